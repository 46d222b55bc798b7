"""Attention output error of positional LSH vs r, against exact ALiBi, beside the window baseline.

For random q, k ~ N(0, 1) * logit_scale and v ~ N(0, 1) (one batch, the Press slopes of ``heads``
heads), compute exact ALiBi attention in float64 and the LSH estimate from r sampled partitions,
r = 1 .. 256, both schemes, and the relative error ||O-hat_h - O_h|| / ||O_h|| of every head.

Cost is counted as the (query, key) pairs a method evaluates:

* LSH "fused": the union of the r blocks of each query (keys with c_pj > 0);
* LSH "split": the sum of the r block sizes (each pass evaluates its own block);
* window: sum_p min(p, w) + 1 (causal) for half-width w.

The window baseline at each r gets the half-width w_h whose pair count is closest to LSH-fused's
for that head, so the two curves compare equal work. Beside them: the 1/sqrt(r) law and, from
``poslsh.theory``, the uniform bound 2 V e^{2 beta} rho / max(1, S - rho) turned into a relative
Frobenius error (times sqrt(N D) / ||O_h||), with rho the row-sum mask error, either the high
probability bound (``row_sum_error_bound``) or the one measured on the drawn masks (``mask_errors``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from poslsh.alibi import alibi_slopes
from poslsh.attention.dispatch import resolve_spec
from poslsh.attention.fused import fused_attention
from poslsh.attention.ranges import Support, nonzero_pairs, split_pairs
from poslsh.hashing import Partitions, sample_partitions
from poslsh.seeds import crc32_seed
from ..util import (Count, CountOrZero, Fraction, Positive, check_fields, fmt, markdown_table, progress, pyplot, replot_saved, save_figure, save_results,
                    torch_threads)
from .harness import config_from
from .metrics import loglog_slope, relative_error

NAME = "attn-error"
PLOT = "attn_error_vs_r.png"
PLOT_BOUND = "attn_error_bound.png"
FLOOR = 1e-4  # bottom of the error axes; zero errors are drawn as markers just above it
FIT_FROM = 4  # the exponent is fitted over r >= FIT_FROM (r = 1, 2 sit before the asymptotic regime)

try:  # written in parallel by the theory issue; the experiment runs without it
    from poslsh import theory as _theory
    from poslsh.mask_errors import mask_errors as _mask_errors

    HAVE_BOUND = hasattr(_theory, "attention_error_bound") and hasattr(_theory, "row_sum_error_bound")
except ImportError:  # pragma: no cover - depends on what is installed
    HAVE_BOUND = False


@dataclass
class Config:
    """What to measure. Defaults take ~20 s on a 2-core CPU.

    Attributes:
        n: Sequence length.
        heads: Attention heads, with Press slopes.
        head_dim: Head dimension D.
        samples: Numbers of partitions r.
        logit_scales: Multipliers of q (larger: more peaked attention rows).
        schemes: Positional LSH schemes to compare.
        seeds: Independent draws of inputs and partitions per point.
        causal: Causal attention (--no-causal: bidirectional).
        delta: Failure probability of the theoretical bound.
        plot_heads: Head indices shown in the per-head figure.
        threads: Torch CPU threads; 0 keeps torch's default (small operations run fastest on one thread).
        seed: Base seed of every draw.
        replot: A saved attn-error.json: only redraw its PNGs into --out (every other flag is ignored).
    """

    n: Count = 256
    heads: Count = 8
    head_dim: Count = 32
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    logit_scales: tuple[Positive, ...] = (0.5, 1.0, 2.0)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    seeds: Count = 2
    causal: bool = True
    delta: Fraction = 0.1
    plot_heads: tuple[CountOrZero, ...] = (0, 2, 4, 7)
    threads: CountOrZero = 1
    seed: int = 0
    replot: str = ""


def lsh_pairs(parts: Partitions, causal: bool) -> tuple[Tensor, Tensor]:
    """Pairs evaluated per head by LSH: (fused: union of blocks, split: sum of blocks), float64 [H]."""
    support = Support("lsh", causal, partitions=parts)
    return nonzero_pairs(support, parts.n, parts.n).double(), split_pairs(support, parts.n, parts.n).double()


def window_pairs(n: int, width: Tensor, causal: bool) -> Tensor:
    """Pairs evaluated by a window of half-width w: [len(width)] for every w in ``width``."""
    return nonzero_pairs(Support("window", causal, window=width), n, n).double()


def matched_widths(n: int, pairs: Tensor, causal: bool) -> Tensor:
    """Per head, the window half-width whose pair count is closest to ``pairs`` [H]: int64 [H]."""
    table = window_pairs(n, torch.arange(n), causal)  # increasing in w
    return (table[None, :] - pairs[:, None]).abs().argmin(-1)



def run(config: Config, out_dir: str | Path) -> dict:
    """Measure, write ``out_dir/attn-error.json`` and the PNGs, return the saved document (with
    ``replot``: only redraw that JSON's PNGs)."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    check_fields(config)
    with torch_threads(config.threads):
        return _run(config, out_dir)


def _run(config: Config, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = sorted(set(config.samples))
    n, h, d = config.n, config.heads, config.head_dim
    slopes = alibi_slopes(h)
    started = time.perf_counter()
    curves: dict[tuple[str, float], dict[str, Any]] = {}
    jobs = [(scale, seed) for scale in config.logit_scales for seed in range(config.seeds)]
    for scale, seed in progress(jobs, desc=NAME):
        g = torch.Generator().manual_seed(crc32_seed(config.seed, scale, seed))
        q = torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * scale
        k = torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * scale
        v = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
        exact = fused_attention(q, k, v, resolve_spec(q, k, v, slopes=slopes, causal=config.causal,
                                                      method="exact"))[0]
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        beta = float(logits.abs().max())  # the bound's logit bound: the realised max |logit|
        vmax = float(v.abs().max())
        window_spec = resolve_spec(q, k, v, slopes=slopes, causal=config.causal, method="window")
        for scheme in config.schemes:
            rec = curves.setdefault((scheme, scale), {
                "scheme": scheme, "logit_scale": scale, "beta": [], "lsh": [], "window": [], "pairs_fused": [],
                "pairs_split": [], "pairs_window": [], "window_width": [], "bound": [], "bound_measured": []})
            rec["beta"].append(beta)
            per_seed = {key: [] for key in ("lsh", "window", "pairs_fused", "pairs_split", "pairs_window",
                                            "window_width", "bound", "bound_measured")}
            for r in samples:
                gen = torch.Generator().manual_seed(crc32_seed(config.seed, scale, seed, scheme, r))
                parts = sample_partitions(n, slopes, r, scheme=scheme, generator=gen)
                spec = resolve_spec(q, k, v, causal=config.causal, method="lsh", partitions=parts)
                est = fused_attention(q, k, v, spec)[0]
                union, total = lsh_pairs(parts, config.causal)
                width = matched_widths(n, union, config.causal)
                win = fused_attention(q, k, v, dataclasses.replace(window_spec, window=width))[0]
                per_seed["lsh"].append(relative_error(est, exact, dim=(-1, -2))[0].tolist())  # per head
                per_seed["window"].append(relative_error(win, exact, dim=(-1, -2))[0].tolist())
                per_seed["pairs_fused"].append(union.tolist())
                per_seed["pairs_split"].append(total.tolist())
                per_seed["pairs_window"].append(window_pairs(n, width, config.causal).tolist())
                per_seed["window_width"].append(width.tolist())
                if HAVE_BOUND:
                    # Entrywise bound -> relative Frobenius bound: sqrt(N D) * bound / ||O_h||.
                    to_rel = math.sqrt(n * d) / exact.norm(dim=(-1, -2))[0]
                    rho = torch.tensor([_theory.row_sum_error_bound(n, float(m), r, config.delta)
                                        for m in slopes.tolist()])
                    measured = _mask_errors(parts)["row_sum"].cpu()
                    per_seed["bound"].append(
                        (_theory.attention_error_bound(rho, beta, vmax) * to_rel).tolist())
                    per_seed["bound_measured"].append(
                        (_theory.attention_error_bound(measured, beta, vmax) * to_rel).tolist())
            for key, value in per_seed.items():
                rec[key].append(value)  # [seed][r][head]
    results: dict[str, Any] = {"samples": samples, "slopes": slopes.tolist(), "have_bound": HAVE_BOUND,
                               "curves": [], "seconds": 0.0}
    for rec in curves.values():
        mean = {key: torch.tensor(val, dtype=torch.float64).mean(0).T.tolist() if val and val[0] else []  # [head][r]
                for key, val in rec.items() if isinstance(val, list) and key != "beta"}
        mean.update(scheme=rec["scheme"], logit_scale=rec["logit_scale"], beta=rec["beta"])
        # Least-squares exponent of err ~ r^a over r >= FIT_FROM (None with fewer than two such r).
        fit = [i for i, r in enumerate(samples) if r >= FIT_FROM]
        mean["exponent"] = [loglog_slope([samples[i] for i in fit], [e[i] for i in fit]) for e in mean["lsh"]]
        results["curves"].append(mean)
    results["seconds"] = time.perf_counter() - started
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    _plot(doc, out_dir, config)
    return doc


def replot(doc: dict, out_dir: str | Path) -> None:
    """The PNGs of a saved document, drawn into out_dir."""
    _plot(doc, Path(out_dir), config_from(doc["config"], Config))


def _plot(doc: dict, out_dir: Path, config: Config) -> None:
    plt = pyplot()
    res = doc["results"]
    samples = res["samples"]
    scales = sorted({c["logit_scale"] for c in res["curves"]})
    schemes = [s for s in ("grid", "cut") if any(c["scheme"] == s for c in res["curves"])]
    heads = [i for i in config.plot_heads if i < len(res["slopes"])]
    colors = plt.get_cmap("viridis")(torch.linspace(0, 0.9, len(heads)).tolist())
    fig, axes = plt.subplots(len(schemes), len(scales), figsize=(4.6 * len(scales), 3.9 * len(schemes)),
                             sharex=True, sharey=True, squeeze=False)
    for row, scheme in enumerate(schemes):
        for col, scale in enumerate(scales):
            ax = axes[row][col]
            curve = next(c for c in res["curves"] if c["scheme"] == scheme and c["logit_scale"] == scale)
            for color, head in zip(colors, heads):
                m = res["slopes"][head]
                ax.plot(samples, curve["lsh"][head], "o-", color=color, ms=3, label=f"LSH, m=2^{math.log2(m):.0f}")
                win = [w if w > 0 else float("nan") for w in curve["window"][head]]
                ax.plot(samples, win, "s--", color=color, ms=3, alpha=0.8,
                        label="window, same pairs" if head == heads[0] else None)
                exact = [r for r, w in zip(samples, curve["window"][head]) if w == 0]
                ax.plot(exact, [FLOOR * 1.6] * len(exact), "v", color=color, ms=6,
                        label="window covers every pair (error 0)" if head == heads[-1] else None)
            first = curve["lsh"][heads[0]][0]
            ax.plot(samples, [first / math.sqrt(r) for r in samples], ":", color="0.3", lw=1.5,
                    label=r"$\propto 1/\sqrt{r}$")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylim(FLOOR, 3e0)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{scheme}, logit scale {scale} (max|logit| {max(curve['beta']):.0f})", fontsize=10)
            if row == len(schemes) - 1:
                ax.set_xlabel("samples r")
            if col == 0:
                ax.set_ylabel(r"$\|\hat O - O\| / \|O\|$")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"Attention output error vs r (n={config.n}, D={config.head_dim}, "
                 f"{'causal' if config.causal else 'bidirectional'}); window at LSH-fused's pair count")
    save_figure(fig, out_dir / PLOT, dpi=110, rect=(0, 0.09, 1, 0.96))
    if res["have_bound"]:
        _plot_bound(res, out_dir, config, heads, colors)


def _plot_bound(res: dict, out_dir: Path, config: Config, heads: list[int], colors) -> None:
    """Measured error beside the uniform bound, at the smallest logit scale (where it is least loose)."""
    plt = pyplot()
    scale = min(c["logit_scale"] for c in res["curves"])
    samples = res["samples"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, scheme in zip(axes, ("grid", "cut")):
        curve = next((c for c in res["curves"] if c["scheme"] == scheme and c["logit_scale"] == scale), None)
        if curve is None:
            continue
        for color, head in zip(colors, heads):
            m = math.log2(res["slopes"][head])
            ax.plot(samples, curve["lsh"][head], "o-", color=color, ms=3, label=f"measured, m=2^{m:.0f}")
            ax.plot(samples, curve["bound_measured"][head], "-.", color=color, label="bound, measured rho"
                    if head == heads[0] else None)
            ax.plot(samples, curve["bound"][head], ":", color=color, label=f"bound, rho w.p. {1 - config.delta:g}"
                    if head == heads[0] else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("samples r")
        ax.set_title(f"{scheme}, logit scale {scale} (max|logit| {max(curve['beta']):.1f})", fontsize=10)
    axes[0].set_ylabel("relative output error")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle("Uniform bound (poslsh.theory.attention_error_bound) vs measured error", fontsize=11)
    save_figure(fig, out_dir / PLOT_BOUND, dpi=110)


def _table(res: dict, r_show: list[int]) -> str:
    rows = []
    idx = [res["samples"].index(r) for r in r_show]
    for c in res["curves"]:
        for head, m in enumerate(res["slopes"]):
            row = [c["scheme"], c["logit_scale"], f"2^{math.log2(m):.0f}"]
            for i in idx:
                row += [c["lsh"][head][i], c["window"][head][i], int(round(c["pairs_fused"][head][i] / 1))]
            row.append(c["exponent"][head])
            rows.append(row)
    headers = ["scheme", "logit scale", "slope"]
    for r in r_show:
        headers += [f"LSH r={r}", f"window r={r}", f"pairs r={r}"]
    return markdown_table(headers + ["fitted exponent"], rows)


def summarize(results: dict, out_dir: str | Path) -> str:
    """Markdown: the figure, a table per head, and where the window baseline is better."""
    res = results["results"]
    samples = res["samples"]
    r_show = [r for r in (8, 256) if r in samples] or samples[-1:]
    total = better = 0
    for c in res["curves"]:
        for lsh, win in zip(c["lsh"], c["window"]):
            total += len(lsh)
            better += sum(w < e for w, e in zip(win, lsh))
    exps = [e for c in res["curves"] for e in c["exponent"] if e is not None]
    fitted = [r for r in samples if r >= FIT_FROM]
    cfg = results["config"]
    lines = [
        f"## Attention error vs r ({NAME})",
        "",
        f"n = {cfg['n']}, {cfg['heads']} heads (Press slopes), D = {cfg['head_dim']}, "
        f"{'causal' if cfg['causal'] else 'bidirectional'}, {cfg['seeds']} seeds, float64; "
        f"error = ||O-hat - O|| / ||O|| per head against exact ALiBi. Ran in {res['seconds']:.1f} s.",
        "",
        f"![attention error vs r]({PLOT})",
        "",
        f"- LSH error falls like r^a with fitted a between {min(exps):.2f} and {max(exps):.2f} "
        f"(1/sqrt(r) is a = -0.5; the largest logits, scale 2, are slowest: few keys carry the weight)." if exps else
        f"- Fitted exponent a of the LSH error against r: n/a (the fit needs two or more r >= {FIT_FROM}; this "
        f"run has {', '.join(map(str, fitted)) or 'none'}).",
        f"- **The window baseline, given the same number of (query, key) pairs as LSH-fused, is more accurate "
        f"in {better} of {total} (head, r, scheme, scale) points.** Truncation error decays exponentially "
        "in the window, LSH error only like 1/sqrt(r); LSH's advantage is being unbiased and uniform over "
        "positions, not accuracy per pair at this size. Where the LSH union already covers every causal "
        "pair (small slopes at this n) the matched window is exact (error 0, drawn as triangles).",
    ]
    if res["have_bound"]:
        last = [c["bound_measured"][h][-1] for c in res["curves"] for h in range(len(res["slopes"]))
                if c["bound_measured"]]
        lines.append(f"- The uniform bound (poslsh.theory, with the measured row-sum mask error) at r = "
                     f"{samples[-1]} ranges {fmt(min(last))} .. {fmt(max(last))} as a relative error: valid "
                     "(it holds for all Q, K, V) but far above the measured error, by its e^(2 beta) factor "
                     f"and its worst-case rows; see ![bound]({PLOT_BOUND}).")
    else:
        lines.append("- poslsh.theory.attention_error_bound was not available: no bound plotted.")
    lines += ["", _table(res, r_show), ""]
    return "\n".join(lines)
