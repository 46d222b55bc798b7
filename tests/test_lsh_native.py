"""Positional-LSH-native training (issue 14): fresh partitions per step from a seed schedule, in the module
and the LM; a tiny native run whose loss falls (and a broken one that cannot); reproducibility; fixed
partitions in evaluation; the trainer's new options. CPU, tiny sizes, fixed seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

import poslsh.nn as pnn  # noqa: E402
from poslsh.hashing import Partitions  # noqa: E402
from poslsh_lab.lm.cli import evaluate_checkpoint  # noqa: E402
from poslsh_lab.lm.data import Corpus  # noqa: E402
from poslsh.method import parse_method  # noqa: E402
from poslsh_lab.lm.model import ALiBiLM, LMConfig, TrainingPartitionSeeds, load_checkpoint  # noqa: E402
from poslsh_lab.lm.train import TrainConfig, train  # noqa: E402
from poslsh.nn import ALiBiAttention  # noqa: E402

ALPHABET = 16
LN_ALPHABET = math.log(ALPHABET)


def skip_one_stream(n: int, seed: int, repeat: float = 0.9) -> np.ndarray:
    """Tokens over 16 symbols where x[t+1] = x[t-1] with probability 0.9 (else a fresh uniform symbol).

    The symbols are uniform and x[t-1] is independent of x[t], so a model that sees only the current token
    (no context) cannot go below ln 16 = 2.77 nats per token; one that sees the previous token reaches ~0.6.
    """
    rng = np.random.default_rng(seed)
    fresh, symbols = rng.random(n) > repeat, rng.integers(0, ALPHABET, n)
    x = symbols.astype(np.uint16)
    for t in range(2, n):
        if not fresh[t]:
            x[t] = x[t - 2]
    return x


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(skip_one_stream(100_000, 0), skip_one_stream(10_000, 1))


def tiny_config(**kw) -> TrainConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, context=32, batch_size=8, steps=200, lr=1e-2, warmup=5,
                eval_every=200, eval_windows=16, device="cpu", train_attention="lsh:4:grid")
    return TrainConfig(**{**base, **kw})


def widths(p: Partitions) -> torch.Tensor:
    return torch.cat([p.widths, p.offsets], 1)


def test_module_schedule_draws_fresh_reproducible_partitions_without_the_global_rng():
    m = ALiBiAttention(16, 4, method="lsh", samples=3).train()
    assert m.partition_schedule is None
    m.set_partition_schedule(lambda step: 1000 + step, step=5)
    state = torch.get_rng_state()
    drawn = [widths(m.partitions_for(64, torch.device("cpu"))) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert m.partition_step == 8  # advanced once per training draw
    assert not torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[1], drawn[2])
    replay = ALiBiAttention(16, 4, method="lsh", samples=3).set_partition_schedule(lambda step: 1000 + step, step=6)
    assert torch.equal(widths(replay.partitions_for(64, torch.device("cpu"))), drawn[1])  # step 6 again
    m.eval()  # eval partitions are fixed and ignore the schedule
    fixed = widths(m.partitions_for(64, torch.device("cpu")))
    assert torch.equal(fixed, widths(m.partitions_for(64, torch.device("cpu")))) and m.partition_step == 8
    m.train().set_partition_schedule(None)  # back to the global RNG
    m.partitions_for(64, torch.device("cpu"))
    assert not torch.equal(torch.get_rng_state(), state)


def test_lm_training_partitions_differ_per_layer_and_step_and_follow_the_seed():
    def draws(seed: int) -> dict[tuple[int, int], torch.Tensor]:
        m = ALiBiLM(LMConfig(d_model=32, n_layers=3, n_heads=4)).set_attention("lsh", samples=4).train()
        out = {}
        for step in range(3):
            m.set_partition_schedule(seed, step)
            for layer, attn in enumerate(m.attention_modules()):
                out[(layer, step)] = widths(attn.partitions_for(40, torch.device("cpu")))
        return out

    a, b, c = draws(0), draws(0), draws(1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same partitions
    assert all(not torch.equal(a[k], c[k]) for k in a)  # another seed, other partitions
    keys = list(a)
    assert all(not torch.equal(a[i], a[j]) for n, i in enumerate(keys) for j in keys[n + 1:])  # every (layer, step)
    assert TrainingPartitionSeeds(0, 1)(2) != TrainingPartitionSeeds(0, 2)(1)

    m = ALiBiLM(LMConfig(d_model=32, n_layers=2, n_heads=4)).set_attention("lsh", samples=2).train()
    idx = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    step3 = m.set_partition_schedule(7, 3)(idx)
    assert torch.equal(step3, m.set_partition_schedule(7, 3)(idx))  # a step replays exactly
    assert not torch.equal(step3, m.set_partition_schedule(7, 4)(idx))  # the next step has new partitions


def test_native_training_learns_context_and_singleton_blocks_cannot(corpus, monkeypatch, tmp_path):
    """LSH-native training (r = 4, fresh partitions every step) must get well below ln 16, the floor of any
    model that sees no context; the same training with every block a single position (no token sees
    another: a broken sampler) must stay at that floor, so the margin tells the two apart."""
    res = train(tiny_config(), tmp_path / "native", corpus=corpus)
    assert res["initial_heldout_loss"] > 5.0  # a random byte model: ~ln 259
    assert res["heldout_loss"] < LN_ALPHABET - 0.5, res["heldout_loss"]
    assert res["train_attention"] == "lsh:4:grid" and res["tokens"] == 200 * 8 * 32

    def singletons(n, slopes, samples, **kw):
        h = len(slopes)
        ones = torch.ones(h, samples, dtype=torch.int64)
        return Partitions(n, torch.as_tensor(slopes, dtype=torch.float64), "grid", widths=ones,
                          offsets=torch.zeros_like(ones))

    monkeypatch.setattr(pnn, "sample_partitions", singletons)
    broken = train(tiny_config(), tmp_path / "broken", corpus=corpus)
    assert broken["heldout_loss"] > LN_ALPHABET - 0.1, broken["heldout_loss"]


def test_same_seeds_same_run_other_partition_seed_other_run(corpus, tmp_path):
    def losses(**kw) -> tuple[list[float], ALiBiLM]:
        res = train(tiny_config(steps=20, eval_every=20, **kw), tmp_path / "ckpt", corpus=corpus)
        return [h["train_loss"] for h in res["history"] if "train_loss" in h], res["model"]

    (a, ma), (b, mb), (c, _) = losses(), losses(), losses(partition_seed=1)
    assert a == b and all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))
    assert all(x != y for x, y in zip(a, c))  # same initialisation and data, other partitions at every step


def test_evaluation_with_fixed_partitions_is_deterministic(corpus, tmp_path):
    res = train(tiny_config(steps=20, eval_every=20), tmp_path / "ckpt", corpus=corpus)
    model = res["model"]
    assert not model.training and model.attention_options["method"] == "lsh"
    specs = [parse_method("lsh:4:grid"), parse_method("lsh:2:cut")]
    rows = [evaluate_checkpoint(model, corpus.heldout, [64], specs, [0], device="cpu",
                                batch_size=2, max_scored=256) for _ in range(2)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    idx = torch.from_numpy(corpus.heldout[:65].astype(np.int64))[None]
    model.set_attention("lsh", samples=4, seed=3)
    with torch.no_grad():
        first = model(idx)
        model.set_partition_schedule(0, 99)  # the training schedule does not reach evaluation
        assert torch.equal(first, model(idx))
        assert not torch.equal(first, model.set_attention("lsh", samples=4, seed=4)(idx))


def test_train_attention_and_init_checkpoint(corpus, tmp_path):
    with pytest.raises(ValueError, match="train_attention must be 'sdpa' or a method"):
        train(tiny_config(train_attention="lsh:0"), tmp_path / "bad", corpus=corpus)
    exact = train(tiny_config(steps=10, eval_every=10, train_attention="sdpa"), tmp_path / "exact", corpus=corpus)
    # lr = 0 from the exact model's weights: fine-tuning changes nothing, so the weights must be the loaded ones.
    tuned = train(tiny_config(steps=2, eval_every=2, lr=0.0, init_checkpoint=str(tmp_path / "exact")),
                  tmp_path / "tuned", corpus=corpus)
    state = exact["model"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in tuned["model"].state_dict().items())
    assert tuned["initial_heldout_loss"] < exact["initial_heldout_loss"] - 1  # it starts trained, not at ~ln 259
    with pytest.raises(ValueError, match="init_checkpoint .* d_model=32"):
        train(tiny_config(d_model=16, n_heads=2, init_checkpoint=str(tmp_path / "exact")), tmp_path / "x",
              corpus=corpus)


def test_lm_train_cli_attention_flag(tmp_path, capsys):
    from poslsh_lab.cli import main

    out = tmp_path / "ckpt"
    rc = main(["lm", "train", "--out", str(out), "--attention", "lsh:2:cut", "--d-model", "16", "--n-layers", "1",
               "--n-heads", "2", "--context", "16", "--batch-size", "4", "--steps", "4", "--warmup", "2",
               "--eval-every", "2", "--eval-windows", "4", "--max-bytes", str(2**18), "--device", "cpu"])
    assert rc == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["train"]["train_attention"] == "lsh:2:cut" and meta["summary"]["train_attention"] == "lsh:2:cut"
    model, _ = load_checkpoint(out)
    assert model.config.train_attention == "poslsh"
    assert main(["lm", "train", "--out", str(out), "--attention", "lsh:8:cut:qmc", "--device", "cpu"]) == 2
    assert "train_attention must be" in capsys.readouterr().err
