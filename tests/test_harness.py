"""The experiments' shared harness and metrics: one clock with a deadline and phase budgets, log lines,
atomic JSON saves, the config helpers; relative error, log-log slope and keys per query."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
import torch

from poslsh import alibi_slopes
from poslsh.attention.dispatch import resolve_spec
from poslsh_lab.experiments import harness
from poslsh_lab.experiments.metrics import keys_per_query, loglog_slope, relative_error


def test_run_deadline_budgets_log_and_save(tmp_path, capsys):
    results = {"points": [], "seconds": 0.0}
    run = harness.Run("exp", tmp_path / "exp.json", {"a": 1}, results, deadline_s=30.0, stamp="6.1f")
    assert not run.late() and run.end() == pytest.approx(run.start + 30.0)
    assert run.end(budget_s=5.0) < run.end() and run.end(reserve_s=10.0) == pytest.approx(run.start + 20.0)
    run.log("hello")
    assert capsys.readouterr().out.startswith("[exp    0.0s] hello")
    results["points"].append(1)
    doc = run.save()
    assert json.loads((tmp_path / "exp.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["results"]["points"] == [1] and doc["results"]["seconds"] > 0 and results["seconds"] == 0.0
    assert not (tmp_path / "exp.json.tmp").exists()  # written beside, then renamed
    never = harness.Run("exp", tmp_path / "b.json", {}, {}, seconds_key=None)
    assert never.end() == math.inf and not never.late() and "seconds" not in never.save()["results"]
    run.deadline = time.perf_counter() - 1
    assert run.late()


def test_describe_failure_is_one_line():
    assert harness.describe_failure(ValueError("bad\nsecond line")) == "ValueError: bad"


@dataclasses.dataclass
class _Config:
    tiny: bool = False
    n: int = 100
    sizes: tuple[int, ...] = (1, 2)
    budget_s: float = 0.0


def test_config_helpers():
    tiny = {"n": 5, "sizes": (1,)}
    assert harness.effective(_Config(), tiny) == _Config()
    assert harness.effective(_Config(tiny=True), tiny) == _Config(tiny=True, n=5, sizes=(1,))
    assert harness.effective(_Config(tiny=True, n=7), tiny).n == 7  # a field set by hand stays
    assert harness.config_from({"n": 3, "sizes": [4, 5], "gone": 1}, _Config) == _Config(n=3, sizes=(4, 5))


def test_relative_error():
    exact = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    est = exact + torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    assert float(relative_error(est, exact)) == pytest.approx(0.5 / math.sqrt(26))
    assert relative_error(est, exact, dim=-1).tolist() == pytest.approx([0.1, 0.0])
    half = relative_error(est.to(torch.bfloat16), exact.to(torch.bfloat16))
    assert half.dtype == torch.float32  # at least float32, whatever the inputs
    assert relative_error(est, exact, dtype=torch.float64).dtype == torch.float64


def test_loglog_slope():
    rs = [1, 2, 4, 8, 16]
    assert loglog_slope(rs, [3 * r ** -0.5 for r in rs]) == pytest.approx(-0.5)
    assert loglog_slope(rs, [r ** 2.0 for r in rs]) == pytest.approx(2.0)
    assert loglog_slope([1, 2, 4], [1.0, 0.0, math.nan]) is None  # one usable point
    assert loglog_slope([4, 4], [1.0, 2.0]) is None  # one x
    assert loglog_slope([1, 2, 4], [1.0, -1.0, 0.25]) == pytest.approx(-1.0)  # non-positive y left out


def test_keys_per_query_of_a_window():
    n, h = 50, 2
    q = torch.zeros(1, h, n, 4)
    spec = resolve_spec(q, q, q, slopes=alibi_slopes(h), method="window", window_eps=0.5)
    w = spec.window.tolist()  # causal row p sees min(p, w) + 1 keys
    expected = sum(min(p, wh) + 1 for wh in w for p in range(n)) / (h * n)
    assert keys_per_query(spec, n, n) == pytest.approx(expected)
