"""bench/split_gpu.py (the H200 check and timing of the split backend) runs on the CPU at tiny sizes:
checks pass, every column is timed or its failure / skip recorded, the JSON carries the floor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "split_gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("split_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_split_bench_runs_on_cpu(tmp_path):
    bench = load()
    args = ["--device", "cpu", "--ns", "64", "128", "--dtype", "float32", "--heads", "2", "--head-dim", "16",
            "--samples", "2", "--primitives", "sdpa", "torch", "nonesuch", "--reps", "1", "--out", str(tmp_path)]
    bench.main(args)
    doc = json.loads((tmp_path / "split_gpu.json").read_text())
    env, res = doc["environment"], doc["results"]
    assert env["device"] == "cpu" and env["torch"] and env["date"] and "--ns 64 128" in res["command"]
    good = [c for c in res["checks"] if c["primitive"] != "nonesuch"]
    assert len(good) == 6 and all(c["ok"] for c in good) and all(len(c["rel_err_dq_dk_dv"]) == 3 for c in good)
    bad = [c for c in res["checks"] if c["primitive"] == "nonesuch"]
    assert bad and not any(c["ok"] for c in bad) and "primitive must be one of" in bad[0]["error"]
    rows = {(r["n"], r["column"], r["pass"]): r for r in res["rows"]}
    for n in (64, 128):
        for col in ("fused", "split_sdpa", "split_torch"):
            for pas in ("fwd", "fwd_bwd"):
                assert rows[(n, col, pas)]["ms"] > 0
        assert "error" in rows[(n, "split_nonesuch", "fwd")]  # a failing column is recorded; the run goes on
        floors = res["per_n"][str(n)]["floor_ms"]
        assert floors["split_fwd"] > floors["fused_fwd"] > 0
        assert res["per_n"][str(n)]["fwd_over_fused"]["split_sdpa"] > 0
    assert rows[(64, "split_sdpa", "fwd")]["primitive_calls"] >= 1
    assert any(k.startswith("fwd/split_sdpa") for k in res["derived"]["loglog_slope"])
    prof = {p["primitive"]: p for p in res["profile"]}
    assert prof["sdpa"]["n"] == 128 and 0 < prof["sdpa"]["primitive_ms"] <= prof["sdpa"]["total_ms"]
    assert sum(c["calls"] for c in prof["sdpa"]["by_block_length"].values()) == rows[(128, "split_sdpa", "fwd")]["primitive_calls"]


def test_split_bench_time_budget_skips_and_still_writes(tmp_path):
    bench = load()
    bench.main(["--device", "cpu", "--ns", "64", "--dtype", "float32", "--heads", "2", "--head-dim", "16",
                "--samples", "2", "--primitives", "torch", "--no-check", "--budget-s", "0", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "split_gpu.json").read_text())["results"]
    assert res["rows"] and all(r["skipped"].startswith("time budget") for r in res["rows"])
