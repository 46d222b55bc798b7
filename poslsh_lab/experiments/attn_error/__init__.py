"""Attention output error of positional LSH vs r, against exact ALiBi, beside the window baseline.

For random q, k ~ N(0, 1) * logit_scale and v ~ N(0, 1) (one batch, the Press slopes of ``heads``
heads), compute exact ALiBi attention in float64 and the LSH estimate from r sampled partitions,
r = 1 .. 256, both schemes, and the relative error ||O-hat_h - O_h|| / ||O_h|| of every head.

Three modules, the JSON document between them: ``design`` (the Config), ``measure`` (config -> JSON: the
errors, pair counts and bounds) and ``report`` (JSON -> plots, summary, results section).
"""

from .design import NAME, Config
from .measure import run
from .report import readme_section, replot, summarize

__all__ = ["NAME", "Config", "run", "readme_section", "replot", "summarize"]
