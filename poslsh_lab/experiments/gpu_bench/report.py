"""bench, reporting: derived numbers (rates, floors, the aims), the tables, the speed table, the
plots and the README sections, computed from the JSON document alone (so a committed run regenerates
them without a GPU)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from ...util import fmt, markdown_table, pyplot
from ..harness import config_from
from .design import COLUMNS, LABELS, Config


def find(rows: list[dict], column: str, n: int, pas: str = "fwd", nq: int | None = None, direct: bool = False):
    """The measured row (with "ms") of a column at n, or None."""
    for row in rows:
        if (row["column"] == column and row["n"] == n and row["pass"] == pas and row.get("direct", False) == direct
                and (nq is None and row["nq"] == row["n"] or row["nq"] == nq) and "ms" in row
                and not row.get("config")):
            return row
    return None


def derive(res: dict[str, Any], config: Config) -> None:
    """Rates, floors and the targets, from the rows."""
    rows = [r for r in res["rows"] if not r.get("config")]
    D, H = config.dim, config.heads
    bw = res["ceilings"].get("copy_TBps")
    sdpa_rate = {}
    for pas, per_pair in (("fwd", 4 * D), ("fwd+bwd", 14 * D)):
        rates = [per_pair * r["pairs"] / r["ms"] / 1e9 for r in rows if r["column"] == "sdpa" and r["pass"] == pas
                 and r["nq"] == r["n"] and "ms" in r]
        sdpa_rate[pas] = max(rates) if rates else None
    res["ceilings"]["sdpa_fwd_TFLOPs"], res["ceilings"]["sdpa_fwd_bwd_TFLOPs"] = sdpa_rate["fwd"], sdpa_rate["fwd+bwd"]
    for r in rows:
        if "ms" not in r or "pairs" not in r:
            continue
        per_pair = 4 * D if r["pass"] == "fwd" else 14 * D
        r["tflops"] = per_pair * r["pairs"] / r["ms"] / 1e9
        nbytes = (2 * r["nq"] + 2 * r["n"]) * H * D * 2 * (1 if r["pass"] == "fwd" else 2.5)
        t_flop = per_pair * r["pairs"] / (sdpa_rate[r["pass"]] * 1e9) if sdpa_rate[r["pass"]] else 0.0
        t_byte = nbytes / (bw * 1e9) if bw else 0.0
        r["floor_ms"] = max(t_flop, t_byte)
        r["floor_bound"] = "flops" if t_flop >= t_byte else "bytes"
        r["floor_fraction"] = r["floor_ms"] / r["ms"]
        ex = find(rows, "exact_flex", r["n"], r["pass"], r["nq"])
        if ex:
            r["speedup_vs_exact_flex"] = ex["ms"] / r["ms"]
    t: dict[str, dict] = {}

    def target(name: str, value: float | None, wanted: str, met: bool | None) -> None:
        if value is not None:
            t[name] = {"value": value, "wanted": wanted, "met": bool(met)}

    n0 = 262144
    wt, wf = find(rows, "window_triton", n0), find(rows, "window_flex", n0)
    if wt:
        target("window (eps 1e-3) forward at 256K, ms", wt["ms"], "<= 3.5", wt["ms"] <= 3.5)
    if wt and wf:
        target("window forward at 256K, Triton over Flex", wt["ms"] / wf["ms"], "<= 0.4", wt["ms"] / wf["ms"] <= 0.4)
    lt = find(rows, "lsh_triton", n0)
    if lt:
        target("LSH r=8 forward at 256K, ms", lt["ms"], "<= 3.0", lt["ms"] <= 3.0)
    for n in (16384, 65536):
        et, sd = find(rows, "exact_triton", n), find(rows, "sdpa", n)
        if et and sd:
            ratio = sd["ms"] / et["ms"]  # same pairs: throughput ratio
            target(f"exact ALiBi forward at {n // 1024}K, throughput over dense SDPA", ratio, ">= 0.9", ratio >= 0.9)
    for col in ("exact_triton", "window_triton", "hybrid_triton", "lsh_triton"):
        for n in sorted({r["n"] for r in rows if r["column"] == col and r["pass"] == "fwd+bwd"}):
            f, b = find(rows, col, n), find(rows, col, n, "fwd+bwd")
            if f and b:
                target(f"{LABELS[col]} fwd+bwd over fwd at {n // 1024}K", b["ms"] / f["ms"], "<= 3",
                       b["ms"] / f["ms"] <= 3)
    for col in ("window_triton", "lsh_triton", "hybrid_triton", "exact_triton"):
        for n in config.decode_ns:
            d = find(rows, col, n, nq=1)
            if not d or n < 65536:
                continue
            if col == "exact_triton":
                sd = find(rows, "sdpa", n, nq=1)
                if sd:
                    target(f"exact decode at {n // 1024}K keys, over dense SDPA", d["ms"] / sd["ms"], "<= 1.1",
                           d["ms"] / sd["ms"] <= 1.1)
            else:
                target(f"{LABELS[col]} decode at {n // 1024}K keys, us per call", d["ms"] * 1e3, "<= 30",
                       d["ms"] * 1e3 <= 30)
    res["targets"] = t


def speed_table(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``poslsh.attention.speed`` table of one run: per method and regime ("prefill": as many queries
    as keys; "decode": one query), each backend's forward ms at each n, through the public call."""
    res = doc["results"]
    device = doc["environment"]["device"]
    table: dict[str, dict] = {}
    for r in res["rows"]:
        method, backend, _ = COLUMNS.get(r["column"], ("none", "", ""))
        if method == "none" or r.get("config") or r.get("direct") or r["pass"] != "fwd" or "ms" not in r:
            continue
        regime = "decode" if r["nq"] == 1 else "prefill" if r["nq"] == r["n"] else None
        if regime:
            entry = table.setdefault(method, {}).setdefault(regime, {}).setdefault(str(r["n"]), {})
            entry[backend] = min(r["ms"], entry.get(backend, math.inf))  # split: its fastest primitive
    return {"devices": {device: table}, "provenance": {"date": doc["environment"]["date"][:10],
                                                     "command": doc["environment"]["command"]}}


def summarize(results: dict[str, Any], out_dir: Path) -> str:
    """Markdown: checks, the tables per pass and decoding, targets, the plots."""
    res = results.get("results", results)
    env = results.get("environment", {})
    lines = [f"## GPU benchmark ({env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')})",
             "", readme_section(results)]
    checks = res.get("checks", [])
    if checks:
        bad = [c for c in checks if not c.get("ok")]
        lines += ["", f"Correctness on the GPU: {len(checks) - len(bad)} of {len(checks)} kernel checks within their "
                      "bounds against float64" + (f"; failed: {[c['method'] + ' ' + c['case'] for c in bad]}" if bad else ".")]
    if res.get("offsets"):
        lines += ["", "Offsets past 2^31 elements (fused-QKV strided view): " + "; ".join(
            f"{o['method']}: " + ("error " + o["error"] if "error" in o else
                                  f"bitwise equal to contiguous {o['bitwise_equal_to_contiguous']}"
                                  + (f", rel. error {fmt(o['rel_err_last_rows_vs_float64'])}"
                                     if "rel_err_last_rows_vs_float64" in o else ""))
            for o in res["offsets"])]
    if res.get("sweep"):
        lines += ["", "### Tile sweep (Triton, kernel-direct)", ""]
        lines.append(markdown_table(["column", "n", "pass", "config", "ms"],
                                    [[r["column"], f"{r['n'] // 1024}K", r["pass"], str(r["config"]), r["ms"]]
                                     for r in res["sweep"]]))
    for png in ("gpu_bench_time.png", "gpu_bench_decode.png"):
        if (Path(out_dir) / png).exists():
            lines += ["", f"![{png}]({png})"]
    return "\n".join(lines)


def combine(docs: list[dict[str, Any]], passes: list[tuple[str, ...]]) -> dict[str, Any]:
    """One document from several runs of the benchmark (a short lease split into calls): from each run
    the rows of its ``passes`` entry ("fwd", "decode", "fwd+bwd"), and the first run's checks, sweep and
    ceilings; then ``derive`` over the union (the targets compare rows of different runs only where one
    run lacks a pass, e.g. fwd+bwd over fwd). The environments go to ``runs``."""
    out = {"environment": docs[0]["environment"], "config": docs[0]["config"], "runs": [], "results": {}}
    res = dict(docs[0]["results"], rows=[], notes=list(docs[0]["results"].get("notes", [])))
    for doc, take in zip(docs, passes):
        for r in doc["results"]["rows"]:
            kind = "decode" if r["nq"] == 1 else r["pass"]
            if kind in take and not r.get("config"):
                res["rows"].append(dict(r, run=len(out["runs"])))
        out["runs"].append({"command": doc["environment"]["command"], "date": doc["environment"]["date"],
                            "passes": list(take)})
    derive(res, config_from(docs[0]["config"], Config))
    out["results"] = res
    return out


PARTS = ("fwd", "errors", "fwd+bwd", "decode", "aims")


def readme_section(doc: dict[str, Any], parts: tuple[str, ...] = PARTS) -> str:
    """The compact view of a run (or ``combine``'s union): forward and fwd+bwd ms per column and n,
    errors, decoding, the aims; ``parts`` picks some."""
    res = copy.deepcopy(doc["results"] if "results" in doc else doc)
    if "config" in doc:  # a run cut short by an error saved its rows before deriving: derive here
        derive(res, config_from(doc["config"], Config))
    rows = [r for r in res["rows"] if not r.get("config")]
    kib = lambda n: f"{n // 1024}K" if n < 1 << 20 else f"{n >> 20}M"  # noqa: E731
    shape = res["shape"]
    which = parts
    parts = [f"B=1, H={shape['H']}, D={shape['D']}, {shape['dtype']}, "
             f"{'causal' if shape['causal'] else 'bidirectional'}, Press slopes"
             + ("; median ms through `poslsh.attention` (speedup over exact ALiBi in FlexAttention, same run)"
                if {"fwd", "fwd+bwd"} & set(which) else "")]
    for pas in [p for p in ("fwd", "fwd+bwd") if p in which]:
        ns = sorted({r["n"] for r in rows if r["pass"] == pas and r["nq"] == r["n"]})
        cols = [c for c in COLUMNS if any(find(rows, c, n, pas) for n in ns)]
        if not cols:
            continue
        body = []
        for n in ns:
            cells = []
            for c in cols:
                r = find(rows, c, n, pas)
                cells.append("–" if r is None else fmt(r["ms"]) + (
                    f" ({fmt(r['speedup_vs_exact_flex'])}×)" if "speedup_vs_exact_flex" in r and c != "exact_flex" else ""))
            body.append([kib(n)] + cells)
        parts.append(f"**{'forward' if pas == 'fwd' else 'forward + backward'}**\n\n"
                     + markdown_table(["n"] + [LABELS[c] for c in cols], body))
    ns = sorted({r["n"] for r in rows if "rel_err_vs_exact" in r})
    cols = [c for c in COLUMNS if any(find(rows, c, n) and "rel_err_vs_exact" in find(rows, c, n) for n in ns)]
    if cols and "errors" in which:
        parts.append("**relative output error against exact ALiBi, same inputs**\n\n" + markdown_table(
            ["n"] + [LABELS[c] for c in cols],
            [[kib(n)] + [fmt(find(rows, c, n)["rel_err_vs_exact"]) if find(rows, c, n) and "rel_err_vs_exact"
                         in find(rows, c, n) else "–" for c in cols] for n in ns]))
    dns = sorted({r["n"] for r in rows if r["nq"] == 1})
    dcols = [c for c in COLUMNS if any(find(rows, c, n, nq=1) for n in dns)]
    if dcols and "decode" in which:
        parts.append("**decoding: one query against a KV cache, µs per call (wall clock per call through the "
                     "public API in parentheses)**\n\n" + markdown_table(
                         ["cached keys"] + [LABELS[c] for c in dcols],
                         [[kib(n)] + ["–" if not (r := find(rows, c, n, nq=1)) else
                                      f"{fmt(r['ms'] * 1e3)} ({fmt(r.get('wall_us'))})" for c in dcols] for n in dns]))
    if res.get("targets") and "aims" in which:
        parts.append("**aims, as measured**\n\n" + markdown_table(
            ["aim", "measured", "wanted", "met"],
            [[k, fmt(v["value"]), v["wanted"], "yes" if v["met"] else "**no**"] for k, v in res["targets"].items()]))
    return "\n\n".join(parts)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time vs n per column (forward, forward + backward) and decoding time vs cached keys."""
    res = results.get("results", results)
    rows = [r for r in res["rows"] if not r.get("config")]
    plt = pyplot()
    colors = {"sdpa": "tab:gray", "exact_triton": "tab:blue", "exact_flex": "tab:blue", "window_triton": "tab:green",
              "window_flex": "tab:green", "hybrid_triton": "tab:orange", "lsh_triton": "tab:red", "lsh_flex": "tab:red",
              "split_sdpa": "tab:purple", "split_flex": "tab:purple"}
    shape = res["shape"]
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, (pas, nq1, title) in zip(axes, (("fwd", False, "forward"), ("fwd+bwd", False, "forward + backward"),
                                            ("fwd", True, "decoding (1 query)"))):
        for col in COLUMNS:
            pts = sorted((r["n"], r["ms"]) for r in rows if r["column"] == col and r["pass"] == pas
                         and not r.get("direct") and "ms" in r and ((r["nq"] == 1) if nq1 else (r["nq"] == r["n"])))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if col.endswith("flex") else "-",
                        marker="s" if col.startswith("split") else "o",
                        ms=3, color=colors[col], label=LABELS[col])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached keys" if nq1 else "sequence length n (tokens)")
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(f"{title}: H={shape['H']}, D={shape['D']}, {shape['dtype']}, "
                     f"{'causal' if shape['causal'] else 'bidirectional'}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:  # a run without this phase (e.g. --phases checks): say so instead of an empty legend
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    p = Path(out_dir) / "gpu_bench_time.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def replot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    return make_plots(doc, out_dir)
