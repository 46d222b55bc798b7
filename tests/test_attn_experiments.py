"""The attn-error and scaling experiments: their cost accounting, memory probe, and a tiny run each."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from poslsh import alibi_slopes, sample_partitions
from poslsh.method import IgnoredOptionWarning
from poslsh_lab.experiments import attn_error, scaling
from poslsh_lab.experiments.attn_error.measure import lsh_pairs, matched_widths, window_pairs
from poslsh_lab.experiments.metrics import cpu_time_and_memory


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_pair_counts_match_dense_masks(causal, scheme):
    n = 40
    parts = sample_partitions(n, alibi_slopes(3), 5, scheme=scheme, generator=torch.Generator().manual_seed(0))
    masks = parts.dense_masks()  # [H, r, n, n]
    if causal:
        masks = masks & torch.ones(n, n, dtype=torch.bool).tril()
    union, total = lsh_pairs(parts, causal)
    assert union.tolist() == masks.any(1).sum((-1, -2)).double().tolist()
    assert total.tolist() == masks.sum((1, 2, 3)).double().tolist()
    widths = torch.tensor([0, 3, 39])
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    band = [((i - j).abs() <= w) & ((j <= i) if causal else True) for w in widths.tolist()]
    assert window_pairs(n, widths, causal).tolist() == [float(b.sum()) for b in band]


def test_matched_widths_are_closest():
    table = window_pairs(50, torch.arange(50), True)
    pairs = torch.tensor([50.0, 300.0, 1275.0])
    w = matched_widths(50, pairs, True)
    assert w[0] == 0 and w[2] == 49
    assert (table - 300).abs().min() == (table[w[1]] - 300).abs()


def test_measure_sees_torch_allocations():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak-RSS reset needs Linux /proc")
    stats = cpu_time_and_memory(lambda: torch.ones(64 * 2**20 // 4).add_(1))
    if stats["peak_rss_delta"] is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 60 * 2**20 <= stats["peak_rss_delta"] <= 200 * 2**20
    assert stats["seconds"] > 0


def test_attn_error_small_run(tmp_path):
    cfg = attn_error.Config(n=48, heads=4, head_dim=8, samples=(1, 4, 16), logit_scales=(0.5, 2.0), seeds=1,
                            plot_heads=(0, 3))
    doc = attn_error.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "attn-error.json").read_text())
    assert saved["config"]["n"] == 48 and "environment" in saved
    curves = saved["results"]["curves"]
    assert {(c["scheme"], c["logit_scale"]) for c in curves} == {(s, x) for s in ("grid", "cut") for x in (0.5, 2.0)}
    for c in curves:
        assert len(c["lsh"]) == 4 and all(len(e) == 3 for e in c["lsh"])
        # The window gets the pair budget LSH-fused used, to within one query's worth of keys.
        for pf, pw in zip(c["pairs_fused"], c["pairs_window"]):
            assert all(abs(a - b) <= 48 for a, b in zip(pf, pw))
    assert (tmp_path / attn_error.design.PLOT).stat().st_size > 10_000
    text = attn_error.summarize(doc, tmp_path)
    assert attn_error.design.PLOT in text and "window baseline" in text and "| grid |" in text


def test_scaling_small_run(tmp_path):
    cfg = scaling.Config(lengths=(256, 512), exact_max=256, heads=2, head_dim=16, samples=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredOptionWarning)  # exact was given window_eps: a warning per run
        doc = scaling.run(cfg, tmp_path)
    rows = doc["results"]["rows"]
    assert [(r["n"], r["method"]) for r in rows] == [(256, m) for m in scaling.design.METHODS] + [
        (512, m) for m in scaling.design.METHODS if m != "exact"]
    assert all(r["seconds"] > 0 for r in rows)
    assert (tmp_path / scaling.design.PLOT).stat().st_size > 10_000
    text = scaling.summarize(doc, tmp_path)
    assert "| 512 |" in text and scaling.design.PLOT in text
    with pytest.raises(ValueError, match="methods must be among"):
        scaling.run(scaling.Config(methods=("magic",)), tmp_path)
