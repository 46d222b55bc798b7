"""Run a function on N local processes joined in one process group (gloo on the CPU by default).

``run_local(fn, world_size, *args)`` spawns N processes; process r initialises torch.distributed
(rank r of N, rendezvous through a file in a temporary directory, so no port is needed), pins its
torch threads, calls ``fn(rank, world_size, *args)`` and sends back the result. For tests, CPU
experiments and ``poslsh cp-bench --world-size N``; under ``torchrun`` use ``init_from_env`` instead.
``fn`` must be importable by name (a module-level function), as for any spawned process.
"""

from __future__ import annotations

import os
import queue as queue_module
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_local", "init_from_env", "NVLS_OFF"]

# NCCL's NVLink multicast (NVLS) stays off in every launch on the lent GPU machines (their KINDS.md).
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _child(rank: int, world: int, store: str, backend: str, threads: int, fn: Callable, args: tuple,
           queue) -> None:
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            result = fn(rank, world, *args)
            # No rank tears the group down while a peer is still joining it: gloo's init has no barrier, so a
            # fast rank's exit closed its peer's half-made connections ("Connection closed by peer", 1 run in 30
            # on a busy 2-core machine). A peer that died leaves this barrier to fail or to the parent's terminate.
            dist.barrier()
            queue.put((rank, True, result))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put((rank, False, traceback.format_exc()))


def run_local(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", threads: int = 1,
              timeout: float | None = None) -> list[Any]:
    """[fn(0, N, *args), ..., fn(N-1, N, *args)], each run in its own process of one N-rank group.

    Raises RuntimeError with the failing ranks' tracebacks if any rank raised or died, or if the
    ranks have not all returned after ``timeout`` seconds (None: no limit)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "rendezvous")
        env = {key: os.environ.get(key) for key in NVLS_OFF}
        os.environ.update(NVLS_OFF)  # inherited by the children
        try:
            procs = [ctx.Process(target=_child, args=(r, world_size, store, backend, threads, fn, args, queue))
                     for r in range(world_size)]
            for p in procs:
                p.start()
            results, failures = _collect(procs, queue, timeout)
            stopped = set()
            for rank, p in enumerate(procs):
                p.join(timeout=5 if failures else None)
                if p.is_alive():  # stuck in a collective with a failed rank
                    p.terminate()
                    p.join()
                    stopped.add(rank)
            if failures:  # the first failure seen may be a consequence (a peer's crash broke the group): say all
                _sweep(procs, queue, results, failures, stopped)
        finally:
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if failures:
        raise RuntimeError("ranks failed:\n" + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))
    return [results[r] for r in range(world_size)]


def _collect(procs: list, queue, timeout: float | None) -> tuple[dict, dict]:
    """Results and failures as they arrive; a process that died without reporting (a crash, or an
    error while starting) is a failure, and so is running past ``timeout``."""
    results, failures = {}, {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(results) + len(failures) < len(procs) and not failures:
        try:
            rank, ok, value = queue.get(timeout=0.5)
            (results if ok else failures)[rank] = value
            continue
        except queue_module.Empty:
            pass
        for rank, p in enumerate(procs):
            if rank not in results and not p.is_alive() and p.exitcode != 0:
                failures[rank] = f"exited with code {p.exitcode} without a result (see its stderr)"
        if deadline is not None and time.monotonic() > deadline:
            failures.update({r: f"no result after {timeout:.0f} s" for r in range(len(procs)) if r not in results})
    return results, failures


def _sweep(procs: list, queue, results: dict, failures: dict, stopped: set) -> None:
    """After the ranks have ended: the reports still queued, and every rank that died without one (not
    those stopped here), so a crash that made its peers fail is named beside their errors."""
    while True:
        try:
            rank, ok, value = queue.get(timeout=0.1)
        except queue_module.Empty:
            break
        if rank not in failures:
            (results if ok else failures)[rank] = value
    for rank, p in enumerate(procs):
        if rank not in results and rank not in failures and rank not in stopped and p.exitcode not in (0, None):
            failures[rank] = f"exited with code {p.exitcode} without a result (see its stderr)"


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set): initialise the default group
    (NCCL on CUDA, pinned to GPU LOCAL_RANK; gloo otherwise) unless it is already; returns (rank, world)."""
    os.environ.update(NVLS_OFF)  # before NCCL initialises: it reads them once
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        device = None
        if backend == "nccl":  # bound to its GPU up front: NCCL then never guesses a rank's device
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    return dist.get_rank(), dist.get_world_size()
