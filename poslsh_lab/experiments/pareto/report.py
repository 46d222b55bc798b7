"""pareto, reporting: the window baseline at equal cost, the verdicts, plots and report sections
computed from the JSON document alone (so the committed runs regenerate them without a GPU)."""

from __future__ import annotations

import math
from pathlib import Path

from ...util import fmt, markdown_table, pyplot
from .design import NAME, PLOT, PLOT_CONV, SAMPLINGS, _label


# ----------------------------------------------------------------------------- analysis


def alibi_panels(res: dict) -> list[dict]:
    """The ALiBi panels, one per length (a JSON written before ``n`` became a tuple holds one panel,
    not a list: bench/results/pareto_cpu/pareto.json)."""
    panels = res.get("alibi") or []
    return panels if isinstance(panels, list) else [panels]


def _panels(res: dict) -> list[tuple[str, dict]]:
    """(title, panel) for every panel in report order."""
    out = [("ALiBi", p) for p in alibi_panels(res)]
    return out + ([("heavy-tailed kernel", res["heavy"])] if res.get("heavy") else [])


def measured(points: list[dict]) -> list[dict]:
    """The points that were measured (not skipped by the budget, not failed)."""
    return [p for p in points if "error" in p]


def baseline_error_at(points: list[dict], budget: float, cost: str = "seconds") -> float | None:
    """The truncation baseline's error at a cost budget: its measured runs (windows, and exact
    attention as the window of width n) reduced to their lower envelope (best error within each
    cost), then log(error) interpolated linearly in log(cost) between neighbouring runs, because a
    window can be given any width in between (comparing against the measured grid only would
    flatter the challengers). None if the budget is below the cheapest run.

    Args:
        cost: "seconds" or "pairs" (keys per query, the hardware-independent cost).
    """
    base = sorted((p[cost], p["error"]) for p in measured(points) if p["method"] in ("window", "exact"))
    if not base or budget < base[0][0]:
        return None
    env: list[tuple[float, float]] = []
    for c, e in base:  # keep only runs that improve on every cheaper one
        if not env or e < env[-1][1]:
            env.append((c, e))
    for (c0, e0), (c1, e1) in zip(env, env[1:]):
        if c0 <= budget <= c1:
            t = 0.0 if c1 == c0 else (math.log(budget) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return math.exp((1 - t) * math.log(max(e0, 1e-300)) + t * math.log(max(e1, 1e-300)))
    return min(e for c, e in env if c <= budget)


def frontier_gaps(points: list[dict]) -> list[dict]:
    """For each measured LSH / hybrid point: the best baseline error available at no more time (and at
    no more keys per query), and the ratios (<= 1: the point is at least as accurate as the baseline)."""
    rows = []
    for p in measured(points):
        if p["method"] not in ("lsh", "hybrid"):
            continue
        row = {"label": _label(p), "error": p["error"], "seconds": p["seconds"], "pairs": p["pairs"]}
        for cost in ("seconds", "pairs"):
            b = baseline_error_at(points, p[cost], cost)
            row[f"baseline_error_{cost}"] = b
            row[f"ratio_{cost}"] = None if b is None else (math.inf if b == 0 else p["error"] / b)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- plots, summary


def replot(doc: dict, out_dir: str | Path) -> list[Path]:
    """Draw the saved document's PNGs into out_dir and return their paths: ``pareto.png`` (one panel
    per panel with measured points) and, with a convergence part, ``pareto_convergence.png``."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    res, cfg, env = doc["results"], doc["config"], doc["environment"]
    panels = [(title, p) for title, p in _panels(res) if measured(p["points"])]
    colors = {"iid": "tab:blue", "stratified": "tab:orange", "qmc": "tab:green"}
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
        for ax, (title, panel) in zip(axes[0], panels):
            _plot_panel(ax, panel, colors)
            what = "Press slopes" if panel["kernel"] is None else panel["kernel"]
            ax.set_title(f"{title}, {what}, n={panel['n']}, H={panel['heads']}", fontsize=10)
        where = (f"{env.get('cpu_threads', cfg['threads'])} thread(s), single-call CPU times: noisy, " if
                 env.get("device", "cpu") == "cpu" else "")
        fig.suptitle(f"Relative output error against the time of one forward call\n({env.get('device', cfg['device'])}, "
                     f"backend {cfg['backend']}, {cfg['dtype']}, {where}D={cfg['head_dim']})"
                     f"{' - partial run' if res.get('partial') else ''}", fontsize=11)
        fig.tight_layout()
        fig.savefig(out_dir / PLOT, dpi=110)
        plt.close(fig)
        written.append(out_dir / PLOT)

    conv = res.get("convergence")
    if not conv:
        return written
    metrics = ("max", "spectral", "attention")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, metric in zip(axes, metrics):
        for sampling, mode in conv["modes"].items():
            slope = mode[metric]["slope"]  # None: fewer than two r to fit
            ax.plot(conv["samples"], mode[metric]["geomean"], "o-", color=colors.get(sampling),
                    label=f"{sampling}: slope {'n/a' if slope is None else f'{slope:.2f}'}")
        first = conv["modes"][next(iter(conv["modes"]))][metric]["geomean"][0]
        for a, style in ((-0.5, ":"), (-0.75, "--")):
            ax.plot(conv["samples"], [first * (r / conv["samples"][0]) ** a for r in conv["samples"]], style,
                    color="0.4", label=f"r^{a}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("samples r")
        ax.set_title({"max": "max-norm error of B-hat", "spectral": "spectral-norm error of B-hat",
                      "attention": "relative attention output error"}[metric], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Error vs r by sampling mode (n={conv['n']}, geometric mean over heads and seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT_CONV, dpi=110)
    plt.close(fig)
    return written + [out_dir / PLOT_CONV]


def _plot_panel(ax, panel: dict, colors: dict[str, str]) -> None:
    """One panel's measured points: error vs time, log-log. Every line runs in order of its x (time),
    every point is labelled with its parameter (window eps, LSH r, hybrid eps or near-field width),
    and the window is drawn wide and underneath, so a hybrid curve on top of it stays visible."""
    pts = measured(panel["points"])
    floor = min([p["error"] for p in pts if p["error"] > 0] + [1e-6]) / 3
    by_time = lambda sel: sorted(sel, key=lambda p: p["seconds"])  # noqa: E731

    def line(sel, style, color, label, tag, offset=(3, 3), **kw):
        sel = by_time(sel)
        xs, ys = [p["seconds"] for p in sel], [max(p["error"], floor) for p in sel]
        ax.plot(xs, ys, style, color=color, label=label, **kw)
        for p, x, y in zip(sel, xs, ys):
            if tag is not None:
                ax.annotate(tag(p), (x, y), fontsize=6, xytext=offset, textcoords="offset points", color=color,
                            ha="left" if offset[0] >= 0 else "right")

    window = [p for p in pts if p["method"] == "window"]
    if window:
        line(window, "s-", "0.25", "window (eps labelled)", lambda p: f"{p['window_eps']:g}", lw=3.5, ms=7,
             alpha=0.55, zorder=1)
    exact = [p for p in pts if p["method"] == "exact"]
    if exact:
        ax.plot([p["seconds"] for p in exact], [max(p["error"], floor) for p in exact], "*", color="r", ms=10,
                label="exact (its own rounding error)", zorder=3)
    labelled = False  # the sampling modes share their r: label the first mode's points only
    for sampling in SAMPLINGS:
        sel = [p for p in pts if p["method"] == "lsh" and p["sampling"] == sampling]
        if sel:
            line(sel, "o--", colors[sampling], f"lsh {sampling}" + ("" if labelled else " (r labelled)"),
                 None if labelled else (lambda p: f"r={p['samples']}"), ms=4, lw=1, zorder=2)
            labelled = True
    for r in sorted({p["samples"] for p in pts if p["method"] == "hybrid"}):
        sel = [p for p in pts if p["method"] == "hybrid" and p["samples"] == r]
        key = "hybrid_eps" if "hybrid_eps" in sel[0] else "near"
        line(sel, "^-", "tab:purple", f"hybrid {sel[0]['sampling']} r={r} ({'eps' if key == 'hybrid_eps' else 'near'}"
             " labelled)", (lambda p: f"{p['hybrid_eps']:g}") if key == "hybrid_eps" else (lambda p: f"near {p['near']}"),
             offset=(-4, -8), ms=6, lw=1.2, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("time of one forward call [s]")
    ax.set_ylabel(r"relative output error $\|\hat O - O\| / \|O\|$")
    ax.legend(fontsize=7)


def summarize(results: dict, out_dir: str | Path) -> str:
    """Markdown: the figures, the slope table, the Pareto tables, and what they show."""
    res, cfg = results["results"], results["config"]
    device = results["environment"].get("device", cfg["device"])
    threads = results["environment"].get("cpu_threads", cfg["threads"])  # as the run had them (--threads 0: torch's)
    how = [f"backend {cfg['backend']}", cfg["dtype"]] + ([f"{threads} thread(s)"] if device == "cpu" else [])
    lines = [f"## Accuracy vs time: window, LSH (sampling modes), hybrid ({NAME})", "",
             f"Ran in {res['seconds']:.1f} s on {device} ({', '.join(how)}); errors against exact attention "
             f"in {cfg['reference_dtype']}"
             + (f" over the last {cfg['error_rows']} query rows" if cfg.get("error_rows") else "")
             + f", q ~ {cfg.get('query_scale', 1.0):g} N(0, 1)."
             + (" **Partial run** (interrupted, or points skipped or failed)." if _incomplete(res) else ""), ""]
    if res.get("convergence"):
        lines += [f"![error vs r by sampling mode]({PLOT_CONV})", ""] + _slope_table(res, cfg)
    lines += [f"![error vs time]({PLOT})", ""]
    for title, panel in _panels(res):
        lines += [f"### {title}: n = {panel['n']}, {panel['heads']} heads"
                  + (f", {panel['kernel']}" if panel["kernel"] else ""), ""]
        if panel.get("reference"):
            ref = panel["reference"]
            lines += [f"Reference: exact attention, {ref['backend']} backend, {ref['dtype']}, "
                      f"{ref['wall_seconds']:.1f} s.", ""]
        if panel.get("failed"):
            lines += [f"The reference failed: `{panel['failed']}`", ""]
        rows = [[_label(p), p["error"], p["seconds"] * 1e3, p["pairs"], p["backend"]]
                for p in measured(panel["points"])]
        rows += [[_label(p), "–", "–", "–", p.get("skipped") or "failed: " + p["failed"][:80]]
                 for p in panel["points"] if "error" not in p]
        lines += [markdown_table(["method", "rel. error", "time [ms]", "keys/query", "backend"], rows), ""]
        lines += [_verdict(panel), ""]
    if device == "cpu":
        lines += ["Caveat on CPU times: at this size one forward call is dominated by the fused engine's "
                  "per-tile Python overhead, and the machine may be shared, so single-call times move by "
                  "tens of percent (``--repeats`` takes a median); keys per query is the hardware-independent "
                  "cost. A win \"at equal time\" that is not also a win at equal keys per query is an "
                  "artifact of the CPU engine (e.g. the window's tiles compute T x (T + w) scores for T x w "
                  "useful ones), not of the method; the GPU run decides.", ""]
    lines += [_discussion(res, cfg), ""]
    return "\n".join(lines)


def failures(doc: dict) -> list[str]:
    """What failed in a saved run, one line each ("n=256: lsh iid r=4: ValueError(...)"): a panel's
    reference or a point. A point skipped by the time budget is not a failure."""
    out = []
    for title, panel in _panels(doc["results"]):
        where = f"{title} n={panel['n']}"
        if panel.get("failed"):
            out.append(f"{where}: reference: {panel['failed']}")
        out += [f"{where}: {_label(p)}: {p['failed']}" for p in panel["points"] if p.get("failed")]
    return out


def _incomplete(res: dict) -> bool:
    return bool(res.get("partial")) or any("error" not in p for _, panel in _panels(res) for p in panel["points"])


def _exact_error(panel: dict) -> float | None:
    """Exact attention's own error in the run's dtype against the reference: the rounding floor."""
    return next((p["error"] for p in measured(panel["points"]) if p["method"] == "exact"), None)


def comparison(panel: dict, cost: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(compared, wins, ties) among the panel's LSH and hybrid points at equal ``cost`` ("seconds" or
    "pairs"): compared, those with a baseline at that cost (``frontier_gaps`` rows); wins, those at
    least as accurate as it; ties, those matching it only where the baseline is at the rounding floor
    (within 2x exact attention's own error): there both are limited by the dtype, not the method."""
    floor = _exact_error(panel)
    gaps = [g for g in frontier_gaps(panel["points"]) if g[f"ratio_{cost}"] is not None]
    matched = [g for g in gaps if g[f"ratio_{cost}"] <= 1]
    ties = [g for g in matched if floor is not None and g[f"baseline_error_{cost}"] <= 2 * floor]
    return gaps, [g for g in matched if g not in ties], ties


def _verdict(panel: dict) -> str:
    """Whether any LSH or hybrid point matches the window baseline at equal time and at equal keys
    (see ``comparison``), the closest one, and notes on backends and unmeasured points."""
    pts = measured(panel["points"])
    if not any(p["method"] == "window" for p in pts) or not any(p["method"] in ("lsh", "hybrid") for p in pts):
        return " ".join(["No comparison: the window or the LSH and hybrid points were not measured."] + _missing(panel))
    text = []
    floor = _exact_error(panel)
    for cost, what in (("seconds", "time"), ("pairs", "keys per query")):
        gaps, wins, ties = comparison(panel, cost)
        unmatched = len(frontier_gaps(panel["points"])) - len(gaps)
        if wins:
            text.append(f"**At equal {what}: " + ", ".join(g["label"] for g in wins)
                        + f" {'is' if len(wins) == 1 else 'are'} at least as accurate as the window "
                        "baseline (interpolated between measured windows and exact) at that cost.**")
        else:
            text.append(f"**At equal {what}: no LSH or hybrid point is as accurate as the window baseline.**")
        if ties:
            text.append(", ".join(g["label"] for g in ties) + f" only {'ties' if len(ties) == 1 else 'tie'} it at "
                        f"the rounding floor (exact attention's own error {fmt(floor)}).")
        if gaps:
            best = min(gaps, key=lambda g: g[f"ratio_{cost}"])
            text.append(f"Closest: {best['label']} (error {fmt(best['error'])}) vs the baseline's "
                        f"{fmt(best[f'baseline_error_{cost}'])}: ratio {best[f'ratio_{cost}']:.2g}.")
        if unmatched:
            text.append(f"({unmatched} point(s) cost less than the cheapest window measured: not compared.)")
    text += _engines(panel) + _missing(panel)
    return " ".join(text)


def _engines(panel: dict) -> list[str]:
    """A note when the baseline and the challengers were timed on different backends."""
    pts = measured(panel["points"])
    base = sorted({p["backend"] for p in pts if p["method"] in ("window", "exact")})
    other = sorted({p["backend"] for p in pts if p["method"] in ("lsh", "hybrid")})
    if not base or not other or base == other:
        return []
    return [f"(Times come from different backends: window and exact on {', '.join(base)}, LSH and hybrid on "
            f"{', '.join(other)}; keys per query is the backend-independent comparison.)"]


def _missing(panel: dict) -> list[str]:
    """A note on planned points that were not measured, with why."""
    reasons: dict[str, int] = {}
    for p in panel["points"]:
        if "error" not in p:
            why = p.get("skipped") or "failed"
            reasons[why] = reasons.get(why, 0) + 1
    if not reasons:
        return []
    return ["(Not measured: " + ", ".join(f"{k} point(s): {why}" for why, k in reasons.items()) + ".)"]


def _slope_table(res: dict, cfg: dict) -> list[str]:
    conv = res.get("convergence")
    if not conv:
        return []
    rows = [[s, m["max"]["slope"], m["spectral"]["slope"], m["attention"]["slope"]] for s, m in conv["modes"].items()]
    fitted = [r for r in conv["samples"] if r >= cfg["fit_from"]]
    why = "" if len(fitted) >= 2 else (f" n/a: the fit needs two or more r >= {cfg['fit_from']}, this run has "
                                       f"{', '.join(map(str, fitted)) or 'none'}")
    return [f"Fitted log-log slope of error vs r (r >= {cfg['fit_from']}, n = {conv['n']}, "
            f"geometric mean over heads and seeds; iid theory -0.5){why}:", "",
            markdown_table(["sampling", "max norm", "spectral norm", "attention output"], rows), ""]


def against_flex(lib_doc: dict, flex_doc: dict, levels: tuple[float, ...] = (2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
                                                                           0.2, 0.5)) -> list[dict]:
    """At each error level: the library's fastest point of at most that error (every method on the backend
    ``auto`` picked, ``lib_doc``) against the fastest FlexAttention point of at most that error
    (``flex_doc``: the same study with backend flex), same n and inputs. Only configurations measured in
    both runs take part (a level where Flex lacks the library's configuration is no comparison). Rows
    {level, lib, flex, speedup}; None where one side has no such point."""
    common = ({_label(p) for p in measured(alibi_panels(lib_doc["results"])[0]["points"])}
              & {_label(p) for p in measured(alibi_panels(flex_doc["results"])[0]["points"])})

    def best(doc: dict, level: float) -> dict | None:
        pts = [p for p in measured(alibi_panels(doc["results"])[0]["points"])
               if p["error"] <= level and _label(p) in common]
        return min(pts, key=lambda p: p["seconds"]) if pts else None

    rows = []
    for level in levels:
        a, b = best(lib_doc, level), best(flex_doc, level)
        rows.append({"level": level, "lib": a, "flex": b,
                     "speedup": b["seconds"] / a["seconds"] if a and b else None})
    return rows


def against_flex_section(lib_doc: dict, flex_doc: dict) -> str:
    """Markdown for ``against_flex``: the table and the aim (at least 3x at every level), as measured."""
    rows = against_flex(lib_doc, flex_doc)
    cell = lambda p: "–" if p is None else f"{_label(p)} ({p['backend']}): {fmt(p['seconds'] * 1e3)} ms, error {fmt(p['error'])}"  # noqa: E731
    table = markdown_table(["error at most", "fastest here", "fastest FlexAttention", "speedup"],
                           [[fmt(r["level"]), cell(r["lib"]), cell(r["flex"]), fmt(r["speedup"])] for r in rows])
    ratios = [r["speedup"] for r in rows if r["speedup"] is not None]
    n = alibi_panels(lib_doc["results"])[0]["n"]
    verdict = (f"At n = {n // 1024}K the library's fastest method is {fmt(min(ratios))}× to {fmt(max(ratios))}× "
               "faster than the best FlexAttention configuration of equal or lower error (the aim was at least 3× "
               f"at every level: {'met' if min(ratios) >= 3 else '**not met**'})." if ratios else "No level had a point on both sides.")
    return verdict + "\n\n" + table


def readme_section(doc: dict) -> str:
    """The README's view of one saved run (CPU or GPU): slopes per sampling mode, the verdict per
    panel, and why."""
    res, cfg = doc["results"], doc["config"]
    device = doc["environment"].get("device", cfg["device"])
    plots = f"`{PLOT}`" + (f", `{PLOT_CONV}`" if res.get("convergence") else "")
    lines = [f"Variance-reduced sampling, hybrid and window on {device} ({cfg['backend']} backend, "
             f"{cfg['dtype']}); plots ({plots}) beside the JSON named below."
             + (" **Partial run** (interrupted, or points skipped or failed)." if _incomplete(res) else ""), ""]
    lines += _slope_table(res, cfg)
    for title, panel in _panels(res):
        lines += [f"*{title}, n = {panel['n']}:* " + _verdict(panel), ""]
    return "\n".join(lines + [_discussion(res, cfg)])


def _discussion(res: dict, cfg: dict) -> str:
    """The honest paragraph: why the window stays ahead for ALiBi (where it does), the rounding floor
    of a 16-bit run, and what changes for heavy tails."""
    won = any(comparison(p, "seconds")[1] for p in alibi_panels(res))
    parts = [("Where the window stays ahead, why" if won else "Why") + ": the window's error falls exponentially "
             "in its width (dropped mass e^{-m w}) while LSH's falls like a power of r. The hybrid is unbiased but "
             "its far field is a rare event: a block reaching past w occurs with probability ~q^w and then adds "
             "~1/r of the row's weight, so its RMS error is ~sqrt(q^w / r), not q^w: to match a window of error "
             "eps it needs q^w ~ r eps^2, about twice the window's width, plus the LSH blocks."]
    if cfg["dtype"] in ("bfloat16", "float16"):
        floors = [(p["n"], e) for p in alibi_panels(res) if (e := _exact_error(p)) is not None]
        if floors:
            parts.append(f"Floor: in {cfg['dtype']}, exact attention itself is "
                         + ", ".join(f"{fmt(e)} (n = {n})" for n, e in floors)
                         + f" from the {cfg['reference_dtype']} reference, so errors near that measure rounding, "
                         "not the method.")
    heavy = res.get("heavy")
    if heavy:
        win = [p for p in measured(heavy["points"]) if p["method"] == "window"]
        lsh = [p for p in measured(heavy["points"]) if p["method"] in ("lsh", "hybrid")]
        if win and lsh:
            parts.append(f"Heavy tail ({heavy['kernel']}): the window needs w = eps^(-1/p) - 1 keys "
                         f"(largest measured {max(p['pairs'] for p in win):.0f} keys/query for error "
                         f"{fmt(min(p['error'] for p in win))}); LSH's blocks are mostly short but its "
                         f"widths are heavy-tailed too (best LSH/hybrid error {fmt(min(p['error'] for p in lsh))} "
                         f"at {min(lsh, key=lambda p: p['error'])['pairs']:.0f} keys/query).")
    return " ".join(parts)
