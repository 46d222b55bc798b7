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
    from poslsh.cli import main

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


def test_eval_hf_missing_model_is_a_clean_error(tmp_path):
    from poslsh.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval-hf", "--model", str(tmp_path / "nope"), "--text", str(text), "--context", "8"]) == 2


@pytest.mark.parametrize("method", ["hybrid:8", "lsh:8:grid:qmc"])
def test_eval_hf_refuses_methods_the_patch_does_not_compute(tmp_path, method, capsys):
    """The LM's method grammar is wider than the transformers patch: refused before any loading."""
    from poslsh.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval-hf", "--model", str(tmp_path / "nope"), "--text", str(text), "--context", "8",
                 "--methods", "exact", method]) == 2
    assert f"method {method!r} is not available for transformers models" in capsys.readouterr().err
