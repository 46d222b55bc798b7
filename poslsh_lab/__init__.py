"""poslsh_lab: the lab beside the library, the paper's experiments and this repository's tools.

Nothing in ``poslsh`` imports it; it imports the library like any user does.

* ``cli``: the ``poslsh`` command (every experiment, ``lm``, ``eval-hf``, ``demo``);
* ``experiments/``: each claim as a measurement, config -> JSON document -> plots, summary, results
  section (design / measure / report);
* ``lm/``: the small ALiBi language model, its training and evaluation;
* ``eval_hf``: ``poslsh eval-hf``, perplexity of a transformers checkpoint per method;
* ``readme``: the README's results block and docs/RESULTS.md, from the committed JSON;
* ``util/``: results files, environment record, tables, progress lines, plotting, Config -> flags.
"""

from poslsh import __version__

__all__ = ["__version__"]
