"""CPU time and peak memory of exact, window and LSH (split, fused) attention vs sequence length.

Forward passes under ``torch.no_grad()``, batch 1, float32, causal, Press slopes; partition sampling
is included in the LSH times. Time is the best of ``repeats`` runs, as process CPU time (the plot
and fits) and wall time (recorded beside it); peak memory is the growth of the process's resident
set (``metrics.cpu_time_and_memory``; None where it cannot be read).

Three modules, the JSON document between them: ``design`` (the Config, its checks, the flags a run
ignores), ``measure`` (config -> JSON: the timings and the fitted growth exponents) and ``report``
(JSON -> plot, summary).
"""

from .design import NAME, Config, unused
from .measure import run
from .report import replot, summarize

__all__ = ["NAME", "Config", "unused", "run", "replot", "summarize"]
