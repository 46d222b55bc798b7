"""``poslsh cp-bench`` at toy sizes: spawned (gloo) and under torchrun, JSON reloadable, checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from poslsh_lab.cli import main
from poslsh_lab.experiments import cp_bench
from poslsh_lab.experiments.cp_bench.design import METHODS, PLOT
from poslsh_lab.util import load_results

TOY = ["--lengths", "96", "--heads", "2", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
       "--exact-max-local", "96", "--samples", "2", "--device", "cpu"]


def _check_doc(doc, world_sizes):
    rows = doc["results"]["rows"]
    for method in METHODS:
        for w in world_sizes:
            mine = [r for r in rows if r["method"] == method and r["world_size"] == w and r["halo"] in (None, "head")]
            assert len(mine) == 1, (method, w)
            r = mine[0]
            assert r["check"]["ok"], (method, w, r["check"])
            assert len(r["bytes_fwd"]) == w and len(r["peak_memory"]) == w
            assert (max(r["bytes_fwd"]) > 0) == (w > 1)
            assert r["ring_bytes_fwd"] == (w - 1) * 2 * 96 * 2 * 8 * 4  # (W-1) x shard K and V, fp32
            assert r["fwd"]["ms"] > 0 and r["fwd_bwd"]["ms"] > 0
            assert (r.get("halo_bound_bytes_fwd") or 0) > 0 or method == "exact"
    # halo="max" sends every head the widest halo: never fewer bytes than per-head halos
    widest = max(world_sizes)
    for method in ("window", "lsh", "hybrid"):
        head, most = (next(r for r in rows if r["method"] == method and r["world_size"] == widest and r["halo"] == h)
                      for h in ("head", "max"))
        assert max(most["bytes_fwd"]) >= max(head["bytes_fwd"])
    assert {w["world_size"] for w in doc["results"]["weak_scaling"]} == set(world_sizes) - {1}


def test_spawned(tmp_path):
    assert main(["cp-bench", "--world-sizes", "1", "2", *TOY, "--out", str(tmp_path)]) == 0
    doc = load_results(tmp_path / "cp-bench.json")
    assert doc["results"]["launch"]["launcher"] == "spawn"
    _check_doc(doc, [1, 2])
    text = cp_bench.summarize(doc, tmp_path)
    assert "Weak scaling" in text and "| window | head | 2 | 96 |" in text
    (tmp_path / PLOT).unlink()
    cp_bench.replot(doc, tmp_path)  # the plot from the JSON alone
    assert (tmp_path / PLOT).stat().st_size > 0
    # and through the CLI, as every experiment: --replot launches nothing and rewrites plot and report
    again = tmp_path / "again"
    assert main(["cp-bench", "--replot", str(tmp_path / "cp-bench.json"), "--out", str(again)]) == 0
    assert (again / PLOT).stat().st_size > 0 and "| window | head | 2 | 96 |" in (again / "report.md").read_text()
    assert not (again / "cp-bench.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun's standalone rendezvous")
def test_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "poslsh_lab.cli",
           "cp-bench", "--world-sizes", "2", "--methods", "window", "lsh", *TOY, "--no-halo-max",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = load_results(tmp_path / "cp-bench.json")
    launch = doc["results"]["launch"]
    assert launch["launcher"] == "torchrun" and launch["processes"] == 2 and launch["backend"] == "gloo"
    assert launch["command"].startswith("torchrun --nproc-per-node 2 -m poslsh_lab.cli cp-bench --world-sizes 2")
    rows = doc["results"]["rows"]
    assert {r["method"] for r in rows} == {"window", "lsh"} and all(r["check"]["ok"] for r in rows)


def _dies_on_rank_one(rank, world):
    if rank == 1:
        os._exit(3)  # a crash: no exception, no result
    return rank


def _raises_on_rank_zero(rank, world):
    if rank == 0:
        raise ValueError("rank zero refuses")
    return rank


def test_local_launcher_reports_dead_and_failing_ranks():
    """A rank that dies without a result is a failure, not a hang (the first version waited forever)."""
    from poslsh.distributed.launch import run_local

    assert run_local(lambda_free_rank, 2) == [0, 1]
    with pytest.raises(RuntimeError, match=r"rank 1 ---\nexited with code 3 without a result"):
        run_local(_dies_on_rank_one, 2, timeout=120)
    with pytest.raises(RuntimeError, match=r"rank 0 ---\nTraceback[\s\S]*ValueError: rank zero refuses"):
        run_local(_raises_on_rank_zero, 2, timeout=120)


def _zero_raises_one_dies_later(rank, world):
    if rank == 0:
        raise ValueError("rank zero refuses")
    time.sleep(1.0)
    os._exit(3)


def test_local_launcher_names_a_rank_that_dies_after_the_first_failure():
    """Every failed rank is named, not only the first seen: a crash that broke its peers' group was hidden
    behind their errors (failed before: rank 0's report ended the wait, rank 1's death went unsaid)."""
    from poslsh.distributed.launch import run_local

    with pytest.raises(RuntimeError, match=r"rank zero refuses[\s\S]*--- rank 1 ---\nexited with code 3"):
        run_local(_zero_raises_one_dies_later, 2, timeout=120)


def lambda_free_rank(rank, world):
    return rank


def test_demo_report_carries_the_committed_cpu_run(tmp_path):
    """poslsh demo re-plots the committed cp-bench run from its JSON alone (no process is launched)."""
    import shutil

    from poslsh_lab import cli
    from poslsh_lab.util import committed_results_dir

    results = tmp_path / "results"
    (results / "cp_cpu").mkdir(parents=True)
    shutil.copy(committed_results_dir() / "cp_cpu" / "cp-bench.json", results / "cp_cpu" / "cp-bench.json")
    sections = cli.committed_sections(tmp_path / "demo", results_dir=results)
    assert len(sections) == 1 and sections[0].startswith("## Context parallelism (cp-bench)")
    assert "Committed result `cp-bench.json`" in sections[0] and (tmp_path / "demo" / PLOT).stat().st_size > 0
