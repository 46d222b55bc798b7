"""GPU benchmark of every method on its backends, through ``poslsh.attention`` as users call it.

One run on one GPU (B = 1, H = 32, D = 128, bfloat16, causal, Press slopes), in phases:

* ``checks``: every Triton kernel (exact, window, lsh, hybrid; forward and backward; padding, grouped
  KV, Nq < Nk, decoding) against the float64 reference on fresh random inputs, outputs poisoned;
* ``offsets``: a BLOOM-like fused-QKV view ([B, N, 3 H D] strides) past 2^31 element offsets, checked
  against float64 on the last rows and bit-for-bit against the same call on contiguous copies;
* ``sweep``: tile configurations of the Triton kernels per method, forward and backward; the fastest
  become this process's defaults and are written to ``tuned.json`` (the package ships that file);
* ``forward`` and ``backward``: every column (``COLUMNS``) at every n, median ms, TFLOP/s on the pairs
  the method needs, relative error against exact ALiBi on the same inputs; Triton also kernel-direct;
* ``decode``: one query against a KV cache of 16K..1M keys: time per call (and per generated token:
  wall clock of repeated calls through the public API).

Compiles are the slow part of a short GPU lease: before each timing phase, a pool of worker processes
runs every timed call once so that Triton's and Inductor's on-disk caches hold the kernels when the
main process times them. Results are saved after every measurement (a crash or the time budget keeps
what was measured). Derived numbers (floors, fractions, targets) are computed from the saved rows.

Three modules, the JSON document between them: ``design`` (the Config, the columns, the check cases,
the tile variants and the calls of each phase), ``measure`` (config -> JSON) and ``report`` (JSON ->
derived numbers, tables, plots, report sections).
"""

from .design import (CHECK_CASES, COLUMNS, LABELS, METHOD_ORDER, NAME, PRIMITIVES, SWEEP_BWD, SWEEP_FWD, Call, Config,
                     decode_calls, forward_calls, sweep_calls)
from .measure import build, check_one, gpu_checks, method_pairs, offsets_check, run, warm
from .report import PARTS, combine, derive, find, make_plots, readme_section, replot, speed_table, summarize

__all__ = ["CHECK_CASES", "COLUMNS", "LABELS", "METHOD_ORDER", "NAME", "PRIMITIVES", "SWEEP_BWD", "SWEEP_FWD", "Call",
           "Config", "decode_calls", "forward_calls", "sweep_calls", "build", "check_one", "gpu_checks",
           "method_pairs", "offsets_check", "run", "warm", "PARTS", "combine", "derive", "find", "make_plots",
           "readme_section", "replot", "speed_table", "summarize"]
