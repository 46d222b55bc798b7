"""cp-bench, reporting: the plot (time vs world size, bytes vs total length), the summary and the results
section, computed from the JSON document alone (so a committed run regenerates them without launching)."""

from __future__ import annotations

from pathlib import Path

from ...util import fmt, markdown_table, pyplot, save_figure
from .design import NAME, PLOT


def replot(doc: dict, out_dir: str | Path) -> None:
    """cp_bench.png from the JSON: time per call vs world size (weak scaling), bytes per rank vs total length."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    rows = [r for r in doc["results"]["rows"] if r["timed"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    main = [r for r in rows if r["halo"] in (None, doc["config"]["halo"])]
    for (method, n), color in zip(dict.fromkeys((r["method"], r["n_local"]) for r in main), plt.cm.tab10.colors * 3):
        mine = sorted((r for r in main if (r["method"], r["n_local"]) == (method, n)), key=lambda r: r["world_size"])
        ws = [r["world_size"] for r in mine]
        phase = "fwd_bwd" if all("fwd_bwd" in r for r in mine) else "fwd"
        axes[0].plot(ws, [r[phase]["ms"] for r in mine], "o-", color=color, label=f"{method}, {n} / rank")
        axes[0].plot(ws, [r[phase]["cpu_ms"] for r in mine], "x:", color=color, alpha=0.6)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("ranks W (sequence W x n: weak scaling)")
    axes[0].set_ylabel("ms per call, fwd+bwd")
    axes[0].set_title("o: wall time of the slowest rank; x: its CPU time", fontsize=8)
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    colors = dict(zip(dict.fromkeys((r["method"], r["halo"]) for r in rows), plt.cm.tab10.colors * 3))
    sizes = sorted({r["world_size"] for r in rows if r["world_size"] > 1})
    styles = dict(zip(reversed(sizes), ["-", "--", ":", "-."] * 4))
    for (method, halo, w) in dict.fromkeys((r["method"], r["halo"], r["world_size"]) for r in rows):
        pts = sorted((r["total"], max(r["bytes_fwd"])) for r in rows
                     if (r["method"], r["halo"], r["world_size"]) == (method, halo, w))
        if w > 1 and method != "exact":
            label = (method if halo in (None, doc["config"]["halo"]) else f"{method}, halo={halo}") + f", W={w}"
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o", ls=styles[w], color=colors[(method, halo)],
                         label=label)
    for w in sizes:  # what a ring sends at each length (the exact rows measured it where they ran)
        ring = sorted({(r["total"], r["ring_bytes_fwd"]) for r in rows if r["world_size"] == w})
        axes[1].plot([p[0] for p in ring], [p[1] for p in ring], "k", ls=styles[w], alpha=0.5,
                     label=f"a ring, W={w}: (W-1) x shard K,V")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("total sequence length")
    axes[1].set_ylabel("bytes sent per rank, forward (max over ranks)")
    axes[1].grid(True, alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:  # a one-rank run sends nothing: no lines to label
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "one rank: nothing sent", ha="center", va="center", transform=axes[1].transAxes)
    env, cfg = doc["environment"], doc["config"]
    fig.suptitle(f"context parallelism on {env['device']} ({doc['results']['launch']['backend']}): B={cfg['batch']}, "
                 f"H={cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}, {'causal' if cfg['causal'] else 'bidirectional'}",
                 fontsize=10)
    save_figure(fig, Path(out_dir) / PLOT)


def summarize(results: dict, out_dir: str | Path) -> str:
    """The run's report.md: a heading, the plot and ``readme_section``."""
    return f"## Context parallelism ({NAME})\n\n![time and bytes]({PLOT})\n\n" + readme_section(results)


def readme_section(results: dict) -> str:
    """Markdown: per (method, W, n) time, memory, bytes and check; weak scaling; bytes vs length (the
    last two where the run has more than one world size)."""
    res, cfg = results["results"], results["config"]
    rows = sorted(res["rows"], key=lambda r: (r["method"], str(r["halo"]), r["n_local"], r["world_size"]))
    checked = [r for r in rows if r.get("check")]
    rows = [r for r in rows if r["timed"]]
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"  # noqa: E731

    table = markdown_table(
        ["method", "halo", "W", "n / rank", "fwd ms", "fwd+bwd ms", "fwd+bwd CPU ms", "peak MiB beyond the inputs (max rank)",
         "sent fwd KiB (max rank)", "sent bwd KiB", "ring fwd KiB"],
        [[r["method"], r["halo"] or r["layout"], r["world_size"], r["n_local"], r["fwd"]["ms"],
          r["fwd_bwd"]["ms"] if "fwd_bwd" in r else "–", r["fwd_bwd"]["cpu_ms"] if "fwd_bwd" in r else "–",
          mib(max((m for m in r["peak_memory"] if m is not None), default=None)), max(r["bytes_fwd"]) / 1024,
          max(b or 0 for b in r["bytes_bwd"]) / 1024, r["ring_bytes_fwd"] / 1024] for r in rows])
    names = ("out", "dq", "dk", "dv")
    checks = markdown_table(
        ["method", "halo", "W", "n / rank", "ok"] + [f"{n} vs 1 process" for n in names]
        + [f"{n}: CP / 1 process vs {checked[0]['check']['reference_dtype'] if checked else 'ref'}" for n in names],
        [[r["method"], r["halo"] or r["layout"], r["world_size"], r["n_local"],
          "yes" if r["check"]["ok"] else "**NO**"] + [r["check"]["vs_single"].get(n) for n in names]
         + [f"{fmt(r['check']['cp_vs_ref'][n])} / {fmt(r['check']['single_vs_ref'][n])}"
            if n in r["check"]["cp_vs_ref"] else "–" for n in names] for r in checked])
    weak = markdown_table(
        ["method", "halo", "n / rank", "W", "fwd time ratio", "fwd+bwd time ratio", "fwd+bwd CPU ratio"],
        [[w["method"], w["halo"] or "–", w["n_local"], w["world_size"], w.get("fwd_time_ratio"),
          w.get("fwd_bwd_time_ratio"), w.get("fwd_bwd_cpu_ratio")] for w in res["weak_scaling"]])
    join = lambda xs: " / ".join("–" if x is None else str(x) for x in xs)  # noqa: E731
    traffic = markdown_table(
        ["method", "halo", "W", "total lengths", "max bytes sent fwd", "halo bound (bytes)", "ring bytes fwd"],
        [[t["method"], t["halo"] or "–", t["world_size"], join(t["totals"]), join(t["max_bytes_fwd"]),
          join(t.get("halo_bound_bytes_fwd", [None] * len(t["totals"]))), join(t["ring_bytes_fwd"])]
         for t in res["traffic_vs_length"]])
    launch = res["launch"]
    parts = [
        f"{launch['processes']} process{'es' if launch['processes'] > 1 else ''} ({launch['launcher']}, {launch['backend']}); B={cfg['batch']}, H={cfg['heads']}, "
        f"Hkv={cfg['kv_heads'] or cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"{'causal' if cfg['causal'] else 'bidirectional'}, Press slopes; window eps={cfg['window_eps']}, "
        f"lsh/hybrid r={cfg['samples']} ({cfg['scheme']}), hybrid eps={cfg['hybrid_eps']}; exact: ring, "
        f"layout {cfg['exact_layout'] if cfg['causal'] else 'contiguous'}. Times: median of {cfg['repeats']} calls of "
        "the slowest rank (wall), and that rank's process CPU time.",
        table,
        "Correctness: the gathered result against one process on the whole sequence (relative Frobenius "
        "difference), and both against a wider-dtype reference of the same method; ok = CP's error within 2x "
        "of the single process's own.",
        checks]
    if res["weak_scaling"]:
        parts += ["Weak scaling: time at W ranks and W x the length over time at 1 rank and 1 x the length "
                  "(1 = perfect).", weak]
    if res["traffic_vs_length"]:
        parts += ["Bytes sent per rank (forward, largest over ranks) at each total length, against the halo bound "
                  "(keys and values of each KV head's largest reach, per side: window w_h, grid LSH max W - 1; the "
                  "same at every N) and a ring's ((W - 1) x the shard's keys and values).", traffic]
    return "\n\n".join(parts) + "\n"
