"""bench/kernel_sweep.py's CPU smoke run (TRITON_INTERPRET=1, --tiny): every phase runs (checks against
float64, timing, the pick, the JSON and the tuned file), and the time budget stops it with what it has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "kernel_sweep.py"


def _sweep(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tiny_sweep_checks_times_and_picks(tmp_path):
    out, tuned = tmp_path / "sweep.json", tmp_path / "tuned.json"
    # one method, a forward and a backward variant (the interpreter's variants are held to the reference in
    # tests/test_triton_interpret.py); one worker process: the GPU run's parallel check phase
    variants = ["fwd_wide128x64w8", "bwd_delta"]
    _sweep("--methods", "window", "--variants", *variants, "--workers", "1", "--json", str(out),
           "--write-tuned", str(tuned))
    doc = json.loads(out.read_text())
    for key in ("date", "device", "torch", "triton", "command", "results", "checks", "picked"):
        assert key in doc, key
    assert not doc["stopped_by_budget"]
    assert {(m, v) for m, checks in doc["checks"].items() for v in checks} >= {("window", "base"), ("window", "bwd_delta")}
    measured = {(r["method"], r["variant"]) for r in doc["results"]}
    assert {("window", v) for v in ("base", "fwd_wide128x64w8", "bwd_delta")} <= measured
    for r in doc["results"]:
        assert r["max_rel_err"] <= 1e-5, r  # fp32 in the interpreter: the variants compute the same function
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["bwd_over_fwd"] == pytest.approx(
            (r["fwd_bwd_ms"] - r["fwd_ms"]) / r["fwd_ms"])
    assert {(s["method"], s["n"]) for s in doc["summary"]} == {("window", 40)}
    table = json.loads(tuned.read_text())
    assert set(table["configs"]) == {"window/prefill/float32/d16"}
    assert table["provenance"]["device"] == doc["device"]
    for method, pick in doc["picked"].items():
        cfg = table["configs"][f"{method}/prefill/float32/d16"]
        assert {"BLOCK_M", "BWD_BLOCK_M", "DQ_BLOCK_M"} <= set(cfg) and cfg == pick["full_config"]
        assert all(cfg.get(k) == v for k, v in pick["config"].items() if k != "wide")
    # docs/RESULTS.md's section: the base's times and the timed pick, from this document
    from poslsh_lab.readme import kernel_sweep

    section = kernel_sweep(doc)
    pick = doc["picked"]["window"]
    timed = {r["variant"]: r for r in doc["results"]}
    row = next(line for line in section.splitlines() if line.startswith("| window | 40 |"))
    assert f"{pick['fwd']} + {pick['bwd']}" in row
    for cell in (f"{timed['base']['bwd_over_fwd']:.2f}", f"{timed['picked']['bwd_over_fwd']:.2f}",
                 f"{timed['picked']['fwd_bwd_over_fwd']:.2f}"):
        assert f"| {cell} |" in row, (cell, row)
    # no variant faster (a run whose pick is base + base times no "picked" row): the base's numbers, not "not timed"
    as_base = dict(doc, picked={"window": dict(doc["picked"]["window"], fwd="base", bwd="base")},
                   results=[r for r in doc["results"] if r["variant"] != "picked"])
    row = next(line for line in kernel_sweep(as_base).splitlines() if line.startswith("| window | 40 |"))
    assert "base + base" in row and "not timed" not in row
    assert f"| {timed['base']['fwd_bwd_over_fwd']:.2f} |" in row, row


def test_tiny_sweep_stops_at_its_budget(tmp_path):
    out = tmp_path / "sweep.json"
    done = _sweep("--methods", "window", "--budget-s", "0.01", "--json", str(out), timeout=300)
    doc = json.loads(out.read_text())
    assert doc["stopped_by_budget"] and doc["results"] == [] and "method" in done.stdout
