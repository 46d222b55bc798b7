"""Moved: the shared helpers are ``poslsh.util`` (results files, tables, progress, plots, flags) and
``poslsh.experiments.metrics`` (``gpu_time``). This module only forwards them for the modules not
switched over yet, and goes when they are."""

from ..util import (config_to_dict, environment, fmt, load_results, markdown_table, progress, pyplot,  # noqa: F401
                    replot_saved, save_results, torch_threads)
from .metrics import gpu_time  # noqa: F401
