"""lm-validation, reporting: findings, plots and report sections computed from the JSON document alone
(so the committed run regenerates them without a model or a GPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ...util import fmt, legend_if_labelled, markdown_table, pyplot, save_figure
from ..metrics import extrapolation_verdict, loglog_slope
from .design import (GAP_FLOOR, LN2, NAME, NOISY_CONTEXT, PLOT_DIR, PLOTS, Config, _lsh_label, _tier, config_of,
                     methods)


# ---------------------------------------------------------------------------- analysis
def _table(rows: list[dict]) -> dict[tuple[int, str], dict]:
    return {(r["context"], r["method"]): r for r in rows if "loss" in r}


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
    from ...lm.train import plot_curve

    res = doc["results"]
    cfg = config_of(res)
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
    return save_figure(fig, path, dpi=120)


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
    return save_figure(fig, path, dpi=120)


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
    return save_figure(fig, path, dpi=120)


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
    return save_figure(fig, path, dpi=110)


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
            verdict = extrapolation_verdict(ratio)
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
    cfg = config_of(res)
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
