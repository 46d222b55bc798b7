"""Context parallelism benchmark: time, memory and bytes per rank of ``poslsh.distributed`` vs world size.

Runs under ``torchrun`` (NCCL on CUDA, one GPU per process) or spawns its own local processes (gloo on
the CPU); for every world size, per-rank length and method it checks the result against one process,
times forward and forward+backward calls, and measures each rank's peak memory and the bytes it sends.

Three modules, the JSON document between them: ``design`` (the Config, its checks), ``measure``
(config -> JSON: the launch, every rank's measurements, merged by rank 0) and ``report`` (JSON -> plot,
summary, results section).
"""

from .design import NAME, Config
from .measure import run
from .report import readme_section, replot, summarize

__all__ = ["NAME", "Config", "run", "readme_section", "replot", "summarize"]
