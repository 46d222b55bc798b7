"""The pareto experiment: its cost accounting (keys per query), the baseline interpolation it judges
by, and a tiny end-to-end run (JSON, plots, summary)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from poslsh import alibi_slopes
from poslsh.attention.dispatch import resolve_spec
from poslsh.attention.reference import dense_log_weights
from poslsh.experiments import pareto


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["exact", "window", "lsh", "hybrid"])
def test_pairs_per_query_counts_the_union_of_nonzero_weights(method, causal):
    """keys/query equals the span from the first to the last nonzero weight of each row (weights are
    contiguous: band, union of blocks, or both), counted on the dense reference weights."""
    n, h = 60, 3
    q = k = v = torch.zeros(1, h, n, 4, dtype=torch.float64)
    spec = resolve_spec(q, k, v, slopes=alibi_slopes(h), causal=causal, method=method, samples=3,
                        window_eps=0.1, hybrid_eps=0.2, generator=torch.Generator().manual_seed(0))
    nonzero = dense_log_weights(spec, n, n, torch.device("cpu")) > -math.inf  # [H, n, n]
    pos = torch.arange(n).expand(h, n, n)
    first = torch.where(nonzero, pos, n).amin(-1)
    last = torch.where(nonzero, pos, -1).amax(-1)
    assert pareto.pairs_per_query(spec, n) == pytest.approx(float((last - first + 1).double().mean()))


def test_baseline_interpolates_the_window_envelope():
    pts = [{"method": "window", "pairs": 10.0, "seconds": 1.0, "error": 1e-1},
           {"method": "window", "pairs": 40.0, "seconds": 2.0, "error": 1e-3},
           {"method": "window", "pairs": 50.0, "seconds": 3.0, "error": 1e-2},  # dominated: ignored
           {"method": "exact", "pairs": 1000.0, "seconds": 10.0, "error": 1e-7}]
    assert pareto.baseline_error_at(pts, 5.0, "pairs") is None
    assert pareto.baseline_error_at(pts, 20.0, "pairs") == pytest.approx(1e-2)  # halfway in log-log
    assert pareto.baseline_error_at(pts, 45.0, "pairs") < 1e-3
    assert pareto.baseline_error_at(pts, 40.0, "pairs") == pytest.approx(1e-3)
    gaps = pareto.frontier_gaps(pts + [{"method": "lsh", "sampling": "qmc", "samples": 4, "pairs": 20.0,
                                        "seconds": 0.5, "error": 5e-3}])
    assert gaps[0]["ratio_pairs"] == pytest.approx(0.5) and gaps[0]["ratio_seconds"] is None


def test_small_run(tmp_path):
    cfg = pareto.Config(n=96, heads=2, head_dim=8, window_eps=(0.3, 1e-2), samples=(2, 4), hybrid_eps=(0.1,),
                        hybrid_samples=(2,), heavy_n=64, heavy_heads=2, heavy_window_eps=(0.3, 0.1),
                        heavy_hybrid_near=(4,), conv_n=24, conv_samples=(4, 8, 16), conv_seeds=1, fit_from=4,
                        seeds=1, repeats=1)
    doc = pareto.run(cfg, tmp_path)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["config"]["n"] == 96
    res = saved["results"]
    assert set(res["convergence"]["modes"]) == {"iid", "stratified", "qmc"}
    for panel in ("alibi", "heavy"):
        methods = {p["method"] for p in res[panel]["points"]}
        assert methods == {"exact", "window", "lsh", "hybrid"}
        assert all(p["error"] >= 0 and p["seconds"] >= 0 and p["backend"] == "fused" for p in res[panel]["points"])
        exact = next(p for p in res[panel]["points"] if p["method"] == "exact")
        assert exact["error"] < 1e-5  # float32 exact against the float64 reference
    assert res["heavy"]["kernel"].startswith("power_law")
    assert (tmp_path / pareto.PLOT).stat().st_size > 0 and (tmp_path / pareto.PLOT_CONV).stat().st_size > 0
    text = pareto.summarize(doc, tmp_path)
    assert "At equal keys per query" in text and "sampling" in text
