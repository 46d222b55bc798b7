"""generate-bench, reporting: greedy-token agreement, the aims as measured, the table, the README
sentence and the plot, computed from the JSON document alone (so a committed run regenerates them
without a GPU or a model)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ...util import fmt, legend_if_labelled, markdown_table, pyplot, save_figure
from ..metrics import loglog_slope
from .design import ARMS, LABELS

PLOT = "generate_bench.png"
COLORS = {"native": "tab:gray", "exact": "tab:blue", "window": "tab:green", "window_evict": "tab:olive",
          "lsh": "tab:red", "lsh_evict": "tab:purple", "window_graph": "tab:cyan"}
# Patched arms whose time per token is held to native's at the two shortest contexts, and the aims'
# bounds (the issue's numbers): within 1.2x native there, at most 0.5x native's longest with window +
# eviction at 64K and 256K, a KV cache held at 256K of at most 1/20 of a full one.
SHORT_RATIO, LONG_RATIO, KV_FRACTION = 1.2, 0.5, 1 / 20
LONG_CONTEXTS = (65536, 262144)
GIB, MIB = 2.0**30, 2.0**20


def tokens_label(n: int) -> str:
    """4096 -> 4K, 1048576 -> 1M, 320 -> 320."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def done(rows: list[dict], arm: str, n: int) -> dict | None:
    """The completed row of an arm at context n, or None."""
    return next((r for r in rows if r["arm"] == arm and r["context"] == n and r.get("phase") == "done"), None)


def reference(rows: list[dict], n: int) -> dict | None:
    """The row whose greedy tokens the others at context n are compared with: native's, else exact's."""
    return done(rows, "native", n) or done(rows, "exact", n)


def agreement(rows: list[dict], row: dict) -> dict[str, Any] | None:
    """Greedy tokens of a completed row against the reference's at the same context:
    {"with", "equal", "of", "first_divergence"}; None for the reference itself or without one."""
    ref = reference(rows, row["context"])
    if ref is None or ref is row:
        return None
    a, b = row["tokens"], ref["tokens"]
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return {"with": ref["arm"], "equal": sum(x == y for x, y in zip(a, b)), "of": min(len(a), len(b)),
            "first_divergence": diverge}


def time_ratio(row: dict, native: dict) -> float:
    """A row's time per token over native's. Where both are of one context and have as many rounds, the
    median over rounds of round k's ratio to native's round k (they ran close in time, so a slow stretch
    of a shared host divides out of each ratio); else the ratio of their times per token (rows of other
    contexts, or of a run with one round or from before rounds)."""
    mine, theirs = row.get("rounds_ms_per_token"), native.get("rounds_ms_per_token")
    if row["context"] == native["context"] and mine and theirs and len(mine) == len(theirs):
        return statistics.median([a / b for a, b in zip(mine, theirs)])
    return row["ms_per_token"] / native["ms_per_token"]


def longest_native(rows: list[dict]) -> dict | None:
    runs = [r for r in rows if r["arm"] == "native" and r.get("phase") == "done"]
    return max(runs, key=lambda r: r["context"]) if runs else None


def aims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's aims that this run's rows decide: {"aim", "value", "wanted", "met"} each."""
    rows = res["rows"]
    contexts = sorted({r["context"] for r in rows})
    out = []
    for n in contexts[:2]:
        native = done(rows, "native", n)
        for arm in ARMS:
            row = done(rows, arm, n)
            if native and row and arm != "native":
                ratio = time_ratio(row, native)
                out.append({"aim": f"{LABELS[arm]} at {tokens_label(n)}: time per token over native's",
                            "value": ratio, "wanted": f"<= {SHORT_RATIO}", "met": ratio <= SHORT_RATIO})
    longest = longest_native(rows)
    for arm, name in (("window_evict", "window + eviction"), ("window_graph", LABELS["window_graph"])):
        for n in LONG_CONTEXTS:
            row = done(rows, arm, n)
            if longest and row:
                ratio = time_ratio(row, longest)
                out.append({"aim": f"{name} at {tokens_label(n)}: time per token over native's at its longest "
                                   f"({tokens_label(longest['context'])})",
                            "value": ratio, "wanted": f"<= {LONG_RATIO}", "met": ratio <= LONG_RATIO})
    for arm in ("window_evict", "lsh_evict", "window_graph"):
        row = done(rows, arm, LONG_CONTEXTS[-1])
        if row:
            frac = row["kv"]["held_bytes"] / row["kv"]["full_bytes"]
            out.append({"aim": f"{LABELS[arm]} at {tokens_label(LONG_CONTEXTS[-1])}: KV cache held over a full cache",
                        "value": frac, "wanted": "<= 1/20", "met": frac <= KV_FRACTION})
    for arm in ARMS:
        if arm == "native":
            continue
        pts = [(r["context"], r["prefill_peak_bytes"] - r["start_bytes"]) for r in rows  # prompts read in one call
               if r["arm"] == arm and r.get("phase") == "done" and "prefill_peak_bytes" in r
               and not r.get("prefill_chunk")]
        slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 3 else None
        if slope is not None:
            out.append({"aim": f"{LABELS[arm]}: one-call prefill memory above the weights grows as n^k, k",
                        "value": slope, "wanted": "<= 1.1 (linear)", "met": slope <= 1.1})
    return out


def failures(doc: dict[str, Any]) -> list[str]:
    """What failed in a saved run, one line each ("exact at 4K: RuntimeError: ..."): a point that raised. A
    point that ran out of memory is a result (where that arm stops), and one skipped by the deadline or
    after running out of memory is not a failure."""
    return [f"{r['arm']} at {tokens_label(r['context'])}: {r['error']}" for r in doc["results"]["rows"] if "error" in r]


def _read(row: dict) -> str:
    """How a row's prompt was read: "one call" or "chunks of 32K"."""
    return f"chunks of {tokens_label(row['prefill_chunk'])}" if row.get("prefill_chunk") else "one call"


def _status(row: dict) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    if "out_of_memory" in row:
        return f"out of memory in {row.get('phase')} ({_read(row)})"
    return f"failed in {row.get('phase')}: {row.get('error', '?')}"


def table(doc: dict[str, Any]) -> str:
    """One row per (context, arm): prefill, peak memory, time per token, KV cache held, greedy tokens."""
    rows = doc["results"]["rows"]
    body = []
    for r in sorted(rows, key=lambda r: (r["context"], list(ARMS).index(r["arm"]))):
        head = [tokens_label(r["context"]), LABELS[r["arm"]]]
        if r.get("phase") != "done":
            body.append(head + [_status(r), "", "", "", ""])
            continue
        prefill = f"{fmt(r['prefill_s'])} s ({fmt(r['context'] / r['prefill_s'] / 1e3)}K tokens/s, {_read(r)})"
        peak = f"{fmt(r['peak_bytes'] / GIB)} GiB" if "peak_bytes" in r else "–"
        per_token = fmt(r["ms_per_token"]) + (f" ({fmt(r['kernel_ms_per_token'])})" if "kernel_ms_per_token" in r
                                             else "")
        kv = r["kv"]
        held = f"{fmt(kv['held_bytes'] / MIB)} MiB ({fmt(100 * kv['held_bytes'] / kv['full_bytes'])} %" + (
            f"; per head {fmt(100 * kv['per_head_reachable_bytes'] / kv['full_bytes'])} %)"
            if "per_head_reachable_bytes" in kv else ")")
        agree = agreement(rows, r)
        same = ("reference" if reference(rows, r["context"]) is r else "–") if agree is None else (
            f"{agree['equal']}/{agree['of']} = {agree['with']}" if agree["first_divergence"] is None else
            f"{agree['equal']}/{agree['of']}, first differs at {agree['first_divergence']} (vs {agree['with']})")
        if r.get("tokens_equal_across_rounds") is False:
            same += "; rounds differ"
        body.append(head + [prefill, peak, per_token, held, same])
    return markdown_table(["prompt", "attention", "prefill", "peak memory", "ms per token (kernels)",
                           "KV cache held (of full)", "greedy tokens equal"], body)


def _what(m: dict[str, Any]) -> str:
    """"bloom-560m's shape with random weights" (a shape or a config file) or "the checkpoint PATH"."""
    return (f"{m.get('source', '?')}'s shape with random weights" if m.get("random_weights", True)
            else f"the checkpoint {m.get('source')}")


def _model_text(doc: dict[str, Any]) -> str:
    res, env = doc["results"], doc["environment"]
    m = res.get("model") or {}
    cfg = res["effective_config"]
    return (f"A model of {_what(m)} ({m.get('layers')} layers, {m.get('heads')} heads of {m.get('head_dim')}, "
            f"{fmt((m.get('parameters') or 0) / 1e6)} M parameters, {m.get('dtype')}) on {env.get('device', '?')}: "
            f"greedy decoding of {cfg['new_tokens']} timed tokens after a random prompt, one process; transformers' "
            f"own attention ({m.get('attn_implementation')}) "
            f"against the poslsh patch (window eps {cfg['window_eps']:g}, LSH r = {cfg['samples']}). Time per token "
            "is wall time with the kernels (synchronised), kernel time from the profiler in parentheses; peak "
            "memory is the device's peak allocation over prefill and decoding; the KV cache is what the cache "
            "holds after generation, against a cache of every position (with eviction, \"per head\": what a "
            "cache evicting each KV head's unreachable keys would hold)." + _rounds_text(cfg.get("rounds", 1)))


def _rounds_text(rounds: int) -> str:
    """The method of a run of several rounds ("" for one round, or a run from before rounds)."""
    if rounds == 1:
        return ""
    return (f" Each arm was measured in {rounds} rounds at each prompt length, in alternating order (the arms' "
            "order, then reversed, and so on), so that a slow stretch of the host falls on every arm alike: time "
            "per token and prefill time are medians over the rounds, peak memory their max, and a time per token "
            "over native's at the same prompt length is the median of the paired per-round ratios (round k of "
            "an arm over round k of native, which ran close in time).")


def readme_section(doc: dict[str, Any]) -> str:
    """docs/RESULTS.md's block: the description, the table and the aims this run decides."""
    parts = [_model_text(doc), table(doc)]
    found = aims(doc["results"])
    if found:
        parts.append("**aims, as measured**\n\n" + markdown_table(
            ["aim", "measured", "wanted", "met"],
            [[a["aim"], fmt(a["value"]), a["wanted"], "yes" if a["met"] else "**no**"] for a in found]))
    if doc["results"].get("partial"):
        parts.append("Partial run: the JSON was saved before the run ended.")
    return "\n\n".join(parts)


def readme_line(doc: dict[str, Any]) -> str:
    """The README's sentence on a run: where transformers' own attention stops, the window with eviction at
    the longest prompt it read (time per token, KV cache held), and how many greedy tokens agreed."""
    res, env = doc["results"], doc["environment"]
    rows, m = res["rows"], res.get("model") or {}
    text = f"Generating text (`poslsh generate-bench`, {_what(m)}, {m.get('dtype')}, {env.get('device', '?')}): "
    native = longest_native(rows)
    oom = min((r["context"] for r in rows if r["arm"] == "native" and "out_of_memory" in r), default=None)
    if native:
        text += (f"transformers' own attention decodes at {fmt(native['ms_per_token'])} ms per token at "
                 f"{tokens_label(native['context'])}" + (f" and runs out of memory at {tokens_label(oom)}; "
                                                          if oom else "; "))
    evict = [r for r in rows if r["arm"] == "window_evict" and r.get("phase") == "done"]
    if evict:
        r = max(evict, key=lambda r: r["context"])
        text += (f"with the window and eviction, the patched model reads {tokens_label(r['context'])} tokens "
                 f"({_read(r)}) at "
                 f"{fmt(r['context'] / r['prefill_s'] / 1e3)}K tokens/s and decodes at {fmt(r['ms_per_token'])} ms "
                 f"per token, holding {fmt(100 * r['kv']['held_bytes'] / r['kv']['full_bytes'])} % of a full KV "
                 "cache" + (f" (peak memory {fmt(r['peak_bytes'] / GIB)} GiB)" if "peak_bytes" in r else "") + ". ")
    pairs = [a for r in rows if r.get("phase") == "done" and (a := agreement(rows, r))]
    if pairs:
        same = sum(a["first_divergence"] is None for a in pairs)
        text += f"Greedy tokens equal the reference's (native, else exact) in {same} of {len(pairs)} runs."
    return text.strip()


def graph_line(doc: dict[str, Any]) -> str:
    """The README's sentence on a run's graph-replayed decoding (``window_graph``) against native in the same
    run ("" when the run has no such arm)."""
    rows = doc["results"]["rows"]
    graph = [r for r in rows if r["arm"] == "window_graph" and r.get("phase") == "done"]
    if not graph:
        return ""
    lo, hi = min(graph, key=lambda r: r["context"]), max(graph, key=lambda r: r["context"])
    native = longest_native(rows)
    pairs = [a for r in graph if (a := agreement(rows, r))]
    return (f"Each decode step replayed from one CUDA graph (`hf_graph.GraphedDecoder`, window + eviction, "
            f"{doc['environment'].get('device', '?')}, another run): {fmt(lo['ms_per_token'])} ms per token at "
            f"{tokens_label(lo['context'])} and {fmt(hi['ms_per_token'])} at {tokens_label(hi['context'])}"
            + (f", {fmt(time_ratio(hi, native))}x transformers' own attention at its longest "
               f"({fmt(native['ms_per_token'])} ms at {tokens_label(native['context'])}, same run)" if native else "")
            + (f"; greedy tokens equal native's in {sum(a['first_divergence'] is None for a in pairs)} of "
               f"{len(pairs)} runs" if pairs else "") + ".")


def summarize(doc: dict[str, Any], out_dir: Path) -> str:
    """Markdown: the README sentence, the section, the plot."""
    lines = [f"## Generating text ({doc['environment'].get('device', '?')})", "",
             " ".join(filter(None, (readme_line(doc), graph_line(doc)))), "", readme_section(doc)]
    if (Path(out_dir) / PLOT).exists():
        lines += ["", f"![{PLOT}]({PLOT})"]
    return "\n".join(lines)


def make_plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time per generated token, peak memory and KV cache held against the prompt length, one line per
    arm; where an arm ran out of memory, a dotted line at that length."""
    rows = doc["results"]["rows"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (("ms per generated token", lambda r: r["ms_per_token"]),
              ("peak device memory (GiB)", lambda r: r["peak_bytes"] / GIB if "peak_bytes" in r else None),
              ("KV cache held after generation (MiB)", lambda r: r["kv"]["held_bytes"] / MIB))
    out_of_memory: dict[int, str] = {}  # context -> which arms ran out of memory there, and how they read the prompt
    for r in rows:
        if "out_of_memory" in r:
            what = f"{LABELS[r['arm']]} ({_read(r)})"
            out_of_memory[r["context"]] = f"{out_of_memory[r['context']]}, {what}" if r["context"] in out_of_memory \
                else f"out of memory: {what}"
    for ax, (ylabel, value) in zip(axes, panels):
        for arm in ARMS:
            pts = sorted((r["context"], value(r)) for r in rows if r["arm"] == arm and r.get("phase") == "done")
            pts = [p for p in pts if p[1] is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=COLORS[arm],
                        label=LABELS[arm])
        for n, text in out_of_memory.items():
            ax.axvline(n, color="black", ls=":", lw=1)
            ax.text(n, 0.98, text, fontsize=6.5, rotation=90, va="top", ha="right", transform=ax.get_xaxis_transform())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        if ax.lines and any(len(line.get_xdata()) for line in ax.lines if line.get_marker() == "o"):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
        legend_if_labelled(ax, fontsize=7)
    m = doc["results"].get("model") or {}
    fig.suptitle(f"{m.get('source', '?')} shape, random weights, {m.get('dtype')}, "
                 f"{doc['environment'].get('device', '?')}: greedy generation after a prompt", fontsize=10)
    return [save_figure(fig, Path(out_dir) / PLOT)]


def replot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    return make_plots(doc, out_dir)
