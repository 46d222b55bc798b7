"""``poslsh eval-hf`` on a tiny BLOOM checkpoint with a tokenizer trained here (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalhf")
    text = Path(__file__).read_text() * 3
    (root / "text.txt").write_text(text)
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    model_dir = root / "bloom"
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2,
                                                                   n_head=4, initializer_range=0.3))
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, root / "text.txt"


def test_eval_hf_reports_each_method(checkpoint, tmp_path, capsys):
    from poslsh_lab.cli import main

    model_dir, text = checkpoint
    out = tmp_path / "out"
    rc = main(["eval-hf", "--model", str(model_dir), "--text", str(text), "--context", "32", "64",
               "--methods", "native", "exact", "window", "lsh:2", "--seeds", "0", "1", "--max-scored", "256",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "eval-hf.json").read_text())
    rows = {(r["context"], r["method"]): r for r in doc["results"]["rows"]}
    assert doc["results"]["family"] == "bloom" and doc["results"]["tokens"] > 500
    for n in (32, 64):
        assert rows[(n, "exact")]["ppl"] == pytest.approx(rows[(n, "native")]["ppl"], rel=1e-4)
        assert abs(rows[(n, "lsh:2:grid")]["ppl"] / rows[(n, "exact")]["ppl"] - 1) > 1e-4
        assert rows[(n, "lsh:2:grid")]["seeds"] == [0, 1]
        assert rows[(n, "native")]["tokens_per_second"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_eval_hf_takes_every_method_and_sampling_mode(checkpoint, tmp_path):
    """hybrid (with its eps) and correlated sampling reach transformers models through eval-hf; the
    hybrid with a near field covering the context is exact."""
    from poslsh_lab.cli import main

    model_dir, text = checkpoint
    out = tmp_path / "out"
    assert main(["eval-hf", "--model", str(model_dir), "--text", str(text), "--context", "32", "--methods", "exact",
                 "hybrid:2:grid:qmc", "hybrid:2:grid:iid:1e-9", "lsh:4:grid:stratified", "--max-scored", "64",
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "eval-hf.json").read_text())["results"]["rows"]}
    assert set(rows) == {"exact", "hybrid:2:grid:qmc", "hybrid:2:grid:iid:1e-09", "lsh:4:grid:stratified"}
    assert rows["hybrid:2:grid:iid:1e-09"]["ppl"] == pytest.approx(rows["exact"]["ppl"], rel=1e-5)
    assert abs(rows["lsh:4:grid:stratified"]["ppl"] / rows["exact"]["ppl"] - 1) > 1e-4


def _run(capsys, *argv):
    from poslsh_lab.cli import main

    rc = main(["eval-hf", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_eval_hf_checks_its_inputs_first(checkpoint, tmp_path, capsys):
    """Each missing requirement is one line and exit status 2, before any model is loaded or scored
    (local files only: a missing folder never turns into a model hub request)."""
    model_dir, text = checkpoint
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    cases = [
        (("--model", tmp_path / "nope", "--text", text, "--context", 8), r"--model \S*nope does not exist"),
        (("--model", text, "--text", text, "--context", 8), r"--model \S*text.txt is not a folder"),
        (("--model", tmp_path, "--text", text, "--context", 8), r"has no config.json: not a saved transformers"),
        (("--model", model_dir, "--text", tmp_path / "none.txt", "--context", 8), r"--text \S*none.txt does not exist"),
        (("--model", model_dir, "--text", short, "--context", 64),
         r"short.txt has \d+ tokens, fewer than one window of context 64 \+ 1: give a longer --text"),
        (("--model", model_dir, "--text", text, "--context", 8, "--methods", "exact", "lsh:8:cut:qmc"),
         r"bad method 'lsh:8:cut:qmc': scheme='cut' supports only sampling='iid'"),
        (("--model", model_dir, "--text", text, "--context", 8, "--device", "cuda:0"),
         r"--device cuda:0 needs CUDA, and torch \S+ sees no CUDA device"),
    ]
    import re

    for argv, pattern in cases:
        if "cuda" in pattern and torch.cuda.is_available():
            continue
        rc, err = _run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("poslsh eval-hf: error: "), (argv, err)
        assert re.search(pattern, lines[0]), (pattern, lines[0])
