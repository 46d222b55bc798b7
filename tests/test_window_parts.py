"""bench/window_parts.py's CPU smoke run (TRITON_INTERPRET=1, --tiny): every group under every config, each
config's output held to the shipped config's, and the contest: the shipped config timed in turns with the
joined one (wide heads apart) and the fastest other."""

from __future__ import annotations

import json
import os
import re
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


def test_base_package_is_timed_beside_in_every_group_and_the_contest(tmp_path):
    """``--base DIR`` imports another checkout's package as ``poslsh_base`` and times its kernel as the config
    'base'. Here DIR holds this checkout's own package, so its output must equal the shipped config's (the same
    kernel source through a second import), and the JSON names the base."""
    out = tmp_path / "wp.json"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--groups", "all", "--base", str(root),
                           "--rounds", "1", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["base"] == str(root)
    base_rows = [r for r in doc["rows"] if r["config"] == "base"]
    assert [r["group"] for r in base_rows] == ["all"]
    assert base_rows[0]["rel_to_shipped"] < 1e-6 and base_rows[0]["ms"] > 0, base_rows
    contest = doc["contest"]["entries"]
    assert "base" in contest and contest["base"]["rel_to_shipped"] < 1e-6 and len(contest["base"]["ms"]) == 1
    from poslsh_lab.readme import window_parts  # the RESULTS section names what the base row is

    text = window_parts(doc)
    assert "| base |" in text and f"the package under `{root}`" in text, text
    assert re.search(r"base \d\.\d{3} \(", text), text  # its ratio in the contest's sentence
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--base", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0 and "--base: no poslsh package under" in done.stderr, done.stderr[-2000:]
