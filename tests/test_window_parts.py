"""bench/window_parts.py's CPU smoke run (TRITON_INTERPRET=1, --tiny): every group under every config, each
config's output held to the shipped config's, and the contest: the shipped config timed in turns with the
joined one (wide heads apart) and the fastest other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "window_parts.py"


def test_tiny_window_parts_times_every_group_and_joins_the_best(tmp_path):
    out = tmp_path / "wp.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    for key in ("date", "device", "torch", "triton", "command", "shape", "groups", "rows"):
        assert key in doc, key
    assert {g: v["heads"] for g, v in doc["groups"].items()} == {"all": 4, "wide": 2, "narrow": 2, "w8": 4}
    assert {(r["group"], r["config"]) for r in doc["rows"]} == {
        (g, c) for g in ("all", "wide", "narrow", "w8") for c in ("shipped", "32x32_w2")}
    for r in doc["rows"]:
        assert "error" not in r, r
        assert r["rel_to_shipped"] < 2e-3, r  # another tile shape, the same function
        assert r["ms"] > 0 and r["keys_per_query"] > 0
    contest = doc["contest"]["entries"]
    assert set(contest) == {"shipped", "joined", "32x32_w2"}
    assert contest["joined"]["config"]["wide"]["min_work"] == doc["shape"]["wide_from"]
    for name, entry in contest.items():
        assert entry["rel_to_shipped"] < 2e-3, name
        assert len(entry["ms"]) == 3 and entry["over_shipped"] > 0
    assert contest["shipped"]["over_shipped"] == 1.0
