"""Accuracy versus time: exact, truncated window, positional LSH (each sampling mode) and the hybrid
estimator, for ALiBi and for a heavy-tailed kernel; plus the error-versus-r slope of each sampling
mode. The Pareto study of issue 6, on the CPU (the defaults) or on a GPU, e.g.

    poslsh pareto --device cuda --backend auto --n 65536 262144 --heads 32 --head-dim 128 \\
        --dtype bfloat16 --reference-dtype float32 --heavy-n 65536 --threads 0 \\
        --no-convergence --no-plots --budget-s 180 --out OUT
    poslsh pareto --replot OUT/pareto.json --out OUT     # the PNGs (and report) from a saved JSON

Three parts, one JSON (``out/pareto.json``, rewritten after every point, ``"partial": true`` until
the run ends, so an interrupted run still leaves a loadable file):

* ``convergence``: error of B-hat (max norm, spectral norm; ``poslsh.mask_errors``, dense) and of the
  attention output against r, per sampling mode ("iid", "stratified", "qmc"), n = ``conv_n``,
  the Press slopes, float64, on the CPU; the fitted log-log slope over r >= ``fit_from`` of the
  geometric mean over heads and seeds (iid: -0.5 expected).
* ``alibi``: one panel per n in ``n``: relative output error ||O-hat - O|| / ||O|| (all heads
  together, against exact attention in ``reference_dtype`` on the same inputs) and time of one
  forward call, for exact, window(eps), hybrid(sampling, eps, r) and lsh(sampling, r), Press slopes
  of ``heads`` heads, ``head_dim``, ``dtype``, causal; q ~ ``query_scale`` N(0, 1), k, v ~ N(0, 1).
  Time on the CPU: process CPU time (one thread by default: on a shared machine wall time measures
  the neighbours), the median of ``repeats`` calls. On a GPU: the benchmark's rule
  (``gpu_bench``: ``triton.testing.do_bench`` median over ``rep_ms``; calls slower than 0.2 s: the
  median of 3 CUDA-event-timed calls). What a model builds once and shares across layers is built
  outside the timed call: the partitions, and FlexAttention's block mask. LSH and hybrid errors are
  averaged over ``seeds`` independent partition draws (time from the first).
* ``heavy``: the same at n = ``heavy_n`` with f(d) = (1 + d)^(-``heavy_p``) on every head
  (``poslsh.positional_kernels.power_law``): the row mass grows like sqrt(n), so the window must keep w with
  (1 + w)^-p <= eps, i.e. w = eps^(-1/p) - 1 (1e-2 -> 9999 at p = 1/2).

``budget_s`` bounds the run's wall time: once it is spent, every point not yet started is recorded
as skipped. Cost beside time: ``pairs``, the (query, key) pairs with a nonzero weight per query
(window: min(p, w) + 1; lsh: the union of the r blocks; hybrid: the union of band and blocks).

Three modules, the JSON document between them: ``design`` (the Config, its checks, the grid of points
of a panel), ``measure`` (config -> JSON: the timings and errors, the time budget, the partial JSON)
and ``report`` (JSON -> tables, verdicts, plots, report sections; nothing is measured there, so the
committed JSON regenerates them).
"""

from .design import NAME, PLOT, PLOT_CONV, SAMPLINGS, Config, check, unused
from .measure import convergence, run
from .report import (against_flex, against_flex_section, alibi_panels, baseline_error_at, comparison, failures,
                     frontier_gaps, measured, readme_section, replot, summarize)

__all__ = ["NAME", "PLOT", "PLOT_CONV", "SAMPLINGS", "Config", "check", "unused", "convergence", "run", "against_flex",
           "against_flex_section", "alibi_panels", "baseline_error_at", "comparison", "failures", "frontier_gaps",
           "measured", "readme_section", "replot", "summarize"]
