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
from poslsh_lab.experiments import pareto
from poslsh_lab.experiments.metrics import keys_per_query, relative_error
from poslsh_lab.util import load_results


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method", ["exact", "window", "lsh", "hybrid"])
def test_keys_per_query_counts_the_union_of_nonzero_weights(method, causal):
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
    assert keys_per_query(spec, n, n) == pytest.approx(float((last - first + 1).double().mean()))


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


def _tiny(**overrides) -> pareto.Config:
    """A configuration that runs in about a second on one CPU thread."""
    cfg = dict(n=(96,), heads=2, head_dim=8, window_eps=(0.3, 1e-2), samples=(2, 4), hybrid_eps=(0.1,),
               hybrid_samples=(2,), heavy_n=64, heavy_heads=2, heavy_window_eps=(0.3, 0.1), heavy_hybrid_near=(4,),
               conv_n=24, conv_samples=(4, 8, 16), conv_seeds=1, fit_from=4, seeds=1, repeats=1)
    return pareto.Config(**{**cfg, **overrides})


def test_small_run(tmp_path):
    doc = pareto.run(_tiny(n=(96, 64)), tmp_path)
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["config"]["n"] == [96, 64] and saved["results"]["partial"] is False
    res = saved["results"]
    assert set(res["convergence"]["modes"]) == {"iid", "stratified", "qmc"}
    panels = res["alibi"] + [res["heavy"]]
    assert [p["n"] for p in panels] == [96, 64, 64]
    for panel in panels:
        methods = {p["method"] for p in panel["points"]}
        assert methods == {"exact", "window", "lsh", "hybrid"}
        assert all(p["error"] >= 0 and p["seconds"] >= 0 and p["backend"] == "fused" for p in panel["points"])
        exact = next(p for p in panel["points"] if p["method"] == "exact")
        assert exact["error"] < 1e-5  # float32 exact against the float64 reference
        assert panel["reference"]["dtype"] == "float64"
    assert res["heavy"]["kernel"].startswith("power_law")
    assert (tmp_path / pareto.PLOT).stat().st_size > 0 and (tmp_path / pareto.PLOT_CONV).stat().st_size > 0
    text = pareto.summarize(doc, tmp_path)
    assert "At equal keys per query" in text and "sampling" in text and "Partial" not in text


def test_the_same_config_draws_the_same_partitions(tmp_path):
    """Seeds come from a process-independent hash, so a rerun reproduces every LSH error."""
    cfg = _tiny(heavy_n=0, convergence=False, window_eps=(0.3,), hybrid_eps=(), plots=False)
    errors = [[p["error"] for p in pareto.run(cfg, tmp_path / str(i))["results"]["alibi"][0]["points"]]
              for i in range(2)]
    assert errors[0] == errors[1]


def test_error_rows_cuts_only_the_reference(tmp_path):
    """error_rows = n measures exactly what the full reference does; fewer rows measure the last rows
    (the reference is exact attention of those query rows alone, which must agree with the last rows
    of the full exact output to float64 rounding)."""
    cfg = dict(heavy_n=0, convergence=False, window_eps=(0.3,), hybrid_eps=(0.1,), plots=False)
    full = pareto.run(_tiny(**cfg), tmp_path / "full")["results"]["alibi"][0]["points"]
    same = pareto.run(_tiny(error_rows=96, **cfg), tmp_path / "same")["results"]["alibi"][0]["points"]
    assert [p["error"] for p in full] == pytest.approx([p["error"] for p in same], rel=1e-9, abs=1e-12)
    last = pareto.run(_tiny(error_rows=17, **cfg), tmp_path / "last")["results"]["alibi"][0]["points"]
    exact = next(p for p in last if p["method"] == "exact")
    assert exact["error"] < 1e-5 and [p["error"] for p in last] != [p["error"] for p in full]
    doc = load_results(tmp_path / "last" / "pareto.json")
    assert "over the last 17 query rows" in pareto.summarize(doc, tmp_path / "last")


def test_budget_skips_the_remaining_points(tmp_path):
    """Past ``budget_s`` every point not started is recorded as skipped; the run still completes, and
    the summary, README section and plot say what was not measured."""
    doc = pareto.run(_tiny(budget_s=1e-9, convergence=False), tmp_path)
    res = doc["results"]
    assert res["partial"] is False
    points = res["alibi"][0]["points"] + res["heavy"]["points"]
    assert points and all(p["skipped"] == "time budget" and "error" not in p for p in points)
    assert len(res["alibi"][0]["points"]) == 1 + 2 + 1 + 2 * 3  # exact, windows, hybrid, lsh (r x sampling)
    assert "time budget" in pareto.summarize(doc, tmp_path) and "Partial run" in pareto.readme_section(doc)
    # nothing measured: no verdict either way, only what was not measured
    assert "No comparison" in pareto.readme_section(doc) and "as accurate" not in pareto.readme_section(doc)
    assert not (tmp_path / pareto.PLOT).exists()  # nothing measured, nothing to draw


def test_interrupted_run_leaves_a_loadable_partial_json_that_replots(tmp_path, monkeypatch):
    """The JSON is rewritten after every point: a run killed mid-way leaves a complete file marked
    partial, which --replot draws and the README section renders."""
    measure = pareto.measure._point
    calls = []

    def dies_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # not an Exception: nothing in the run may swallow it
        return measure(*args, **kwargs)

    monkeypatch.setattr(pareto.measure, "_point", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        pareto.run(_tiny(convergence=False), tmp_path / "run")
    saved = load_results(tmp_path / "run" / "pareto.json")
    assert saved["results"]["partial"] is True and saved["results"]["heavy"] is None
    assert [p["method"] for p in saved["results"]["alibi"][0]["points"]] == ["exact", "window", "window"]
    assert not list((tmp_path / "run").glob("*.tmp"))

    replot = pareto.run(pareto.Config(replot=str(tmp_path / "run" / "pareto.json")), tmp_path / "plots")
    assert replot == saved and (tmp_path / "plots" / pareto.PLOT).stat().st_size > 0
    assert "Partial run" in pareto.readme_section(saved) and "Partial run" in pareto.summarize(saved, tmp_path)


def test_a_failing_point_is_recorded_and_the_rest_measured(tmp_path, monkeypatch):
    point = pareto.measure._point

    def hybrid_breaks(config, method, *args):
        if method == "hybrid":
            raise RuntimeError("compiler exploded")
        return point(config, method, *args)

    monkeypatch.setattr(pareto.measure, "_point", hybrid_breaks)
    doc = pareto.run(_tiny(convergence=False, heavy_n=0, plots=False), tmp_path)
    points = doc["results"]["alibi"][0]["points"]
    failed = [p for p in points if "failed" in p]
    assert [p["method"] for p in failed] == ["hybrid"] and "compiler exploded" in failed[0]["failed"]
    assert len(pareto.measured(points)) == len(points) - 1
    assert "1 point(s): failed" in pareto.readme_section(doc)


def test_replot_names_a_missing_file():
    with pytest.raises(ValueError, match="replot"):
        pareto.run(pareto.Config(replot="/nonexistent/pareto.json"), "/tmp")


def _gpu_like_doc() -> dict:
    """A bfloat16 run's document, synthetic: exact attention has a rounding error of 2e-3, the hybrid
    reaches it (a tie, not a win), an LSH point beats the window at equal time on another backend."""
    pt = lambda method, error, ms, pairs, backend, **opts: dict(  # noqa: E731
        method=method, **opts, error=error, errors=[error], seconds=ms / 1e3, timing="do_bench median",
        pairs=pairs, backend=backend)
    points = [pt("exact", 2e-3, 1500.0, 131072.5, "flex"),
              pt("window", 3e-2, 3.0, 100.0, "flex", window_eps=3e-2),
              pt("window", 2.5e-3, 9.0, 350.0, "flex", window_eps=1e-3),
              pt("hybrid", 2.4e-3, 20.0, 600.0, "triton", sampling="qmc", samples=8, hybrid_eps=1e-3),
              pt("lsh", 1e-2, 4.0, 200.0, "triton", sampling="qmc", samples=8),
              {"method": "lsh", "sampling": "iid", "samples": 32, "skipped": "time budget"}]
    return {"environment": {"device": "NVIDIA H200"},
            "config": {"device": "cuda", "backend": "auto", "dtype": "bfloat16", "reference_dtype": "float32",
                       "head_dim": 128, "threads": 0, "fit_from": 8},
            "results": {"partial": False, "convergence": None, "heavy": None, "seconds": 100.0,
                        "alibi": [{"n": 262144, "heads": 32, "kernel": None, "points": points,
                                   "reference": {"backend": "flex", "dtype": "float32", "wall_seconds": 20.0}}]}}


def test_readme_section_reads_a_gpu_run():
    text = pareto.readme_section(_gpu_like_doc())
    assert "on NVIDIA H200 (auto backend, bfloat16)" in text
    assert "**At equal time: lsh qmc r=8 is at least as accurate" in text  # 1e-2 < the window's ~2e-2 at 4 ms
    assert "hybrid qmc r=8 eps=0.001 only ties it at the rounding floor (exact attention's own error 2.00e-03)" in text
    assert "window and exact on flex, LSH and hybrid on triton" in text
    assert "1 point(s): time budget" in text and "Partial run" in text
    assert "Floor: in bfloat16, exact attention itself is 2.00e-03 (n = 262144)" in text
    assert text.count("Where the window stays ahead, why") == 1


def test_replot_of_a_gpu_run(tmp_path):
    """``--replot`` (the CLI) and ``replot(doc, out_dir)`` (the module function) draw from the JSON alone."""
    path = tmp_path / "pareto.json"
    path.write_text(json.dumps(_gpu_like_doc()))
    pareto.run(pareto.Config(replot=str(path)), tmp_path / "out")
    assert (tmp_path / "out" / pareto.PLOT).stat().st_size > 0 and not (tmp_path / "out" / pareto.PLOT_CONV).exists()
    assert pareto.replot(_gpu_like_doc(), tmp_path / "again") == [tmp_path / "again" / pareto.PLOT]


def test_readme_renders_the_gpu_json_under_its_title(tmp_path, monkeypatch):
    """Once bench/results/pareto_h200/pareto.json is committed, docs/RESULTS.md gains its section."""
    from poslsh_lab import readme

    doc = _gpu_like_doc()
    doc["environment"].update(date="2026-12-01T00:00:00+00:00", torch="2.11.0", triton="3.6.0",
                              command="poslsh pareto --device cuda")
    (tmp_path / "bench" / "results" / "pareto_h200").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "pareto_h200" / "pareto.json").write_text(json.dumps(doc))
    monkeypatch.setattr(readme, "ROOT", tmp_path)
    monkeypatch.setattr(readme, "RESULTS", tmp_path / "bench" / "results")
    monkeypatch.setattr(readme, "RESULTS_MD", tmp_path / "docs" / "RESULTS.md")
    text = readme.render_results()
    heading = next(s.heading for s in readme.SECTIONS if s.path == "pareto_h200/pareto.json")
    assert f"## {heading}\n\n{pareto.readme_section(doc)}" in text
    assert "](../bench/results/pareto_h200/pareto.json)" in text


@pytest.mark.parametrize("method", ["exact", "window"])
def test_flex_is_timed_with_its_block_mask_built_once(method):
    """On the GPU the Flex call is timed with a prebuilt block mask; it computes what the backend's
    own call does (run here eagerly on the CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from poslsh.attention.dispatch import BACKENDS, available_backends

    assert "flex" in available_backends()
    q, k, v = pareto.measure._inputs(64, 2, 16, torch.float32, torch.device("cpu"), seed=0, query_scale=2.0)
    spec = resolve_spec(q, k, v, slopes=alibi_slopes(2), causal=True, method=method, window_eps=0.1)
    out = pareto.measure._forward(BACKENDS["flex"], spec, 64, 64, q.device)(q, k, v)
    assert relative_error(out, BACKENDS["fused"](q, k, v, spec)[0]) < 1e-5
    # the reference of the last rows only (error_rows): its block mask must be built for those rows
    last = q[:, :, -17:]
    spec_last = resolve_spec(last, k, v, slopes=alibi_slopes(2), causal=True, method=method, window_eps=0.1)
    out_last = pareto.measure._forward(BACKENDS["flex"], spec_last, 17, 64, q.device)(last, k, v)
    assert relative_error(out_last, out[:, :, -17:]) < 1e-5
