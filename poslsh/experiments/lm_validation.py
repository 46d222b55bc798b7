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
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..method import MethodSpec, parse_method, parse_methods
from ..util import fmt, legend_if_labelled, load_results, markdown_table, pyplot, replot_saved
from .harness import Run, describe_failure
from .metrics import loglog_slope

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
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    train_context: int = 1024
    batch_size: int = 32
    steps: int = 20000
    lr: float = 1e-3
    warmup: int = 200
    eval_every: int = 500
    train_budget_s: float = 270.0
    max_bytes: int = 128 * 2**20
    heldout_fraction: float = 0.05
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    samples: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    extra_methods: tuple[str, ...] = ("lsh:8:grid:qmc", "hybrid:8:grid:qmc")
    window_eps: float = 1e-3
    seeds: tuple[int, ...] = (0,)
    scored_tokens: int = 131072
    eval_batch_tokens: int = 65536
    eval_budget_s: float = 150.0
    error_context: int = 4096
    error_batch: int = 2
    error_seeds: tuple[int, ...] = (0, 1)
    error_budget_s: float = 30.0
    deadline_s: float = 500.0
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
    if not config.tiny:
        return config
    defaults = Config()
    return dataclasses.replace(config, **{k: v for k, v in TINY.items() if getattr(config, k) == getattr(defaults, k)})


def check(cfg: Config) -> None:
    """ValueError naming the first bad field of an effective config."""
    if not cfg.contexts or any(n < 2 for n in cfg.contexts):
        raise ValueError(f"contexts must be integers >= 2, got {cfg.contexts}")
    if not cfg.samples or not cfg.schemes:
        raise ValueError(f"samples and schemes must not be empty, got {cfg.samples} and {cfg.schemes}")
    method_specs(cfg)  # every method built once: a bad r, scheme, window_eps or extra method fails here
    if not cfg.seeds or not cfg.error_seeds:
        raise ValueError(f"seeds and error_seeds must not be empty, got {cfg.seeds} and {cfg.error_seeds}")
    strides = {n: math.ceil(n / 2) for n in cfg.contexts}
    if cfg.scored_tokens < 1 or any(cfg.scored_tokens % s for s in strides.values()):
        raise ValueError(f"scored_tokens must be a positive multiple of every context's stride {strides} "
                         f"(so that every context scores the same tokens), got {cfg.scored_tokens}")
    for name in ("train_budget_s", "eval_budget_s", "error_budget_s", "deadline_s"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = no limit), got {getattr(cfg, name)}")
    if cfg.error_batch < 1 or cfg.error_context < 2 or cfg.eval_batch_tokens < 1:
        raise ValueError(f"error_batch >= 1, error_context >= 2 and eval_batch_tokens >= 1 are needed, got "
                         f"{cfg.error_batch}, {cfg.error_context}, {cfg.eval_batch_tokens}")


def method_specs(cfg: Config) -> list[MethodSpec]:
    """Every method of the grid, in table order: exact, the window, LSH per scheme and r, the extra
    methods (ValueError naming the bad field)."""
    grid = [MethodSpec("exact"), MethodSpec("window", window_eps=cfg.window_eps)]
    grid += [MethodSpec("lsh", samples=r, scheme=s) for s in cfg.schemes for r in cfg.samples]
    return grid + parse_methods(cfg.extra_methods, "extra_methods")


def methods(cfg: Config) -> list[str]:
    """Every method label of the grid, in table order."""
    return list(dict.fromkeys(spec.label for spec in method_specs(cfg)))


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


def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Train (or load ``checkpoint``), measure, write ``lm-validation.json`` and the PNGs; or, with
    ``replot``, only redraw the PNGs of that JSON. Returns the JSON document."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = effective(config)
    check(cfg)
    results: dict[str, Any] = {"partial": True, "effective_config": dataclasses.asdict(cfg), "timing": {},
                               "rows": [], "layer_errors": None}
    clock = Run(NAME, out / f"{NAME}.json", config, results, deadline_s=cfg.deadline_s)
    log, save = clock.log, clock.save

    model, heldout, device = _train_or_load(cfg, out, clock, results, log)
    save()
    t = time.perf_counter()
    _measure_layer_errors(model, heldout, cfg, device, clock, results, log)
    results["timing"]["errors_s"] = time.perf_counter() - t
    save()
    t = time.perf_counter()
    _evaluate(model, heldout, cfg, device, clock, results, log, save)
    results["timing"]["eval_s"] = time.perf_counter() - t
    results["partial"] = False
    doc = save()
    replot(doc, out)
    log(f"done; timing {', '.join(f'{k} {v:.0f}' for k, v in results['timing'].items())} s")
    return doc


def _train_or_load(cfg: Config, out: Path, clock: Run, results: dict, log) -> tuple[Any, np.ndarray, torch.device]:
    """Corpus, then the trained (or loaded) model; fills results' training, history, unigram, corpus."""
    from ..lm.data import build_corpus, unigram_baseline
    from ..lm.model import load_checkpoint
    from ..lm.train import TrainConfig, resolve_device, train

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    corpus = build_corpus(None, cfg.max_bytes, cfg.heldout_fraction)
    results["corpus"] = corpus.stats()
    results["timing"]["corpus_s"] = time.perf_counter() - t
    log(f"corpus {corpus.stats()} in {results['timing']['corpus_s']:.1f} s")
    t = time.perf_counter()
    if cfg.checkpoint:
        model, meta = load_checkpoint(cfg.checkpoint, device)
        results["training"] = meta.get("summary", {})
        history = Path(cfg.checkpoint) / "history.json"
        results["history"] = load_results(history) if history.exists() else []
        results["unigram"] = meta.get("unigram") or unigram_baseline(corpus.train, corpus.heldout)
        results["checkpoint"] = str(cfg.checkpoint)
    else:
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.resolve().with_name(out.resolve().name
                                                                                          + "_checkpoint")
        # Training gets what the deadline leaves once the later phases' budgets are set aside.
        end = clock.end(cfg.train_budget_s, reserve_s=cfg.error_budget_s + cfg.eval_budget_s + RESERVE_S)
        budget = 0.0 if end == math.inf else max(1.0, end - time.perf_counter())
        tc = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, context=cfg.train_context,
                         batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                         eval_every=cfg.eval_every, seed=cfg.seed, max_bytes=cfg.max_bytes,
                         heldout_fraction=cfg.heldout_fraction, device=str(device), time_budget_s=budget,
                         eval_windows=16 if cfg.tiny else 64)
        log(f"training (budget {budget:.0f} s), checkpoint in {ckpt}" if budget else f"training, checkpoint in {ckpt}")
        result = train(tc, ckpt, corpus=corpus, log=log)
        model = result.pop("model")
        results["history"] = result.pop("history")
        results["training"] = result
        results["unigram"] = result["unigram"]
        results["checkpoint"] = str(ckpt)
    results["timing"]["train_s"] = time.perf_counter() - t
    return model, corpus.heldout, device


def _measure_layer_errors(model, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run,
                          results: dict, log) -> None:
    """Per-layer error of every non-exact method (in tier order) at ``error_context``, float32, "fused"."""
    from ..lm.evaluate import layer_errors

    n = min(cfg.error_context, heldout.size // cfg.error_batch)
    windows = np.stack([heldout[i * n:(i + 1) * n].astype(np.int64) for i in range(cfg.error_batch)])
    idx = torch.from_numpy(windows).to(device)
    labels = [m for _, m in jobs(cfg, [n]) if m != "exact"]
    end = clock.end(cfg.error_budget_s, reserve_s=RESERVE_S)
    entry = {"context": n, "batch": cfg.error_batch, "seeds": list(cfg.error_seeds), "backend": "fused",
             "errors": {}, "skipped": []}
    try:
        # float32 (no autocast): bf16 rounding (~3e-3) would hide the window's error.
        entry["errors"] = layer_errors(model, idx, [parse_method(m) for m in labels], seeds=list(cfg.error_seeds),
                                       backend="fused", deadline=None if end == math.inf else end)
    except Exception as err:  # the perplexity rows still run
        entry["error"] = describe_failure(err)
        log(f"per-layer errors failed: {entry['error']}")
    entry["skipped"] = [m for m in labels if m not in entry["errors"]]
    results["layer_errors"] = entry
    for m, errs in entry["errors"].items():
        log(f"layer errors {m:<18} " + " ".join(f"{e:.2e}" for e in errs))
    if entry["skipped"]:
        log(f"layer errors skipped (budget): {entry['skipped']}")


def _evaluate(model, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run, results: dict,
              log, save) -> None:
    """Perplexity rows in ``jobs`` order until the budget ends, saving the JSON after each."""
    from ..lm.cli import evaluate_checkpoint

    contexts = sorted(cfg.contexts)
    while contexts and heldout.size < contexts[-1] + cfg.scored_tokens:  # the largest sets the first target
        dropped = contexts.pop()
        log(f"held-out set ({heldout.size} tokens) too short for context {dropped} and {cfg.scored_tokens} scored")
    if not contexts:
        return
    first_target = contexts[-1]  # every context has its full window before the first scored token
    results["scored_from"] = first_target
    end = clock.end(cfg.eval_budget_s, reserve_s=RESERVE_S)
    for n, m in jobs(cfg, contexts):
        if time.perf_counter() > end:
            results["rows"].append({"context": n, "method": m, "skipped": "eval budget"})
            continue
        batch = max(1, min(16, cfg.eval_batch_tokens // n))  # same batch for every method of a context
        try:
            results["rows"] += evaluate_checkpoint(model, heldout, [n], [parse_method(m)], list(cfg.seeds),
                                                   device=device, batch_size=batch, max_scored=cfg.scored_tokens,
                                                   first_target=first_target, log=log)
        except Exception as err:  # one failing row (a kernel that fails, out of memory) must not lose the rest
            results["rows"].append({"context": n, "method": m, "error": describe_failure(err)})
            log(f"context {n} {m}: failed: {results['rows'][-1]['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    model.set_attention("exact")


# ---------------------------------------------------------------------------- analysis
def _config(res: dict[str, Any]) -> Config:
    """The effective config stored in a results dict."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["effective_config"].items()
                     if k in known})


def _table(rows: list[dict]) -> dict[tuple[int, str], dict]:
    return {(r["context"], r["method"]): r for r in rows if "loss" in r}


def _lsh_label(r: int, scheme: str) -> str:
    return f"lsh:{r}:{scheme}"


def _slope(points: list[tuple[float, float]]) -> float | None:
    """The log-log slope of |y| (floored at 1e-12: a gap may be 0 or negative) against x."""
    return loglog_slope([x for x, _ in points], [max(abs(y), 1e-12) for _, y in points])


def _gaps(table: dict, n: int, scheme: str, cfg: Config) -> list[tuple[int, float]]:
    """(r, LSH loss - exact loss) at context n for the scheme's measured r."""
    if (n, "exact") not in table:
        return []
    base = table[(n, "exact")]["loss"]
    return [(r, table[(n, _lsh_label(r, scheme))]["loss"] - base) for r in cfg.samples
            if (n, _lsh_label(r, scheme)) in table]


def _extras(cfg: Config) -> list[str]:
    return [m for m in methods(cfg) if _tier(m, cfg) == 3]


def replot(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw every PNG of ``PLOTS`` that the saved document has data for into out_dir."""
    from ..lm.train import plot_curve

    res = doc["results"]
    cfg = _config(res)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _table(res["rows"])
    draw = {"gap": lambda p: _plot_gap(table, cfg, p), "context": lambda p: _plot_context(table, cfg, p),
            "time": lambda p: _plot_time(table, cfg, p),
            "layers": lambda p: _plot_layers(res["layer_errors"]["errors"], res["layer_errors"]["context"], cfg, p),
            "training": lambda p: plot_curve(res["history"], res["unigram"]["nats_per_token"], p)}
    return [draw[key](out / PLOTS[key]) for key in _drawable(res)]


def _drawable(res: dict[str, Any]) -> list[str]:
    """The keys of ``PLOTS`` that the results have data for, in ``PLOTS`` order."""
    rows = bool(_table(res["rows"]))
    present = {"gap": rows, "context": rows, "time": rows, "training": bool(res.get("history")),
               "layers": bool((res.get("layer_errors") or {}).get("errors"))}
    return [key for key in PLOTS if present[key]]


def _plot_gap(table: dict, cfg: Config, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    contexts = sorted({c for c, _ in table})
    win = f"window:{cfg.window_eps:g}"
    first = []
    for ci, n in enumerate(contexts):
        for scheme, ls in zip(cfg.schemes, ("-", "--", ":")):
            pts = [(r, max(abs(g) / LN2, GAP_FLOOR)) for r, g in _gaps(table, n, scheme, cfg)]
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", ms=4, color=f"C{ci}", label=f"{n} {scheme}")
                first.append(pts[0])
        if (n, win) in table and (n, "exact") in table:
            ax.axhline(max(abs(table[(n, win)]["loss"] - table[(n, "exact")]["loss"]) / LN2, GAP_FLOOR),
                       color=f"C{ci}", ls=":", lw=1)
        for m, marker in zip(_extras(cfg), ("x", "D", "s", "^")):
            if (n, m) in table and (n, "exact") in table:
                spec_r = int(m.split(":")[1])
                ax.plot([spec_r], [max(abs(table[(n, m)]["loss"] - table[(n, "exact")]["loss"]) / LN2, GAP_FLOOR)], marker,
                        color=f"C{ci}", ms=6, label=m if ci == 0 else None)
    if first:
        r0 = min(r for r, _ in first)
        anchor = math.exp(np.mean([math.log(g) for r, g in first if r == r0]))
        rs = np.array(sorted(cfg.samples), dtype=float)
        ax.plot(rs, anchor * (rs / r0) ** -0.5, "k-", lw=0.8, alpha=0.5, label="1/sqrt(r)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples r")
    ax.set_ylabel("|held-out bits per byte - exact's|")
    ax.set_title("Held-out bits-per-byte gap to exact ALiBi against r, per context\n(dotted: the window baseline; the "
                 "contexts' LSH curves lie on top of each other)", fontsize=9)
    legend_if_labelled(ax, fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_layers(errs: dict[str, list[float]], context: int, cfg: Config, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    layers = len(next(iter(errs.values())))
    win = f"window:{cfg.window_eps:g}"
    first = []
    for layer in range(layers):
        for scheme, ls in zip(cfg.schemes, ("-", "--", ":")):
            pts = [(r, errs[_lsh_label(r, scheme)][layer]) for r in cfg.samples if _lsh_label(r, scheme) in errs]
            if pts:
                ax.plot(*zip(*pts), ls, marker=".", color=f"C{layer % 10}",
                        label=f"layer {layer}" if scheme == cfg.schemes[0] else None)
                first.append(pts[0])
        if win in errs:
            ax.axhline(max(errs[win][layer], 1e-9), color=f"C{layer % 10}", ls=":", lw=1)
    if first:
        r0 = min(r for r, _ in first)
        anchor = max(e for r, e in first if r == r0)
        rs = np.array(sorted(cfg.samples), dtype=float)
        ax.plot(rs, anchor * (rs / r0) ** -0.5, "k-", lw=0.8, alpha=0.5, label="1/sqrt(r)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples r")
    ax.set_ylabel("relative attention-output error")
    ax.set_title(f"Per-layer error at context {context} (solid grid, dashed cut, dotted window)", fontsize=9)
    legend_if_labelled(ax, fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_context(table: dict, cfg: Config, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    contexts = sorted({c for c, _ in table})
    rs = sorted(cfg.samples)
    shown = ["exact", f"window:{cfg.window_eps:g}"] + [_lsh_label(r, s) for s in cfg.schemes[:1]
                                                      for r in dict.fromkeys((rs[0], 8, rs[-1])) if r in rs]
    exact = {n: table[(n, "exact")]["bits_per_token"] for n in contexts if (n, "exact") in table}
    for i, m in enumerate(shown):
        pts = [(n, table[(n, m)]["bits_per_token"]) for n in contexts if (n, m) in table]
        if not pts:
            continue
        label = m
        close = [abs(b - exact[n]) for n, b in pts if n in exact]
        if m != "exact" and close and max(close) < 0.01:  # would hide the exact curve: say so, draw exact wider
            label = f"{m} (on top of exact: within {max(close):.3f} bits/byte)"
        wide = m == "exact"
        ax.plot(*zip(*pts), marker="o", label=label, color=f"C{i}", lw=4 if wide else 1.5, ms=9 if wide else 6,
                alpha=0.5 if wide else 1.0, zorder=1 if wide else 2)
    ax.axvline(cfg.train_context, color="gray", ls="--", lw=1, label="training context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context (same scored tokens at every context)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Held-out bits per byte against the evaluation context (trained at "
                 f"{cfg.train_context})", fontsize=10)
    legend_if_labelled(ax, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_time(table: dict, cfg: Config, path: Path) -> Path:
    """Bits per byte against time per token, one panel per context: the accuracy/time plane on the LM."""
    plt = pyplot()
    from matplotlib import ticker

    contexts = sorted({c for c, _ in table})
    cols = min(2, len(contexts))
    rows = math.ceil(len(contexts) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    win = f"window:{cfg.window_eps:g}"
    styles = [("exact", "*", "k"), (win, "s", "C2")] + [(s, m, c) for s, m, c in zip(cfg.schemes, "o^", ("C0", "C1"))]
    for ax, n in zip(axes.flat, contexts):
        for key, marker, color in styles:
            if key in cfg.schemes:
                pts = [(r, table[(n, _lsh_label(r, key))]) for r in cfg.samples if (n, _lsh_label(r, key)) in table]
                pts.sort(key=lambda rp: rp[1]["time_per_token"])  # a line in order of its x
                if pts:
                    ax.plot([p["time_per_token"] * 1e6 for _, p in pts], [p["bits_per_token"] for _, p in pts],
                            marker=marker, color=color, ls="-", lw=0.8, label=f"lsh {key} (r labelled)")
                    for r, p in pts:
                        ax.annotate(str(r), (p["time_per_token"] * 1e6, p["bits_per_token"]), fontsize=6,
                                    xytext=(3, 2), textcoords="offset points")
            elif (n, key) in table:
                p = table[(n, key)]
                ax.plot([p["time_per_token"] * 1e6], [p["bits_per_token"]], marker, color=color, ms=9, label=key)
        for m, marker in zip(_extras(cfg), ("x", "D", "P", "v")):
            if (n, m) in table:
                p = table[(n, m)]
                ax.plot([p["time_per_token"] * 1e6], [p["bits_per_token"]], marker, color="C3", ms=7, label=m)
        ax.set_xscale("log")
        # a span of less than a decade gets matplotlib's minor labels, which overlap: plain numbers instead
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))
        ax.tick_params(axis="x", which="both", labelsize=7)
        noisy = n <= NOISY_CONTEXT
        ax.set_title(f"context {n}" + (": per-token times dominated by per-call overhead (noisy)" if noisy else ""),
                     fontsize=9, color="firebrick" if noisy else "black")
        ax.set_xlabel("forward time per token (us)")
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3, which="both")
        legend_if_labelled(ax, fontsize=6)
    for ax in list(axes.flat)[len(contexts):]:
        ax.set_visible(False)
    fig.suptitle("Held-out bits per byte against forward time per token: exact, window, positional LSH", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def findings(res: dict[str, Any], cfg: Config) -> list[str]:
    """Plain statements computed from the results: convergence in r, per-layer error, window versus
    LSH at equal time, extrapolation."""
    table = _table(res["rows"])
    contexts = sorted({c for c, _ in table})
    win = f"window:{cfg.window_eps:g}"
    lines = []
    for n in contexts:
        for scheme in cfg.schemes:
            gaps = _gaps(table, n, scheme, cfg)
            slope = _slope(gaps)
            if slope is not None:
                (r0, g0), (r1, g1) = gaps[0], gaps[-1]
                lines.append(f"context {n}, {scheme}: LSH's held-out bits per byte minus exact's {fmt(g0 / LN2)} at "
                             f"r={r0} -> {fmt(g1 / LN2)} at r={r1} (fitted log-log slope of |gap| vs r {slope:.2f}; "
                             "1/sqrt(r) is -0.5)")
    errs = (res.get("layer_errors") or {}).get("errors") or {}
    for scheme in cfg.schemes:
        pts = [(r, float(np.mean(errs[_lsh_label(r, scheme)]))) for r in cfg.samples if _lsh_label(r, scheme) in errs]
        slope = _slope(pts)
        if slope is not None:
            lines.append(f"per-layer attention error, {scheme} (mean over layers): {fmt(pts[0][1])} at r={pts[0][0]} "
                         f"-> {fmt(pts[-1][1])} at r={pts[-1][0]} (slope {slope:.2f})"
                         + (f"; window baseline {fmt(float(np.mean(errs[win])))}" if win in errs else ""))
    for n in contexts:
        if (n, win) not in table or (n, "exact") not in table:
            continue
        # Closeness to exact is the measure: a loss below exact's is luck of the draw, not a better model.
        ex, w = table[(n, "exact")], table[(n, win)]
        gap = lambda row: abs(row["loss"] - ex["loss"]) / LN2  # noqa: E731  (bits per byte)
        lsh = [table[k] for k in table if k[0] == n and _tier(k[1], cfg) > 0]
        cheaper = [c for c in lsh if c["time_per_token"] <= w["time_per_token"]]
        better = [c for c in cheaper if gap(c) < gap(w)]
        head = (f"context {n}: the window baseline ({fmt(gap(w))} bits/byte from exact, "
                f"{fmt(w['time_per_token'] * 1e6)} us/token)")
        if better:
            best = min(better, key=gap)
            lines.append(f"context {n}: {best['method']} is closer to exact than the window baseline at no more time "
                         f"per token ({fmt(gap(best))} vs {fmt(gap(w))} bits/byte)")
        elif cheaper:
            lines.append(f"{head} is closer to exact than each of the {len(cheaper)} LSH settings that are at least "
                         "as fast")
        elif lsh:
            closer = sum(gap(c) < gap(w) for c in lsh)
            closest = min(lsh, key=gap)
            lines.append(f"{head} is faster than every LSH setting; "
                         + (f"{closer} of the {len(lsh)} are closer to exact" if closer else "none is closer to exact")
                         + f" (the closest, {closest['method']}, is {fmt(gap(closest))} bits/byte from it)")
    rs = sorted(cfg.samples)
    for m in ["exact", win] + [_lsh_label(r, cfg.schemes[0]) for r in dict.fromkeys((8, rs[-1])) if r in rs]:
        seq = [(n, table[(n, m)]["bits_per_token"]) for n in contexts if (n, m) in table]
        if len(seq) > 1:
            ratio = seq[-1][1] / seq[0][1]
            verdict = ("keeps its loss" if ratio <= 1.05 else f"degrades by {100 * (ratio - 1):.0f} %")
            lines.append(f"extrapolation (trained at {cfg.train_context}), {m}: "
                         + ", ".join(f"{n}: {b:.3f}" for n, b in seq)
                         + f" bits/byte; at {seq[-1][0]} it {verdict} (ratio to {seq[0][0]}: {ratio:.3f})")
    return lines


def _training_line(res: dict[str, Any], cfg: Config) -> str:
    tr, corpus = res.get("training") or {}, res.get("corpus") or {}
    if not tr:
        return ""
    return (f"A {fmt(tr.get('parameters', 0) / 1e6)} M-parameter ALiBi LM ({cfg.n_layers} layers, width "
            f"{cfg.d_model}, {cfg.n_heads} heads, bytes as tokens) trained here for {tr.get('steps')} steps "
            f"({fmt(tr.get('train_seconds'))} s, {fmt(tr.get('tokens_per_second'))} tokens/s) at context "
            f"{cfg.train_context} on {fmt(corpus.get('train_tokens', 0) / 2**20)} MiB of Python source (the "
            f"interpreter's own library and packages; {corpus.get('heldout_files')} held-out files never trained "
            f"on): held-out {fmt(tr.get('heldout_bits_per_byte'))} bits/byte, against "
            f"{fmt(res['unigram']['bits_per_token'])} for the unigram baseline.")


def _rows_table(res: dict[str, Any], cfg: Config, measured_only: bool = False) -> str:
    table = _table(res["rows"])
    contexts = sorted({r["context"] for r in res["rows"]})
    order = [m for m in methods(cfg) if any(r["method"] == m and ("loss" in r or not measured_only)
                                            for r in res["rows"])]
    status = {(r["context"], r["method"]): ("skipped" if "skipped" in r else "failed") for r in res["rows"]
              if "loss" not in r}
    def cell(n: int, m: str) -> str:
        if (n, m) not in table:
            return status.get((n, m), "–")
        return f"{table[(n, m)]['bits_per_token']:.4f} ({fmt(table[(n, m)]['time_per_token'] * 1e6)})"

    return markdown_table(["method"] + [str(n) for n in contexts],
                          [[m] + [cell(n, m) for n in contexts] for m in order])


def _section(doc: dict[str, Any], image_dir: str, full: bool) -> str:
    """Markdown shared by the report (``full``: every layer) and the README (a per-method summary)."""
    res, env = doc["results"], doc["environment"]
    cfg = _config(res)
    parts = []
    if res.get("partial"):
        parts.append("**Partial run**: the JSON was saved before the run ended; what follows is what it holds.\n")
    where = (f" on {env.get('device', '?')} ({env['date'][:10]}, torch {env['torch']}, triton {env.get('triton')})"
             if full else "")  # the README states the provenance under every block
    parts.append(f"One command{where}: corpus, training and every measurement in {fmt(res.get('seconds'))} s.")
    line = _training_line(res, cfg)
    if line:
        parts.append(line)
    if res["rows"]:
        scored = next((r["scored_tokens"] for r in res["rows"] if "scored_tokens" in r), None)
        how = ("bf16; \"auto\" dispatch: exact and window through FlexAttention, LSH and hybrid through the Triton "
               "kernel" if env.get("device", "cpu") != "cpu" else "float32 on the CPU, torch backends")
        parts.append(f"\nHeld-out bits per byte and, in brackets, forward time per token in microseconds ({how}). "
                     f"Every context scores the same {scored} held-out tokens (from position "
                     f"{res.get('scored_from')}), so the columns compare:\n")
        parts.append(_rows_table(res, cfg, measured_only=not full))
        undone = [r for r in res["rows"] if "loss" not in r]
        never = [m for m in methods(cfg) if not any(r["method"] == m and "loss" in r for r in res["rows"])]
        if undone and not full:
            reasons = sorted({r.get("skipped") or "failed" for r in undone})
            parts.append(f"\nNot measured ({', '.join(reasons)}): {len(undone)} of {len(res['rows'])} planned rows"
                         + (f", among them every row of {', '.join(never)}" if never else "") + ".")
        elif undone:
            parts.append(f"\n{len(undone)} of {len(res['rows'])} rows did not run: "
                         + ", ".join(f"{r['context']} {r['method']} ({r.get('skipped') or r.get('error')})"
                                     for r in undone[:8]) + (" ..." if len(undone) > 8 else ""))
    le = res.get("layer_errors") or {}
    errs = {m: le["errors"][m] for m in methods(cfg) if m in (le.get("errors") or {})}  # table order
    if errs:
        layers = len(next(iter(errs.values())))
        parts.append(f"\nPer-layer relative attention-output error against exact at context {le['context']} (each "
                     f"layer fed the exact model's input; float32; mean over seeds {le['seeds']}):\n")
        if full:
            parts.append(markdown_table(["method"] + [f"layer {i}" for i in range(layers)],
                                        [[m] + [float(e) for e in v] for m, v in errs.items()]))
        else:
            parts.append(markdown_table(["method", "mean over layers", "smallest", "largest (layer)"],
                                        [[m, float(np.mean(v)), float(min(v)),
                                          f"{fmt(float(max(v)))} ({int(np.argmax(v))})"] for m, v in errs.items()]))
        if le.get("skipped"):
            parts.append(f"\nNot measured (budget): {', '.join(le['skipped'])}.")
    lines = findings(res, cfg)
    if lines:
        parts.append("\n" + "\n".join(f"- {x}" for x in lines))
    images = [f"![{key}]({image_dir}{PLOTS[key]})" for key in _drawable(res)]
    if images:
        parts.append("\n" + " ".join(images))
    return "\n".join(parts)


def summarize(results: dict[str, Any], out_dir: str | Path) -> str:
    """The report section (PNGs beside the report in out_dir)."""
    return f"## {NAME}: an ALiBi language model with positional-LSH attention\n\n" + _section(results, "", full=True)


def readme_section(doc: dict[str, Any], image_dir: str = "../" + PLOT_DIR + "/") -> str:
    """The block of docs/RESULTS.md for bench/results/lm-validation.json (PNGs in ``PLOT_DIR``, linked
    through ``image_dir``): methods that were never measured are named, not tabled."""
    return _section(doc, image_dir, full=False)
