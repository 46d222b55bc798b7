"""What the experiments measure, one definition each: relative error, log-log slope, GPU time, CPU
time and memory, keys per query.

* ``relative_error``: ||est - exact|| / ||exact|| (Frobenius), over everything or per slice.
* ``loglog_slope``: the least-squares slope of log y against log x, the empirical rate (a 1/sqrt(r)
  law is -0.5, linear cost in n is 1).
* ``gpu_time``: milliseconds per call on the GPU, by the rule of the benchmark and the Pareto study.
* ``cpu_time_and_memory``: best wall and process CPU time of a call on the CPU, and the growth of the
  process's peak resident set during it (torch's CPU allocations are invisible to ``tracemalloc``:
  a 64 MB tensor shows there as 80 bytes).
* ``keys_per_query``: the mean number of keys with nonzero weight per query of a resolved call
  (``attention.ranges.nonzero_pairs``, the count the kernels' ranges give).
* ``extrapolation_verdict``: whether a language model keeps its loss beyond its training context.
"""

from __future__ import annotations

import ctypes
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from poslsh.attention.ranges import nonzero_pairs

__all__ = ["relative_error", "loglog_slope", "gpu_time", "event_times", "cpu_time_and_memory", "keys_per_query",
           "KEEPS_EXTRAPOLATION", "extrapolation_verdict"]

# A model "keeps its loss" out to a context when its bits there are at most this times those at its
# training context (lm-validation's and lsh-native's criterion).
KEEPS_EXTRAPOLATION = 1.05


def extrapolation_verdict(ratio: float) -> str:
    """"keeps its loss" or "degrades by N %", for bits at a long context over bits at the training one."""
    return "keeps its loss" if ratio <= KEEPS_EXTRAPOLATION else f"degrades by {100 * (ratio - 1):.0f} %"


def relative_error(est: Tensor, exact: Tensor, dim: int | tuple[int, ...] | None = None,
                   dtype: torch.dtype | None = None) -> Tensor:
    """||est - exact|| / ||exact||, Frobenius norms over ``dim`` (None: every entry: a 0-d tensor).

    Computed in ``dtype``, by default the wider of the two inputs' dtypes and at least float32 (a
    float64 copy of a 256K-token output would double the memory the measurement needs)."""
    if dtype is None:
        dtype = torch.promote_types(torch.promote_types(est.dtype, exact.dtype), torch.float32)
    est, exact = est.to(dtype), exact.to(dtype)
    if dim is None:
        return (est - exact).norm() / exact.norm()
    return (est - exact).norm(dim=dim) / exact.norm(dim=dim)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of log y against log x over the points whose x and y are finite and > 0
    (a caller that wants zeros kept floors them first); None with fewer than two such points or a
    single x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y)]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else None


def gpu_time(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> tuple[float, str]:
    """Milliseconds per call of ``fn`` on the GPU and how they were measured: the median of
    ``triton.testing.do_bench``, or for calls over 0.2 s the median of 3 event-timed calls (the rule of
    the benchmark and the Pareto study)."""
    from triton.testing import do_bench

    fn()  # compile / warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    if est > 200:
        return statistics.median(event_times(fn, 3)), "median of 3 event-timed calls"
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")), "do_bench median"


def event_times(fn: Callable[[], Any], count: int) -> list[float]:
    """Milliseconds of ``count`` calls of ``fn``, each between two CUDA events (for calls too long for
    do_bench's repeats)."""
    times = []
    for _ in range(count):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) if match else None


def _release_and_reset_peak() -> bool:
    """Give freed heap memory back to the OS and reset the peak RSS; False where unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def cpu_time_and_memory(fn: Callable[[], Any], repeats: int = 1) -> dict[str, float | None]:
    """Best wall and CPU time of ``fn()`` over ``repeats`` runs and its peak memory growth (on Linux: the
    peak resident set, VmHWM, reset through /proc/self/clear_refs before each run after freed heap
    memory is returned with ``malloc_trim``; elsewhere memory is None).

    Returns:
        {"seconds" (wall), "cpu_seconds" (process CPU time: on a shared, loaded machine this is the
         steadier measure of work), "peak_rss_delta" (bytes above the RSS at the start of the run,
         or None), "peak_rss" (the process's peak RSS during the run, bytes, or None)}.
    """
    best, best_cpu, delta, peak = math.inf, math.inf, None, None
    for _ in range(repeats):
        ok = _release_and_reset_peak()
        before = _status_kib("VmRSS") if ok else None
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
        del out
        if ok and before is not None:
            hwm = _status_kib("VmHWM")
            delta = max(delta or 0, (hwm - before) * 1024)
            peak = max(peak or 0, hwm * 1024)
    return {"seconds": best, "cpu_seconds": best_cpu, "peak_rss_delta": delta, "peak_rss": peak}


def keys_per_query(spec, nq: int, nk: int) -> float:
    """Mean number of keys with nonzero weight per query and head of a resolved call (an
    ``AttentionSpec`` or ``ranges.Support``), counted on the partitions' device."""
    pairs = nonzero_pairs(spec, nq, nk)  # [H]
    return float(pairs.sum()) / (pairs.numel() * nq)
