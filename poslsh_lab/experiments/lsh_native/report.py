"""lsh-native, reporting: the verdict, the plots and the report sections, computed from the JSON
document alone (so a committed run regenerates them without rerunning)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ...util import fmt, legend_if_labelled, markdown_table, pyplot, save_figure
from ..metrics import extrapolation_verdict
from .design import (NAME, PLOT_DIR, PLOTS, TOLERANCE, Config, _r, config_of, fill_methods,
                     main_methods, verdict_contexts, window_label)


# ---------------------------------------------------------------------------- analysis
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
        head = (f"Yes: {_arm_label(arm, letter=False)}, evaluated with positional LSH at r = {r}, comes within "
                f"{100 * TOLERANCE:.0f} % of the exact-ALiBi model's bits per byte at {ctx} ("
                + ", ".join(f"{100 * g:+.1f} %" for _, _, g in best["bits"])
                + f"), with attention taking {best['speed'][-1]}; extrapolation: {best['extrapolation']}")
    elif native:
        closest = min(native, key=lambda a: max(g for _, _, g in found[a["name"]]["bits"]))
        best = found[closest["name"]]
        head = (f"No: no LSH-native model evaluated with LSH at r <= {cfg.verdict_max_r} comes within "
                f"{100 * TOLERANCE:.0f} % of the exact-ALiBi model's bits per byte at {ctx}; the closest, "
                f"{_arm_label(closest, letter=False)} evaluated with {best['method']}, is "
                + " and ".join(f"{100 * g:+.1f} %" for _, _, g in best["bits"])
                + f" from it, with attention taking {best['speed'][-1]}; extrapolation: {best['extrapolation']}")
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
    speed = [f"{fmt(times[(n, method)])} µs per token at {_k(n)} (the window: {fmt(times[(n, win)])} µs)"
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
    return f"bits at {_k(n)} / at {_k(cfg.train_context)} = {ratio:.3f}, {extrapolation_verdict(ratio)}"


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _arm_label(arm: dict, letter: bool = True) -> str:
    """The arm in words, with its letter of the section's list (a), (b), (c) unless ``letter`` is off (a
    sentence read on its own, as the README's)."""
    if arm["kind"] == "baseline":
        text, tag = "the exact-ALiBi model", "a"
    elif arm["kind"] == "finetune":
        text, tag = f"the exact model fine-tuned with {arm['train_attention']}", "c"
    else:
        text, tag = f"the model trained with {arm['train_attention']}", "b"
    return f"{text} ({tag})" if letter else text


# ---------------------------------------------------------------------------- plots
def replot(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Draw every PNG of ``PLOTS`` that the saved document has data for into out_dir."""
    res = doc["results"]
    cfg = config_of(res)
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
    return save_figure(fig, path, dpi=110)


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
    cfg = config_of(res)
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


def readme_section(doc: dict[str, Any], image_dir: str = PLOT_DIR + "/") -> str:
    """The results block for bench/results/lsh-native.json, its PNGs linked under ``image_dir`` (default
    ``PLOT_DIR``, from the repository root)."""
    return _section(doc, image_dir, full=False)
