"""bench/host_overhead.py at toy size on the CPU: every method through every way in (the plan, the public
call, the old resolve_spec path) runs and reports a finite per-call time (a benchmark, not a timed test)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "host_overhead.py"


def test_host_overhead_runs_at_toy_size(tmp_path):
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "rows.json"
    rows = mod.main(["--nk", "40", "--heads", "4", "--dim", "8", "--reps", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    for method in mod.METHODS:
        ways = {row["way"] for row in rows if row["method"] == method and row["what"] == "host"}
        assert ways == {"resolve_spec", "old path", "public", "plan"}, method
        assert {row["way"] for row in rows if row["method"] == method and row["what"] == "cpu"} == \
            {"old path", "public", "plan"}
    assert all(math.isfinite(row["us_per_call"]) and row["us_per_call"] > 0 for row in rows)
    assert any(row.get("note") == "band keys only" for row in rows)


def test_host_overhead_tiny_bloom_runs_at_toy_size(tmp_path):
    """--model tiny-bloom: every arm decodes, per-token wall and CPU times are finite, native's ratio is
    1, and exact's tokens equal native's."""
    import pytest

    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "model.json"
    arms = list(mod.MODEL_ARMS)
    rows = mod.main(["--model", "tiny-bloom", "--layers", "1", "--contexts", "24", "--tokens", "3", "--rounds", "1",
                     "--arms", *arms, "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [row["arm"] for row in rows] == arms
    assert all(math.isfinite(row["ms_per_token"]) and row["cpu_ms_per_token"] > 0 for row in rows)
    by_arm = {row["arm"]: row for row in rows}
    assert by_arm["native"]["ratio_to_native"] == 1.0
    assert by_arm["exact"]["tokens_equal_native"] is True


def test_host_overhead_launch_stub_runs_at_toy_size():
    """--launch-stub: the Triton decode's host work with stubbed kernels, plan and public call per method,
    finite per-call times, labelled as a stub measurement."""
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--launch-stub", "--nk", "300", "--heads", "4", "--dim", "16", "--reps", "3",
                     "--methods", "window", "lsh"])
    ways = {(m, w) for m in ("window", "lsh") for w in ("plan", "public")}
    assert {(row["method"], row["way"]) for row in rows} == ways
    assert all(row["what"] == "stub" and "stubbed" in row["note"] for row in rows)
    assert all(math.isfinite(row["us_per_call"]) and row["us_per_call"] > 0 for row in rows)
