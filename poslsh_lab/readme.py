"""Generate the README's results block, its advice on which method to use, and ``docs/RESULTS.md`` from
the committed JSON in bench/results/.

    python3 -m poslsh_lab.readme            # rewrite both
    python3 -m poslsh_lab.readme --check    # exit 1 if either is out of date (a test runs this)
    python3 -m poslsh_lab.readme --root DIR # another checkout (default: the one poslsh runs from, else .)

Numbers in the README and in docs/RESULTS.md come only from here, so they cannot drift from the
measurements. Each section of RESULTS.md is a function of one JSON document: to add a result, add a
``Section`` to ``SECTIONS`` (its file, a plain-language heading and a renderer ``doc -> Markdown``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .util import checkout_root, fmt, load_results, markdown_table

def _paths(root: str | Path) -> tuple[Path, Path, Path, Path]:
    """A checkout's root, its committed results, its README and its results page."""
    root = Path(root).resolve()
    return root, root / "bench" / "results", root / "README.md", root / "docs" / "RESULTS.md"


# The checkout poslsh runs from (else the current folder); ``--root`` / ``use_root`` names another.
ROOT, RESULTS, README, RESULTS_MD = _paths(checkout_root() or Path.cwd())


def use_root(root: str | Path) -> None:
    """Read the committed results of, and write the pages of, the checkout at ``root``."""
    global ROOT, RESULTS, README, RESULTS_MD
    ROOT, RESULTS, README, RESULTS_MD = _paths(root)


START, END = "<!-- generated:start -->", "<!-- generated:end -->"
ADVICE_START, ADVICE_END = "<!-- generated:advice:start -->", "<!-- generated:advice:end -->"

Doc = dict[str, Any]


def _link(path: Path, page: Path) -> str:
    """``path`` as a link target from the folder of ``page``."""
    return Path("../" * len(page.parent.relative_to(ROOT).parts) + str(path.relative_to(ROOT))).as_posix()


def _provenance(doc: Doc, path: Path, page: Path) -> str:
    env = doc.get("environment", doc)  # bench scripts that write the environment's keys at the top level
    return (f"<sub>From [`{path.relative_to(ROOT)}`]({_link(path, page)}): {env['date'][:10]}, {env.get('device', '?')}, "
            f"torch {env['torch']}, triton {env.get('triton')}, command `{env['command']}`.</sub>")


# ----------------------------------------------------------------------------- the README's table


def _pareto_points(doc: Doc) -> list[dict]:
    from .experiments.pareto import alibi_panels, measured

    return measured(alibi_panels(doc["results"])[0]["points"])


def _pick(points: list[dict], method: str, **match) -> dict | None:
    return next((p for p in points if p["method"] == method and all(p.get(k) == v for k, v in match.items())), None)


# The README's rows: (label, method, parameters) of the 256K Pareto run; absent points are left out.
README_ROWS = [
    ("exact ALiBi", "exact", {}),
    ("window, eps = 1e-3", "window", {"window_eps": 1e-3}),
    ("window, eps = 1e-2", "window", {"window_eps": 1e-2}),
    ("hybrid, r = 8, hybrid_eps = 1e-2", "hybrid", {"samples": 8, "hybrid_eps": 1e-2}),
    ("hybrid, r = 8, hybrid_eps = 0.1", "hybrid", {"samples": 8, "hybrid_eps": 0.1}),
    ("LSH, r = 8 (the paper's estimator)", "lsh", {"samples": 8, "sampling": "iid"}),
    ("LSH, r = 32, qmc sampling", "lsh", {"samples": 32, "sampling": "qmc"}),
]


def readme_table(doc: Doc) -> str:
    """One table that answers how fast, how accurate, compared with what: the 256K H200 Pareto run."""
    cfg, env = doc["config"], doc["environment"]
    pts = _pareto_points(doc)
    exact = _pick(pts, "exact")
    rows = []
    for label, method, match in README_ROWS:
        p = _pick(pts, method, **match)
        if p is None:
            continue
        speedup = "1×" if p is exact else (f"{exact['seconds'] / p['seconds']:.0f}×" if exact else "–")
        rows.append([label, p["backend"], f"{p['seconds'] * 1e3:.3g}", speedup, fmt(p["error"]),
                     f"{p['pairs']:.0f}"])
    n = alibi_panels_n(doc)
    head = (f"One forward call at n = {n // 1024}K tokens on an {env.get('device', '?')} ({cfg['heads']} heads, "
            f"D = {cfg['head_dim']}, {cfg['dtype']}, causal, Press slopes); error relative to exact attention in "
            f"{cfg['reference_dtype']}"
            + (f" over the last {cfg['error_rows']} rows" if cfg.get("error_rows") else "") + ". Exact attention's "
            f"own error is the {cfg['dtype']} rounding floor.\n\n")
    return head + markdown_table(["method", "kernel", "time [ms]", "faster than exact", "relative error",
                                  "keys per query"], rows)


def alibi_panels_n(doc: Doc) -> int:
    from .experiments.pareto import alibi_panels

    return alibi_panels(doc["results"])[0]["n"]


# The README's first table and its advice: the newest 256K-token Pareto run (an H100, 2026-12-08).
README_TABLE = "pareto_h100_256k/pareto.json"
# The equal-error comparison with FlexAttention: both runs on one H200 (2026-12-01), never across cards.
FLEX_PAIR = ("pareto_h200_256k/pareto.json", "pareto_h200_256k_flex/pareto.json")


def _committed(path: str) -> Doc:
    """A committed result, by its path inside the results folder."""
    return load_results(RESULTS / path)


def _ratio_range(values: list[float]) -> str:
    show = lambda x: f"{x:.0f}" if x >= 10 else f"{x:.2g}"  # noqa: E731
    lo, hi = show(min(values)), show(max(values))
    return f"{lo}×" if lo == hi else f"{lo}–{hi}×"


def readme_summary() -> str:
    """The README's short reading of the GPU results, every number from the committed JSON: the kernels
    against FlexAttention and SDPA (the benchmark), at equal error (the two Pareto runs), the split form
    (bench/split_gpu.py), the LSH-trained language models (lsh-native) and context parallelism (cp-bench)."""
    from .experiments import gpu_bench as gb
    from .experiments import lsh_native, pareto

    load = _committed
    bench = gb.combine([load(path) for path, _ in BENCH_RUNS], [take for _, take in BENCH_RUNS])
    rows = bench["results"]["rows"]
    n = max(r["n"] for r in rows if r["pass"] == "fwd" and gb.find(rows, "exact_flex", r["n"]))

    def over_flex(method: str, pas: str, at: int) -> float | None:
        t, f = gb.find(rows, f"{method}_triton", at, pas), gb.find(rows, f"{method}_flex", at, pas)
        return f["ms"] / t["ms"] if t and f else None

    fwd = {m: over_flex(m, "fwd", n) for m in ("window", "lsh", "exact")}
    nb = max(r["n"] for r in rows if r["pass"] == "fwd+bwd" and gb.find(rows, "lsh_flex", r["n"], "fwd+bwd"))
    bwd = {m: over_flex(m, "fwd+bwd", nb) for m in ("lsh", "window")}
    sdpa_at = [m for m in (16384, 65536) if gb.find(rows, "sdpa", m) and gb.find(rows, "exact_triton", m)]
    sdpa = [gb.find(rows, "sdpa", m)["ms"] / gb.find(rows, "exact_triton", m)["ms"] for m in sdpa_at]
    flex = [r["speedup"] for r in pareto.against_flex(*(load(path) for path in FLEX_PAIR)) if r["speedup"]]
    split = [v for path in ("split_h200/split_gpu.json", "split_h200_1m/split_gpu.json")
             for per in load(path)["results"]["per_n"].values()
             for prim, v in per["fwd_over_fused"].items() if prim in ("split_sdpa", "split_flex") and v]
    ln = load("lsh-native.json")
    verdict = lsh_native.verdict(ln["results"], lsh_native.config_of(ln["results"]))[0]
    k = lambda m: f"{m // 1024}K"  # noqa: E731
    faster = lambda x: f"{x:.2g}× as fast as" if x < 1 else f"{x:.2g}× faster than"  # noqa: E731
    return "\n".join([
        f"**In short** (on the {bench['environment']['device']}, {bench['environment']['date'][:10]}, with the kernels "
        "of that day, through `poslsh.attention`; a speed ratio is the other kernel's time over poslsh's, so 2× means "
        "half the time):",
        "",
        f"* Forward at {k(n)} tokens, poslsh's Triton kernels beat FlexAttention for every method: the window is "
        f"{fwd['window']:.2g}× faster, LSH {fwd['lsh']:.2g}×, exact ALiBi {fwd['exact']:.2g}×.",
        f"* Forward + backward at {k(nb)} tokens (training), LSH is {faster(bwd['lsh'])} Flex and the window "
        f"{faster(bwd['window'])} Flex.",
        f"* Exact ALiBi runs at {_ratio_range(sdpa)} the speed of dense SDPA without a bias (at "
        f"{' and '.join(k(m) for m in sdpa_at)} tokens).",
        f"* At equal error, poslsh's fastest method is {_ratio_range(flex)} faster than the best FlexAttention "
        "configuration: the window reads few keys per query, so its time is mostly reading q, k and v once.",
        "* The paper's own form (r short attentions inside the sampled blocks, on SDPA's or Flex's kernel: "
        f"`backend=\"split\"`) is correct but {_ratio_range(split)} slower than the fused kernel, because each of "
        "its r passes reads all of q, k and v.",
        f"* Language models trained with positional LSH in place of the bias (`poslsh lsh-native`): {verdict}",
        f"* {cp_summary(load('cp_cpu/cp-bench.json'))}",
    ])


def cp_summary(doc: Doc) -> str:
    """One sentence on context parallelism from the CPU cp-bench run: bytes per rank of the halo methods
    at the largest world size and both lengths, against a ring's, and whether every check passed."""
    res = doc["results"]
    w = max(t["world_size"] for t in res["traffic_vs_length"])
    at = {t["method"]: t for t in res["traffic_vs_length"] if t["world_size"] == w and t["halo"] in (None, "head")}
    kib = lambda xs: " and ".join(f"{x / 1024:.0f}" for x in xs)  # noqa: E731
    totals = " and ".join(f"{n // 1024}K" for n in at["window"]["totals"])
    ok = all(r["check"]["ok"] for r in res["rows"] if r.get("check"))
    return (f"Context parallelism (`poslsh.distributed`, {w} CPU processes talking through gloo, {totals} tokens in "
            "all): a rank "
            f"sends {kib(at['window']['max_bytes_fwd'])} KiB per forward for the window and "
            f"{kib(at['lsh']['max_bytes_fwd'])} KiB for LSH, where a ring would send "
            f"{kib(at['window']['ring_bytes_fwd'])} KiB; "
            + ("every method matches one process on the whole sequence." if ok else
               "**a check against one process failed** (docs/RESULTS.md)."))


def _ms(p: dict) -> str:
    """A point's time in milliseconds, three figures ("4.00 ms", "1431 ms")."""
    ms = p["seconds"] * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:#.3g} ms"


def _eps(x: float) -> str:
    """A truncation level as the README's table writes it: 0.3, 0.1, 3e-2, 1e-4."""
    if x >= 0.1:
        return f"{x:g}"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _against_window(panel: dict, method: str) -> str:
    """How ``method``'s points ("lsh" or "hybrid") compare with the window at equal time in ``panel``:
    the points at least as accurate (``pareto.comparison``), those that tie it only at the rounding floor,
    and the closest of the others, every number from the panel."""
    from .experiments.pareto import comparison

    gaps, wins, ties = (
        [g for g in part if g["label"].startswith(method + " ")] for part in comparison(panel, "seconds"))
    name = {"lsh": "LSH"}.get(method, method)
    if not gaps:
        return f"The run has no {name} point to compare."
    floor = next(p["error"] for p in panel["points"] if p["method"] == "exact" and "error" in p)
    text = (f"At equal time {_names([g['label'] for g in wins])} {'is' if len(wins) == 1 else 'are'} at least as "
            "accurate as the window" if wins else f"At equal time no {name} point is as accurate as the window")
    if ties:
        text += (f"; {_names([g['label'] for g in ties])} only {'ties' if len(ties) == 1 else 'tie'} it at the "
                 f"rounding floor (error {fmt(floor)}, exact attention's own in this dtype)")
    rest = [g for g in gaps if g not in wins and g not in ties]
    if rest:
        best = min(rest, key=lambda g: g["ratio_seconds"])
        text += (f". Its closest point, {best['label']}, has error {fmt(best['error'])} in {_ms(best)}, where the "
                 f"window reaches error {fmt(best['baseline_error_seconds'])} in the same time")
    return text + "."


def readme_advice(doc: Doc) -> str:
    """The README's "Which method to use": what each method is for, and how it stands against the window
    in the committed 256K-token Pareto run (README_TABLE), every claim computed from that run."""
    from .experiments.pareto import alibi_panels, comparison, measured

    panel = alibi_panels(doc["results"])[0]
    pts = measured(panel["points"])
    windows = sorted((p for p in pts if p["method"] == "window"), key=lambda p: p["seconds"])
    exact = _pick(pts, "exact")
    where = f"In the {panel['n'] // 1024}K-token run on the {doc['environment'].get('device', '?')} below"
    wins = {cost: comparison(panel, cost)[1] for cost in ("seconds", "pairs")}
    tied = any(comparison(panel, cost)[2] for cost in ("seconds", "pairs"))
    if wins["seconds"] or wins["pairs"]:
        verdict = "; ".join(f"at equal {what}, {_names([g['label'] for g in wins[cost]]) or 'none'} "
                            f"{'is' if len(wins[cost]) == 1 else 'are'} at least as accurate as the window"
                            for cost, what in (("seconds", "time"), ("pairs", "keys per query")))
    else:
        verdict = ("no LSH or hybrid point is as accurate as the window at equal time or at equal keys per query"
                   + (", except where both are at the rounding floor" if tied else ""))
    window = (f"{where}, window_eps {_eps(windows[0]['window_eps'])} to {_eps(windows[-1]['window_eps'])} gives "
              f"errors from {fmt(windows[0]['error'])} in {_ms(windows[0])} to {fmt(windows[-1]['error'])} in "
              f"{_ms(windows[-1])}. Comparing with the window interpolated between its measured widths, {verdict}."
              if windows else f"{where}, the window was not measured.")
    exact_text = (f" At {panel['n'] // 1024}K tokens it took {_ms(exact)} (on {exact.get('backend', '?')}), "
                  f"{exact['seconds'] / windows[-1]['seconds']:.0f}× the window's time at window_eps "
                  f"{_eps(windows[-1]['window_eps'])}." if exact and windows else "")
    return "\n".join([
        "* **`method=\"window\"`** for speed at a given accuracy: exact ALiBi weights for keys within w_h positions "
        "of the query in head h, `w_h = ceil(ln(1/window_eps) / m_h)` (m_h: the head's slope), nothing beyond; its "
        "error falls exponentially as the window widens. " + window,
        "* **`method=\"exact\"`** (the default: nothing is approximated unless you ask) when you need ALiBi itself; "
        "on a GPU `backend=\"auto\"` runs it on the fastest backend that serves the call (poslsh's Triton kernel, "
        "which computes the bias inside the kernel instead of storing an n × n matrix; cuDNN's fused ALiBi for the "
        "Press slopes where its frontend is installed), and its cost still grows like n²." + exact_text,
        "* **`method=\"lsh\"`** for the paper's estimator and research on it: unbiased, with an error that falls "
        "like 1/√r in the number r of sampled partitions (`samples=r`); `sampling=\"stratified\"` or `\"qmc\"` "
        "(quasi-Monte Carlo: the r partitions drawn to spread evenly instead of independently) makes it fall faster. "
        + _against_window(panel, "lsh"),
        "* **`method=\"hybrid\"`**: exact weights near the query, LSH beyond (`hybrid_eps` sets how far the exact "
        "part reaches). " + _against_window(panel, "hybrid"),
    ])


def readme_block() -> str:
    path = RESULTS / README_TABLE
    doc = load_results(path)
    generate = generate_lines()
    newer = newer_window_line(doc, RESULTS / LATEST_WINDOW) if (RESULTS / LATEST_WINDOW).exists() else ""
    return (readme_table(doc) + "\n\n" + _provenance(doc, path, README) + ("\n\n" + newer if newer else "")
            + "\n\n" + readme_summary() + ("\n\n" + generate if generate else ""))


# The newest run of the window's public call (bench/exact_gpu.py --method window): the headline table above is
# older than the kernels it measured, so the README says what the same call takes today.
LATEST_WINDOW = "window_gpu_s19/exact_gpu.json"


def newer_window_line(headline: Doc, path: Path) -> str:
    """A sentence on ``path``'s window run at its longest n (Triton, the backend ``auto`` runs for the window, beside
    Flex), forward and forward + backward, with its card and date; "" when it is not newer than ``headline``."""
    doc = load_results(path)
    env, res = doc["environment"], doc["results"]
    if env["date"][:10] <= headline["environment"]["date"][:10]:
        return ""
    n = max(r["n"] for r in res["rows"] if r.get("ms") is not None)
    ms = {(r["column"], r["pass"]): r["ms"] for r in res["rows"] if r["n"] == n and r.get("ms") is not None}
    flex = (f" (FlexAttention: {fmt(ms[('flex', 'fwd')])} and {fmt(ms[('flex', 'fwd+bwd')])} ms)"
            if ("flex", "fwd") in ms and ("flex", "fwd+bwd") in ms else "")
    return (f"The kernels have changed since the run above ({headline['environment']['date'][:10]}, "
            f"{headline['environment']['device']}); the newest run of the window's public call "
            f"(eps {doc['config'].get('window_eps')}, {env['date'][:10]}, {env['device']}, "
            f"[`{path.relative_to(ROOT)}`]({_link(path, README)})) took {fmt(ms[('triton', 'fwd')])} ms forward and "
            f"{fmt(ms[('triton', 'fwd+bwd')])} ms forward + backward at n = {n // 1024}K on the Triton backend{flex}. "
            "The table above has not been measured again since.")


# generate-bench's runs: a BLOOM-560m-shaped model at every context, a BLOOM-7b1-shaped one's long prompt, the
# 560m shape decoding from a CUDA graph beside the eager patch and native.
GENERATE_RUNS = ("generate_bench/generate-bench.json", "generate_bench_7b1/generate-bench.json",
                 "generate_graph/generate-bench.json", "generate_short/generate-bench.json",
                 "generate_graph_short/generate-bench.json", "generate_short_s10/generate-bench.json",
                 "generate_rounds_s12/generate-bench.json")


def generate_lines() -> str:
    """The README's sentences on generate-bench's committed runs ("" while none is committed)."""
    from .experiments import generate_bench

    lines = [generate_bench.readme_line(_committed(path)) for path in GENERATE_RUNS[:2] if (RESULTS / path).exists()]
    if (RESULTS / GENERATE_RUNS[2]).exists():  # the graph run: its graph-replayed arm against native
        lines.append(generate_bench.graph_line(_committed(GENERATE_RUNS[2])))
    return " ".join(lines)


# ----------------------------------------------------------------------------- RESULTS.md sections


def _experiment(module: str) -> Callable[[Doc], str]:
    def render(doc: Doc) -> str:
        import importlib

        return importlib.import_module(f"poslsh_lab.experiments.{module}").readme_section(doc)

    return render


def cpu_scaling(doc: Doc) -> str:
    cfg = doc["config"]
    small, large = cfg["lengths"]
    rows = []
    for run in doc["results"]["runs"]:
        rows.append([run["backend"], run["scheme"], fmt(run["cpu_seconds"][str(small)]), fmt(run["cpu_seconds"][str(large)]),
                     fmt(run["ratio"]), fmt(run["wall_ratio"]), f"{run['peak_rss_bytes'] / 2**20:.0f} MiB"])
    f, aim = large // small, cfg["targets"]
    head = (f"LSH forward, H = {cfg['heads']}, D = {cfg['head_dim']}, {cfg['dtype']}, r = {cfg['samples']}, causal, "
            f"{cfg['threads']} torch thread; CPU seconds, best of {cfg['repeats']}. From n = {small} to {large} "
            f"({f}× longer) linear growth is {f}× and quadratic {f * f}×; the aim was a ratio of at most "
            f"{aim['ratio']:g} and under {aim['peak_bytes'] / 1e9:g} GB of memory.\n")
    return head + "\n" + markdown_table(["backend", "scheme", f"n={small} (s)", f"n={large} (s)", "CPU-time ratio",
                                         "wall-time ratio", f"peak RSS at {large}"], rows)


@dataclass(frozen=True)
class Section:
    """One block of docs/RESULTS.md: a JSON file under bench/results, its heading, its renderer."""

    path: str
    heading: str
    render: Callable[[Doc], str]
    images: tuple[str, ...] = ()  # PNGs under bench/results shown after the block


def gpu_bench(part: str) -> Callable[[Doc], str]:
    """One part of the benchmark's view ("fwd", "errors", "decode", "fwd+bwd", "aims"); "aims" over the
    three runs of the session combined (its forward, decoding and backward runs: ``BENCH_RUNS``)."""
    def render(doc: Doc) -> str:
        from .experiments import gpu_bench as gb

        if part == "aims":
            doc = gb.combine([_committed(path) for path, _ in BENCH_RUNS],
                             [take for _, take in BENCH_RUNS])
        return gb.readme_section(doc, (part,))

    return render


def split_gpu(doc: Doc) -> str:
    """bench/split_gpu.py's run: the primitives' checks, forward and fwd+bwd ms beside the fused kernel,
    and the split form's bytes floor (r passes over q, k, v and a merge of r outputs)."""
    res = doc["results"]
    checks = res["checks"]
    ok = sum(c["ok"] for c in checks)
    head = (f"The split backend (`backend=\"split\"`, LSH as r = {doc['config'].get('samples', 8)} block-local "
            f"attentions merged by their LSEs) on each attention primitive: {ok} of {len(checks)} checks against "
            "float64 within bounds (primitives: " + ", ".join(sorted({c['primitive'] for c in checks})) + "). "
            "Median ms, with the fused Triton kernel of the same run; the floor is the split form's bytes over "
            "the measured copy bandwidth.\n\n")
    body = []
    for n, per in sorted(res["per_n"].items(), key=lambda kv: int(kv[0])):
        for pas, key in (("fwd", "fwd"), ("fwd_bwd", "fwd_bwd")):
            times = {r["column"]: r["ms"] for r in res["rows"] if str(r["n"]) == n and r["pass"] == pas and "ms" in r}
            if not times:
                continue
            floor = per["floor_ms"].get("split_fwd" if pas == "fwd" else "split_fwd_bwd")
            body.append([f"{int(n) // 1024}K", "forward" if pas == "fwd" else "fwd+bwd", fmt(times.get("fused")),
                         *(fmt(times.get(c)) for c in ("split_sdpa", "split_flex", "split_torch")), fmt(floor)])
    return head + markdown_table(["n", "pass", "fused (Triton)", "split, SDPA flash", "split, Flex", "split, torch",
                                  "split floor"], body)


def exact_gpu(doc: Doc) -> str:
    """bench/exact_gpu.py's run: exact ALiBi (or, with ``--method window``, the per-head window) through
    ``poslsh.attention`` on each backend, beside bias-free SDPA for exact, forward and forward + backward
    median ms, its float64 checks and what ``auto`` selected."""
    res, cfg = doc["results"], doc["config"]
    checks = res["checks"]
    ok = sum(bool(c["ok"]) for c in checks)
    refusing = sorted({c["backend"] for c in checks if c["ok"] is None})
    refused = sum(c["ok"] is None for c in checks)
    env = doc["environment"]
    window = cfg.get("method") == "window"
    names = {"cudnn": "cuDNN ALiBi", "triton": "Triton", "flex": "Flex", "flex_fa4": "Flex FA4", "auto": "auto",
             "sdpa_cudnn": "SDPA cuDNN, no bias", "sdpa_flash": "SDPA flash, no bias"}
    seen = {r["column"] for r in res["rows"] if "ms" in r}
    columns = [c for c in names if c in seen]
    what = (f"The per-head window (eps {cfg.get('window_eps')}, Press slopes" if window
            else "Exact causal ALiBi (Press slopes")
    auto = ("`auto` chose by the speed table this run wrote (its measurements above)" if "table_written" in res
            else "`auto` ran with the speed table shipped before this run")
    head = (f"{what}, B = 1, H = {cfg.get('heads', 32)}, D = {cfg.get('head_dim', 128)}, bfloat16) on "
            f"{env.get('device')}, median ms through `poslsh.attention(backend=...)`"
            + ("" if window else ", beside bias-free SDPA on its cuDNN and flash kernels (no ALiBi: the ceilings)")
            + ((f"; {ok} of {len(checks) - refused} checks against float64 within bounds"
                + (f"; {refused} refused by their backend ({', '.join(refusing)}: a call it does not serve)"
                   if refused else "")
                + f" ({', '.join(sorted({c['backend'] for c in checks}))})") if checks
               else "; no checks against float64 in this run (`--no-check`)")
            + f". {auto}; a blank cell was skipped by the time budget."
            + (" Flex FA4 is FlexAttention's FlashAttention-4 kernels (`backend=\"flex_fa4\"`, "
               "`pip install flash-attn-4`)." if "flex_fa4" in columns else "") + "\n\n")
    body = []
    for n in sorted({r["n"] for r in res["rows"]}):
        for pas in ("fwd", "fwd+bwd"):
            times = {r["column"]: r.get("ms") for r in res["rows"] if r["n"] == n and r["pass"] == pas}
            if any(v is not None for v in times.values()):
                body.append([f"{n // 1024}K", "forward" if pas == "fwd" else "fwd+bwd",
                             *(fmt(times[c]) if times.get(c) is not None else "" for c in columns)])
    paired = [r for r in res["rows"] if r["column"] == "auto" and "auto_over_pick" in r]
    tail = ("" if not paired else "\n\n`auto` against the backend its calls ran on, timed in alternation "
            "(the median ratio of the rounds): " + "; ".join(
                f"{r['n'] // 1024}K {'forward' if r['pass'] == 'fwd' else 'fwd+bwd'} {r['auto_over_pick']:.3f} "
                f"({', '.join(k for k in r['paired'] if k != 'auto')})" for r in paired) + ".")
    return head + markdown_table(["n", "pass", *(names[c] for c in columns)], body) + tail


def kernel_sweep(doc: Doc) -> str:
    """bench/kernel_sweep.py's run: per method and length, the shipped config ("base"), the fastest checked
    variant of each pass and the joined pick, forward and forward + backward median ms and their ratio."""
    shape = doc["shape"]
    checks = [c for per in doc["checks"].values() for c in per.values()]
    ok = sum("error" not in c and c.get("max_rel_err", 1.0) <= 1e-2 for c in checks)
    head = (f"The Triton kernels' candidate variants (config keys of `triton_attention`), B = {shape['B']}, "
            f"H = {shape['H']}, D = {shape['D']}, {shape['dtype']}, causal, {shape['slopes']} slopes; window eps "
            f"{shape['window_eps']:g}, hybrid eps {shape['hybrid_eps']:g} and LSH with r = {shape['samples']} "
            f"({shape['scheme']}); {doc['timing']}. {ok} of {len(checks)} variants within 1e-2 of float64 "
            f"(forward and gradients, {shape['check_n']} tokens); only those were timed. \"picked\" joins the "
            "fastest forward variant and the fastest backward variant of a method. The issue's aim: forward + "
            "backward at most 3x the forward (item 2 of the issue: the backward alone at most 3x).\n\n")
    rows = {(r["method"], r["n"], r["variant"]): r for r in doc["results"] if "error" not in r}
    forward_variants = {(m, v["name"]) for m, vs in doc["variants"].items() for v in vs
                        if v["pass_"] in ("fwd", "both")}
    body = []
    for s in doc.get("summary", []):
        m, n = s["method"], s["n"]
        base, pick = rows[(m, n, "base")], doc["picked"].get(m, {})
        best_fwd = min((r for (rm, rn, v), r in rows.items() if rm == m and rn == n and (m, v) in forward_variants),
                       key=lambda r: r["fwd_ms"])
        picked = rows.get((m, n, "picked"))
        if picked is None and pick.get("fwd") == pick.get("bwd") == "base":  # no variant faster: the pick is base
            picked = base
        body.append([m, f"{n // 1024}K" if n >= 1024 else str(n), fmt(base["fwd_ms"]), fmt(base["fwd_bwd_ms"]),
                     f"{base['bwd_over_fwd']:.2f}", f"{best_fwd['variant']} ({fmt(best_fwd['fwd_ms'])})",
                     *([f"{pick.get('fwd')} + {pick.get('bwd')}", fmt(picked["fwd_ms"]), fmt(picked["fwd_bwd_ms"]),
                        f"{picked['bwd_over_fwd']:.2f}", f"{picked['fwd_bwd_over_fwd']:.2f}"] if picked
                       else ["not timed", "", "", "", ""])])
    return head + markdown_table(["method", "n", "base fwd ms", "base fwd+bwd ms", "base bwd/fwd",
                                  "fastest forward variant (ms)", "picked (fwd + bwd variant)", "picked fwd ms",
                                  "picked fwd+bwd ms", "picked bwd/fwd", "picked (fwd+bwd)/fwd"], body)


def specialize_check(doc: Doc) -> str:
    """bench/specialize_check.py's run: per kernel binding (as shipped, and with Triton's integer
    specialisation of Nk, q_offset and split_tiles off), decoding steps' wall times (their slowest is a
    compile inside generation), the compiled forward variants after them, and the prefill forward."""
    runs = {r["variant"]: r for r in doc["runs"] if "decode" in r}
    names = {"spec": "Triton's default: every int specialised (session 7)",
             "nospec": f"as shipped: do_not_specialize={doc['do_not_specialize']}"}
    steps, prefill = doc["steps"], doc["prefill_n"]
    head = (f"{steps} decoding steps per method through `poslsh.attention(backend=\"triton\")` (B = 1, H = 32, D = 128, "
            f"bfloat16, one query row, the cache growing by one key per step from {doc['nk']} keys, each binding in its own process and a "
            f"fresh Triton cache), then the causal prefill forward (Nq = Nk, `do_bench` median). The first step "
            f"compiles the method's kernel; a later step over {doc['stall_ms']:g} ms (a stall) compiled another "
            f"inside generation. \"compiled\" counts the forward kernel's compiled variants after the method's "
            f"steps (cumulative over the methods above it).\n\n")
    body = [[names.get(v, v), m, fmt(d["first_ms"]), str(d["stalls"]), fmt(d["max_later_ms"]), fmt(d["median_ms"]),
             str(d["compiled_variants_after"]), fmt(r["prefill_ms"][m])]
            for v, r in runs.items() for m, d in r["decode"].items()]
    return head + markdown_table(["kernel binding", "method", "first step ms", "stalls", "slowest later step ms",
                                  "median step ms", "compiled", f"prefill ms (n = {prefill})"], body)


def backward_parts(doc: Doc) -> str:
    """bench/backward_parts.py's run: each Triton kernel's GPU time in one forward + backward step, per
    method and length, and the backward's ratio to the forward."""
    shape = doc["shape"]
    head = (f"Each Triton kernel's GPU time in one forward + backward step ({doc['timing']}) on {doc['device']}, "
            f"B = {shape['B']}, H = {shape['H']}, D = {shape['D']}, {shape['dtype']}, causal, {shape['slopes']} "
            f"slopes, window eps {shape['window_eps']:g}, hybrid eps {shape['hybrid_eps']:g}, LSH r = "
            f"{shape['samples']} ({shape['scheme']}). The backward is three kernels: delta = rowsum(dO * O), dK/dV "
            "(one program per key tile) and dQ (one per query tile), seven matrix products per tile pair against "
            "the forward's two; \"other\" is torch's small operations. The aim: the backward at most 3x the "
            "forward.\n\n")
    parts = (("_bwd_delta_kernel", "delta"), ("_bwd_dkdv_kernel", "dK/dV"), ("_bwd_dq_kernel", "dQ"))
    body = []
    for r in doc["rows"]:
        k = r["kernels"]
        other = r["backward_ms"] - sum(k.get(name, 0.0) for name, _ in parts)
        ratio = r["backward_over_forward"]
        body.append([r["method"], f"{r['n'] // 1024}K", fmt(r["forward_ms"]), *(fmt(k.get(name, 0.0)) for name, _ in parts),
                     fmt(other), fmt(r["backward_ms"]), "" if ratio is None else f"{ratio:.2f}"])
    return head + markdown_table(["method", "n", "forward ms", *(label + " ms" for _, label in parts), "other ms",
                                  "backward ms", "backward / forward"], body)


def window_parts(doc: Doc) -> str:
    """bench/window_parts.py's run: the window forward on head groups apart under tile configs (median ms, the
    band's TFLOP/s, the bytes' TB/s beside the group's floor), and the contest against the shipped config."""
    shape, groups = doc["shape"], doc["groups"]
    present = [g for g in groups if any(r["group"] == g for r in doc["rows"])]
    head = (f"The window forward (Triton, eps {shape['window_eps']:g}, Press slopes, n = {shape['n'] // 1024}K, "
            f"B = 1, D = {shape['D']}, {shape['dtype']}, causal) on {doc['device']}, {doc['timing']}, per head group: "
            + "; ".join(f"{g} = {groups[g]['heads']} heads, {sum(groups[g]['widths'])} keys per query summed"
                        for g in present)
            + f" (wide: half-width >= {shape['wide_from']}; w8: every head of half-width 8). Each cell: ms, then the "
            "band's matrix-product rate (TFLOP/s, 4 D flops per query-key pair) / the rate of the four tensors' "
            "bytes (TB/s); floor: the four tensors' bytes at `o.copy_(q)`'s rate.\n\n")
    configs = list(dict.fromkeys(r["config"] for r in doc["rows"]))
    cell = {(r["group"], r["config"]): r for r in doc["rows"]}
    body = [["floor", *(fmt(next((r["floor_ms"] for r in doc["rows"] if r["group"] == g and "floor_ms" in r), None))
                        for g in present)]]
    for c in configs:
        body.append([c, *("" if "ms" not in cell.get((g, c), {}) else
                          f"{fmt(cell[g, c]['ms'])} ({cell[g, c]['tflops']:.0f} / {cell[g, c]['tb_per_s']:.2f})"
                          for g in present)])
    text = head + markdown_table(["config", *present], body)
    if doc.get("base"):
        text += ("\n\nThe row and contest entry `base`: the predecessor's kernel (the package under "
                 f"`{doc['base']}`, imported beside this one) with its own shipped config, in the same process.")
    joined = doc.get("joined")  # the first run's form of the contest: the joined config alone
    if joined:
        contest_ms = joined["ms"]
        text += (f"\n\nThe fastest wide config ({joined['best']['wide']}) and narrow config ({joined['best']['narrow']}) "
                 "joined (wide heads launched apart), timed in alternation with the shipped one on all heads: "
                 f"{', '.join(fmt(x) for x in contest_ms['joined'])} ms against "
                 f"{', '.join(fmt(x) for x in contest_ms['shipped'])} ms.")
    contest = (doc.get("contest") or {}).get("entries")
    if contest:
        text += ("\n\nIn alternating rounds on all heads, each config's median time ratio to the shipped one: "
                 + "; ".join(f"{name} {e['over_shipped']:.3f} ({', '.join(fmt(x) for x in e['ms'])} ms)"
                             for name, e in contest.items() if name != "shipped") + ".")
    return text


def first_call(doc: Doc) -> str:
    """bench/first_call.py's run: per head shape, prompt length and backend, an exact causal prefill's first
    call at that length (a cuDNN graph build, where one happens) and its warm median, and what ``auto``
    took once warm. The order of the backends per length is the run's (auto first: its first call meets
    the length cold)."""
    order = [r["backend"] for r in doc["rows"] if (r["heads"], r["n"]) == (doc["rows"][0]["heads"], doc["rows"][0]["n"])]
    head = (f"An exact causal prefill (B = 1, bfloat16, Press slopes) through `poslsh.attention` on {doc['device']}, "
            f"each length new to the process, the backends in the order {', '.join(order)} per length: the first "
            "call's wall time (where cuDNN builds an execution graph for the shape, the build) and the warm "
            "`do_bench` median. Triton's kernels were compiled before the first length (a new length compiles "
            "nothing, except the first launch of a variant, e.g. a length that is a multiple of the tile). "
            "In parentheses, the backend `auto` took after its warm median.\n\n")
    body = []
    for r in doc["rows"]:
        took = r.get("auto_picks_warm", r.get("auto_picks"))
        body.append([f"{r['heads']} x {r['head_dim']}", str(r["n"]), r["backend"] + (f" ({took})" if took else ""),
                     fmt(r["first_ms"]) if "first_ms" in r else r.get("error", "")[:80],
                     fmt(r["warm_ms"]) if "warm_ms" in r else ""])
    return head + markdown_table(["heads x head dim", "n", "backend", "first call ms", "warm ms"], body)


def lsh_native(doc: Doc) -> str:
    """The lsh-native section, its plots linked from docs/RESULTS.md's folder."""
    from .experiments import lsh_native as ln

    return ln.readme_section(doc, _link(RESULTS / "lsh-native" / "x", RESULTS_MD)[:-1])


def against_flex(doc: Doc) -> str:
    from .experiments import pareto

    return pareto.against_flex_section(_committed(FLEX_PAIR[0]), doc)


# The session's benchmark, run in three device calls: (file, the passes taken from it).
BENCH_RUNS = [("gpu_bench/gpu_bench.json", ("fwd",)), ("gpu_bench/gpu_bench_decode.json", ("decode",)),
              ("gpu_bench/gpu_bench_backward.json", ("fwd+bwd",))]

SECTIONS: list[Section] = [
    Section("gpu_bench/gpu_bench.json", "How fast: every method on its GPU backends, forward", gpu_bench("fwd"),
            ("gpu_bench/gpu_bench_time.png",)),
    Section("gpu_bench/gpu_bench.json", "How accurate: each method's error against exact ALiBi at those lengths",
            gpu_bench("errors")),
    Section("gpu_bench/gpu_bench_backward.json", "Forward + backward (training)", gpu_bench("fwd+bwd")),
    Section("gpu_bench/gpu_bench_decode.json", "Decoding: one new token against a KV cache", gpu_bench("decode")),
    Section("gpu_bench/gpu_bench.json", "The speed aims, as measured (the three runs above together)",
            gpu_bench("aims")),
    Section(GENERATE_RUNS[0], "A model generating text: transformers' own attention against the patch, per prompt "
            "length", _experiment("generate_bench"), ("generate_bench/generate_bench.png",)),
    Section(GENERATE_RUNS[1], "A 7B model reading a long prompt in chunks, with the window and eviction",
            _experiment("generate_bench"), ("generate_bench_7b1/generate_bench.png",)),
    Section(GENERATE_RUNS[2], "A model generating text, each decode step replayed from one CUDA graph",
            _experiment("generate_bench"), ("generate_graph/generate_bench.png",)),
    Section(GENERATE_RUNS[3], "Short prompts (4K, 8K): does the patch cost more than it saves? Every arm against "
            "transformers' own attention", _experiment("generate_bench"), ("generate_short/generate_bench.png",)),
    Section(GENERATE_RUNS[6], "Short prompts, every arm in three alternating rounds (the GPU host's speed varies "
            "from second to second; each ratio to native is the median of paired rounds)", _experiment("generate_bench"),
            ("generate_rounds_s12/generate_bench.png",)),
    Section(GENERATE_RUNS[5], "Short prompts after the one-launch decode (split keys merged in the same launch): "
            "every eager arm and the CUDA-graph decoder against transformers' own attention", _experiment("generate_bench"),
            ("generate_short_s10/generate_bench.png",)),
    Section(GENERATE_RUNS[4], "Short prompts again, with the CUDA-graph decoder (and exact, no longer waiting for a "
            "cuDNN graph at 8K)", _experiment("generate_bench"), ("generate_graph_short/generate_bench.png",)),
    Section("specialize/specialize.json", "Decoding without compiles: Triton's integer specialisation of the key "
            "count, before and after", specialize_check),
    Section("exact_gpu_s19/exact_gpu.json", "Exact ALiBi on every backend after the tma backward (the speed table's "
            "H100 rows at 16K and 64K)", exact_gpu),
    Section("kernel_sweep_s19/kernel_sweep.json", "The window's wide heads on wider backward tiles, and exact's "
            "backward by tensor descriptors (round 7: exact's shipped, the window's all slower)", kernel_sweep),
    Section("window_gpu_s19/exact_gpu.json", "The per-head window through the public call, session 19's check on "
            "another H100", exact_gpu),
    Section("window_gpu_s16/final/exact_gpu.json", "The per-head window through the public call with the wide heads "
            "on 64-key tiles (the speed table's H100 window rows)", exact_gpu),
    Section("exact_gpu_s16/exact_gpu.json", "Exact ALiBi on every backend after the tma forward", exact_gpu),
    Section("window_parts_s16/window_parts.json", "The window forward at 256K: the wide heads on 64-key tiles "
            "(wide512 shipped at 0.942 of the tma config in alternating rounds)", window_parts),
    Section("window_parts_s16/call3/window_parts.json", "The window forward at 256K: pipeline stages against programs "
            "per multiprocessor (nothing ahead by the 3 % bar)", window_parts),
    Section("kernel_sweep_s16/kernel_sweep.json", "Wider key tiles with tensor descriptors (round 6): the hybrid "
            "forward on 64 x 32 shipped", kernel_sweep),
    Section("window_gpu_s15/final/exact_gpu.json", "The per-head window through the public call with tma in the "
            "forward and the backward (the speed table's H100 window rows until session 16)", exact_gpu),
    Section("kernel_sweep_s15_bwd/kernel_sweep.json", "Tensor-descriptor loads in the backward's loops (round 5, "
            "bwd_tma): picked for the window, LSH and hybrid", kernel_sweep),
    Section("window_parts_s15/window_parts.json", "The window forward at 256K after the one-edge boundary tiles, "
            "against its predecessor (base) in one process: K and V by tensor descriptors (tma) shipped", window_parts),
    Section("window_gpu_s15/tma/exact_gpu.json", "The per-head window through the public call with the tma forward "
            "shipped, before bwd_tma", exact_gpu),
    Section("window_gpu_s15/base/exact_gpu.json", "The same measurement with the predecessor's package, in the same "
            "device call, minutes later", exact_gpu),
    Section("kernel_sweep_s15/kernel_sweep.json", "Tensor-descriptor loads in every method's forward (round 5): "
            "picked for LSH and exact", kernel_sweep),
    Section("backward_parts_s15/backward_parts.json", "Where the training time goes after the tma forward: each "
            "kernel of a forward + backward step", backward_parts),
    Section("window_parts_s14/window_parts.json", "The window forward at 256K with the heads' query tiles in turns "
            "(interleave): no config ahead of the shipped one beyond the rounds' spread", window_parts),
    Section("kernel_sweep_s14/kernel_sweep.json", "The interleave variants of the forward and the backward (round 4): "
            "none picked", kernel_sweep),
    Section("exact_gpu_s14/exact_gpu.json", "`auto` against the backend it ran on, timed alternately (flex_fa4 "
            "installed; the flex column's 16K forward is a timing artifact, fixed after this run in "
            "`exact_gpu.time_ms`)", exact_gpu),
    Section("exact_gpu_s14_nofa4/exact_gpu.json", "`auto` against the backend it ran on, timed alternately "
            "(FlashAttention-4 not installed: cuDNN; the flex column's 16K forward: the same artifact)", exact_gpu),
    Section("window_parts_s13/window_parts_call2.json", "Where the window forward's time goes at 256K: head groups "
            "apart, tile configs, bytes floors", window_parts),
    Section("exact_gpu_s13/exact_gpu.json", "Exact ALiBi on every backend, rerun with `auto` timed at every length "
            "after its warm-up (the compiled backends under the same rent rule as cuDNN)", exact_gpu),
    Section("window_gpu_s13/exact_gpu.json", "The per-head window on every backend at 64K and 256K, after the "
            "flex_fa4 fixes", exact_gpu),
    Section("exact_gpu_s12/exact_gpu.json", "Exact ALiBi on every backend, FlexAttention's FlashAttention-4 kernels "
            "included (the speed table's H100 rows until session 16; flex_fa4's check failed in this run, before its "
            "fixes: below)",
            exact_gpu),
    Section("exact_check_s12/exact_gpu.json", "Exact ALiBi: every backend's check after the flex_fa4 fixes",
            exact_gpu),
    Section("window_gpu_s12/exact_gpu.json", "The per-head window on every backend at 64K (flex_fa4's gradients were "
            "NaN with grouped KV in this run, fixed after: tests/test_flex_fa4.py on the GPU)", exact_gpu),
    Section("exact_gpu_s10/exact_gpu.json", "Exact ALiBi on every backend, rerun after `auto`'s deferral of cuDNN's "
            "graph builds (the speed table's H100 rows at 256K)", exact_gpu),
    Section("exact_gpu/exact_gpu.json", "Exact ALiBi on every backend, cuDNN's included (its first run)",
            exact_gpu),
    Section("first_call/first_call_builds.json", "A prompt of a new length: what cuDNN's graph build costs (auto "
            "timed last, after cuDNN had built its graphs)", first_call),
    Section("first_call/first_call.json", "A prompt of a new length: auto serves it at once, and takes cuDNN once "
            "the calls at that length have paid for its build", first_call),
    Section("backward_parts/backward_parts.json", "Where the training time goes: each kernel of a forward + "
            "backward step", backward_parts),
    Section("kernel_sweep/kernel_sweep.json", "The Triton kernels' variants, forward and training, and the "
            "configurations the library ships", kernel_sweep),
    Section("kernel_sweep_2/kernel_sweep.json", "The training kernels' second round: tiles against the backward's "
            "register spills (none shipped: the base config stays fastest)", kernel_sweep),
    Section("pareto_h100_256k/pareto.json", "How accurate for the time: error against time at 256K tokens on an "
            "H100 (the README's first table)", _experiment("pareto"), ("pareto_h100_256k/pareto.png",)),
    Section("pareto_h200_256k/pareto.json", "How accurate for the time: error against time at 256K tokens on the "
            "H200 (2026-12-01, the kernels of then)", _experiment("pareto"), ("pareto_h200_256k/pareto.png",)),
    Section("pareto_h200_256k_flex/pareto.json", "Against FlexAttention at equal error (256K tokens)", against_flex,
            ("pareto_h200_256k_flex/pareto.png",)),
    Section("split_h200/split_gpu.json", "The paper's form: ALiBi as r short attentions on kernels without a bias",
            split_gpu),
    Section("split_h200_1m/split_gpu.json", "The paper's form at 1M tokens (after the 64-bit offset fix of its merge)",
            split_gpu),
    Section("lsh-native.json", "Language models trained with positional LSH instead of the bias", lsh_native),
    Section("cp_cpu/cp-bench.json", "Context parallelism on the CPU: 1, 2 and 4 gloo processes (poslsh.distributed)",
            _experiment("cp_bench"), ("cp_cpu/cp_bench.png",)),
    Section("cp_h200_1gpu/cp-bench.json", "Context parallelism on one H200 (NCCL, one process): the weak-scaling "
            "baseline at 256K and 1M tokens", _experiment("cp_bench")),
    Section("cp_h200_1gpu/smoke/cp-bench.json", "Context parallelism on one H200: every method through NCCL, checked",
            _experiment("cp_bench")),
    Section("lm-validation.json", "A language model trained here: bits per byte per method, r and context",
            _experiment("lm_validation")),
    Section("pareto_h200/pareto.json", "Error against time at 64K tokens on the GPU (its 256K panel was rerun above)",
            _experiment("pareto"), ("pareto_h200/pareto.png",)),
    Section("pareto_h200_heavy/pareto.json", "A heavy-tailed kernel at 64K tokens on the GPU", _experiment("pareto"),
            ("pareto_h200_heavy/pareto.png",)),
    Section("mask-error/mask-error.json", "The paper's first claim: the mean of r masks approaches the ALiBi kernel",
            _experiment("mask_error"), ("mask-error/mask_error_spectral.png",)),
    Section("attn-error/attn-error.json", "The paper's second claim: attention output error against r",
            _experiment("attn_error"), ("attn-error/attn_error_vs_r.png",)),
    Section("pareto_cpu/pareto.json", "On the CPU: correlated sampling, the hybrid and a heavy-tailed kernel",
            _experiment("pareto"), ("pareto_cpu/pareto.png", "pareto_cpu/pareto_convergence.png")),
    Section("cpu_scaling.json", "On the CPU: time and memory against the context", cpu_scaling),
]

RESULTS_HEAD = """# Results

Every number on this page is generated by `python3 -m poslsh_lab.readme` from the JSON committed in
[`bench/results/`](../bench/results/) (a test fails when this page and the JSON disagree); each section
names the file and the command that produced it. The README keeps the one table that answers "how
fast, how accurate, compared with what"; the rest is here, the GPU first.
"""


def render_results() -> str:
    parts = [RESULTS_HEAD]
    for section in SECTIONS:
        path = RESULTS / section.path
        if not path.exists():
            continue
        doc = load_results(path)
        images = "".join(f"\n\n![{section.heading}]({_link(RESULTS / img, RESULTS_MD)})" for img in section.images
                         if (RESULTS / img).exists())
        parts.append(f"## {section.heading}\n\n" + section.render(doc) + images + "\n\n"
                     + _provenance(doc, path, RESULTS_MD))
    return "\n\n".join(parts) + "\n"


def updated(readme: str) -> str:
    """The README with its generated blocks (between their markers) rewritten: the advice on which method
    to use and the results block."""
    blocks = [(ADVICE_START, ADVICE_END, lambda: readme_advice(_committed(README_TABLE))), (START, END, readme_block)]
    for start, end, render in blocks:
        if start not in readme or end not in readme:
            raise ValueError(f"README.md lacks the markers {start} ... {end}")
        head, rest = readme.split(start, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{start}\n{render()}\n{end}{tail}"
    return readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the README's results block and docs/RESULTS.md from the "
                                            "committed JSON.")
    p.add_argument("--check", action="store_true", help="Only check that both are up to date.")
    p.add_argument("--root", type=Path, default=None, metavar="DIR",
                   help="The checkout whose README.md, docs/RESULTS.md and bench/results/ are used. Default: the "
                        "checkout poslsh runs from, else the current folder.")
    args = p.parse_args(argv)
    if args.root is not None:
        use_root(args.root)
    current = README.read_text()
    new = updated(current)
    results = render_results()
    if args.check:
        stale = [name for name, ok in (("README.md", new == current),
                                       ("docs/RESULTS.md", RESULTS_MD.exists() and RESULTS_MD.read_text() == results))
                 if not ok]
        if stale:
            print(f"{', '.join(stale)} out of date: run python3 -m poslsh_lab.readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    RESULTS_MD.parent.mkdir(exist_ok=True)
    RESULTS_MD.write_text(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
