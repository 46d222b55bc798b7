"""The LM validation experiment at its --tiny size: the whole pipeline on the CPU in under a minute."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("safetensors")

from poslsh.experiments import lm_validation as lv  # noqa: E402
from poslsh.experiments.common import load_results  # noqa: E402


def test_tiny_validation_runs_end_to_end(tmp_path):
    config = lv.Config(tiny=True)
    doc = lv.run(config, tmp_path)
    res = doc["results"]
    assert res["seconds"] < 60
    cfg = lv.effective(config)
    methods = lv._methods(cfg)
    assert len(methods) == 2 + 2 * 6
    rows = [r for r in res["rows"] if "loss" in r]
    assert sorted({r["context"] for r in rows}) == [64, 256]
    assert len(rows) == 2 * len(methods) and all(math.isfinite(r["loss"]) for r in rows)
    # Training happened and lowered the held-out loss.
    assert res["training"]["heldout_loss"] < res["training"]["initial_heldout_loss"] - 0.5
    errs = res["layer_errors"]["errors"]
    assert set(errs) == set(methods[1:]) and all(len(v) == 2 for v in errs.values())
    # Per-layer error falls with r (averaged over layers and both schemes: r = 32 vs r = 1).
    mean = lambda r: sum(sum(errs[f"lsh:{r}:{s}"]) for s in cfg.schemes)  # noqa: E731
    assert mean(32) < mean(1) / 2.5
    for png in ("lm_validation_gap.png", "lm_validation_layers.png", "lm_validation_context.png",
                "lm_checkpoint/loss.png"):
        assert (tmp_path / png).is_file()
    reloaded = load_results(tmp_path / f"{lv.NAME}.json")
    text = lv.summarize(reloaded, tmp_path)
    assert "| exact |" in text and "1/sqrt(r)" in text and "window baseline" in text
