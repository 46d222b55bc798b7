"""bench/exact_gpu.py (exact ALiBi on the GPU, every backend side by side): its speed-table output and
the merge into ``speed_table.json`` (the timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "exact_gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("exact_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_speed_table_and_merge(tmp_path):
    bench = load()
    rows = [dict(column="cudnn", n=16384, **{"pass": "fwd"}, ms=4.0),
            dict(column="triton", n=16384, **{"pass": "fwd"}, ms=5.0),
            dict(column="cudnn", n=16384, **{"pass": "fwd+bwd"}, ms=14.0),
            dict(column="sdpa_flash", n=16384, **{"pass": "fwd"}, ms=6.0),  # a ceiling, not a poslsh backend
            dict(column="auto", n=16384, **{"pass": "fwd"}, ms=4.1),
            dict(column="flex", n=65536, **{"pass": "fwd"}, skipped="time budget")]
    frag = bench.speed_table(rows, "GPU X")
    assert frag == {"devices": {"GPU X": {"exact": {"prefill": {"16384": {"cudnn": 4.0, "triton": 5.0}},
                                                    "prefill+backward": {"16384": {"cudnn": 14.0}}}}}}
    path = tmp_path / "speed_table.json"
    path.write_text(json.dumps({"devices": {"GPU X": {"exact": {"prefill": {"16384": {"triton": 9.0, "flex": 6.0}}},
                                                      "window": {"prefill": {"16384": {"triton": 1.0}}}}},
                                "provenance": {"date": "2026-12-01", "command": "poslsh bench"}}))
    bench.merge_table(path, frag, {"device": "GPU X", "date": "2026-12-06", "command": "exact_gpu.py"})
    doc = json.loads(path.read_text())
    exact = doc["devices"]["GPU X"]["exact"]
    assert exact["prefill"]["16384"] == {"triton": 5.0, "flex": 6.0, "cudnn": 4.0}  # measured ones replaced
    assert exact["prefill+backward"]["16384"] == {"cudnn": 14.0}
    assert doc["devices"]["GPU X"]["window"]["prefill"]["16384"] == {"triton": 1.0}
    assert doc["provenance"]["date"] == "2026-12-01" and doc["provenance"]["merged"][0]["command"] == "exact_gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_needs_a_gpu(tmp_path):
    assert load().main(["--out", str(tmp_path)]) == 2


def test_backends_run_counts_what_auto_ran_on():
    """``backends_run`` counts the backend of each planned call (the first call of its arguments is
    resolved afresh, not counted), and leaves AttentionPlan as it was."""
    import poslsh
    from poslsh.attention.plan import AttentionPlan
    from poslsh.attention.public_plans import clear_public_plans

    bench = load()
    chosen = AttentionPlan._backend_for
    clear_public_plans()  # (other tests' calls of the same arguments)
    q = torch.randn(1, 2, 8, 4)
    poslsh.attention(q, q, q, backend="fused")  # the plan of these arguments
    with bench.backends_run() as ran:
        for _ in range(3):
            poslsh.attention(q, q, q, backend="fused")
        poslsh.attention(q, q, q, backend="reference")  # a first call: resolved afresh
        poslsh.attention(q, q, q, backend="reference")
    assert dict(ran) == {"fused": 3, "reference": 1}
    assert AttentionPlan._backend_for is chosen


def test_paired_times_auto_and_its_pick_alternately(monkeypatch):
    """auto and the backend it ran on are timed in turns (pick first), and the ratio is the median of the
    rounds' ratios, not a ratio of two columns measured minutes apart."""
    bench = load()
    calls = []
    ms = {"auto": iter([10.0, 12.0, 30.0]), "pick": iter([10.0, 10.0, 10.0])}

    def fake_time(fn, warmup, rep):
        calls.append(fn())
        return next(ms[calls[-1]]), "fake", 0.0, 0.0

    monkeypatch.setattr(bench, "time_ms", fake_time)
    args = bench.parse(["--out", "x", "--pair-rounds", "3"])
    out = bench.paired(args, lambda: "auto", "flex_fa4", lambda: "pick")
    assert calls == ["pick", "auto"] * 3
    assert out["paired"] == {"auto": [10.0, 12.0, 30.0], "flex_fa4": [10.0, 10.0, 10.0]}
    assert out["auto_over_pick"] == 1.2


def test_results_section_reports_auto_against_its_pick():
    """docs/RESULTS.md's exact_gpu section names auto's paired ratio and the backend it ran on."""
    from poslsh_lab.readme import exact_gpu

    rows = [dict(column="flex_fa4", n=16384, ms=4.0, **{"pass": "fwd"}),
            dict(column="auto", n=16384, ms=4.3, ran_on={"flex_fa4": 10}, paired={"auto": [4.1], "flex_fa4": [4.0]},
                 auto_over_pick=1.025, **{"pass": "fwd"})]
    doc = {"results": {"checks": [], "rows": rows}, "config": {"method": "exact"},
           "environment": {"device": "GPU X"}}
    text = exact_gpu(doc)
    assert "timed in alternation" in text and "16K forward 1.025 (flex_fa4)" in text
    assert "no checks against float64 in this run" in text and "0 of 0" not in text  # a --no-check run


def test_time_ms_is_not_decided_by_a_one_time_cost(monkeypatch):
    """A call whose second run still pays a one-time cost (0.3 s) and runs fast after it is timed by
    do_bench, not as a long call whose median takes in that cost (session 14's flex column at 16K: 149 ms)."""
    import time

    import triton.testing

    bench = load()
    calls = []

    def fn():
        calls.append(None)
        if len(calls) == 2:
            time.sleep(0.3)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench", lambda f, warmup, rep, return_mode: 0.5)
    monkeypatch.setattr(bench, "event_times", lambda f, k: pytest.fail("timed as a long call"))
    ms, how, first, _ = bench.time_ms(fn, 1, 1)
    assert (ms, how) == (0.5, "do_bench median") and len(calls) == 3


def test_time_ms_long_calls_take_the_median_of_three(monkeypatch):
    """A call over 0.2 s every time: the median of three (not of two, which is their mean)."""
    import time

    bench = load()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(bench, "event_times", lambda f, k: [250.0, 900.0][:k])
    ms, how, _, _ = bench.time_ms(lambda: time.sleep(0.21), 1, 1)
    assert how == "median of 3 calls (first wall-clock timed)" and 250.0 <= ms < 300
