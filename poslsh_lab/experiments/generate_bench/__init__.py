"""Long-context generation, end to end: a model of a published ALiBi checkpoint's shape (BLOOM-560m's by
default; BLOOM-7b1, MPT-7b, Falcon-RW-1b, or a local checkpoint) with random weights reads a random
prompt and generates greedily, with transformers' own attention ("native") and the poslsh patch
(exact, window, window with eviction, LSH, LSH with eviction; and the window with eviction decoding
from a CUDA graph over a static window cache, ``poslsh.integrations.hf_graph``, on CUDA only).

Per prompt length and arm: prefill time and peak memory (in one call, or in chunks against the cache
with ``--prefill-chunk``), wall time per generated token (and kernel time from the profiler), the KV
cache held after generation against a full one, and the greedy tokens against native's (exact's where
native did not run). An arm that runs out of memory is recorded as such and skipped at longer prompts;
a deadline (``--budget-s``) stops what would not finish. ``--rounds R`` measures each arm R times per
prompt length, in alternating arm order, against a shared host's slow stretches: the times are medians
over rounds, and a ratio to native's the median of the per-round ratios. ``--tiny`` is a CPU dry run of
seconds.

Three modules, the JSON document between them: ``design`` (the Config, the shapes, the arms),
``measure`` (config -> JSON; ``chunked_prefill``) and ``report`` (JSON -> agreement, aims, table,
README sentence, plot).
"""

from .design import (ARMS, GRAPHED, LABELS, NAME, SHAPES, TINY, Config, check, chunk_for, config_of, effective,
                     method_of, unavailable)
from .measure import build_model, cache_bytes, chunked_prefill, graph_cache_bytes, measure_point, run
from .report import (PLOT, agreement, aims, failures, make_plots, graph_line, readme_line, readme_section, reference, replot,
                     summarize, table, time_ratio)

__all__ = ["ARMS", "GRAPHED", "LABELS", "NAME", "SHAPES", "TINY", "Config", "check", "chunk_for", "config_of",
           "effective", "method_of", "unavailable", "build_model", "cache_bytes", "chunked_prefill", "graph_cache_bytes",
           "measure_point", "run", "PLOT", "agreement",
           "aims", "failures", "make_plots", "graph_line", "readme_line", "readme_section", "reference", "replot", "summarize",
           "table", "time_ratio"]
