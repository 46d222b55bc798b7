"""Language-model validation: train an ALiBi LM here, then held-out perplexity and per-layer attention
error of positional-LSH attention against exact ALiBi and the window baseline, versus r and context.

One command on the GPU (``poslsh lm-validation``; the defaults end within ``deadline_s`` = 500 s plus
Python's start, under 9 minutes on one H200):

1. corpus (this interpreter's Python sources, split into train and held-out sets by file) and
   training for at most ``train_budget_s`` seconds at ``train_context`` (bf16 autocast on CUDA);
2. per-layer relative attention-output error versus r at ``error_context`` (float32 on the "fused"
   torch backend, which compiles nothing), within ``error_budget_s``;
3. held-out bits per byte and time per token at ``contexts`` (beyond the training context too:
   ALiBi's extrapolation) for exact, window (``window_eps``), LSH with r in ``samples`` for each of
   ``schemes``, and ``extra_methods`` (correlated "qmc" samples, the hybrid), within
   ``eval_budget_s``. Every context scores the same ``scored_tokens`` held-out tokens, so losses at
   different contexts differ by the context alone. Rows run in order of importance (``jobs``), so a
   short budget loses the least useful ones, recorded as skipped.

``deadline_s`` bounds the whole run from its start: training gets what is left after reserving the
error and evaluation budgets, and nothing new starts after the deadline.

Outputs in ``--out``, all small: ``lm-validation.json``, rewritten after training and after every
evaluation row with ``"partial": true`` until the end (a killed run still leaves its data; the
training loss history is in it), and the PNGs of ``PLOTS``. The model weights go to
``--checkpoint-dir`` (default: the sibling folder ``<out>_checkpoint``), never into ``--out``.
``--replot JSON`` redraws every PNG from a saved JSON alone (no model, no GPU), e.g. the committed
run's: ``poslsh lm-validation --replot bench/results/lm-validation.json --out bench/results/lm-validation``.
``--tiny`` runs the whole pipeline at CPU size in seconds.

Three modules, the JSON document between them: ``design`` (the Config, its checks, the grid of methods
and jobs), ``measure`` (config -> JSON) and ``report`` (JSON -> findings, plots, report sections).
"""

from .design import (LN2, NAME, PLOT_DIR, PLOTS, TINY, Config, check, config_of, effective, jobs, method_specs,
                     methods)
from .measure import run
from .report import findings, readme_section, replot, summarize

__all__ = ["LN2", "NAME", "PLOT_DIR", "PLOTS", "TINY", "Config", "check", "config_of", "effective", "jobs",
           "method_specs", "methods", "run", "findings", "readme_section", "replot", "summarize"]
