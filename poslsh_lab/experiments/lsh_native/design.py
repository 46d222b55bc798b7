"""lsh-native, the design of the run: its Config (every field a flag), the checks of a config, and the
grid of arms, methods, contexts and jobs in order of importance, shared by measuring and reporting."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from ...lm.evaluate import check_common_scoring
from poslsh.method import MethodSpec, parse_method, parse_methods
from ...util import Bounds, Count, CountOrZero, Fraction, NonNegative, Positive, TwoOrMore, check_fields
from .. import harness

NAME = "lsh-native"

# Where the committed run's PNGs live (relative to the repository root), linked from the README.
PLOT_DIR = "bench/results/lsh-native"
PLOTS = {"r": "lsh_native_r.png", "context": "lsh_native_context.png", "time": "lsh_native_time.png",
         "training": "lsh_native_training.png", "layers": "lsh_native_layers.png"}

# Seconds kept free before the deadline for what follows the last job (JSON, plots, report).
RESERVE_S = 15.0

# The question: within 2 % of the exact model's bits per byte.
TOLERANCE = 0.02



@dataclass
class Config:
    """Defaults: the H200 run. ``tiny=True`` replaces the sizes by a CPU-sized run (``TINY``).

    The model (12.7 M parameters: 4 layers of width 512, 8 heads of dimension 64, which the Triton
    kernels take) is smaller than lm-validation's 19 M so that ~90 s of training gives each arm enough
    steps. Budgets and ``deadline_s`` are seconds, 0 = no limit; ``max_steps`` bounds arm (a), whose
    training budget sets the step count. ``scored_tokens`` must be a multiple of every context's stride
    ceil(context / 2).

    Attributes:
        tiny: Replace the sizes left at their defaults by a CPU-sized run of seconds.
        d_model: Model width.
        n_layers: Transformer layers.
        n_heads: Attention heads, with Press slopes.
        train_context: Training context in tokens (bytes).
        batch_size: Training batch size in sequences.
        max_steps: Most steps of the exact arm (its training budget usually sets the count).
        lr: Peak learning rate.
        warmup: Learning-rate warm-up steps.
        eval_every: Steps between held-out evaluations.
        train_budget_s: Training budget of the exact arm in seconds (it sets every arm's token budget).
        slower_arm_factor: An arm slower than the exact one may take this many times its time.
        native: Methods the positional-LSH-native arms train with, as method strings.
        finetune: Method the fine-tuned arm trains with, from the exact arm's weights.
        finetune_fraction: Fine-tuning steps as a fraction of the exact arm's steps.
        finetune_lr_ratio: Fine-tuning learning rate as a fraction of the peak.
        optional_native: Native arms trained only when the deadline leaves room.
        max_bytes: Most bytes of corpus read.
        heldout_fraction: Fraction of the corpus's files held out.
        contexts: Evaluation contexts in tokens.
        samples: Partitions r of the LSH evaluations.
        window_eps: Truncation level of the window evaluations.
        fill_schemes: Schemes of the exact arm's extra rows (those lm-validation skipped).
        fill_methods: Extra methods evaluated on the exact arm, as method strings.
        verdict_max_r: Largest r the verdict counts.
        scored_tokens: Held-out tokens scored at every context (a multiple of every context's stride).
        eval_batch_tokens: Tokens per evaluation batch.
        eval_reserve_s: Seconds kept for evaluation before the deadline.
        error_context: Context of the per-layer attention errors.
        error_batch: Sequences of the per-layer attention errors.
        error_budget_s: Budget of the per-layer errors in seconds (0: no limit).
        precompile_workers: Processes that compile the Triton kernels while the arms train (0: none).
        deadline_s: Wall-time deadline of the whole run in seconds (0: none).
        seed: Seed of training and evaluation.
        device: Device, e.g. auto, cpu or cuda.
        checkpoint_dir: Where the arms' weights go (empty: OUT_checkpoint).
        replot: Redraw the PNGs of this saved JSON into --out; nothing else runs (empty: a normal run).
    """

    tiny: bool = False
    d_model: Count = 512
    n_layers: Count = 4
    n_heads: Count = 8
    train_context: TwoOrMore = 1024
    batch_size: Count = 32
    max_steps: Count = 20000
    lr: Positive = 1e-3
    warmup: CountOrZero = 200
    eval_every: Count = 1000
    train_budget_s: NonNegative = 90.0
    slower_arm_factor: Annotated[float, Bounds(1)] = 1.3
    native: tuple[str, ...] = ("lsh:4:grid", "lsh:1:grid")
    finetune: str = "lsh:8:grid"
    finetune_fraction: Annotated[float, Bounds(0, 1, low_open=True)] = 0.1
    finetune_lr_ratio: Positive = 0.3
    optional_native: tuple[str, ...] = ("lsh:4:grid:qmc",)
    max_bytes: Count = 128 * 2**20
    heldout_fraction: Fraction = 0.05
    contexts: tuple[TwoOrMore, ...] = (1024, 4096, 16384, 65536)
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32)
    window_eps: Fraction = 1e-3
    fill_schemes: tuple[str, ...] = ("cut",)
    fill_methods: tuple[str, ...] = ("lsh:8:grid:qmc", "hybrid:8:grid:qmc")
    verdict_max_r: Count = 8
    scored_tokens: Count = 65536
    eval_batch_tokens: Count = 16384
    eval_reserve_s: NonNegative = 170.0
    error_context: TwoOrMore = 2048
    error_batch: Count = 1
    error_budget_s: NonNegative = 16.0
    precompile_workers: CountOrZero = 6
    deadline_s: NonNegative = 515.0
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str = ""
    replot: str = ""


# What --tiny changes, in the fields left at their defaults (so ``--tiny --contexts 64`` keeps 64).
TINY = dict(d_model=32, n_layers=2, n_heads=4, train_context=32, batch_size=8, max_steps=40, lr=3e-3, warmup=5,
            eval_every=20, train_budget_s=0.0, max_bytes=2**20, contexts=(32, 64, 256), scored_tokens=256,
            eval_batch_tokens=1024, eval_reserve_s=0.0, error_context=128, error_budget_s=0.0, precompile_workers=0,
            deadline_s=0.0)


@dataclass(frozen=True)
class Arm:
    """One trained model: ``name`` labels its rows, ``train`` is its ``TrainConfig.train_attention``."""

    name: str
    kind: str  # "baseline" (a), "native" (b), "finetune" (c)
    train: str
    optional: bool = False


def effective(config: Config) -> Config:
    """The config actually run: with ``tiny`` set, the TINY sizes replace the fields left at their defaults."""
    return harness.effective(config, TINY)


def check(cfg: Config) -> None:
    """ValueError naming the first bad field of an effective config."""
    check_fields(cfg)
    if not cfg.contexts:
        raise ValueError("contexts must name one or more lengths")
    if cfg.train_context not in cfg.contexts:
        raise ValueError(f"contexts must include train_context={cfg.train_context} (the extrapolation ratio's "
                         f"reference), got {cfg.contexts}")
    if not cfg.samples:
        raise ValueError(f"samples must not be empty, got {cfg.samples}")
    main_methods(cfg), fill_methods(cfg)  # every evaluated method built once: a bad r, scheme or eps fails here
    trained = (parse_methods(cfg.native, "native") + parse_methods(cfg.optional_native, "optional_native")
               + parse_methods([cfg.finetune] if cfg.finetune else [], "finetune"))
    if any(not spec.random for spec in trained):
        raise ValueError("native, optional_native and finetune must be lsh or hybrid methods, got "
                         f"{[spec.label for spec in trained if not spec.random]}")
    check_common_scoring(cfg.scored_tokens, cfg.contexts)
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"d_model must be divisible by n_heads, got {cfg.d_model} and {cfg.n_heads}")


def config_of(res: dict) -> Config:
    """The effective config stored in a results dict (what the reporting knows of the run)."""
    return harness.config_from(res["effective_config"], Config)


# ---------------------------------------------------------------------------- the grid of the run
def arms(cfg: Config) -> list[Arm]:
    """The arms in training order: (a), the native arms (b), the fine-tuned arm (c), the optional ones."""
    out = [Arm("exact", "baseline", "sdpa")]
    out += [Arm(parse_method(m).label, "native", m) for m in cfg.native]
    if cfg.finetune:
        out.append(Arm(f"exact+{parse_method(cfg.finetune).label}", "finetune", cfg.finetune))
    out += [Arm(parse_method(m).label, "native", m, optional=True) for m in cfg.optional_native]
    return list({a.name: a for a in out}.values())


def window_label(cfg: Config) -> str:
    return f"window:{cfg.window_eps:g}"


def main_methods(cfg: Config) -> list[str]:
    """Every arm's evaluation methods, in table order."""
    specs = [MethodSpec("exact"), MethodSpec("window", window_eps=cfg.window_eps)]
    return [spec.label for spec in specs + [MethodSpec("lsh", samples=r) for r in cfg.samples]]


def fill_methods(cfg: Config) -> list[str]:
    """Arm (a)'s extra rows (those lm-validation skipped), not already in ``main_methods``."""
    extra = [MethodSpec("lsh", samples=r, scheme=s).label for s in cfg.fill_schemes for r in cfg.samples]
    extra += [spec.label for spec in parse_methods(cfg.fill_methods, "fill_methods")]
    main = set(main_methods(cfg))
    return [m for m in dict.fromkeys(extra) if m not in main]


def verdict_contexts(cfg: Config) -> list[int]:
    """The contexts the verdict is about: the two largest beyond the training context (16K and 64K)."""
    beyond = sorted(n for n in cfg.contexts if n > cfg.train_context)
    return beyond[-2:]


def _context_rank(cfg: Config) -> dict[int, int]:
    """Verdict contexts first, then the training context, then the rest (ascending)."""
    first = verdict_contexts(cfg) + [cfg.train_context]
    return {n: i for i, n in enumerate(first + sorted(n for n in cfg.contexts if n not in first))}


def _r(method: str) -> int | None:
    parts = method.split(":")
    return int(parts[1]) if parts[0] in ("lsh", "hybrid") else None


def _core(cfg: Config, arm: Arm) -> set[str]:
    """What the verdict needs of an arm: exact, window, LSH at the largest r <= verdict_max_r, its own r."""
    lsh = [m for m in main_methods(cfg) if m.startswith("lsh:")]
    small = [m for m in lsh if _r(m) <= cfg.verdict_max_r]
    core = {"exact", window_label(cfg)} | ({max(small, key=_r)} if small else set())
    own = f"lsh:{_r(arm.train)}:grid" if arm.kind != "baseline" else None
    return core | ({own} if own in lsh else set())


def jobs(cfg: Config) -> list[tuple]:
    """Evaluation jobs in order of importance: ("row", arm, context, method), ("time", context, method) and
    ("errors", arm).

    Tiers: 0 the verdict's rows (``_core``) at the verdict and training contexts; 1 the other LSH rows with
    r <= verdict_max_r there; then the attention timings of those; 2 every other row of the main grid;
    its timings; the per-layer errors; arm (a)'s fill rows and their timings. Within a tier: context
    (``_context_rank``), method, arm: the first row of a method compiles its kernel, the others reuse it.
    """
    rank = _context_rank(cfg)
    key_contexts = set(verdict_contexts(cfg) + [cfg.train_context])
    main, fill = main_methods(cfg), fill_methods(cfg)
    order = main + fill
    plan = arms(cfg)
    out = []
    for ai, arm in enumerate(plan):
        core = _core(cfg, arm)
        for n in cfg.contexts:
            for m in main:
                small = m in core or (m.startswith("lsh:") and _r(m) <= cfg.verdict_max_r)
                tier = (0 if m in core else 1) if n in key_contexts and small else 3
                out.append(((tier, rank[n], order.index(m), ai), ("row", arm.name, n, m)))
            if arm.kind == "baseline":
                out += [((6, rank[n], order.index(m), ai), ("row", arm.name, n, m)) for m in fill]
        out.append(((5, 0, 0, ai), ("errors", arm.name)))
    for n in cfg.contexts:
        for m in main:
            early = n in key_contexts and (not m.startswith("lsh:") or _r(m) <= cfg.verdict_max_r)
            out.append(((2 if early else 4, rank[n], order.index(m), 0), ("time", n, m)))
        out += [((7, rank[n], order.index(m), 0), ("time", n, m)) for m in fill]
    return [job for _, job in sorted(out, key=lambda x: x[0])]


def eval_batch(n: int, cfg: Config) -> int:
    """Windows per forward at context n: as near ``eval_batch_tokens / n`` as divides the context's window
    count, never 1 or a multiple of 16 while there are two windows or more (Triton compiles one kernel per
    such class of an integer argument, so one class serves every context)."""
    windows = cfg.scored_tokens // math.ceil(n / 2)
    target = max(2, cfg.eval_batch_tokens // n)
    fits = [b for b in range(2, min(target, windows) + 1) if windows % b == 0 and b % 16]
    return max(fits) if fits else 1
