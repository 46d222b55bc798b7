"""Positional-LSH-native language models (issue 14): train ALiBi LMs with sampled block masks instead of
the bias, evaluate every model with exact, window and positional-LSH attention, and find whether a model
trained with the masks keeps exact ALiBi's perplexity and extrapolation at a fraction of its attention time.

One command on the GPU, ``poslsh lsh-native --out OUT``: the defaults end within ``deadline_s`` = 515 s of
the run's start (about 9 minutes with Python's start) on one H200. Every arm has the same model shape,
initialisation, data order and seed, at ``train_context``:

* (a) ``exact``: exact ALiBi (SDPA with the dense bias, the lm-validation recipe), for ``train_budget_s``
  seconds (less when the deadline needs it): that sets the step count N and the token budget
  N * ``batch_size`` * ``train_context`` of every from-scratch arm;
* (b) ``native``: positional-LSH-native training for N steps each (``poslsh lm train --attention lsh:R:grid``:
  fresh partitions at every step, per layer and head, from (seed, layer, step)); an arm that runs slower
  than (a) may take ``slower_arm_factor`` times (a)'s time, then its schedule is shortened (its JSON entry
  says so: ``token_budget_met``);
* (c) ``finetune``: (a)'s weights, then ``finetune_fraction`` * N more steps with ``finetune`` (LSH r = 8), at
  ``finetune_lr_ratio`` times the learning rate, on new batches;
* ``optional_native`` arms (qmc) train only when the deadline leaves room after the evaluation reserve.

Training gets what the deadline leaves once ``eval_reserve_s`` is set aside. Then, in order of importance
(``jobs``; what the deadline cuts is recorded as skipped, with the reason):

* held-out bits per byte of every arm at ``contexts`` with exact, window (``window_eps``) and LSH with r in
  ``samples`` (grid); every context scores the same ``scored_tokens`` tokens, so columns compare, and the
  extrapolation ratio is bits at a context over bits at ``train_context``;
* attention time per token per method and context: one ``poslsh.attention`` call of the model's shape
  (its eval batch, heads, head dim, dtype, "auto" dispatch: the Triton kernels on CUDA) times the number
  of layers, divided by the tokens;
* per-layer relative attention-output error against exact at ``error_context`` (each layer fed the exact
  model's input; float32, the "fused" backend);
* for arm (a) also the rows lm-validation's H200 run skipped (r = 2, 4, 16 of both schemes, qmc, hybrid):
  ``fill_schemes`` and ``fill_methods`` (lm-validation.json stays as it was committed: these rows are of
  this run's exact-ALiBi model).

Compile cost: on CUDA every method runs through the Triton kernels ("auto"), which specialize on the
method, r, the scheme, the dtype and on integer arguments equal to 1 or divisible by 16, so the eval batch
of every context avoids both (``eval_batch``) and each (method, r, scheme) compiles once for all arms and
contexts; ``precompile_workers`` processes compile the kernels the run will need into Triton's disk cache
while the arms train. The JSON records each row's wall seconds.

Outputs in ``--out``: ``lsh-native.json`` (rewritten atomically after every arm and row with
``"partial": true`` until the end) and the PNGs of ``PLOTS``; model weights go to ``--checkpoint-dir``
(default: the sibling ``<out>_checkpoint``). ``--replot JSON`` redraws the PNGs from a saved JSON alone;
``--tiny`` runs the whole pipeline at CPU size in seconds. The verdict (``verdict``) is computed from the
JSON: whether an LSH-native arm evaluated with LSH at r <= ``verdict_max_r`` comes within ``TOLERANCE`` of
the exact model's bits per byte at the two largest contexts, at what attention time per token next to the
window, and whether it keeps ALiBi's extrapolation.

Three modules, the JSON document between them: ``design`` (the Config, its checks, the grid of arms,
methods and jobs), ``measure`` (config -> JSON: training, evaluation, timings, kernels compiled
ahead) and ``report`` (JSON -> verdict, plots, report sections; nothing is measured there).
"""

from .design import (NAME, PLOT_DIR, PLOTS, TINY, TOLERANCE, Arm, Config, arms, check,
                     config_of, effective, eval_batch, fill_methods, jobs, main_methods, verdict_contexts,
                     window_label)
from .measure import precompile_specs, run, warm_kernels
from .report import readme_section, replot, summarize, verdict

__all__ = ["NAME", "PLOT_DIR", "PLOTS", "TOLERANCE", "TINY", "Config", "Arm", "effective",
           "check", "config_of", "arms", "window_label", "main_methods", "fill_methods", "verdict_contexts", "jobs",
           "eval_batch", "run", "precompile_specs", "warm_kernels", "verdict", "replot", "summarize", "readme_section"]
