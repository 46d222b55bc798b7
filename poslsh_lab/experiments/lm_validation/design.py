"""lm-validation, the design of the run: its Config (every field a flag), the checks of a config, the
grid of methods and the evaluation jobs in order of importance, shared by measuring and reporting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ...lm.evaluate import check_common_scoring
from poslsh.method import MethodSpec, parse_method, parse_methods
from ...util import Count, CountOrZero, Fraction, NonNegative, Positive, TwoOrMore, check_fields
from .. import harness

NAME = "lm-validation"

# Where the committed run's PNGs live (relative to the repository root), linked from the README.
PLOT_DIR = "bench/results/lm-validation"
PLOTS = {"gap": "lm_validation_gap.png", "layers": "lm_validation_layers.png",
         "context": "lm_validation_context.png", "time": "lm_validation_time.png",
         "training": "lm_validation_training.png"}

# Log axes cannot show a zero loss gap: gaps are drawn at least this large (bits/byte).
GAP_FLOOR = 1e-9
LN2 = math.log(2)  # losses are stored in nats per byte; every plot and table shows bits per byte
# Per-token forward times at contexts up to this are dominated by per-call overhead (kernel launches,
# Python), not attention: the time plot marks them as noisy.
NOISY_CONTEXT = 1024

# Seconds kept free before the deadline for what follows the last phase (JSON, plots, report).
RESERVE_S = 15.0


@dataclass
class Config:
    """Defaults: the H200 run. ``tiny=True`` replaces the sizes by a CPU-sized run (see ``TINY``).

    The model (19 M parameters: 6 layers of width 512, 8 heads of dimension 64, which the Triton and
    Flex kernels take) is sized for ``train_budget_s`` on an H200: a few epochs of the 128 MiB corpus
    in bf16 (the committed run's tokens/s and held-out loss are in bench/results/lm-validation.json).

    Budgets and ``deadline_s`` are seconds, 0 = no limit. ``steps`` is an upper bound: the training
    budget sets the count. ``scored_tokens`` must be a multiple of every context's stride
    ceil(context / 2), so that every context scores the same tokens.

    Attributes:
        tiny: Replace the sizes left at their defaults by a CPU-sized run of seconds.
        d_model: Model width.
        n_layers: Transformer layers.
        n_heads: Attention heads, with Press slopes.
        train_context: Training context in tokens (bytes).
        batch_size: Training batch size in sequences.
        steps: Most training steps (the training budget usually sets the count).
        lr: Peak learning rate.
        warmup: Learning-rate warm-up steps.
        eval_every: Steps between held-out evaluations.
        train_budget_s: Training budget in seconds (0: no limit).
        max_bytes: Most bytes of corpus read.
        heldout_fraction: Fraction of the corpus's files held out.
        contexts: Evaluation contexts in tokens.
        samples: Partitions r of the LSH rows.
        schemes: Positional LSH schemes of the LSH rows.
        extra_methods: More methods to evaluate, as method strings (e.g. lsh:8:grid:qmc).
        window_eps: Truncation level of the window rows.
        seeds: Partition seeds averaged per LSH row.
        scored_tokens: Held-out tokens scored at every context (a multiple of every context's stride).
        eval_batch_tokens: Tokens per evaluation batch.
        eval_budget_s: Evaluation budget in seconds (0: no limit).
        error_context: Context of the per-layer attention errors.
        error_batch: Sequences of the per-layer attention errors.
        error_seeds: Partition seeds averaged for the per-layer errors.
        error_budget_s: Budget of the per-layer errors in seconds (0: no limit).
        deadline_s: Wall-time deadline of the whole run in seconds (0: none).
        seed: Seed of training and evaluation.
        device: Device, e.g. auto, cpu or cuda.
        checkpoint: Evaluate this checkpoint folder instead of training (empty: train).
        checkpoint_dir: Where training writes the weights (empty: OUT_checkpoint).
        replot: Redraw the PNGs of this saved JSON into --out; nothing else runs (empty: a normal run).
    """

    tiny: bool = False
    d_model: Count = 512
    n_layers: Count = 6
    n_heads: Count = 8
    train_context: TwoOrMore = 1024
    batch_size: Count = 32
    steps: Count = 20000
    lr: Positive = 1e-3
    warmup: CountOrZero = 200
    eval_every: Count = 500
    train_budget_s: NonNegative = 270.0
    max_bytes: Count = 128 * 2**20
    heldout_fraction: Fraction = 0.05
    contexts: tuple[TwoOrMore, ...] = (1024, 4096, 16384, 65536)
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    extra_methods: tuple[str, ...] = ("lsh:8:grid:qmc", "hybrid:8:grid:qmc")
    window_eps: Fraction = 1e-3
    seeds: tuple[int, ...] = (0,)
    scored_tokens: Count = 131072
    eval_batch_tokens: Count = 65536
    eval_budget_s: NonNegative = 150.0
    error_context: TwoOrMore = 4096
    error_batch: Count = 2
    error_seeds: tuple[int, ...] = (0, 1)
    error_budget_s: NonNegative = 30.0
    deadline_s: NonNegative = 500.0
    seed: int = 0
    device: str = "auto"
    checkpoint: str = ""
    checkpoint_dir: str = ""
    replot: str = ""


# What --tiny changes, in the fields left at their defaults (so ``--tiny --contexts 64`` keeps 64).
TINY = dict(d_model=32, n_layers=2, n_heads=4, train_context=32, batch_size=8, steps=40, lr=3e-3, warmup=5,
            eval_every=10, train_budget_s=0.0, max_bytes=2**20, contexts=(64, 256), scored_tokens=256,
            eval_batch_tokens=4096, eval_budget_s=0.0, error_context=128, error_batch=1, error_budget_s=0.0,
            deadline_s=0.0)


def effective(config: Config) -> Config:
    """The config actually run: with ``tiny`` set, the TINY sizes replace the fields left at their defaults."""
    return harness.effective(config, TINY)


def check(cfg: Config) -> None:
    """ValueError naming the first bad field of an effective config."""
    check_fields(cfg)
    if not cfg.contexts:
        raise ValueError("contexts must name one or more lengths")
    if not cfg.samples or not cfg.schemes:
        raise ValueError(f"samples and schemes must not be empty, got {cfg.samples} and {cfg.schemes}")
    method_specs(cfg)  # every method built once: a bad r, scheme, window_eps or extra method fails here
    if not cfg.seeds or not cfg.error_seeds:
        raise ValueError(f"seeds and error_seeds must not be empty, got {cfg.seeds} and {cfg.error_seeds}")
    check_common_scoring(cfg.scored_tokens, cfg.contexts)


def method_specs(cfg: Config) -> list[MethodSpec]:
    """Every method of the grid, in table order: exact, the window, LSH per scheme and r, the extra
    methods (ValueError naming the bad field)."""
    grid = [MethodSpec("exact"), MethodSpec("window", window_eps=cfg.window_eps)]
    grid += [MethodSpec("lsh", samples=r, scheme=s) for s in cfg.schemes for r in cfg.samples]
    return grid + parse_methods(cfg.extra_methods, "extra_methods")


def methods(cfg: Config) -> list[str]:
    """Every method label of the grid, in table order."""
    return list(dict.fromkeys(spec.label for spec in method_specs(cfg)))


def _lsh_label(r: int, scheme: str) -> str:
    return f"lsh:{r}:{scheme}"


def _tier(label: str, cfg: Config) -> int:
    """0: exact and window (reference and baseline); 1: LSH at the smallest, middle and largest r (the
    ends and middle of every curve); 2: the other r; 3: the extra methods."""
    spec = parse_method(label)
    if not spec.random:
        return 0
    if label not in {_lsh_label(r, s) for s in cfg.schemes for r in cfg.samples}:
        return 3
    rs = sorted(cfg.samples)
    key = {rs[0], rs[-1], 8 if 8 in rs else rs[len(rs) // 2]}
    return 1 if spec.samples in key else 2


def jobs(cfg: Config, contexts: list[int]) -> list[tuple[int, str]]:
    """(context, method) in evaluation order: by tier (``_tier``), then context, then table order."""
    order = methods(cfg)
    return sorted(((n, m) for n in contexts for m in order),
                  key=lambda job: (_tier(job[1], cfg), job[0], order.index(job[1])))


def config_of(res: dict) -> Config:
    """The effective config stored in a results dict (what the reporting knows of the run)."""
    return harness.config_from(res["effective_config"], Config)
