"""poslsh_lab.lm: tokenizer, corpus split, model, trainer, evaluation (tiny sizes, CPU)."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

from poslsh_lab.lm.data import ByteTokenizer, build_corpus, default_roots, is_heldout, unigram_baseline  # noqa: E402
from poslsh_lab.lm.evaluate import layer_errors, perplexity, sliding_windows  # noqa: E402
from poslsh.method import MethodSpec, parse_method  # noqa: E402
from poslsh_lab.lm.model import ALiBiLM, LMConfig, load_checkpoint  # noqa: E402
from poslsh_lab.lm.train import TrainConfig, lr_at, train  # noqa: E402


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' + x  # ünïcode\n"
    ids = tok.encode(text, eos=True)
    assert ids.dtype == np.uint16 and ids[-1] == tok.EOS and ids[:-1].max() < 256
    assert tok.decode(ids[:-1]) == text
    assert tok.vocab_size == 259


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_corpus_split_by_path_never_mixes_and_drops_duplicates(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(60):
        _write(a, f"pkg{i % 7}/mod{i}.py", f"x = {i}\n" * (i + 1))
    _write(a, "notes.txt", "not python")
    _write(b, "vendored/mod3.py", "x = 3\n" * 4)  # same content as a/pkg3/mod3.py: a duplicate
    _write(b, "other.py", "y = 1\n")
    c1 = build_corpus([a, b], max_bytes=10**9, heldout_fraction=0.3)
    c2 = build_corpus([b, a], max_bytes=10**9, heldout_fraction=0.3)
    assert c1.duplicates_dropped == 1 and len(c1.train_files) + len(c1.heldout_files) == 61
    assert not set(c1.train_files) & set(c1.heldout_files)
    assert c1.heldout_files and c1.train_files
    assert all(is_heldout(f, 0.3) for f in c1.heldout_files)
    assert not any(is_heldout(f, 0.3) for f in c1.train_files)
    assert sorted(c1.heldout_files) == sorted(c2.heldout_files)  # the split depends on paths only
    assert np.array_equal(c1.train, build_corpus([a, b], 10**9, 0.3).train)  # deterministic
    assert (c1.train == ByteTokenizer.EOS).sum() == len(c1.train_files)
    capped = build_corpus([a, b], max_bytes=200, heldout_fraction=0.3)
    assert 200 <= capped.train.size + capped.heldout.size < c1.train.size + c1.heldout.size


def test_default_roots_are_this_interpreters_sources():
    roots = default_roots()
    assert Path(sysconfig.get_paths()["stdlib"]).resolve() in roots
    assert all(r.is_dir() for r in roots)


def test_unigram_baseline_by_hand():
    train_tokens = np.array([0, 0, 0, 1], dtype=np.uint16)
    held = np.array([0, 1], dtype=np.uint16)
    out = unigram_baseline(train_tokens, held, vocab_size=2)  # add-one: p0 = 4/6, p1 = 2/6
    expected = -(math.log(4 / 6) + math.log(2 / 6)) / 2
    assert out["nats_per_token"] == pytest.approx(expected)
    assert out["bits_per_token"] == pytest.approx(expected / math.log(2))


def test_parse_method_grammar():
    assert parse_method("exact") == MethodSpec("exact")
    assert parse_method("window:0.01") == MethodSpec("window", window_eps=0.01)
    assert parse_method("lsh") == MethodSpec("lsh", samples=8, scheme="grid")
    assert parse_method("lsh:16:cut").label == "lsh:16:cut"
    assert parse_method("lsh:8:grid:qmc") == MethodSpec("lsh", samples=8, sampling="qmc")
    assert parse_method("lsh:8:grid:iid").label == "lsh:8:grid"  # iid is the default, left out of labels
    assert parse_method("hybrid").label == "hybrid:8:grid" and parse_method("hybrid:4:grid:qmc").random
    for bad in ("lsh:0", "lsh:4:hex", "window:2", "fast", "exact:1", "lsh:x", "lsh:8:grid:sobol",
                "hybrid:8:grid:qmc:0.1:3", "hybrid:8:grid:qmc:0", "window:0.1:grid"):
        with pytest.raises(ValueError, match="bad method"):
            parse_method(bad)
    with pytest.raises(ValueError, match="scheme='cut' supports only sampling='iid'"):
        parse_method("lsh:8:cut:qmc")


def _tiny_model(seed: int = 0) -> ALiBiLM:
    torch.manual_seed(seed)
    return ALiBiLM(LMConfig(d_model=32, n_layers=2, n_heads=4)).eval()


@torch.no_grad()
def test_model_sdpa_training_path_equals_poslsh_exact():
    m = _tiny_model()
    idx = torch.randint(0, 259, (2, 40))
    assert not any("pos" in name for name, _ in m.named_parameters())  # ALiBi only, no position embeddings
    assert (m(idx, sdpa=True) - m(idx, sdpa=False)).abs().max() < 1e-5
    m.set_attention("lsh", samples=2)
    with pytest.raises(ValueError, match="exact"):
        m(idx, sdpa=True)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@torch.no_grad()
def test_lsh_model_partitions_fixed_and_prefix_consistent(scheme):
    m = _tiny_model().set_attention("lsh", samples=3, scheme=scheme, seed=4)
    idx = torch.randint(0, 259, (1, 50))
    full = m(idx)
    assert torch.equal(full, m(idx))  # fixed partitions in eval
    assert (m(idx[:, :23]) - full[:, :23]).abs().max() < 1e-5  # causal + restricted partitions
    other = _tiny_model().set_attention("lsh", samples=3, scheme=scheme, seed=5)(idx)
    assert (other - full).abs().max() > 1e-4  # another seed, other partitions
    exact = _tiny_model().set_attention("exact")(idx)
    assert (full - exact).abs().max() > 1e-4


@torch.no_grad()
def test_hybrid_and_qmc_methods_in_the_model():
    """hybrid (exact near field) is far closer to exact than plain LSH; qmc partitions are fixed per seed and
    differ from iid ones; the cut scheme refuses correlated sampling."""
    m = _tiny_model(2)
    idx = torch.randint(0, 259, (1, 80))
    exact = m(idx)
    err = lambda **kw: float((m.set_attention(**kw)(idx) - exact).norm() / exact.norm())  # noqa: E731
    assert err(method="hybrid", samples=4, sampling="qmc") < err(method="lsh", samples=4, sampling="qmc") / 5
    qmc = m.set_attention("lsh", samples=4, sampling="qmc", seed=1)(idx)
    assert torch.equal(qmc, m(idx)) and not torch.equal(qmc, m.set_attention("lsh", samples=4, seed=1)(idx))
    assert m.set_attention("exact").attention_options["sampling"] == "iid"
    with pytest.raises(ValueError, match="sampling"):
        m.set_attention("lsh", scheme="cut", sampling="qmc")


def test_lr_schedule():
    c = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, c, 100) == pytest.approx(0.1)
    assert lr_at(9, c, 100) == pytest.approx(1.0)
    assert lr_at(10, c, 100) == pytest.approx(1.0)
    assert lr_at(55, c, 100) == pytest.approx(0.55)
    assert lr_at(100, c, 100) == pytest.approx(0.1)


def test_perplexity_windows_align_predictions_with_targets():
    v = 259
    tokens = np.random.default_rng(0).integers(0, 256, 1000).astype(np.uint16)
    stream = torch.from_numpy(tokens.astype(np.int64))

    def oracle(x: torch.Tensor) -> torch.Tensor:
        # Logits that put all mass on the true next token: needs each window's position in the stream.
        out = torch.full((*x.shape, v), -30.0)
        for b in range(x.shape[0]):
            start = next(s for s in range(len(tokens)) if torch.equal(stream[s:s + x.shape[1]], x[b]))
            out[b, torch.arange(x.shape[1]), stream[start + 1:start + 1 + x.shape[1]]] = 30.0
        return out

    res = perplexity(oracle, tokens, 64, device="cpu", batch_size=3, max_scored=None)
    assert res["loss"] < 1e-6
    starts, stride = sliding_windows(tokens.size, 64, 0.5)
    assert stride == 32 and res["scored_tokens"] == len(starts) * 32 and starts[-1] + 65 <= tokens.size
    uniform = perplexity(lambda x: torch.zeros(*x.shape, v), tokens, 64, device="cpu", max_scored=100)
    assert uniform["loss"] == pytest.approx(math.log(v)) and uniform["scored_tokens"] == 128
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(oracle, tokens[:50], 64, device="cpu")


def test_first_target_makes_every_context_score_the_same_tokens():
    targets = {}
    for n in (16, 64, 128):
        starts, stride = sliding_windows(1000, n, 0.5, max_scored=128, first_target=128)
        targets[n] = [s + n + 1 - stride + i for s in starts for i in range(stride)]
    assert targets[16] == targets[64] == targets[128] == list(range(128, 256))
    with pytest.raises(ValueError, match="first_target"):
        sliding_windows(1000, 128, 0.5, first_target=32)  # too little text before it for context 128


@torch.no_grad()
def test_layer_errors_fall_with_samples_and_window_is_tiny():
    m = _tiny_model(1)
    with torch.no_grad():  # sharpen the attention so that it is not uniform
        for attn in m.attention_modules():
            attn.q_proj.weight.mul_(8.0)
    idx = torch.randint(0, 259, (2, 96))
    errs = layer_errors(m, idx, [parse_method("lsh:1"), parse_method("lsh:64"), parse_method("window:1e-3")],
                        seeds=[0, 1, 2])
    assert m.attention_options["method"] == "exact"  # restored
    for layer in range(2):
        assert errs["lsh:64:grid"][layer] < errs["lsh:1:grid"][layer] / 3
        assert errs["window:0.001"][layer] < 1e-2 < errs["lsh:1:grid"][layer]


def test_tiny_training_lowers_the_loss_and_checkpoints(tmp_path):
    corpus = build_corpus(None, max_bytes=2**20, heldout_fraction=0.05)
    cfg = TrainConfig(d_model=32, n_layers=2, n_heads=4, context=32, batch_size=8, steps=40, lr=3e-3, warmup=5,
                      eval_every=20, eval_windows=8, device="cpu")
    res = train(cfg, tmp_path, corpus=corpus)
    # A random byte model starts near ln(259) = 5.56 nats; 40 steps must learn at least the byte statistics.
    assert res["initial_heldout_loss"] > 5.0
    assert res["heldout_loss"] < res["initial_heldout_loss"] - 0.8, res["heldout_loss"]
    for name in ("model.safetensors", "config.json", "history.json", "loss.png"):
        assert (tmp_path / name).is_file()
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["train"]["context"] == 32 and meta["unigram"]["bits_per_token"] > 3
    model, _ = load_checkpoint(tmp_path)
    idx = torch.randint(0, 259, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), res["model"](idx))


def test_time_budget_ends_training_in_time(tmp_path):
    corpus = build_corpus(None, max_bytes=2**19, heldout_fraction=0.05)
    cfg = TrainConfig(d_model=16, n_layers=1, n_heads=2, context=16, batch_size=4, steps=10**6, warmup=5,
                      eval_every=50, eval_windows=4, device="cpu", time_budget_s=2.0)
    res = train(cfg, tmp_path, corpus=corpus)
    assert 50 < res["steps"] < 10**6 and res["train_seconds"] < 2.0 + 1.0
    assert res["history"][-1]["step"] == res["steps"] and "heldout_loss" in res["history"][-1]


def test_lm_cli_train_and_eval(tmp_path, capsys):
    from poslsh_lab.cli import main

    text = tmp_path / "text.txt"
    text.write_text(Path(__file__).read_text())
    out = tmp_path / "ckpt"
    rc = main(["lm", "train", "--out", str(out), "--d-model", "16", "--n-layers", "1", "--n-heads", "2",
               "--context", "16", "--batch-size", "4", "--steps", "6", "--warmup", "2", "--eval-every", "3",
               "--eval-windows", "4", "--max-bytes", str(2**18), "--device", "cpu"])
    assert rc == 0 and (out / "model.safetensors").is_file()
    rc = main(["lm", "eval", "--checkpoint", str(out), "--context", "32", "64", "--methods", "exact", "window",
               "lsh:2:cut", "--text", str(text), "--max-scored", "128"])
    assert rc == 0
    doc = json.loads((out / "lm-eval.json").read_text())
    rows = doc["results"]["rows"]
    assert [(r["context"], r["method"]) for r in rows] == [
        (n, m) for n in (32, 64) for m in ("exact", "window:0.001", "lsh:2:cut")]
    assert all(math.isfinite(r["loss"]) and r["time_per_token"] > 0 for r in rows)
    assert "bits/byte" in capsys.readouterr().out


def test_training_paths_sdpa_and_poslsh_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    m = ALiBiLM(LMConfig(d_model=32, n_layers=2, n_heads=4, train_attention="poslsh")).train()
    x = torch.randint(0, 259, (3, 33))
    grads = []
    for path in ("poslsh", "sdpa"):
        m.config.train_attention = path
        m.zero_grad()
        loss = m.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        grads.append((loss.detach(), m.blocks[0].attn.q_proj.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6) and grads[0][1].abs().max() > 0
