"""``poslsh bench --device cpu``: the dry run of the GPU benchmark at toy sizes (Triton under its
interpreter), its JSON reloadable, and the reporting half redrawing plots and tables from that JSON."""

import os
import subprocess
import sys

import pytest

from poslsh_lab.experiments import gpu_bench
from poslsh_lab.util import load_results

COLUMNS = ("sdpa", "exact_triton", "window_triton", "split_sdpa")


def test_cpu_dry_run_then_report_from_the_json(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "bench"
    # a fresh process: TRITON_INTERPRET must be set before the kernels are decorated
    cmd = [sys.executable, "-m", "poslsh_lab.cli", "bench", "--device", "cpu", "--out", str(out),
           "--phases", "forward", "decode", "--ns", "48", "--decode-ns", "80", "--flex-ns", "48",
           "--heads", "2", "--dim", "16", "--samples", "2", "--columns", *COLUMNS, "--warm-workers", "0",
           "--budget-s", "0"]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = load_results(out / "gpu_bench.json")
    rows = doc["results"]["rows"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    # forward through the dispatcher, kernel-direct (Triton at a flex n), decoding (+ direct; no split form)
    assert {(r["column"], r["nq"], r["direct"]) for r in rows} == {
        ("sdpa", 48, False), ("exact_triton", 48, False), ("exact_triton", 48, True), ("window_triton", 48, False),
        ("window_triton", 48, True), ("split_sdpa", 48, False), ("sdpa", 1, False), ("exact_triton", 1, False),
        ("exact_triton", 1, True), ("window_triton", 1, False), ("window_triton", 1, True)}
    fwd = {r["column"]: r for r in rows if r["nq"] == 48 and not r["direct"]}
    assert fwd["exact_triton"]["rel_err_vs_exact"] < 1e-5  # float32 on the CPU: the reference is exact_triton
    assert fwd["window_triton"]["rel_err_vs_exact"] < 1e-2 and "rel_err_vs_exact" not in fwd["sdpa"]
    assert 0 < fwd["split_sdpa"]["rel_err_vs_exact"] < 1  # LSH with r = 2: an estimate, not exact
    assert fwd["sdpa"]["pairs"] == 2 * 48 * 49 // 2  # the causal triangle of both heads
    assert all(r["ms"] > 0 for r in rows) and all(r["wall_us"] > 0 for r in rows if r["nq"] == 1)
    # the reporting half, from the JSON alone
    (out / "gpu_bench_time.png").unlink()
    assert gpu_bench.replot(doc, out)[0].stat().st_size > 0
    text = gpu_bench.summarize(doc, out)
    assert "**forward**" in text and "exact ALiBi (Triton)" in text
    assert "**decoding" in text and "![gpu_bench_time.png](gpu_bench_time.png)" in text
    table = gpu_bench.speed_table(doc)["devices"][doc["environment"]["device"]]
    assert set(table) == {"exact", "window", "lsh"} and set(table["lsh"]["prefill"]["48"]) == {"split"}
