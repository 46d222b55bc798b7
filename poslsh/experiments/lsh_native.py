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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..method import MethodSpec, parse_method, parse_methods
from ..util import fmt, legend_if_labelled, load_results, markdown_table, pyplot
from .harness import Run, describe_failure
from .metrics import gpu_time

NAME = "lsh-native"

# Where the committed run's PNGs live (relative to the repository root), linked from the README.
PLOT_DIR = "bench/results/lsh-native"
PLOTS = {"r": "lsh_native_r.png", "context": "lsh_native_context.png", "time": "lsh_native_time.png",
         "training": "lsh_native_training.png", "layers": "lsh_native_layers.png"}

# Seconds kept free before the deadline for what follows the last job (JSON, plots, report).
RESERVE_S = 15.0

# The question: within 2 % of the exact model's bits per byte.
TOLERANCE = 0.02

# An arm "keeps its loss" out to a context when its bits there are at most this times those at the
# training context (lm-validation's criterion).
KEEPS_EXTRAPOLATION = 1.05


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
    d_model: int = 512
    n_layers: int = 4
    n_heads: int = 8
    train_context: int = 1024
    batch_size: int = 32
    max_steps: int = 20000
    lr: float = 1e-3
    warmup: int = 200
    eval_every: int = 1000
    train_budget_s: float = 90.0
    slower_arm_factor: float = 1.3
    native: tuple[str, ...] = ("lsh:4:grid", "lsh:1:grid")
    finetune: str = "lsh:8:grid"
    finetune_fraction: float = 0.1
    finetune_lr_ratio: float = 0.3
    optional_native: tuple[str, ...] = ("lsh:4:grid:qmc",)
    max_bytes: int = 128 * 2**20
    heldout_fraction: float = 0.05
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    samples: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    window_eps: float = 1e-3
    fill_schemes: tuple[str, ...] = ("cut",)
    fill_methods: tuple[str, ...] = ("lsh:8:grid:qmc", "hybrid:8:grid:qmc")
    verdict_max_r: int = 8
    scored_tokens: int = 65536
    eval_batch_tokens: int = 16384
    eval_reserve_s: float = 170.0
    error_context: int = 2048
    error_batch: int = 1
    error_budget_s: float = 16.0
    precompile_workers: int = 6
    deadline_s: float = 515.0
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
    if not config.tiny:
        return config
    defaults = Config()
    return dataclasses.replace(config, **{k: v for k, v in TINY.items() if getattr(config, k) == getattr(defaults, k)})


def check(cfg: Config) -> None:
    """ValueError naming the first bad field of an effective config."""
    if not cfg.contexts or any(n < 2 for n in cfg.contexts):
        raise ValueError(f"contexts must be integers >= 2, got {cfg.contexts}")
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
    if cfg.finetune and not 0 < cfg.finetune_fraction <= 1:
        raise ValueError(f"finetune_fraction must be in (0, 1], got {cfg.finetune_fraction}")
    strides = {n: math.ceil(n / 2) for n in cfg.contexts}
    if cfg.scored_tokens < 1 or any(cfg.scored_tokens % s for s in strides.values()):
        raise ValueError(f"scored_tokens must be a positive multiple of every context's stride {strides} "
                         f"(so that every context scores the same tokens), got {cfg.scored_tokens}")
    for name in ("train_budget_s", "eval_reserve_s", "error_budget_s", "deadline_s"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = no limit), got {getattr(cfg, name)}")
    if cfg.slower_arm_factor < 1:
        raise ValueError(f"slower_arm_factor must be >= 1, got {cfg.slower_arm_factor}")
    if cfg.d_model % cfg.n_heads or cfg.error_batch < 1 or cfg.error_context < 2 or cfg.eval_batch_tokens < 1:
        raise ValueError(f"d_model divisible by n_heads, error_batch >= 1, error_context >= 2 and "
                         f"eval_batch_tokens >= 1 are needed, got {cfg.d_model}, {cfg.n_heads}, {cfg.error_batch}, "
                         f"{cfg.error_context}, {cfg.eval_batch_tokens}")


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


# ---------------------------------------------------------------------------- the run
def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Train the arms, evaluate them, write ``lsh-native.json`` and the PNGs; or, with ``replot``, only
    redraw the PNGs of that JSON. Returns the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.replot:
        doc = load_results(config.replot)
        replot(doc, out)
        return doc
    cfg = effective(config)
    check(cfg)
    results: dict[str, Any] = {"partial": True, "effective_config": dataclasses.asdict(cfg), "timing": {},
                               "arms": [], "rows": [], "timings": [], "layer_errors": {}, "precompile": None}
    clock = Run(NAME, out / f"{NAME}.json", config, results, deadline_s=cfg.deadline_s)
    log, save = clock.log, clock.save

    from ..lm.data import build_corpus
    from ..lm.train import resolve_device

    device = resolve_device(cfg.device)
    t = time.perf_counter()
    corpus = build_corpus(None, cfg.max_bytes, cfg.heldout_fraction)
    results["corpus"] = corpus.stats()
    results["timing"]["corpus_s"] = time.perf_counter() - t
    log(f"corpus {corpus.stats()} in {results['timing']['corpus_s']:.1f} s")
    workers = _start_precompile(cfg, device, log)
    try:
        t = time.perf_counter()
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.resolve().with_name(out.resolve().name
                                                                                          + "_checkpoint")
        models = _train_arms(cfg, corpus, ckpt, device, clock, results, log, save)
        results["timing"]["train_s"] = time.perf_counter() - t
        save()
        t = time.perf_counter()
        _evaluate(models, corpus.heldout, cfg, device, clock, results, log, save, workers)
        results["timing"]["eval_s"] = time.perf_counter() - t
    finally:
        results["precompile"] = _finish_precompile(workers, log)
    results["partial"] = False
    doc = save()
    replot(doc, out)
    for line in verdict(results, cfg):
        log(line)
    log(f"done; timing {', '.join(f'{k} {v:.0f}' for k, v in results['timing'].items())} s")
    return doc


def _train_arms(cfg: Config, corpus, ckpt: Path, device: torch.device, clock: Run, results: dict, log,
                save) -> dict[str, Any]:
    """Train every arm in ``arms`` order within what the deadline leaves before ``eval_reserve_s``; fill
    ``results["arms"]``. Returns {arm name: model in eval mode} for the arms that trained."""
    from ..lm.train import TrainConfig, train

    plan = arms(cfg)
    end = clock.end(0, reserve_s=cfg.eval_reserve_s + RESERVE_S)  # when training must be over
    # Planned cost of each arm in units of (a)'s training time: an LSH arm may take slower_arm_factor times.
    weight = {a.name: 1.0 if a.kind == "baseline" else cfg.slower_arm_factor * (
        cfg.finetune_fraction if a.kind == "finetune" else 1.0) for a in plan}
    models: dict[str, Any] = {}
    base: dict[str, Any] = {}  # arm (a)'s steps and seconds
    for i, arm in enumerate(plan):
        entry: dict[str, Any] = {"name": arm.name, "kind": arm.kind, "train_attention": arm.train,
                                 "optional": arm.optional}
        results["arms"].append(entry)
        left = end - time.perf_counter()
        later = sum(weight[a.name] for a in plan[i + 1:] if not a.optional)  # the required arms still to come
        if arm.kind == "baseline":
            steps = cfg.max_steps
            budget = min(cfg.train_budget_s or math.inf, left / (1 + later))  # leave the others their share
        elif not base:
            entry["skipped"] = "arm (a) did not train"
            continue
        else:
            steps = base["steps"] if arm.kind == "native" else max(1, round(cfg.finetune_fraction * base["steps"]))
            need = weight[arm.name] * base["seconds"]  # what this arm may take
            budget = left - later * base["seconds"]  # what the deadline leaves it
            if budget < (need if arm.optional else 0.5 * need / cfg.slower_arm_factor):
                entry["skipped"] = (f"deadline: needs up to {need:.0f} s, {max(budget, 0):.0f} s left for it before "
                                    "the evaluation reserve")
                log(f"arm {arm.name}: skipped ({entry['skipped']})")
                continue
            if cfg.train_budget_s or budget < math.inf:  # no budgets at all (--tiny): no cap either
                budget = min(budget, need)
        ft = arm.kind == "finetune"
        tc = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, context=cfg.train_context,
                         batch_size=cfg.batch_size, steps=steps, lr=cfg.lr * (cfg.finetune_lr_ratio if ft else 1.0),
                         warmup=max(1, steps // 10) if ft else cfg.warmup, eval_every=cfg.eval_every,
                         eval_windows=16 if cfg.tiny else 64, seed=cfg.seed + (1 if ft else 0),  # ft: new batches
                         partition_seed=cfg.seed, max_bytes=cfg.max_bytes, heldout_fraction=cfg.heldout_fraction,
                         device=str(device), time_budget_s=0.0 if budget == math.inf else max(1.0, budget),
                         train_attention=arm.train, init_checkpoint=str(ckpt / "exact") if ft else "")
        entry["planned_steps"] = steps
        entry["time_budget_s"] = tc.time_budget_s
        log(f"arm {arm.name}: training with {arm.train} for up to {steps} steps"
            + (f", budget {tc.time_budget_s:.0f} s" if tc.time_budget_s else ""))
        try:
            result = train(tc, ckpt / _slug(arm.name), corpus=corpus, log=log)
        except Exception as err:  # one failing arm (a kernel, memory) must not lose the others
            entry["error"] = describe_failure(err)
            log(f"arm {arm.name}: failed: {entry['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        models[arm.name] = result.pop("model")
        history = result.pop("history")
        entry.update({k: result[k] for k in ("steps", "tokens", "parameters", "train_seconds", "tokens_per_second",
                                             "heldout_bits_per_byte")})
        entry["initial_heldout_bits_per_byte"] = result["initial_heldout_loss"] / math.log(2)
        entry["planned_tokens"] = steps * cfg.batch_size * cfg.train_context
        entry["token_budget_met"] = result["steps"] == steps or arm.kind == "baseline"
        entry["history"] = [{"step": h["step"], **{f"{k.split('_')[0]}_bits_per_byte": h[k] / math.log(2)
                                                   for k in ("train_loss", "heldout_loss") if k in h}}
                            for h in history]
        results.setdefault("unigram", result["unigram"])
        if arm.kind == "baseline":
            base.update(steps=result["steps"], seconds=result["train_seconds"])
        save()
    return models


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("+", "_then_")


def _evaluate(models: dict, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run, results: dict,
              log, save, workers: list | None = None) -> None:
    """Every job of ``jobs`` while its expected cost (``_expected_seconds``) fits before the deadline, saving
    the JSON after each; what does not run is recorded with the reason."""
    first_target = max(cfg.contexts)  # every context has its full window before the first scored token
    if heldout.size < first_target + cfg.scored_tokens:
        raise ValueError(f"held-out set ({heldout.size} tokens) too short for context {first_target} and "
                         f"{cfg.scored_tokens} scored tokens")
    results["scored_from"] = first_target
    end = clock.end(0, reserve_s=RESERVE_S)
    trained = {a["name"]: a for a in results["arms"]}
    error_share = cfg.error_budget_s / max(1, len(models))
    compiled: set[tuple] = set()  # kernels this process has run
    for job in jobs(cfg):
        kind, arm = job[0], (job[1] if job[0] != "time" else None)
        record = ({"arm": arm, "context": job[2], "method": job[3]} if kind == "row" else
                  {"context": job[1], "method": job[2]} if kind == "time" else {})
        if arm is not None and arm not in models:
            why = trained[arm].get("skipped") or trained[arm].get("error") or "not trained"
            _store(results, job, {**record, "skipped": f"arm not trained ({why})"})
            continue
        key = _kernel(job, device)
        need = _expected_seconds(job, key, compiled, _precompiled(workers), error_share)
        if time.perf_counter() + need > end:
            _store(results, job, {**record, "skipped": f"deadline (expected {need:.0f} s)"})
            continue
        t = time.perf_counter()
        try:
            if kind == "row":
                _store(results, job, _row(models[arm], heldout, arm, job[2], job[3], cfg, device, first_target))
                r = results["rows"][-1]
                log(f"{arm:<18} {job[2]:>6} {job[3]:<18} {r['bits_per_token']:.4f} bits/byte  "
                    f"{r['time_per_token'] * 1e6:7.3f} us/token forward  ({r['wall_seconds']:.1f} s)")
            elif kind == "time":
                _store(results, job, _attention_time(job[1], job[2], cfg, device))
                r = results["timings"][-1]
                log(f"attention {job[1]:>6} {job[2]:<18} {r['attention_us_per_token']:.4f} us/token ({r['backend']})")
            else:
                cap = min(end, time.perf_counter() + error_share) if error_share else end
                _store(results, job, _layer_errors(models[arm], heldout, arm, cfg, device, cap))
                log(f"layer errors {arm}: " + ", ".join(f"{m} {np.mean(v):.3g}" for m, v in
                                                         results["layer_errors"][arm]["errors"].items()))
            compiled.add(key)
        except Exception as err:  # one failing job (a kernel that fails, out of memory) must not lose the rest
            _store(results, job, {**record, "error": describe_failure(err), "wall_seconds": time.perf_counter() - t})
            log(f"{job}: failed: {describe_failure(err)}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    for model in models.values():
        model.set_attention("exact")


def _store(results: dict, job: tuple, entry: dict) -> None:
    """A job's outcome (measurement, skip or error) where the JSON keeps its kind."""
    if job[0] == "errors":
        results["layer_errors"][job[1]] = entry
    else:
        results["rows" if job[0] == "row" else "timings"].append(entry)


# Compile seconds of a kernel's first launch, read off the lm-validation H200 log of the previous LSH kernel
# (a row's wall time at its first context minus its time at a context that reused the kernel): the kernel
# unrolls its per-sample loops, about 0.4 s per sample (grid) and 1.2 s (cut, which loads block bounds).
# Exact and window (one sample's worth of code) take the r = 1 figure. A compiled row costs at most ~2 s.
ROW_S = 2.0


def _kernel(job: tuple, device: torch.device) -> tuple:
    """What a row or timing job compiles on its first launch on CUDA: the Triton kernel of (method, r,
    scheme), one for every context and arm (``eval_batch``); () elsewhere."""
    if device.type != "cuda" or job[0] == "errors":
        return ()
    spec = parse_method(job[-1])
    return _kernel_key(spec.method, spec.samples if spec.random else 1, spec.scheme if spec.random else "-")


def _kernel_key(method: str, r: int, scheme: str) -> tuple:
    return ("triton", method, r, scheme)


def _expected_seconds(job: tuple, key: tuple, compiled: set, precompiled: set, error_share: float) -> float:
    """A job's expected wall time: a compiled row's, plus the compile when its kernel is new to the process
    and not in Triton's disk cache yet (``precompiled``); the per-layer errors take their share."""
    if job[0] == "errors":
        return error_share
    if not key:
        return 0.0
    if key in compiled:
        return ROW_S
    if key in precompiled:
        return ROW_S + 1.0
    _, method, r, scheme = key
    return ROW_S + (1.0 + (1.2 if scheme == "cut" else 0.4) * r) * (1.5 if method == "hybrid" else 1.0)


def _row(model, heldout: np.ndarray, arm: str, n: int, method: str, cfg: Config, device: torch.device,
         first_target: int) -> dict[str, Any]:
    """One perplexity row (``poslsh.lm.cli.evaluate_checkpoint``) with the arm, batch and wall seconds."""
    from ..lm.cli import evaluate_checkpoint

    t = time.perf_counter()
    batch = eval_batch(n, cfg)
    [row] = evaluate_checkpoint(model, heldout, [n], [parse_method(method)], [cfg.seed], device=device,
                                batch_size=batch, max_scored=cfg.scored_tokens, first_target=first_target)
    return {"arm": arm, **row, "batch": batch, "wall_seconds": time.perf_counter() - t}


@torch.no_grad()
def _attention_time(n: int, method: str, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Time of one ``poslsh.attention`` call as a layer of the model makes it at context n (its eval batch,
    heads, head dim and layout, bf16 on CUDA, fixed partitions of layer 0), times the layers, per token."""
    from ..alibi import alibi_slopes
    from ..attention import attention
    from ..attention.dispatch import resolve_spec, select_backend
    from ..layer_partitions import LayerPartitions
    spec = parse_method(method)
    b, h, d = eval_batch(n, cfg), cfg.n_heads, cfg.d_model // cfg.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    # [B, N, H, D] viewed as [B, H, N, D]: the strides of the model's projections.
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    parts = None
    if spec.random:
        parts = LayerPartitions(alibi_slopes(h), spec.samples, spec.scheme, cfg.seed, 0,
                                sampling=spec.sampling).get(n, device)
    kw = dict(method=spec.method, partitions=parts, window_eps=spec.window_eps, hybrid_eps=spec.hybrid_eps)
    backend = select_backend(q, resolve_spec(q, k, v, **kw), "auto").name

    def call() -> torch.Tensor:
        return attention(q, k, v, backend="auto", **kw)

    if device.type == "cuda":
        ms, how = gpu_time(call, warmup_ms=5, rep_ms=20)
    else:
        call()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        ms, how = 1e3 * float(np.median(times)), "median of 3 calls (wall)"
    return {"context": n, "method": method, "batch": b, "backend": backend, "ms_per_call": ms, "timed": how,
            "attention_us_per_token": cfg.n_layers * ms * 1e3 / (b * n)}


def _layer_errors(model, heldout: np.ndarray, arm: str, cfg: Config, device: torch.device,
                  end: float) -> dict[str, Any]:
    """Per-layer error of every non-exact main method (and, for arm (a), the fill methods) at
    ``error_context``, float32, "fused" backend, until ``end``."""
    from ..lm.evaluate import layer_errors

    n = min(cfg.error_context, heldout.size // cfg.error_batch)
    windows = np.stack([heldout[i * n:(i + 1) * n].astype(np.int64) for i in range(cfg.error_batch)])
    idx = torch.from_numpy(windows).to(device)
    labels = [m for m in main_methods(cfg) if m != "exact"] + (fill_methods(cfg) if arm == "exact" else [])
    errs = layer_errors(model, idx, [parse_method(m) for m in labels], seeds=[cfg.seed], backend="fused",
                        deadline=None if end == math.inf else end)
    return {"context": n, "batch": cfg.error_batch, "seeds": [cfg.seed], "backend": "fused", "errors": errs,
            "skipped": [m for m in labels if m not in errs]}


# ---------------------------------------------------------------------------- Triton kernels compiled ahead
def precompile_specs(cfg: Config) -> list[dict[str, Any]]:
    """The Triton kernels the run will launch, as ``warm_kernels`` specs: the training kernels (forward and
    backward at the training batch) of every LSH arm, and the eval forwards of every method (exact, window,
    each r and scheme, the hybrid) at a batch of the eval batches' class (2: not 1, not a multiple of 16)."""
    shape = dict(heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, n=cfg.train_context)

    def spec(text: str, batch: int, backward: bool) -> dict[str, Any]:
        s = parse_method(text)
        return dict(shape, method=s.method, r=s.samples if s.random else 1, scheme=s.scheme if s.random else "-",
                    window_eps=s.window_eps, batch=batch, backward=backward)

    specs = [spec(m, cfg.batch_size, True) for m in (*cfg.native, cfg.finetune, *cfg.optional_native) if m]
    specs += [spec(m, 2, False) for m in main_methods(cfg) + fill_methods(cfg)]
    unique = {json.dumps(s, sort_keys=True): s for s in specs}  # qmc and iid share a kernel
    return list(unique.values())


def warm_kernels(specs: list[dict[str, Any]], device: str = "cuda", report=None) -> list[dict[str, Any]]:
    """Launch the Triton kernel once per spec (``precompile_specs``) on random inputs, so that it is
    compiled into Triton's disk cache; returns [{"spec", "seconds"} or {"spec", "error"}], each also passed
    to ``report`` as it completes. Run by the worker processes of ``_start_precompile`` (or directly, e.g.
    under TRITON_INTERPRET=1 on the CPU)."""
    from ..alibi import alibi_slopes
    from ..attention import attention
    from ..hashing import sample_partitions

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    done = []
    for spec in specs:
        t = time.perf_counter()
        try:
            b, n, h, d = spec["batch"], spec["n"], spec["heads"], spec["head_dim"]
            # [B, N, H, D] viewed as [B, H, N, D], as the model's projections are: the same strides' class.
            q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(spec["backward"])
                       for _ in range(3))
            parts = None
            if spec["method"] in ("lsh", "hybrid"):
                parts = sample_partitions(n, alibi_slopes(h), spec["r"], scheme=spec["scheme"],
                                          generator=torch.Generator().manual_seed(0), device=dev)
            with torch.set_grad_enabled(spec["backward"]):
                out = attention(q, k, v, method=spec["method"], partitions=parts, window_eps=spec["window_eps"],
                                backend="triton")
                if spec["backward"]:
                    out.float().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            done.append({"spec": spec, "seconds": time.perf_counter() - t})
        except Exception as err:  # a kernel that does not compile here will compile (or fail) in the run
            done.append({"spec": spec, "error": describe_failure(err)})
        if report is not None:
            report(done[-1])
    return done


# A worker: one JSON line per kernel as it completes, so the run knows what is in the disk cache already.
_WORKER = ("import json, sys; from poslsh.experiments.lsh_native import warm_kernels; "
           "warm_kernels(json.loads(sys.argv[1]), sys.argv[2], lambda r: print(json.dumps(r), flush=True))")


def _start_precompile(cfg: Config, device: torch.device, log) -> list[tuple[subprocess.Popen, Path]]:
    """On CUDA with ``precompile_workers`` > 0: start that many processes running ``warm_kernels`` on the
    specs, dealt out in turn. Returns [(process, the file its lines go to)]."""
    if device.type != "cuda" or cfg.precompile_workers <= 0:
        return []
    return _spawn_workers(precompile_specs(cfg), cfg.precompile_workers, str(device), log)


def _spawn_workers(specs: list[dict], count: int, device: str, log) -> list[tuple[subprocess.Popen, Path]]:
    # The training kernels first (an LSH arm starts ~100 s in, evaluation later), then the costliest.
    specs = sorted(specs, key=lambda s: (not s["backward"], -s["r"] * (3 if s["scheme"] == "cut" else 1)))
    shares: list[list[dict]] = [[] for _ in range(min(count, len(specs)))]
    for i, spec in enumerate(specs):
        shares[i % len(shares)].append(spec)
    workers = []
    for share in shares:
        fd, path = tempfile.mkstemp(prefix="poslsh-precompile-", suffix=".jsonl")
        with os.fdopen(fd, "a") as sink:  # appends: the worker's lines never overwrite each other
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(share), device], stdout=sink,
                                    stderr=subprocess.DEVNULL)
        workers.append((proc, Path(path)))
    log(f"precompiling {len(specs)} Triton kernels in {len(workers)} processes")
    return workers


def _reports(workers: list[tuple[subprocess.Popen, Path]] | None) -> list[dict]:
    """The kernels the workers have reported so far."""
    out = []
    for _, path in workers or []:
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


def _precompiled(workers: list | None) -> set[tuple]:
    """Keys (``_kernel``) of the eval kernels that are in Triton's disk cache by now."""
    return {_kernel_key(r["spec"]["method"], r["spec"]["r"], r["spec"]["scheme"]) for r in _reports(workers)
            if "seconds" in r and not r["spec"]["backward"]}


def _finish_precompile(workers: list[tuple[subprocess.Popen, Path]], log) -> dict[str, Any] | None:
    """The workers' reports; a worker still running is ended (its kernels compile, if needed, in the run)."""
    if not workers:
        return None
    unfinished = 0
    for proc, _ in workers:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            unfinished += 1
    report = {"workers": len(workers), "kernels": _reports(workers), "unfinished": unfinished}
    for _, path in workers:
        path.unlink(missing_ok=True)
    failed = sum("error" in k for k in report["kernels"])
    log(f"precompile: {len(report['kernels'])} kernels compiled ahead ({failed} failed), {unfinished} workers "
        "ended unfinished")
    return report


# ---------------------------------------------------------------------------- analysis
def _config(res: dict[str, Any]) -> Config:
    """The effective config stored in a results dict."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["effective_config"].items()
                     if k in known})


def _table(rows: list[dict]) -> dict[tuple[str, int, str], dict]:
    return {(r["arm"], r["context"], r["method"]): r for r in rows if "loss" in r}


def _times(timings: list[dict]) -> dict[tuple[int, str], float]:
    """(context, method) -> attention microseconds per token."""
    return {(t["context"], t["method"]): t["attention_us_per_token"] for t in timings if "attention_us_per_token" in t}


def _lsh_rs(table: dict, arm: str, n: int, cfg: Config, scheme: str = "grid") -> list[tuple[int, dict]]:
    """(r, row) of the arm's LSH rows at context n, by r."""
    return [(r, table[(arm, n, f"lsh:{r}:{scheme}")]) for r in sorted(cfg.samples) if (arm, n, f"lsh:{r}:{scheme}")
            in table]


def _trained(res: dict[str, Any]) -> list[dict]:
    return [a for a in res.get("arms", []) if "steps" in a]


def _rel(bits: float, ref: float) -> float:
    return bits / ref - 1.0


def verdict(res: dict[str, Any], cfg: Config) -> list[str]:
    """The issue's question answered from the rows, "not measured" where they are missing.

    Per LSH-trained arm ((b) and (c)): the smallest r <= verdict_max_r whose LSH evaluation is within
    TOLERANCE of the exact model's exact bits per byte at every verdict context (else the r that comes
    closest), its attention time per token next to the window's, and its extrapolation. The first line
    answers for the LSH-native arms (b) (the fine-tuned arm (c) is reported beside them)."""
    table, times = _table(res.get("rows", [])), _times(res.get("timings", []))
    big = verdict_contexts(cfg)
    ctx = " and ".join(_k(n) for n in big)
    refs = {n: table.get(("exact", n, "exact")) for n in big}
    if not big or any(r is None for r in refs.values()):
        return [f"Verdict not measured: the exact model's exact rows at {ctx or 'the verdict contexts'} are missing."]
    exact_extra = _extrapolation(table, "exact", "exact", cfg)
    found = {}
    lines = []
    for arm in [a for a in res.get("arms", []) if a["kind"] in ("native", "finetune")]:
        found[arm["name"]] = best = _best_lsh(table, times, arm, refs, cfg)
        if isinstance(best, str):
            lines.append(f"{_arm_label(arm)}: not measured ({best}).")
            continue
        lines.append(f"{_arm_label(arm)} evaluated with {best['method']}: "
                     + ", ".join(f"{b:.4f} at {_k(n)} ({100 * g:+.1f} %)" for n, b, g in best["bits"])
                     + " against the exact model's " + ", ".join(f"{refs[n]['bits_per_token']:.4f}" for n in big)
                     + f" -> {'within' if best['within'] else 'not within'} {100 * TOLERANCE:.0f} %; attention time "
                     + "; ".join(best["speed"]) + f"; extrapolation: {best['extrapolation']}.")
    native = [a for a in res.get("arms", []) if a["kind"] == "native" and isinstance(found.get(a["name"]), dict)]
    met = sorted((found[a["name"]]["r"], i, a) for i, a in enumerate(native) if found[a["name"]]["within"])
    if met:
        r, _, arm = met[0]
        best = found[arm["name"]]
        head = (f"Yes: {_arm_label(arm)}, evaluated with positional LSH at r = {r}, comes within "
                f"{100 * TOLERANCE:.0f} % of the exact-ALiBi model's bits per byte at {ctx} ("
                + ", ".join(f"{100 * g:+.1f} %" for _, _, g in best["bits"])
                + f"), at an attention time per token of {best['speed'][-1]}; extrapolation: {best['extrapolation']}")
    elif native:
        closest = min(native, key=lambda a: max(g for _, _, g in found[a["name"]]["bits"]))
        best = found[closest["name"]]
        head = (f"No: no LSH-native model evaluated with LSH at r <= {cfg.verdict_max_r} comes within "
                f"{100 * TOLERANCE:.0f} % of the exact-ALiBi model's bits per byte at {ctx}; the closest, "
                f"{_arm_label(closest)} with {best['method']}, is "
                + ", ".join(f"{100 * g:+.1f} %" for _, _, g in best["bits"])
                + f" from it, at {best['speed'][-1]}; extrapolation: {best['extrapolation']}")
    else:
        head = f"Verdict not measured: no LSH-native arm has LSH rows with r <= {cfg.verdict_max_r} at {ctx}"
    return [head + f" (exact ALiBi: {exact_extra})."] + lines


def _best_lsh(table: dict, times: dict, arm: dict, refs: dict, cfg: Config) -> dict | str:
    """The arm's LSH evaluation that answers the verdict (see ``verdict``), or why there is none."""
    if "steps" not in arm:
        return f"not trained: {arm.get('skipped') or arm.get('error')}"
    name, big, win = arm["name"], list(refs), window_label(cfg)
    gaps = {r: [_rel(table[(name, n, f"lsh:{r}:grid")]["bits_per_token"], refs[n]["bits_per_token"]) for n in big]
            for r in sorted(cfg.samples) if r <= cfg.verdict_max_r
            and all((name, n, f"lsh:{r}:grid") in table for n in big)}
    if not gaps:
        return f"no LSH rows with r <= {cfg.verdict_max_r} at " + " and ".join(_k(n) for n in big)
    within = [r for r, g in gaps.items() if max(g) <= TOLERANCE]
    r = min(within) if within else min(gaps, key=lambda x: max(gaps[x]))
    method = f"lsh:{r}:grid"
    speed = [f"{fmt(times[(n, method)])} us vs the window's {fmt(times[(n, win)])} at {_k(n)}"
             if (n, method) in times and (n, win) in times else f"not measured at {_k(n)}" for n in big]
    return {"r": r, "method": method, "within": bool(within), "speed": speed,
            "bits": [(n, table[(name, n, method)]["bits_per_token"], g) for n, g in zip(big, gaps[r])],
            "extrapolation": _extrapolation(table, name, method, cfg)}


def _extrapolation(table: dict, arm: str, method: str, cfg: Config) -> str:
    """'ratio 1.01 at 64K, keeps its loss' from bits at the largest context over bits at train_context."""
    n = max(cfg.contexts)
    a, b = table.get((arm, cfg.train_context, method)), table.get((arm, n, method))
    if a is None or b is None:
        return "not measured"
    ratio = b["bits_per_token"] / a["bits_per_token"]
    keeps = "keeps its loss" if ratio <= KEEPS_EXTRAPOLATION else f"degrades by {100 * (ratio - 1):.0f} %"
    return f"bits at {_k(n)} / at {_k(cfg.train_context)} = {ratio:.3f}, {keeps}"


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _arm_label(arm: dict) -> str:
    if arm["kind"] == "baseline":
        return "the exact-ALiBi model (a)"
    if arm["kind"] == "finetune":
        return f"the exact model fine-tuned with {arm['train_attention']} (c)"
    return f"the model trained with {arm['train_attention']} (b)"


# ---------------------------------------------------------------------------- plots
def replot(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw every PNG of ``PLOTS`` that the saved document has data for into out_dir."""
    res = doc["results"]
    cfg = _config(res)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(res["rows"])
    draw = {"r": lambda p: _plot_r(table, res, cfg, p), "context": lambda p: _plot_context(table, res, cfg, p),
            "time": lambda p: _plot_time(table, res, cfg, p), "training": lambda p: _plot_training(res, p),
            "layers": lambda p: _plot_layers(res, cfg, p)}
    return [draw[key](out / PLOTS[key]) for key in _drawable(res)]


def _drawable(res: dict[str, Any]) -> list[str]:
    rows = bool(_table(res["rows"]))
    present = {"r": rows, "context": rows, "time": rows and bool(_times(res.get("timings", []))),
               "training": bool(_trained(res)),
               "layers": any(e.get("errors") for e in (res.get("layer_errors") or {}).values())}
    return [key for key in PLOTS if present[key]]


def _arm_colors(res: dict[str, Any]) -> dict[str, str]:
    return {a["name"]: f"C{i}" for i, a in enumerate(res.get("arms", []))}


def _panels(count: int, cols: int = 2, size=(5.2, 3.8)):
    plt = pyplot()
    cols = max(1, min(cols, count))
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)[:count]


def _axes(ax, x: str, y: str = "held-out bits / byte", title: str = "", xscale: str = "log2", ylog: bool = True,
          legend: int = 6) -> None:
    """Labels, grid, legend and log scales with plain numbers (matplotlib's 4.9x10^0 style is unreadable on a
    narrow range). ``xscale``: "log2" (samples), "contexts" (log2, ticks labelled 1K, 4K, ...), "log" (times,
    every tick labelled) or "linear"."""
    from matplotlib import ticker

    plain = ticker.FormatStrFormatter("%.4g")
    if ylog:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="both", labelsize=6)
    if xscale in ("log2", "contexts"):
        ax.set_xscale("log", base=2)
    if xscale == "contexts":
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: _k(int(round(v)))))
    if xscale == "log":  # a span of less than a decade gets only minor ticks: label them too
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(axis="x", which="both", labelsize=6)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    legend_if_labelled(ax, fontsize=legend)


def _finish(plt, fig, path: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_r(table: dict, res: dict, cfg: Config, path: Path) -> Path:
    """Bits per byte against r_eval (LSH, grid), one panel per context, one line per arm; the exact model's
    exact bits and its +-TOLERANCE band."""
    contexts = sorted({n for _, n, _ in table})
    plt, fig, axes = _panels(len(contexts))
    colors = _arm_colors(res)
    for ax, n in zip(axes, contexts):
        ref = table.get(("exact", n, "exact"))
        if ref:
            b = ref["bits_per_token"]
            ax.axhline(b, color="k", lw=1, label="exact model, exact attention")
            ax.axhspan(b * (1 - TOLERANCE), b * (1 + TOLERANCE), color="k", alpha=0.08,
                       label=f"+-{100 * TOLERANCE:.0f} %")
        for arm in _trained(res):
            pts = _lsh_rs(table, arm["name"], n, cfg)
            if pts:
                ax.plot([r for r, _ in pts], [p["bits_per_token"] for _, p in pts], "o-", ms=4,
                        color=colors[arm["name"]], label=f"trained {arm['name']}")
            own = table.get((arm["name"], n, window_label(cfg)))
            if own:
                ax.plot([max(cfg.samples) * 1.5], [own["bits_per_token"]], "s", ms=5, color=colors[arm["name"]],
                        alpha=0.6)
        _axes(ax, "LSH samples r at evaluation (squares at the right: window)", title=f"context {_k(n)}")
    return _finish(plt, fig, path, "Held-out bits per byte against the LSH samples r used at evaluation, per "
                                   "training arm")


def _context_methods(cfg: Config) -> list[str]:
    """Exact, window and LSH at the smallest r, verdict_max_r and the largest r: the extrapolation lines."""
    rs = sorted(cfg.samples)
    return ["exact", window_label(cfg)] + [f"lsh:{r}:grid" for r in dict.fromkeys((rs[0], cfg.verdict_max_r, rs[-1]))
                                           if r in rs]


def _plot_context(table: dict, res: dict, cfg: Config, path: Path) -> Path:
    """Bits per byte against the evaluation context, one panel per arm: exact, window, LSH r = 1, 8, largest."""
    arms_ = [a for a in _trained(res) if any(k[0] == a["name"] for k in table)]
    plt, fig, axes = _panels(len(arms_))
    shown = _context_methods(cfg)
    for ax, arm in zip(axes, arms_):
        for i, m in enumerate(shown):
            pts = sorted((n, row["bits_per_token"]) for (a, n, mm), row in table.items() if a == arm["name"] and mm == m)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, color=f"C{i}", label=m)
        ax.axvline(cfg.train_context, color="gray", ls="--", lw=1, label="training context")
        _axes(ax, "evaluation context (tokens; the same scored tokens at every context)", xscale="contexts",
              title=f"trained {arm['name']}")
    return _finish(plt, fig, path, "Held-out bits per byte against the evaluation context (extrapolation beyond "
                                   "the training context), per training arm and evaluation method")


def _plot_time(table: dict, res: dict, cfg: Config, path: Path) -> Path:
    """Bits per byte against attention time per token, one panel per context: each arm's LSH points (r
    labelled, sorted by time), its exact and window points."""
    times = _times(res.get("timings", []))
    contexts = sorted({n for _, n, _ in table})
    plt, fig, axes = _panels(len(contexts))
    colors = _arm_colors(res)
    win = window_label(cfg)
    for ax, n in zip(axes, contexts):
        for arm in _trained(res):
            c = colors[arm["name"]]
            pts = sorted((times[(n, f"lsh:{r}:grid")], row["bits_per_token"], r)
                         for r, row in _lsh_rs(table, arm["name"], n, cfg) if (n, f"lsh:{r}:grid") in times)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=0.8, color=c,
                        label=f"trained {arm['name']}: lsh (r labelled)")
                for x, y, r in pts:
                    ax.annotate(str(r), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            for m, marker in (("exact", "*"), (win, "s")):
                row = table.get((arm["name"], n, m))
                if row and (n, m) in times:
                    ax.plot([times[(n, m)]], [row["bits_per_token"]], marker, ms=8, color=c, alpha=0.7)
                    ax.annotate(m.split(":")[0], (times[(n, m)], row["bits_per_token"]), fontsize=6,
                                xytext=(3, -8), textcoords="offset points")
        _axes(ax, "attention time per token, all layers (us)", xscale="log",
              title=f"context {_k(n)} (star: exact, square: window)")
    return _finish(plt, fig, path, "Held-out bits per byte against attention time per token, per training arm "
                                   "and evaluation method")


def _plot_training(res: dict, path: Path) -> Path:
    """Held-out bits per byte against training step, per arm (the fine-tuned arm continues after (a))."""
    plt, fig, (ax,) = _panels(1, size=(6.5, 4.2))
    colors = _arm_colors(res)
    base = next((a for a in _trained(res) if a["kind"] == "baseline"), None)
    for arm in _trained(res):
        shift = base["steps"] if arm["kind"] == "finetune" and base else 0
        pts = sorted((h["step"] + shift, h["heldout_bits_per_byte"]) for h in arm["history"]
                     if "heldout_bits_per_byte" in h)
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, color=colors[arm["name"]],
                    label=f"{arm['name']} ({arm['train_attention']}, eval with it)")
    if res.get("unigram"):
        ax.axhline(res["unigram"]["bits_per_token"], color="gray", ls="--", lw=1, label="unigram baseline")
    _axes(ax, "optimizer step (the fine-tuned arm after (a)'s)", xscale="linear", legend=7)
    return _finish(plt, fig, path, "Held-out bits per byte during training, each arm measured with its training "
                                   "attention")


def _plot_layers(res: dict, cfg: Config, path: Path) -> Path:
    """Per-layer attention-output error (mean over layers, bars: min and max) against r, per arm."""
    plt, fig, (ax,) = _panels(1, size=(6.5, 4.2))
    colors = _arm_colors(res)
    for name, entry in (res.get("layer_errors") or {}).items():
        errs = entry.get("errors") or {}
        pts = sorted((r, errs[f"lsh:{r}:grid"]) for r in cfg.samples if f"lsh:{r}:grid" in errs)
        if pts:
            mean = np.array([np.mean(e) for _, e in pts])
            lo, hi = mean - [min(e) for _, e in pts], [max(e) for _, e in pts] - mean
            ax.errorbar([r for r, _ in pts], mean, yerr=[lo, hi], fmt="o-", ms=4, capsize=2, color=colors.get(name),
                        label=f"trained {name}")
        if window_label(cfg) in errs:
            ax.axhline(max(float(np.mean(errs[window_label(cfg)])), 1e-9), color=colors.get(name), ls=":", lw=1)
    _axes(ax, "LSH samples r at evaluation", "relative attention-output error vs exact", legend=7)
    return _finish(plt, fig, path, "Per-layer attention error against exact ALiBi (mean over layers, bars min-max; "
                                   "dotted: window)")


# ---------------------------------------------------------------------------- report
def _arms_table(res: dict[str, Any]) -> str:
    rows = []
    for a in res.get("arms", []):
        if "steps" in a:
            met = "" if a.get("token_budget_met", True) else f" (planned {a['planned_steps']})"
            rows.append([a["name"], a["train_attention"], f"{a['steps']}{met}", f"{fmt(a['tokens'] / 1e6)} M",
                         a["train_seconds"], a["tokens_per_second"] / 1e6, a["heldout_bits_per_byte"]])
        else:
            rows.append([a["name"], a["train_attention"], a.get("skipped") or a.get("error"), "–", "–", "–", "–"])
    return markdown_table(["arm", "trained with", "steps", "tokens", "seconds", "M tokens/s",
                           "held-out bits/byte (its own attention)"], rows)


def _grid_table(table: dict, times: dict, res: dict, arm: str, methods: list[str], contexts: list[int]) -> str:
    status = {(r["context"], r["method"]): ("skipped" if "skipped" in r else "failed") for r in res["rows"]
              if r["arm"] == arm and "loss" not in r}

    def cell(n: int, m: str) -> str:
        row = table.get((arm, n, m))
        if row is None:
            return status.get((n, m), "–")
        t = times.get((n, m))
        return f"{row['bits_per_token']:.4f}" + (f" ({fmt(t)})" if t is not None else "")

    shown = [m for m in methods if any((arm, n, m) in table or (n, m) in status for n in contexts)]
    return markdown_table(["method"] + [_k(n) for n in contexts], [[m] + [cell(n, m) for n in contexts] for m in shown])


def _extrapolation_table(table: dict, res: dict, cfg: Config) -> str:
    contexts = [n for n in sorted(cfg.contexts) if n != cfg.train_context]
    rows = []
    for arm in _trained(res):
        for m in _context_methods(cfg):
            ref = table.get((arm["name"], cfg.train_context, m))
            cells = [fmt(table[(arm["name"], n, m)]["bits_per_token"] / ref["bits_per_token"])
                     if ref and (arm["name"], n, m) in table else "–" for n in contexts]
            if any(c != "–" for c in cells):
                rows.append([arm["name"], m] + cells)
    return markdown_table(["arm", "method"] + [f"{_k(n)} / {_k(cfg.train_context)}" for n in contexts], rows)


def _section(doc: dict[str, Any], image_dir: str, full: bool) -> str:
    """Markdown shared by the report (``full``: every table) and the README (verdict, training, key rows)."""
    res, env = doc["results"], doc["environment"]
    cfg = _config(res)
    table, times = _table(res["rows"]), _times(res.get("timings", []))
    contexts = sorted(cfg.contexts)
    parts = []
    if res.get("partial"):
        parts.append("**Partial run**: the JSON was saved before the run ended; what follows is what it holds.\n")
    where = (f" on {env.get('device', '?')} ({env['date'][:10]}, torch {env['torch']}, triton {env.get('triton')})"
             if full else "")
    parts.append(f"One command{where}: corpus, {len(res.get('arms', []))} training arms and every measurement in "
                 f"{fmt(res.get('seconds'))} s.")
    trained = _trained(res)
    if trained:
        a = trained[0]
        corpus = res.get("corpus", {})
        parts.append(f"Every arm: the same {fmt(a['parameters'] / 1e6)} M-parameter ALiBi LM ({cfg.n_layers} layers, "
                     f"width {cfg.d_model}, {cfg.n_heads} heads, bytes as tokens), initialisation, data order and "
                     f"seed, trained at context {cfg.train_context} on {fmt(corpus.get('train_tokens', 0) / 2**20)} "
                     f"MiB of Python source ({corpus.get('heldout_files')} held-out files never trained on); arm (a) "
                     f"trained for its time budget, which set the step count of the others (token budget per arm in "
                     f"the table); LSH arms draw fresh partitions at every step, per layer and head. Unigram "
                     f"baseline: {fmt((res.get('unigram') or {}).get('bits_per_token'))} bits/byte.\n")
        parts.append(_arms_table(res))
    lines = verdict(res, cfg)
    parts.append("\n**Verdict** (computed from the JSON): " + lines[0])
    parts.append("\n".join(f"- {x}" for x in lines[1:]))
    if table:
        scored = next((r["scored_tokens"] for r in res["rows"] if "scored_tokens" in r), None)
        timed = (", in brackets, attention time per token in microseconds (all layers" if full else
                 "; below, attention time per token in microseconds (all layers")
        parts.append(f"\nHeld-out bits per byte{timed}: one `poslsh.attention` call of the model's shape per layer, "
                     f"\"auto\" dispatch). Every context scores the same {scored} held-out tokens (from position "
                     f"{res.get('scored_from')}), so the columns compare.")
        if full:
            for arm in trained:
                parts.append(f"\nTrained {arm['name']} ({arm['train_attention']}):\n")
                parts.append(_grid_table(table, times, res, arm["name"], main_methods(cfg), contexts))
        else:  # per verdict context: exact, window and LSH up to verdict_max_r (rows) for every arm (columns)
            small = [m for m in main_methods(cfg) if not m.startswith("lsh:") or _r(m) <= cfg.verdict_max_r]
            names = [a["name"] for a in trained]
            for n in verdict_contexts(cfg):
                parts.append(f"\nContext {_k(n)} (training context {_k(cfg.train_context)}), by training arm:\n")
                parts.append(markdown_table(["evaluated with"] + names, [
                    [m] + [f"{table[(a, n, m)]['bits_per_token']:.4f}" if (a, n, m) in table else "–" for a in names]
                    for m in small]))
            parts.append("\nAttention time per token (us, all layers):\n")
            timed = [m for m in main_methods(cfg) if any((n, m) in times for n in contexts)]
            parts.append(markdown_table(["method"] + [_k(n) for n in contexts],
                                        [[m] + [fmt(times.get((n, m))) for n in contexts] for m in timed]))
        if full and any(k[0] == "exact" and k[2] in fill_methods(cfg) for k in table):
            parts.append("\nArm (a), the rows lm-validation's H200 run skipped (cut scheme, qmc, hybrid; this run's "
                         "exact-ALiBi model, not lm-validation's, whose JSON stays as committed):\n")
            parts.append(_grid_table(table, times, res, "exact", fill_methods(cfg), contexts))
        if full:
            parts.append("\nExtrapolation: bits per byte at each context over bits at the training context:\n")
            parts.append(_extrapolation_table(table, res, cfg))
    undone = [r for r in res["rows"] + res.get("timings", []) if "loss" not in r and "attention_us_per_token" not in r]
    if undone:
        parts.append(f"\n{len(undone)} rows and timings did not run: "
                     + ", ".join(f"{r.get('arm', 'timing')} {r['context']} {r['method']} ({r.get('skipped') or r.get('error')})"
                                 for r in undone[:8]) + (" ..." if len(undone) > 8 else ""))
    le = {k: v for k, v in (res.get("layer_errors") or {}).items() if v.get("errors")}
    if le and full:
        first = next(iter(le.values()))
        parts.append(f"\nPer-layer relative attention-output error against exact at context {first['context']} "
                     "(each layer fed the exact model's input; float32; mean over layers, largest in brackets):\n")
        methods = [m for m in main_methods(cfg) + fill_methods(cfg) if any(m in v["errors"] for v in le.values())]
        parts.append(markdown_table(["arm"] + methods, [[arm] + [
            f"{fmt(float(np.mean(v['errors'][m])))} ({fmt(float(max(v['errors'][m])))})" if m in v["errors"] else "–"
            for m in methods] for arm, v in le.items()]))
    pre = res.get("precompile")
    if pre and full:
        done = [k for k in pre["kernels"] if "seconds" in k]
        parts.append(f"\nTriton kernels compiled ahead in {pre['workers']} processes while the arms trained: "
                     f"{len(done)} of {len(pre['kernels'])} reported ({pre['unfinished']} workers unfinished).")
    images = [f"![{key}]({image_dir}{PLOTS[key]})" for key in _drawable(res)]
    if images:
        parts.append("\n" + " ".join(images))
    return "\n".join(parts)


def summarize(results: dict[str, Any], out_dir: str | Path) -> str:
    """The report section (PNGs beside the report in out_dir)."""
    return (f"## {NAME}: ALiBi language models trained with positional-LSH masks\n\n"
            + _section(results, "", full=True))


def readme_section(doc: dict[str, Any]) -> str:
    """The README block for bench/results/lsh-native.json (PNGs in ``PLOT_DIR``)."""
    return _section(doc, PLOT_DIR + "/", full=False)
