"""Low-level helpers every command and experiment shares; they import nothing else of poslsh.

* ``results``: a run's JSON document (environment record, atomic save, load, replot) and where the
  checkout's committed results are;
* ``display``: progress lines, compact numbers, Markdown tables, matplotlib without a display;
* ``flags``: a Config dataclass as command-line flags, ``--threads``, requirement checks.
"""

from .display import fmt, legend_if_labelled, markdown_table, progress, pyplot, save_figure
from .flags import (DEFAULT_THREADS, Bounds, Count, CountOrZero, Fraction, NonNegative, Positive, RequirementError,
                    TwoOrMore, add_config_flags, add_threads_flag, check_fields, config_from_args, field_help,
                    install_hint, require_cuda, require_file, require_package, synchronize, torch_threads)
from .results import (checkout_root, committed_results_dir, config_to_dict, environment, load_results,
                      replot_saved, save_results)

__all__ = ["fmt", "legend_if_labelled", "markdown_table", "progress", "pyplot", "save_figure", "DEFAULT_THREADS",
           "RequirementError", "add_config_flags", "add_threads_flag", "config_from_args", "field_help", "require_cuda",
           "require_file", "require_package", "install_hint", "Bounds", "Count", "CountOrZero", "Fraction",
           "NonNegative", "Positive", "TwoOrMore", "check_fields", "synchronize", "torch_threads", "checkout_root",
           "committed_results_dir", "config_to_dict", "environment", "load_results", "replot_saved", "save_results"]
