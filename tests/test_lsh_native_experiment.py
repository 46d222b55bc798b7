"""The lsh-native experiment at its --tiny size: the whole pipeline on the CPU in seconds, a run whose
deadline hits during training and during evaluation, a killed run, re-plotting from the JSON alone, the
verdict from hand-made rows, the job order and eval batches, and the Triton pre-compilation worker
(under Triton's CPU interpreter)."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import types

import pytest

pytest.importorskip("safetensors")

from poslsh_lab.experiments import lsh_native as ln  # noqa: E402
from poslsh_lab.util import load_results  # noqa: E402

# A smaller grid for the runs that test the bookkeeping rather than the numbers.
SMALL = dict(tiny=True, samples=(1, 4), native=("lsh:4:grid",), optional_native=(), fill_schemes=(), fill_methods=(),
             contexts=(32, 64))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full --tiny run shared by the tests below: (out folder, document)."""
    root = tmp_path_factory.mktemp("lsh_native")
    doc = ln.run(ln.Config(tiny=True, checkpoint_dir=str(root / "ckpt")), root / "out")
    return root / "out", doc


def test_tiny_run_trains_every_arm_and_measures_every_row(tiny_run):
    out, doc = tiny_run
    res = doc["results"]
    cfg = ln.effective(ln.Config(tiny=True))
    assert not res["partial"] and res["seconds"] < 60
    arms = {a["name"]: a for a in res["arms"]}
    assert list(arms) == ["exact", "lsh:4:grid", "lsh:1:grid", "exact+lsh:8:grid", "lsh:4:grid:qmc"]
    steps = arms["exact"]["steps"]
    assert steps == cfg.max_steps and all(arms[m]["steps"] == steps and arms[m]["token_budget_met"]
                                          for m in ("lsh:4:grid", "lsh:1:grid", "lsh:4:grid:qmc"))
    assert arms["exact+lsh:8:grid"]["steps"] == round(0.1 * steps)
    assert all(a["tokens"] == a["steps"] * cfg.batch_size * cfg.train_context for a in arms.values())
    assert all(a["heldout_bits_per_byte"] < a["initial_heldout_bits_per_byte"] - 0.5 for a in arms.values()
               if a["kind"] != "finetune")
    # Every arm x context x main method, and arm (a)'s fill rows, measured once, finite.
    rows = {(r["arm"], r["context"], r["method"]): r for r in res["rows"]}
    want = {(a, n, m) for a in arms for n in cfg.contexts for m in ln.main_methods(cfg)}
    want |= {("exact", n, m) for n in cfg.contexts for m in ln.fill_methods(cfg)}
    assert set(rows) == want and len(res["rows"]) == len(want)
    assert all(math.isfinite(r["bits_per_token"]) and r["wall_seconds"] > 0 for r in rows.values())
    assert {r["scored_tokens"] for r in rows.values()} == {cfg.scored_tokens} and res["scored_from"] == 256
    assert "lsh:16:cut" in ln.fill_methods(cfg) and "hybrid:8:grid:qmc" in ln.fill_methods(cfg)
    timed = {(t["context"], t["method"]) for t in res["timings"]}
    assert timed == {(n, m) for n in cfg.contexts for m in ln.main_methods(cfg) + ln.fill_methods(cfg)}
    assert all(t["attention_us_per_token"] > 0 for t in res["timings"])
    errs = res["layer_errors"]
    assert set(errs) == set(arms) and all(len(v) == cfg.n_layers for e in errs.values() for v in e["errors"].values())
    assert "lsh:2:cut" in errs["exact"]["errors"] and "lsh:2:cut" not in errs["lsh:4:grid"]["errors"]
    # Small files only in --out; the weights are in the checkpoint folder.
    assert {p.name for p in out.iterdir()} == {f"{ln.NAME}.json", *ln.PLOTS.values()}
    text = ln.summarize(load_results(out / f"{ln.NAME}.json"), out)
    assert "**Verdict**" in text and "not measured" not in text and "Partial" not in text
    assert "| exact | sdpa | 40 |" in text and "lm-validation" in text and "Extrapolation" in text


def test_deadline_during_training_skips_arms_and_rows(tmp_path):
    """A deadline that leaves no time after arm (a): the other arms are skipped with the reason, and so is
    every evaluation job; the JSON is complete and says so."""
    doc = ln.run(ln.Config(**SMALL, deadline_s=5.0, eval_reserve_s=4.0, checkpoint_dir=str(tmp_path / "c")),
                 tmp_path / "out")
    res = doc["results"]
    assert not res["partial"] and res["seconds"] < 20
    arms = {a["name"]: a for a in res["arms"]}
    assert "steps" in arms["exact"] and arms["exact"]["time_budget_s"] == 1.0
    assert arms["lsh:4:grid"]["skipped"].startswith("deadline")
    assert all("skipped" in r for r in res["rows"] + res["timings"]) and res["rows"]
    assert {r["skipped"].split(" ")[0] for r in res["rows"]} == {"deadline", "arm"}
    text = ln.summarize(doc, tmp_path)
    assert "did not run" in text and "Verdict not measured" in text


def test_deadline_during_evaluation_records_the_rest_as_skipped(tmp_path, monkeypatch):
    """The clock jumps past the deadline after the third row: every later job is recorded as skipped."""
    jump = [0.0]
    fake = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + jump[0])
    real_row = ln.measure._row
    done = []

    def row_then_late(*args, **kwargs):
        done.append(1)
        if len(done) == 3:
            jump[0] = 1e6
        return real_row(*args, **kwargs)

    monkeypatch.setattr(ln.measure, "time", fake)
    monkeypatch.setattr(ln.measure, "_row", row_then_late)
    doc = ln.run(ln.Config(**SMALL, deadline_s=3600.0, checkpoint_dir=str(tmp_path / "c")), tmp_path / "out")
    res = doc["results"]
    measured = [r for r in res["rows"] if "loss" in r]
    assert not res["partial"] and len(measured) == 3
    assert len(res["rows"]) == 3 * 2 * (2 + 2)  # every job is accounted for: 3 arms, 2 contexts, 4 methods
    assert all(r["skipped"].startswith("deadline") for r in res["rows"] if "loss" not in r)
    assert all(v.get("skipped") == "deadline (expected 0 s)" for v in res["layer_errors"].values())
    assert [(r["arm"], r["context"], r["method"]) for r in measured] == [
        ("exact", 64, "exact"), ("lsh:4:grid", 64, "exact"), ("exact+lsh:8:grid", 64, "exact")]


def test_killed_run_leaves_loadable_partial_json(tmp_path, monkeypatch):
    calls = []
    real_row = ln.measure._row

    def first_row_then_killed(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real_row(*args, **kwargs)

    monkeypatch.setattr(ln.measure, "_row", first_row_then_killed)
    with pytest.raises(KeyboardInterrupt):
        ln.run(ln.Config(**SMALL, checkpoint_dir=str(tmp_path / "c")), tmp_path / "out")
    doc = load_results(tmp_path / "out" / f"{ln.NAME}.json")
    res = doc["results"]
    assert res["partial"] and len(res["rows"]) == 1 and all("steps" in a for a in res["arms"])
    assert "Partial run" in ln.summarize(doc, tmp_path)
    assert {p.name for p in ln.replot(doc, tmp_path / "plots")} == {ln.PLOTS[k] for k in ("r", "context", "training")}


def test_replot_cli_and_demo_section(tiny_run, tmp_path):
    from poslsh_lab import cli

    out, _ = tiny_run
    assert cli.main(["lsh-native", "--replot", str(out / f"{ln.NAME}.json"), "--out", str(tmp_path / "re")]) == 0
    assert all((tmp_path / "re" / name).is_file() for name in ln.PLOTS.values())
    assert "| lsh:32:cut |" in (tmp_path / "re" / "report.md").read_text()
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(out / f"{ln.NAME}.json", results / "lsh-native.json")
    sections = cli.committed_sections(tmp_path / "demo", results_dir=results)
    assert len(sections) == 1 and "positional-LSH masks" in sections[0]
    readme = ln.readme_section(load_results(out / f"{ln.NAME}.json"))
    assert f"]({ln.PLOT_DIR}/{ln.PLOTS['r']})" in readme and "**Verdict**" in readme and "Context 256 (training context 32)" in readme


def _rows(arm: str, bits: dict) -> list[dict]:
    return [{"arm": arm, "context": n, "method": m, "loss": b * math.log(2), "bits_per_token": b}
            for (n, m), b in bits.items()]


def _doc(native_bits: dict, timings: bool = True) -> dict:
    cfg = ln.Config(contexts=(1024, 16384, 65536), samples=(1, 4, 8, 16), native=("lsh:4:grid",), finetune="",
                    optional_native=())
    exact = {(n, "exact"): 1.0 for n in cfg.contexts}
    arms = [{"name": "exact", "kind": "baseline", "train_attention": "sdpa", "steps": 10},
            {"name": "lsh:4:grid", "kind": "native", "train_attention": "lsh:4:grid", "steps": 10}]
    times = [{"context": n, "method": m, "attention_us_per_token": t} for n in cfg.contexts
             for m, t in (("window:0.001", 0.3), ("lsh:1:grid", 0.1), ("lsh:4:grid", 0.15), ("lsh:8:grid", 0.2))]
    return {"effective_config": dataclasses.asdict(cfg), "arms": arms,
            "rows": _rows("exact", exact) + _rows("lsh:4:grid", native_bits), "timings": times if timings else []}


def test_verdict_is_computed_from_the_rows():
    cfg = ln.config_of(_doc({}))
    near = {(n, f"lsh:{r}:grid"): b for n in (1024, 16384, 65536) for r, b in ((1, 1.10), (4, 1.015), (8, 1.01))}
    lines = ln.verdict(_doc(near), cfg)
    assert lines[0].startswith("Yes: the model trained with lsh:4:grid, evaluated with positional LSH at r = 4,")
    assert "(+1.5 %, +1.5 %), with attention taking 0.15 µs per token at 64K (the window: 0.3 µs)" in lines[0]
    assert "+1.5 %" in lines[1] and "keeps its loss" in lines[1]
    assert "0.15 µs per token at 16K (the window: 0.3 µs)" in lines[1]
    far = {k: b + 0.05 for k, b in near.items()}  # r = 8 now 6 % above exact: not within 2 %
    far[(65536, "lsh:8:grid")] = 1.2  # and degrading with the context
    lines = ln.verdict(_doc(far), cfg)
    assert lines[0].startswith("No:") and "the closest, the model trained with lsh:4:grid evaluated with lsh:4:grid" in lines[0]
    assert "not within 2 %" in lines[1] and "evaluated with lsh:4:grid:" in lines[1]
    lines = ln.verdict(_doc({k: v for k, v in near.items() if k[0] != 65536}, timings=False), cfg)
    assert lines[0].startswith("Verdict not measured") and "not measured (no LSH rows" in lines[1]
    lines = ln.verdict(_doc(near, timings=False), cfg)
    assert lines[0].startswith("Yes") and "not measured at 16K" in lines[1]
    assert ln.verdict({**_doc(near), "rows": _rows("lsh:4:grid", near)}, cfg)[0].startswith("Verdict not measured")


def test_jobs_put_the_verdict_first_and_batches_share_one_kernel():
    cfg = ln.Config()
    order = ln.jobs(cfg)
    rows = [j for j in order if j[0] == "row"]
    assert len(rows) == len(set(rows)) == 4 * 4 * 8 + 4 * 8 + 4 * 8  # 4 main arms + qmc, plus arm (a)'s fill
    first = rows[:sum(len(ln.design._core(cfg, a)) for a in ln.arms(cfg))]  # at 16K: exact, window, lsh:8, the arm's r
    assert {j[2] for j in first} == {16384} and {j[3] for j in first} >= {"exact", "window:0.001", "lsh:8:grid"}
    assert ("row", "lsh:1:grid", 16384, "lsh:1:grid") in first and ("row", "exact", 16384, "lsh:1:grid") not in first
    assert all(j[3] in ln.fill_methods(cfg) for j in rows[-4 * 8:])  # fill rows last
    assert order.index(("errors", "exact")) < order.index(rows[-4 * 8])
    batches = {n: ln.eval_batch(n, cfg) for n in cfg.contexts}
    assert batches == {1024: 8, 4096: 4, 16384: 2, 65536: 2}  # never 1, never a multiple of 16
    specs = ln.precompile_specs(cfg)
    eval_keys = {(s["method"], s["r"], s["scheme"]) for s in specs if not s["backward"]}
    assert eval_keys == ({("lsh", r, sc) for r in cfg.samples for sc in ("grid", "cut")}
                         | {("hybrid", 8, "grid"), ("exact", 1, "-"), ("window", 1, "-")})
    assert {(s["method"], s["r"], s["batch"]) for s in specs if s["backward"]} == {("lsh", r, 32) for r in (4, 1, 8)}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="scored_tokens"):
        ln.check(ln.Config(scored_tokens=1000))
    with pytest.raises(ValueError, match="train_context"):
        ln.check(ln.Config(contexts=(4096, 16384)))
    with pytest.raises(ValueError, match="native: bad method"):
        ln.check(ln.Config(native=("lsh:0",)))
    with pytest.raises(ValueError, match="must be lsh or hybrid"):
        ln.check(ln.Config(finetune="window"))
    assert ln.effective(ln.Config(tiny=True, contexts=(32, 64))).contexts == (32, 64)


def test_precompile_worker_compiles_and_reports(tmp_path, monkeypatch):
    """The worker process of the GPU pre-compilation, run on the CPU through Triton's interpreter: it
    launches the kernel of every spec (forward, and backward for a training spec) and reports each."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    specs = [dict(heads=2, head_dim=16, n=40, method=m, r=r, scheme=s, window_eps=1e-3, batch=2, backward=b)
             for m, r, s, b in (("lsh", 2, "grid", True), ("lsh", 2, "cut", False), ("hybrid", 2, "grid", False),
                                ("window", 1, "-", False))]
    workers = ln.measure._spawn_workers(specs, 2, "cpu", lambda s: None)
    for proc, _ in workers:
        proc.wait(timeout=120)
    assert ln.measure._precompiled(workers) == {("triton", "lsh", 2, "cut"), ("triton", "hybrid", 2, "grid"),
                                        ("triton", "window", 1, "-")}
    report = ln.measure._finish_precompile(workers, lambda s: None)
    assert report["unfinished"] == 0 and len(report["kernels"]) == 4
    assert all("seconds" in k for k in report["kernels"]), report
    assert not any(path.exists() for _, path in workers)
