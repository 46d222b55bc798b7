"""Max-norm and spectral error of the mean of r sampled block masks against the ALiBi kernel, vs r.

For each sequence length n, slope m, scheme ("grid", "cut") and seed, the errors of B-hat built from
r = 1, 2, 4, ..., r_max partitions, beside the theoretical levels from ``poslsh.theory`` and the
block-size bound.

Three modules, the JSON document between them: ``design`` (the Config, its checks), ``measure``
(config -> JSON: the errors and block sizes of nested prefixes of one draw, the bounds) and ``report``
(JSON -> plots, summary, results section).
"""

from .design import NAME, Config
from .measure import run
from .report import readme_section, replot, summarize

__all__ = ["NAME", "Config", "run", "readme_section", "replot", "summarize"]
