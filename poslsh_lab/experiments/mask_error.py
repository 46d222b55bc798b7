"""Max-norm and spectral error of the mean of r sampled block masks against the ALiBi kernel, vs r.

For each sequence length n, slope m, scheme ("grid", "cut") and seed, draw r_max partitions once
and measure the errors of B-hat built from the first r of them, r = 1, 2, 4, ..., r_max (nested
prefixes: each is a valid set of r independent samples; nesting makes each curve smoother, seeds
give the spread). Beside every measurement stand the theoretical levels from ``poslsh.theory``
(the eps that the Hoeffding and matrix-Bernstein sample counts guarantee with probability
>= 1 - delta at that r) and the block-size bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from poslsh import theory
from poslsh.hashing import Partitions, sample_partitions
from poslsh.mask_errors import mask_errors
from poslsh.seeds import crc32_seed
from ..util import Count, Fraction, Positive, check_fields, markdown_table, progress, pyplot, replot_saved, save_figure, save_results
from .metrics import loglog_slope

NAME = "mask-error"

PLOTS = {"max": "mask_error_max.png", "spectral": "mask_error_spectral.png", "blocks": "block_sizes.png"}


@dataclass
class Config:
    """What to measure. The defaults take ~30 s on a 2-core CPU; ``--lengths 100000`` scales up.

    Attributes:
        lengths: Sequence lengths n, one row of panels each.
        slopes: ALiBi slopes m, one column of panels each.
        samples: Numbers of masks r averaged (nested prefixes of one draw of the largest).
        schemes: Positional LSH schemes to compare.
        seeds: Independent draws per (n, slope, scheme), for the spread.
        delta: Failure probability of the plotted bounds.
        seed: Base seed of every draw.
        method: How the errors are computed: dense n x n matrices, structured (no n x n matrix), or auto (dense up to n = 512).
        rtol: Relative Lanczos residual of the structured spectral norm (1e-2 puts the value within about 0.3 percent).
        replot: A saved mask-error.json: only redraw its PNGs into --out (every other flag is ignored).
    """

    lengths: tuple[Count, ...] = (256, 4096)
    slopes: tuple[Positive, ...] = (2.0, 0.5, 1 / 16, 1 / 256)
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    seeds: Count = 3
    delta: Fraction = 0.1
    seed: int = 0
    method: Literal["auto", "dense", "structured"] = "auto"
    rtol: Positive = 1e-2
    replot: str = ""


def _prefix(parts: Partitions, r: int) -> Partitions:
    """The first r samples of every head (a valid draw of r independent samples)."""
    if parts.scheme == "grid":
        return Partitions(parts.n, parts.slopes, "grid", widths=parts.widths[:, :r].contiguous(),
                          offsets=parts.offsets[:, :r].contiguous())
    assert parts.num_heads == 1, "prefixes of cut partitions are taken one head at a time"
    ptr = parts.cut_pointers[: r + 1]
    return Partitions(parts.n, parts.slopes, "cut", cut_positions=parts.cut_positions[: int(ptr[-1])],
                      cut_pointers=ptr)


def _num_blocks(parts: Partitions) -> torch.Tensor:
    """Number of blocks of each head and sample, int64 [H, r], from the compact representation."""
    if parts.scheme == "grid":
        return torch.div(parts.n - 1 + parts.offsets, parts.widths, rounding_mode="floor") + 1
    return (parts.cut_pointers.diff() + 1).reshape(parts.num_heads, parts.num_samples)




def run(config: Config, out_dir: str | Path) -> dict:
    """Measure, write ``out_dir/mask-error.json`` and the PNGs, and return the saved document (with
    ``replot``: only redraw that JSON's PNGs)."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    check_fields(config)
    if not config.samples:
        raise ValueError("samples must name at least one r")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = sorted(set(config.samples))
    r_max = samples[-1]
    records: list[dict[str, Any]] = []
    jobs = [(n, m, s, k) for n in config.lengths for m in config.slopes for s in config.schemes
            for k in range(config.seeds)]
    start = time.perf_counter()
    for n, slope, scheme, k in progress(jobs, desc=NAME):
        gen = torch.Generator().manual_seed(crc32_seed(config.seed, n, slope, scheme, k))
        parts = sample_partitions(n, [slope], r_max, scheme=scheme, generator=gen)
        largest = parts.max_block_size()[0]  # [r_max]
        blocks = _num_blocks(parts)[0]  # [r_max]
        for r in samples:
            sub = _prefix(parts, r)
            t0 = time.perf_counter()
            err = mask_errors(sub, config.method, rtol=config.rtol)
            records.append({
                "n": n, "slope": slope, "scheme": scheme, "seed": k, "samples": r,
                "max": float(err["max"][0]), "spectral": float(err["spectral"][0]),
                "row_sum": float(err["row_sum"][0]), "spectral_residual": float(err["spectral_residual"][0]),
                "largest_block": int(largest[:r].max()),
                "mean_largest_block": float(largest[:r].double().mean()),
                "mean_block": float(n / blocks[:r].double().mean()),
                "seconds": time.perf_counter() - t0,
            })
    theory_rows = []
    for n in config.lengths:
        for slope in config.slopes:
            for r in samples:
                theory_rows.append({
                    "n": n, "slope": slope, "samples": r,
                    "max_eps": theory.max_norm_eps(n, r, config.delta),
                    "spectral_eps": theory.spectral_eps(n, slope, r, config.delta),
                    "row_sum_bound": theory.row_sum_error_bound(n, slope, r, config.delta),
                    "block_bound": theory.block_size_bound(n, slope, r, config.delta),
                    "kernel_norm": theory.kernel_norm_bound(n, slope),
                })
    results = {"records": records, "theory": theory_rows, "seconds": time.perf_counter() - start}
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    _plot(doc, out_dir)
    return doc


# ----------------------------------------------------------------------------- aggregation and plots


def _series(doc: dict, n: int, slope: float, scheme: str, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(r, median, min, max) over seeds of one measured quantity."""
    rows = [x for x in doc["results"]["records"] if x["n"] == n and x["slope"] == slope and x["scheme"] == scheme]
    rs = sorted({x["samples"] for x in rows})
    med, lo, hi = [], [], []
    for r in rs:
        vals = torch.tensor([x[key] for x in rows if x["samples"] == r and x[key] is not None], dtype=torch.float64)
        med.append(float(vals.median()) if vals.numel() else float("nan"))
        lo.append(float(vals.min()) if vals.numel() else float("nan"))
        hi.append(float(vals.max()) if vals.numel() else float("nan"))
    return rs, med, lo, hi


def _theory(doc: dict, n: int, slope: float, key: str) -> tuple[list[int], list[float]]:
    rows = sorted((x for x in doc["results"]["theory"] if x["n"] == n and x["slope"] == slope),
                  key=lambda x: x["samples"])
    return [x["samples"] for x in rows], [x[key] for x in rows]


_COLORS = {"grid": "tab:blue", "cut": "tab:orange"}


def _slope_label(m: float) -> str:
    if m > 0 and abs(math.log2(m) - round(math.log2(m))) < 1e-12 and m < 1:
        return f"m = 1/{round(1 / m)}"
    return f"m = {m:g}"


def replot(doc: dict, out_dir: str | Path) -> None:
    """The PNGs of a saved document, drawn into out_dir."""
    _plot(doc, Path(out_dir))


def _plot(doc: dict, out_dir: Path) -> None:
    plt = pyplot()
    from matplotlib import ticker

    cfg = doc["config"]
    lengths, slopes, schemes = cfg["lengths"], cfg["slopes"], cfg["schemes"]
    delta = cfg["delta"]
    for key, title, bound_key in (("max", "max-norm error  max|B̂ − B|", "max_eps"),
                                  ("spectral", "spectral-norm error  ‖B̂ − B‖₂", "spectral_eps")):
        fig, axes = plt.subplots(len(lengths), len(slopes), figsize=(3.6 * len(slopes), 3.2 * len(lengths)),
                                 squeeze=False, sharex=True)
        for a, n in enumerate(lengths):
            for b, slope in enumerate(slopes):
                ax = axes[a][b]
                for scheme in schemes:
                    rs, med, lo, hi = _series(doc, n, slope, scheme, key)
                    ax.plot(rs, med, "o-", color=_COLORS.get(scheme), ms=3, label=f"{scheme} (median)")
                    ax.fill_between(rs, lo, hi, color=_COLORS.get(scheme), alpha=0.2, lw=0)
                rs, bound = _theory(doc, n, slope, bound_key)
                ax.plot(rs, bound, "k--", lw=1.2, label=f"bound (δ = {delta:g})")
                rs0, med0, _, _ = _series(doc, n, slope, schemes[0], key)
                if med0 and med0[0] > 0:
                    ax.plot(rs0, [med0[0] / math.sqrt(r / rs0[0]) for r in rs0], ":", color="gray",
                            lw=1.2, label="∝ 1/√r guide")
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"n = {n}, {_slope_label(slope)}", fontsize=10)
                ax.grid(True, which="major", alpha=0.3)
                if a == len(lengths) - 1:
                    ax.set_xlabel("samples r")
                if b == 0:
                    ax.set_ylabel(key + " error")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        fig.suptitle(f"{title} vs samples r (shaded: min–max over {cfg['seeds']} seeds)")
        save_figure(fig, out_dir / PLOTS[key], dpi=110, rect=(0, 0.06, 1, 0.96))

    fig, axes = plt.subplots(len(lengths), len(slopes), figsize=(3.6 * len(slopes), 3.2 * len(lengths)),
                             squeeze=False, sharex=True)
    for a, n in enumerate(lengths):
        for b, slope in enumerate(slopes):
            ax = axes[a][b]
            for scheme in schemes:
                c = _COLORS.get(scheme)
                rs, med, lo, hi = _series(doc, n, slope, scheme, "largest_block")
                ax.plot(rs, med, "o-", color=c, ms=3, label=f"{scheme}: largest block of r samples")
                ax.fill_between(rs, lo, hi, color=c, alpha=0.2, lw=0)
                rs, med, _, _ = _series(doc, n, slope, scheme, "mean_block")
                ax.plot(rs, med, "s:", color=c, ms=3, label=f"{scheme}: mean block length")
            rs, bound = _theory(doc, n, slope, "block_bound")
            ax.plot(rs, bound, "k--", lw=1.2, label=f"block-size bound (δ = {delta:g})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            # plain integers on the block-length axis (log ticks like 6x10^0 read badly)
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(f"n = {n}, {_slope_label(slope)}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
            if a == len(lengths) - 1:
                ax.set_xlabel("samples r")
            if b == 0:
                ax.set_ylabel("block length (positions)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Block sizes vs samples r (median and min–max over {cfg['seeds']} seeds)")
    save_figure(fig, out_dir / PLOTS["blocks"], dpi=110, rect=(0, 0.09, 1, 0.96))


def summarize(results: dict, out_dir: str | Path) -> str:
    """A Markdown section: what the schemes are, a table at the largest r, and the three plots."""
    doc = results
    cfg = doc["config"]
    r_max = max(cfg["samples"])
    rows = []
    for n in cfg["lengths"]:
        for slope in cfg["slopes"]:
            th = {x["samples"]: x for x in doc["results"]["theory"] if x["n"] == n and x["slope"] == slope}[r_max]
            for scheme in cfg["schemes"]:
                rs, mx, _, _ = _series(doc, n, slope, scheme, "max")
                _, sp, _, _ = _series(doc, n, slope, scheme, "spectral")
                _, rw, _, _ = _series(doc, n, slope, scheme, "row_sum")
                _, lb, _, _ = _series(doc, n, slope, scheme, "largest_block")
                rows.append([n, _slope_label(slope).removeprefix("m = "), scheme,
                             mx[-1], th["max_eps"], loglog_slope(rs, mx),
                             sp[-1], th["spectral_eps"], loglog_slope(rs, sp), th["kernel_norm"],
                             rw[-1], th["row_sum_bound"], int(lb[-1]), th["block_bound"]])
    table = markdown_table(
        ["n", "slope", "scheme", "max err", "max bound", "max rate", "spectral err", "spectral bound",
         "spectral rate", "‖B‖₂ ≤", "row-sum err", "row-sum bound", "largest block", "block bound"], rows)
    secs = doc["results"]["seconds"]
    return f"""## Mask error: how well the mean of r block masks approximates the ALiBi kernel

ALiBi's multiplicative kernel B_ij = e^(−m|i−j|) is the expectation of random contiguous
block-diagonal 0/1 masks M (M_ij = 1 when i and j share a block). Two exact samplers:

* **grid**: one random width W (P(W = w) = w(1−q)² q^(w−1), q = e^(−m)) and a uniform offset; every
  block has width W, so a sample is two integers and applying it is a reshape.
* **cut**: each gap between neighbours is cut independently with probability 1 − q; blocks have
  geometric lengths.

Both give P(i, j share a block) = q^|i−j| exactly. Below, B̂ is the mean of r masks; errors are
medians over {cfg['seeds']} seeds at r = {r_max} (bounds at δ = {cfg['delta']:g}: Hoeffding + union bound
for the max norm, matrix Bernstein with the block-size cap for the spectral norm, block-size union
bound; "rate" is the fitted exponent of the error against r, −0.5 for a 1/√r law, n/a with one r). Errors for
n ≤ 512 are dense, above that structured (no n × n matrix; spectral norm by Lanczos).
Took {secs:.1f} s.

{table}

![max-norm error vs r]({PLOTS['max']})

![spectral-norm error vs r]({PLOTS['spectral']})

![block sizes vs r]({PLOTS['blocks']})
"""
