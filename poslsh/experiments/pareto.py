"""Accuracy versus time: exact, truncated window, positional LSH (each sampling mode) and the hybrid
estimator, for ALiBi and for a heavy-tailed kernel; plus the error-versus-r slope of each sampling
mode. The CPU version of the Pareto study of issue 6; the same code runs on a GPU
(``--device cuda --backend auto --n 65536 --reference-dtype float32``).

Three parts, one JSON:

* ``convergence``: error of B-hat (max norm, spectral norm; ``poslsh.masks``, dense) and of the
  attention output against r, per sampling mode ("iid", "stratified", "qmc"), n = ``conv_n``,
  the Press slopes, float64; the fitted log-log slope over r >= ``fit_from`` of the geometric mean
  over heads and seeds (iid: -0.5 expected).
* ``alibi``: relative output error ||O-hat - O|| / ||O|| (all heads together, against exact
  attention in ``reference_dtype``) and time of one forward call, for exact, window(eps),
  lsh(sampling, r) and hybrid(sampling, eps, r) at n = ``n``, Press slopes of ``heads`` heads,
  ``head_dim``, ``dtype``, causal. Time: process CPU time on the CPU (one thread by default: on
  a shared machine wall time measures the neighbours), CUDA-event time on a GPU; the median of
  ``repeats`` calls after a warm-up, partitions drawn once outside the timed call (they are shared
  by every layer of a model and cost microseconds). LSH and hybrid errors are averaged over
  ``seeds`` independent partition draws (time from the first).
* ``heavy``: the same at n = ``heavy_n`` with f(d) = (1 + d)^(-``heavy_p``) on every head
  (``poslsh.kernels.power_law``): the row mass grows like sqrt(n), so the window must keep w with
  (1 + w)^-p <= eps, i.e. w = eps^(-1/p) - 1 (1e-2 -> 9999 at p = 1/2).

Cost beside time: ``pairs``, the (query, key) pairs with a nonzero weight per query (window:
min(p, w) + 1; lsh: the union of the r blocks; hybrid: the union of band and blocks).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..alibi import alibi_slopes
from ..attention.dispatch import resolve_spec, select_backend
from ..hashing import sample_partitions
from ..kernels import power_law
from .common import fmt, markdown_table, progress, pyplot, save_results, torch_threads

NAME = "pareto"
PLOT = "pareto.png"
PLOT_CONV = "pareto_convergence.png"
SAMPLINGS = ("iid", "stratified", "qmc")


@dataclass
class Config:
    """What to measure. Defaults take about a minute on one CPU thread."""

    n: int = 4096
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    reference_dtype: str = "float64"  # exact attention the errors are measured against
    device: str = "cpu"
    backend: str = "fused"  # falls back to "auto" for a method the backend does not accept
    causal: bool = True
    window_eps: tuple[float, ...] = (0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4)
    samples: tuple[int, ...] = (4, 8, 16, 32)
    samplings: tuple[str, ...] = SAMPLINGS
    hybrid_eps: tuple[float, ...] = (0.3, 0.1, 3e-2, 1e-2)
    hybrid_samples: tuple[int, ...] = (8,)
    hybrid_sampling: str = "qmc"
    heavy_n: int = 2048
    heavy_heads: int = 4
    heavy_p: float = 0.5
    heavy_window_eps: tuple[float, ...] = (0.3, 0.1, 0.05, 3e-2, 2e-2)
    # hybrid_eps asks the far field's RMS row-weight error to be <= eps; for a tail this heavy the
    # LSH far field cannot meet any such target below ~1 (its variance grows with n), so the heavy
    # panel sets the near field directly: these half-widths.
    heavy_hybrid_near: tuple[int, ...] = (16, 64, 256)
    conv_n: int = 256
    conv_samples: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    conv_seeds: int = 3
    fit_from: int = 8
    seeds: int = 2
    repeats: int = 1  # timed calls per point (median); the first also gives the error
    threads: int = 1  # torch CPU threads (0: leave as is)
    seed: int = 0


# ----------------------------------------------------------------------------- measuring


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call: CUDA events on a GPU, process CPU time on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(end) / 1e3
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def _median_time(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[Any, float]:
    """(result of the first call, median seconds of ``repeats`` calls); on a GPU one untimed warm-up
    first (compilation, autotuning), on the CPU none (nothing to compile; time is the scarce thing)."""
    if device.type == "cuda":
        fn()
    runs = [_timed(fn, device) for _ in range(max(1, repeats))]
    return runs[0][0], statistics.median(t for _, t in runs)


def pairs_per_query(spec, nk: int) -> float:
    """Mean number of keys with nonzero weight per query (causal or bidirectional)."""
    p = torch.arange(spec.q_offset, nk)
    if spec.method == "exact":
        return float((p + 1).double().mean()) if spec.causal else float(nk)
    lo = torch.full((spec.num_heads, p.numel()), nk, dtype=torch.int64)
    hi = torch.zeros_like(lo)
    if spec.method in ("lsh", "hybrid"):
        from ..masks import select_head

        parts = spec.partitions.to("cpu")
        for h in range(spec.num_heads):  # one head's [r, n] bounds at a time: [H, r, n] is GBs at 256K
            start, end = select_head(parts, h).block_bounds()
            lo[h] = start[0].amin(0)[spec.q_offset:]
            hi[h] = end[0].amax(0)[spec.q_offset:]
    if spec.method in ("window", "hybrid"):
        w = spec.window[:, None]
        lo = torch.minimum(lo, (p[None] - w).clamp(min=0))
        hi = torch.maximum(hi, (p[None] + w + 1).clamp(max=nk))
    if spec.causal:
        hi = p[None] + 1
    return float((hi - lo).double().mean())


def _inputs(n: int, heads: int, d: int, dtype: torch.dtype, device: torch.device, seed: int):
    """q, k, v ~ N(0, 1) [1, H, n, D], drawn on ``device`` (at 256K tokens a CPU float64 copy would
    take GBs) in float32, or float64 when that is the dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return tuple(torch.randn(1, heads, n, d, generator=g, dtype=draw, device=device).to(dtype) for _ in range(3))


def _rel(out: Tensor, exact: Tensor) -> float:
    out, exact = out.double(), exact.double()
    return float((out - exact).norm() / exact.norm())


def _panel(config: Config, n: int, heads: int, *, slopes: Tensor | None, kernel, window_eps, desc: str,
           seed: int, near: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Every method's (error, time, pairs) at one size, for ALiBi (slopes) or a kernel. Hybrid points
    use ``hybrid_eps`` (the API's target), or, with ``near``, these near-field half-widths."""
    device = torch.device(config.device)
    dtype, ref_dtype = getattr(torch, config.dtype), getattr(torch, config.reference_dtype)
    q, k, v = _inputs(n, heads, config.head_dim, dtype, device, seed)
    pos = dict(slopes=slopes) if kernel is None else dict(kernel=kernel)
    qr, kr, vr = (t.to(ref_dtype) for t in (q, k, v))
    ref_spec = resolve_spec(qr, kr, vr, causal=config.causal, method="exact", **pos)
    with torch.no_grad():
        exact = select_backend(qr, ref_spec, "auto")(qr, kr, vr, ref_spec)[0]

    jobs: list[tuple[str, dict[str, Any]]] = [("exact", {})]
    jobs += [("window", {"window_eps": e}) for e in window_eps]
    jobs += [("lsh", {"sampling": s, "samples": r}) for s in config.samplings for r in config.samples]
    if near is None:
        jobs += [("hybrid", {"sampling": config.hybrid_sampling, "samples": r, "hybrid_eps": e})
                 for r in config.hybrid_samples for e in config.hybrid_eps]
    else:
        jobs += [("hybrid", {"sampling": config.hybrid_sampling, "samples": r, "near": w})
                 for r in config.hybrid_samples for w in near]
    points = []
    for method, opts in progress(jobs, desc=desc):
        draws = config.seeds if method in ("lsh", "hybrid") else 1
        errs, seconds, pairs, backend = [], None, [], None
        for draw in range(draws):
            gen = torch.Generator().manual_seed(hash((config.seed, seed, method, tuple(opts.items()), draw)) % 2**62)
            kw = {key: val for key, val in opts.items() if key != "near"}
            spec = resolve_spec(q, k, v, causal=config.causal, method=method, generator=gen, **pos, **kw)
            try:
                chosen = select_backend(q, spec, config.backend)
            except ValueError:  # e.g. hybrid on a GPU kernel that does not implement it
                chosen = select_backend(q, spec, "auto")
            if method == "hybrid" and near is not None:  # explicit near-field widths (heavy panel)
                spec = dataclasses.replace(spec, window=torch.full((heads,), int(opts["near"])))
            with torch.no_grad():
                run = lambda: chosen(q, k, v, spec)[0]  # noqa: E731
                if draw == 0:
                    out, seconds = _median_time(run, config.repeats, device)
                else:
                    out = run()
            errs.append(_rel(out, exact))
            pairs.append(pairs_per_query(spec, n))
            backend = chosen.name
        points.append({"method": method, **opts, "error": sum(errs) / len(errs), "errors": errs,
                       "seconds": seconds, "pairs": sum(pairs) / len(pairs), "backend": backend})
    return {"n": n, "heads": heads, "kernel": None if kernel is None else kernel.name, "points": points}


def _fit(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-300)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def convergence(config: Config) -> dict[str, Any]:
    """Max-norm, spectral and attention errors vs r per sampling mode, with fitted slopes."""
    from ..attention.fused import fused_attention
    from ..masks import mask_errors

    n, h = config.conv_n, config.heads
    slopes = alibi_slopes(h)
    rs = sorted(set(config.conv_samples))
    out: dict[str, Any] = {"n": n, "samples": rs, "modes": {}}
    for sampling in progress(config.samplings, desc=f"{NAME} convergence"):
        logs = {m: [[0.0] * len(rs) for _ in range(h)] for m in ("max", "spectral", "attention")}
        for seed in range(config.conv_seeds):
            q, k, v = _inputs(n, h, config.head_dim, torch.float64, torch.device("cpu"), 1000 + seed)
            exact = fused_attention(q, k, v, resolve_spec(q, k, v, slopes=slopes, causal=config.causal,
                                                          method="exact"))[0]
            for i, r in enumerate(rs):
                gen = torch.Generator().manual_seed(hash((config.seed, sampling, seed, r)) % 2**62)
                parts = sample_partitions(n, slopes, r, sampling=sampling, generator=gen)
                errs = mask_errors(parts, "dense")
                est = fused_attention(q, k, v, resolve_spec(q, k, v, causal=config.causal, partitions=parts))[0]
                att = (est - exact).norm(dim=(-1, -2))[0] / exact.norm(dim=(-1, -2))[0]
                for head in range(h):
                    logs["max"][head][i] += math.log(float(errs["max"][head])) / config.conv_seeds
                    logs["spectral"][head][i] += math.log(float(errs["spectral"][head])) / config.conv_seeds
                    logs["attention"][head][i] += math.log(float(att[head])) / config.conv_seeds
        mode: dict[str, Any] = {}
        fit = [i for i, r in enumerate(rs) if r >= config.fit_from]
        for metric, per_head in logs.items():
            geo = [math.exp(sum(per_head[hd][i] for hd in range(h)) / h) for i in range(len(rs))]
            mode[metric] = {"per_head": [[math.exp(x) for x in row] for row in per_head], "geomean": geo,
                            "slope": _fit([rs[i] for i in fit], [geo[i] for i in fit]),
                            "slope_per_head": [_fit([rs[i] for i in fit], [math.exp(per_head[hd][i]) for i in fit])
                                               for hd in range(h)]}
        out["modes"][sampling] = mode
    return out


def run(config: Config, out_dir: str | Path) -> dict:
    """Measure, write ``out_dir/pareto.json`` and the PNGs, return the saved document."""
    with torch_threads(config.threads):
        return _run(config, out_dir)


def _run(config: Config, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    results["convergence"] = convergence(config) if config.conv_samples else None
    results["alibi"] = _panel(config, config.n, config.heads, slopes=alibi_slopes(config.heads), kernel=None,
                              window_eps=config.window_eps, desc=f"{NAME} alibi", seed=1)
    results["heavy"] = None
    if config.heavy_n > 0:
        results["heavy"] = _panel(config, config.heavy_n, config.heavy_heads, slopes=None,
                                  kernel=power_law(config.heavy_p), window_eps=config.heavy_window_eps,
                                  desc=f"{NAME} heavy", seed=2, near=config.heavy_hybrid_near)
    for key in ("alibi", "heavy"):
        if results[key] is not None:
            results[key]["frontier"] = frontier_gaps(results[key]["points"])
    results["seconds"] = time.perf_counter() - started
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    _plot(doc, out_dir)
    return doc


# ----------------------------------------------------------------------------- analysis


def _label(p: dict) -> str:
    if p["method"] == "window":
        return f"window eps={p['window_eps']:g}"
    if p["method"] == "lsh":
        return f"lsh {p['sampling']} r={p['samples']}"
    if p["method"] == "hybrid":
        target = f"eps={p['hybrid_eps']:g}" if "hybrid_eps" in p else f"near={p['near']}"
        return f"hybrid {p['sampling']} r={p['samples']} {target}"
    return p["method"]


def baseline_error_at(points: list[dict], budget: float, cost: str = "seconds") -> float | None:
    """The truncation baseline's error at a cost budget: its measured runs (windows, and exact
    attention as the window of width n) reduced to their lower envelope (best error within each
    cost), then log(error) interpolated linearly in log(cost) between neighbouring runs, because a
    window can be given any width in between (comparing against the measured grid only would
    flatter the challengers). None if the budget is below the cheapest run.

    Args:
        cost: "seconds" or "pairs" (keys per query, the hardware-independent cost).
    """
    base = sorted((p[cost], p["error"]) for p in points if p["method"] in ("window", "exact"))
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
    """For each LSH / hybrid point: the best baseline error available at no more time (and at no
    more keys per query), and the ratios (<= 1: the point is at least as accurate as the baseline)."""
    rows = []
    for p in points:
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


def _plot(doc: dict, out_dir: Path) -> None:
    plt = pyplot()
    res = doc["results"]
    panels = [k for k in ("alibi", "heavy") if res.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    styles = {"window": ("s-", "k"), "exact": ("*", "r")}
    colors = {"iid": "tab:blue", "stratified": "tab:orange", "qmc": "tab:green"}
    for ax, key in zip(axes[0], panels):
        pts = res[key]["points"]
        floor = min([p["error"] for p in pts if p["error"] > 0] + [1e-6]) / 3
        for method in ("window", "exact"):
            sel = sorted((p for p in pts if p["method"] == method), key=lambda p: p["seconds"])
            if sel:
                marker, color = styles[method]
                ax.plot([p["seconds"] for p in sel], [max(p["error"], floor) for p in sel], marker, color=color,
                        label=method if method == "window" else "exact (its own rounding error)", ms=7)
                if method == "window":
                    for p in sel:
                        ax.annotate(f"{p['window_eps']:g}", (p["seconds"], max(p["error"], floor)), fontsize=7,
                                    xytext=(3, 3), textcoords="offset points")
        for sampling in SAMPLINGS:
            sel = sorted((p for p in pts if p["method"] == "lsh" and p["sampling"] == sampling),
                         key=lambda p: p["samples"])
            if sel:
                ax.plot([p["seconds"] for p in sel], [p["error"] for p in sel], "o--", color=colors[sampling],
                        label=f"lsh {sampling} (r={sel[0]['samples']}..{sel[-1]['samples']})", ms=4)
        for r in sorted({p["samples"] for p in pts if p["method"] == "hybrid"}):
            sel = sorted((p for p in pts if p["method"] == "hybrid" and p["samples"] == r),
                         key=lambda p: p["seconds"])
            key_ = "hybrid_eps" if "hybrid_eps" in sel[0] else "near"
            values = sorted(p[key_] for p in sel)
            ax.plot([p["seconds"] for p in sel], [p["error"] for p in sel], "^-", ms=6,
                    label=f"hybrid {sel[0]['sampling']} r={r} ({key_} {values[0]:g}..{values[-1]:g})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("time of one forward call [s]")
        ax.set_ylabel(r"$\|\hat O - O\| / \|O\|$")
        title = "ALiBi, Press slopes" if key == "alibi" else f"heavy tail: {res[key]['kernel']}"
        ax.set_title(f"{title}, n={res[key]['n']}, H={res[key]['heads']}", fontsize=10)
        ax.legend(fontsize=7)
    cfg = doc["config"]
    fig.suptitle(f"Error vs time ({cfg['device']}, backend {cfg['backend']}, {cfg['dtype']}, "
                 f"{cfg['threads']} thread(s), D={cfg['head_dim']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_dir / PLOT, dpi=110)
    plt.close(fig)

    conv = res.get("convergence")
    if not conv:
        return
    metrics = ("max", "spectral", "attention")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, metric in zip(axes, metrics):
        for sampling, mode in conv["modes"].items():
            ax.plot(conv["samples"], mode[metric]["geomean"], "o-", color=colors.get(sampling),
                    label=f"{sampling}: slope {mode[metric]['slope']:.2f}")
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


def summarize(results: dict, out_dir: str | Path) -> str:
    """Markdown: the figures, the slope table, the Pareto tables, and what they show."""
    res, cfg = results["results"], results["config"]
    lines = [f"## Accuracy vs time: window, LSH (sampling modes), hybrid ({NAME})", "",
             f"Ran in {res['seconds']:.1f} s on {cfg['device']} (backend {cfg['backend']}, {cfg['dtype']}, "
             f"{cfg['threads']} thread(s)); errors against exact attention in {cfg['reference_dtype']}.", ""]
    if res.get("convergence"):
        lines += [f"![error vs r by sampling mode]({PLOT_CONV})", ""] + _slope_table(res, cfg)
    lines += [f"![error vs time]({PLOT})", ""]
    for key, title in (("alibi", "ALiBi"), ("heavy", "heavy-tailed kernel")):
        panel = res.get(key)
        if not panel:
            continue
        lines += [f"### {title}: n = {panel['n']}, {panel['heads']} heads"
                  + (f", {panel['kernel']}" if panel["kernel"] else ""), ""]
        rows = [[_label(p), p["error"], p["seconds"] * 1e3, p["pairs"], p["backend"]] for p in panel["points"]]
        lines += [markdown_table(["method", "rel. error", "time [ms]", "keys/query", "backend"], rows), ""]
        lines += [_verdict(panel), ""]
    if cfg["device"] == "cpu":
        lines += ["Caveat on CPU times: at this size one forward call is dominated by the fused engine's "
                  "per-tile Python overhead, and the machine may be shared, so single-call times move by "
                  "tens of percent (``--repeats`` takes a median); keys per query is the hardware-independent "
                  "cost. A win \"at equal time\" that is not also a win at equal keys per query is an "
                  "artifact of the CPU engine (e.g. the window's tiles compute T x (T + w) scores for T x w "
                  "useful ones), not of the method; the GPU run decides.", ""]
    lines += [_discussion(res), ""]
    return "\n".join(lines)


def _verdict(panel: dict) -> str:
    """Whether any LSH or hybrid point matches the window baseline at equal time and at equal keys."""
    text = []
    for cost, what in (("seconds", "time"), ("pairs", "keys per query")):
        gaps = [g for g in panel["frontier"] if g[f"ratio_{cost}"] is not None]
        wins = [g for g in gaps if g[f"ratio_{cost}"] <= 1]
        unmatched = len(panel["frontier"]) - len(gaps)
        if wins:
            text.append(f"**At equal {what}: " + ", ".join(g["label"] for g in wins)
                        + f" {'is' if len(wins) == 1 else 'are'} at least as accurate as the window "
                        "baseline (interpolated between measured windows and exact) at that cost.**")
        else:
            text.append(f"**At equal {what}: no LSH or hybrid point is as accurate as the window baseline.**")
        if gaps:
            best = min(gaps, key=lambda g: g[f"ratio_{cost}"])
            text.append(f"Closest: {best['label']} (error {fmt(best['error'])}) vs the baseline's "
                        f"{fmt(best[f'baseline_error_{cost}'])}: ratio {best[f'ratio_{cost}']:.2g}.")
        if unmatched:
            text.append(f"({unmatched} point(s) cost less than the cheapest window measured: not compared.)")
    return " ".join(text)


def _slope_table(res: dict, cfg: dict) -> list[str]:
    conv = res.get("convergence")
    if not conv:
        return []
    rows = [[s, m["max"]["slope"], m["spectral"]["slope"], m["attention"]["slope"]] for s, m in conv["modes"].items()]
    return [f"Fitted log-log slope of error vs r (r >= {cfg['fit_from']}, n = {conv['n']}, "
            "geometric mean over heads and seeds; iid theory -0.5):", "",
            markdown_table(["sampling", "max norm", "spectral norm", "attention output"], rows), ""]


def readme_section(doc: dict) -> str:
    """The README's view: slopes per sampling mode, the verdict per panel, and why."""
    res, cfg = doc["results"], doc["config"]
    lines = [f"Variance-reduced sampling, hybrid and window on {cfg['device']} ({cfg['backend']} backend, "
             f"{cfg['dtype']}); plots in bench/results/pareto_cpu/.", ""] + _slope_table(res, cfg)
    for key, title in (("alibi", "ALiBi"), ("heavy", "heavy-tailed kernel")):
        panel = res.get(key)
        if panel:
            lines += [f"*{title}, n = {panel['n']}:* " + _verdict(panel), ""]
    return "\n".join(lines + [_discussion(res)])


def _discussion(res: dict) -> str:
    """The honest paragraph: why the window wins for ALiBi, and what changes for heavy tails."""
    parts = ["Why: the window's error falls exponentially in its width (dropped mass e^{-m w}) while "
             "LSH's falls like a power of r. The hybrid is unbiased but its far field is a rare event: a "
             "block reaching past w occurs with probability ~q^w and then adds ~1/r of the row's weight, "
             "so its RMS error is ~sqrt(q^w / r), not q^w: to match a window of error eps it needs "
             "q^w ~ r eps^2, about twice the window's width, plus the LSH blocks."]
    heavy = res.get("heavy")
    if heavy:
        win = [p for p in heavy["points"] if p["method"] == "window"]
        lsh = [p for p in heavy["points"] if p["method"] in ("lsh", "hybrid")]
        if win and lsh:
            parts.append(f"Heavy tail ({heavy['kernel']}): the window needs w = eps^(-1/p) - 1 keys "
                         f"(largest measured {max(p['pairs'] for p in win):.0f} keys/query for error "
                         f"{fmt(min(p['error'] for p in win))}); LSH's blocks are mostly short but its "
                         f"widths are heavy-tailed too (best LSH/hybrid error {fmt(min(p['error'] for p in lsh))} "
                         f"at {min(lsh, key=lambda p: p['error'])['pairs']:.0f} keys/query).")
    return " ".join(parts)
