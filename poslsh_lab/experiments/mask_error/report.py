"""mask-error, reporting: the error and block-size figures, the summary and the results section,
computed from the JSON document alone (so the committed run regenerates them)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...util import fmt, markdown_table, pyplot, save_figure
from ..metrics import loglog_slope
from .design import PLOTS


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


def readme_section(doc: dict) -> str:
    """The results section (docs/RESULTS.md) of a committed run: the fitted rate of the mean mask's error
    against r, per scheme, length and slope."""
    cfg = doc["config"]
    rows = []
    for n in cfg["lengths"]:
        for slope in cfg["slopes"]:
            for scheme in cfg["schemes"]:
                rs, mx, _, _ = _series(doc, n, slope, scheme, "max")
                _, sp, _, _ = _series(doc, n, slope, scheme, "spectral")
                rows.append([n, _slope_label(slope).removeprefix("m = "), scheme, fmt(mx[-1]),
                             fmt(loglog_slope(rs, mx)), fmt(sp[-1]), fmt(loglog_slope(rs, sp))])
    return (f"The mean of r sampled block masks against the ALiBi kernel B, medians over {cfg['seeds']} seeds; "
            f"\"rate\" is the fitted exponent of the error against r (a 1/sqrt(r) law is -0.5). Errors at "
            f"r = {max(cfg['samples'])}.\n\n"
            + markdown_table(["n", "slope", "scheme", "max error", "max rate", "spectral error", "spectral rate"], rows))
