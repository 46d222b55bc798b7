"""scaling, reporting: the time and memory figure and the summary (table, growth exponents), computed
from the JSON document alone (so a saved run regenerates them)."""

from __future__ import annotations

import math
from pathlib import Path

from ...util import fmt, markdown_table, pyplot, save_figure
from .design import NAME, PLOT


def replot(doc: dict, out_dir: str | Path) -> None:
    """The PNG of a saved document, drawn into out_dir."""
    _plot(doc, Path(out_dir))


def _plot(doc: dict, out_dir: Path) -> None:
    plt = pyplot()
    rows = doc["results"]["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, key, label in ((axes[0], "cpu_seconds", "forward CPU time (s)"),
                           (axes[1], "peak_rss_delta", "peak memory growth (MiB)")):
        scale = 1.0 if key == "cpu_seconds" else 1 / 2**20
        for method in methods:
            pts = sorted((r["n"], r[key]) for r in rows if r["method"] == method and r[key])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * scale for p in pts], "o-", label=method)
        ref = sorted((r["n"], r[key]) for r in rows if r["method"] == methods[-1] and r[key])
        if ref:
            n0, y0 = ref[0][0], ref[0][1] * scale
            ns = sorted({r["n"] for r in rows})
            ax.plot(ns, [y0 * (n / n0) for n in ns], ":", color="0.4", label="slope 1 (linear)")
            ax.plot(ns, [y0 * (n / n0) ** 2 for n in ns], "--", color="0.6", label="slope 2 (quadratic)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"CPU forward, H={cfg['heads']}, D={cfg['head_dim']}, fp32, r={cfg['samples']} ({cfg['scheme']}), "
                 f"{doc['results']['threads']} thread(s)", fontsize=11)
    save_figure(fig, out_dir / PLOT, dpi=110)


def summarize(results: dict, out_dir: str | Path) -> str:
    """Markdown: the figure, a time/memory table, and the fitted growth exponents."""
    res = results["results"]
    rows = res["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["n"] for r in rows})
    by = {(r["n"], r["method"]): r for r in rows}

    def cell(n, m):
        r = by.get((n, m))
        if r is None:
            return "–"
        mem = "?" if r["peak_rss_delta"] is None else f"{r['peak_rss_delta'] / 2**20:.0f} MiB"
        return f"{fmt(r['cpu_seconds'])} s ({fmt(r['seconds'])} s wall) / {mem}"

    table = markdown_table(["n"] + methods, [[n] + [cell(n, m) for m in methods] for n in lengths])
    exps = res["exponents"]
    growth = "; ".join(f"{m}: n/a (one length)" if e["time"] is None else f"{m}: time n^{fmt(e['time'])}"
                       + (f", memory n^{fmt(e['memory'])}" if e["memory"] else "") for m, e in exps.items())
    cfg = results["config"]
    eps, m_min = cfg["window_eps"], min(res["slopes"])
    reach = math.log(1 / eps) / m_min
    return "\n".join([
        f"## CPU scaling ({NAME})",
        "",
        "Forward CPU time (process time, best of repeats; wall time beside it: the machine is shared, so "
        "wall time also measures other tenants) and peak resident-memory growth per call, no autograd, "
        f"{res['threads']} torch thread(s).",
        "",
        f"Log-log growth fitted on n >= {cfg['fit_from']} (on all of a method's lengths where fewer than two reach "
        f"that, as for exact): {growth}. Expected: exact n^2 in time (the tiled "
        "engine keeps its memory linear), window and LSH n^1 once n is well beyond the reach of the "
        f"flattest head (window w = ln(1/eps)/m = {reach:.0f} for m = {m_min:g}; the LSH union is of the same "
        "order): below that they still see the whole prefix for that head and grow like exact. Memory "
        "includes the O(n) output.",
        "",
        f"![scaling]({PLOT})",
        "",
        table,
        "",
    ])
