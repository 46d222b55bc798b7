"""Language-model validation: train an ALiBi LM here, then held-out perplexity and per-layer attention
error of positional-LSH attention against exact ALiBi and the window baseline, versus r and context.

One command on the GPU (``poslsh lm-validation``, defaults sized for an H200 and a 25-minute budget):
train for at most ``train_budget_s`` seconds on this interpreter's Python sources, then evaluate at
``contexts`` (beyond the training context too: ALiBi's extrapolation) for exact, window
(``window_eps``) and LSH with r in ``samples`` for both schemes. ``--tiny`` runs the same pipeline
at CPU size in well under a minute.

Outputs: ``lm-validation.json``; ``lm_validation_gap.png`` (|loss gap| to exact versus r, log-log,
with a 1/sqrt(r) guide), ``lm_validation_layers.png`` (per-layer relative attention-output error
versus r), ``lm_validation_context.png`` (loss versus context), and the training loss curve.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import fmt, markdown_table, progress, pyplot, save_results

NAME = "lm-validation"


@dataclass
class Config:
    """Defaults: the H200 run. ``tiny=True`` replaces the sizes by a CPU-sized run (see ``TINY``)."""

    tiny: bool = False
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    train_context: int = 1024
    batch_size: int = 32
    steps: int = 20000
    lr: float = 1e-3
    warmup: int = 200
    train_budget_s: float = 720.0
    max_bytes: int = 256 * 2**20
    heldout_fraction: float = 0.05
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    samples: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    schemes: tuple[str, ...] = ("grid", "cut")
    window_eps: float = 1e-3
    seeds: tuple[int, ...] = (0,)
    max_scored: int = 16384
    eval_batch_tokens: int = 16384
    eval_budget_s: float = 480.0
    error_context: int = 4096
    error_batch: int = 2
    error_seeds: tuple[int, ...] = (0, 1)
    seed: int = 0
    device: str = "auto"
    checkpoint: str = ""


# What --tiny changes (everything else keeps its value).
TINY = dict(d_model=32, n_layers=2, n_heads=4, train_context=32, batch_size=8, steps=40, lr=3e-3, warmup=5,
            train_budget_s=0.0, max_bytes=2**20, contexts=(64, 256), max_scored=256, eval_budget_s=0.0,
            error_context=128, error_batch=1, samples=(1, 2, 4, 8, 16, 32))


def effective(config: Config) -> Config:
    """The config actually run: ``config`` with the TINY sizes applied when ``tiny`` is set."""
    return dataclasses.replace(config, **TINY) if config.tiny else config


def _methods(cfg: Config) -> list[str]:
    return ["exact", f"window:{cfg.window_eps:g}"] + [f"lsh:{r}:{s}" for s in cfg.schemes for r in cfg.samples]


def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    from ..lm.cli import evaluate_checkpoint
    from ..lm.data import build_corpus, unigram_baseline
    from ..lm.evaluate import layer_errors, parse_method
    from ..lm.model import load_checkpoint
    from ..lm.train import TrainConfig, resolve_device, train

    cfg = effective(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    corpus = build_corpus(None, cfg.max_bytes, cfg.heldout_fraction)
    log = lambda s: print(f"[{NAME}] {s}", flush=True)  # noqa: E731
    log(f"corpus {corpus.stats()} in {time.perf_counter() - t0:.1f} s")

    ckpt = out / "lm_checkpoint"
    if cfg.checkpoint:
        model, meta = load_checkpoint(cfg.checkpoint, device)
        training = meta.get("summary", {})
        if Path(cfg.checkpoint).resolve() != ckpt.resolve() and (Path(cfg.checkpoint) / "loss.png").exists():
            ckpt.mkdir(exist_ok=True)
            shutil.copy(Path(cfg.checkpoint) / "loss.png", ckpt / "loss.png")
    else:
        tc = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, context=cfg.train_context,
                         batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                         eval_every=max(1, cfg.steps // 10), seed=cfg.seed, max_bytes=cfg.max_bytes,
                         heldout_fraction=cfg.heldout_fraction, device=str(device),
                         time_budget_s=cfg.train_budget_s, eval_windows=16 if cfg.tiny else 64)
        result = train(tc, ckpt, corpus=corpus, log=log)
        model = result.pop("model")
        training = {k: v for k, v in result.items() if k != "history"}
    unigram = unigram_baseline(corpus.train, corpus.heldout)
    heldout = corpus.heldout
    usable = [n for n in cfg.contexts if heldout.size >= n + 1]
    if len(usable) < len(cfg.contexts):
        log(f"held-out set ({heldout.size} tokens) too short for contexts {sorted(set(cfg.contexts) - set(usable))}")

    # Perplexity per context and method, within the evaluation budget.
    methods = _methods(cfg)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    jobs = [(n, m) for n in usable for m in methods]
    for n, m in progress(jobs, desc="lm-validation eval", total=len(jobs)):
        if cfg.eval_budget_s > 0 and time.perf_counter() - start > cfg.eval_budget_s:
            rows.append({"context": n, "method": parse_method(m).label, "skipped": "eval budget"})
            continue
        batch = max(1, min(16, cfg.eval_batch_tokens // n))  # same batch for every method of a context
        rows += evaluate_checkpoint(model, heldout, [n], [m], list(cfg.seeds), device=device,
                                    batch_size=batch, max_scored=cfg.max_scored, log=log)

    # Per-layer relative attention-output error versus r (each layer fed the exact model's input).
    n_err = min(cfg.error_context, heldout.size // cfg.error_batch)
    windows = np.stack([heldout[i * n_err:(i + 1) * n_err].astype(np.int64) for i in range(cfg.error_batch)])
    idx = torch.from_numpy(windows).to(device)
    specs = [parse_method(m) for m in methods[1:]]
    errors = layer_errors(model, idx, specs, seeds=list(cfg.error_seeds))  # float32: bf16 would hide the window
    model.set_attention("exact")

    results = {"training": training, "unigram": unigram, "corpus": corpus.stats(), "rows": rows,
               "layer_errors": {"context": n_err, "batch": cfg.error_batch, "seeds": list(cfg.error_seeds),
                                "errors": errors},
               "effective_config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - t0}
    doc = save_results(out / f"{NAME}.json", config, results)
    _plots(doc["results"], cfg, out)
    return doc


# ---------------------------------------------------------------------------- analysis
def _table(rows: list[dict]) -> dict[tuple[int, str], dict]:
    return {(r["context"], r["method"]): r for r in rows if "loss" in r}


def _lsh_label(r: int, scheme: str) -> str:
    return f"lsh:{r}:{scheme}"


def _plots(res: dict[str, Any], cfg: Config, out: Path) -> None:
    plt = pyplot()
    table = _table(res["rows"])
    contexts = sorted({c for c, _ in table})
    win = f"window:{cfg.window_eps:g}"
    rs = np.array(cfg.samples, dtype=float)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for ci, n in enumerate(contexts):
        if (n, "exact") not in table:
            continue
        base = table[(n, "exact")]["loss"]
        for scheme, ls in zip(cfg.schemes, ("-", "--")):
            pts = [(r, abs(table[(n, _lsh_label(r, scheme))]["loss"] - base)) for r in cfg.samples
                   if (n, _lsh_label(r, scheme)) in table]
            if pts:
                ax.plot(*zip(*pts), ls, marker="o", color=f"C{ci}", label=f"{n} {scheme}")
        if (n, win) in table:
            ax.axhline(max(abs(table[(n, win)]["loss"] - base), 1e-6), color=f"C{ci}", ls=":", lw=1)
    anchor = [abs(table[(n, _lsh_label(cfg.samples[0], cfg.schemes[0]))]["loss"] - table[(n, "exact")]["loss"])
              for n in contexts if (n, _lsh_label(cfg.samples[0], cfg.schemes[0])) in table and (n, "exact") in table]
    if anchor:
        ax.plot(rs, max(anchor) * (rs / rs[0]) ** -0.5, "k-", lw=0.8, alpha=0.5, label="1/sqrt(r)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples r")
    ax.set_ylabel("|held-out loss - exact| (nats/byte)")
    ax.set_title("Perplexity gap to exact ALiBi (dotted: window baseline)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "lm_validation_gap.png", dpi=120)
    plt.close(fig)

    errs = res["layer_errors"]["errors"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    layers = len(next(iter(errs.values())))
    for layer in range(layers):
        for scheme, ls in zip(cfg.schemes, ("-", "--")):
            pts = [(r, errs[_lsh_label(r, scheme)][layer]) for r in cfg.samples if _lsh_label(r, scheme) in errs]
            ax.plot(*zip(*pts), ls, marker=".", color=f"C{layer % 10}",
                    label=f"layer {layer}" if scheme == cfg.schemes[0] else None)
        if win in errs:
            ax.axhline(max(errs[win][layer], 1e-9), color=f"C{layer % 10}", ls=":", lw=1)
    first = max(errs[_lsh_label(cfg.samples[0], s)][layer] for s in cfg.schemes for layer in range(layers))
    ax.plot(rs, first * (rs / rs[0]) ** -0.5, "k-", lw=0.8, alpha=0.5, label="1/sqrt(r)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("samples r")
    ax.set_ylabel("relative attention-output error")
    ax.set_title(f"Per-layer error at context {res['layer_errors']['context']} (solid grid, dashed cut, dotted window)",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "lm_validation_layers.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    shown = ["exact", win] + [_lsh_label(r, cfg.schemes[0]) for r in (min(cfg.samples), 8, max(cfg.samples))
                              if r in cfg.samples]
    for i, m in enumerate(dict.fromkeys(shown)):
        pts = [(n, table[(n, m)]["bits_per_token"]) for n in contexts if (n, m) in table]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, color=f"C{i}")
    ax.axvline(res["effective_config"]["train_context"], color="gray", ls="--", lw=1, label="training context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context")
    ax.set_ylabel("held-out bits / byte")
    ax.set_title("Extrapolation beyond the training context")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "lm_validation_context.png", dpi=120)
    plt.close(fig)


def findings(res: dict[str, Any], cfg: Config) -> list[str]:
    """Plain statements computed from the results: convergence, window versus LSH at equal time, extrapolation."""
    table = _table(res["rows"])
    contexts = sorted({c for c, _ in table})
    win = f"window:{cfg.window_eps:g}"
    lines = []
    for n in contexts:
        if (n, "exact") not in table:
            continue
        ex = table[(n, "exact")]
        for scheme in cfg.schemes:
            gaps = [(r, table[(n, _lsh_label(r, scheme))]["loss"] - ex["loss"]) for r in cfg.samples
                    if (n, _lsh_label(r, scheme)) in table]
            if len(gaps) >= 2:
                (r0, g0), (r1, g1) = gaps[0], gaps[-1]
                slope = math.log(max(abs(g1), 1e-12) / max(abs(g0), 1e-12)) / math.log(r1 / r0)
                lines.append(f"context {n}, {scheme}: loss gap {fmt(g0)} nats at r={r0} -> {fmt(g1)} at r={r1} "
                             f"(log-log slope {slope:.2f}; 1/sqrt(r) is -0.5)")
        if (n, win) in table:
            w = table[(n, win)]
            cheaper = [table[k] for k in table if k[0] == n and k[1].startswith("lsh")
                       and table[k]["time_per_token"] <= w["time_per_token"]]
            better = [c for c in cheaper if c["loss"] < w["loss"]]
            wgap = fmt(w["loss"] - ex["loss"])
            if better:
                best = min(better, key=lambda c: c["loss"])
                lines.append(f"context {n}: {best['method']} beats the window baseline at no more time per token "
                             f"({fmt(best['loss'])} vs {fmt(w['loss'])} nats)")
            elif cheaper:
                lines.append(f"context {n}: the window baseline (gap to exact {wgap} nats) is better than each of "
                             f"the {len(cheaper)} LSH settings that are at least as fast")
            else:
                lsh = [table[k] for k in table if k[0] == n and k[1].startswith("lsh")]
                closest = min(lsh, key=lambda c: abs(c["loss"] - ex["loss"])) if lsh else None
                tail = (f"; the closest LSH setting, {closest['method']}, is {fmt(closest['loss'] - ex['loss'])} nats "
                        "from exact") if closest else ""
                lines.append(f"context {n}: the window baseline (gap to exact {wgap} nats) is faster than every "
                             f"LSH setting{tail}")
    train_n = res["effective_config"]["train_context"]
    for m in ["exact", _lsh_label(max(cfg.samples), cfg.schemes[0])]:
        seq = [(n, table[(n, m)]["bits_per_token"]) for n in contexts if (n, m) in table]
        if len(seq) > 1:
            lines.append(f"extrapolation (trained at {train_n}), {m}: "
                         + ", ".join(f"{n}: {b:.3f}" for n, b in seq) + " bits/byte; largest / smallest context "
                         + f"= {seq[-1][1] / seq[0][1]:.3f}")
    return lines


def summarize(results: dict[str, Any], out_dir: str | Path) -> str:
    res = results["results"]
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["effective_config"].items()})
    table = _table(res["rows"])
    contexts = sorted({c for c, _ in table})
    tr = res["training"]
    parts = [f"## {NAME}: an ALiBi language model with positional-LSH attention\n"]
    if tr:
        parts.append(f"Trained {tr.get('parameters', 0) / 1e6:.2f} M parameters for {tr.get('steps')} steps "
                     f"({fmt(tr.get('train_seconds'))} s) at context {cfg.train_context}: held-out "
                     f"{fmt(tr.get('heldout_bits_per_byte'))} bits/byte against a unigram baseline of "
                     f"{fmt(res['unigram']['bits_per_token'])}.\n")
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    parts.append("Held-out bits per byte (time per token in microseconds):\n")
    parts.append(markdown_table(["method"] + [str(n) for n in contexts],
                                [[m] + [f"{table[(n, m)]['bits_per_token']:.4f} ({table[(n, m)]['time_per_token'] * 1e6:.1f})"
                                        if (n, m) in table else "–" for n in contexts] for m in methods]))
    errs = res["layer_errors"]["errors"]
    layers = len(next(iter(errs.values())))
    parts.append(f"\nPer-layer relative attention-output error at context {res['layer_errors']['context']}:\n")
    parts.append(markdown_table(["method"] + [f"layer {i}" for i in range(layers)],
                                [[m] + [float(e) for e in v] for m, v in errs.items()]))
    parts.append("\n" + "\n".join(f"- {line}" for line in findings(res, cfg)))
    parts.append("\n![gap](lm_validation_gap.png) ![layers](lm_validation_layers.png) "
                 "![context](lm_validation_context.png) ![training](lm_checkpoint/loss.png)")
    return "\n".join(parts)
