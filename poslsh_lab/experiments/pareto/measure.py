"""pareto, measuring: the reference, each point's error, time and keys per query, the convergence
slopes, the time budget; the JSON document is rewritten after every point (``experiments.harness.Run``)."""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from poslsh.alibi import alibi_slopes
from poslsh.attention.dispatch import Backend, resolve_spec, select_backend
from poslsh.hashing import sample_partitions
from poslsh.positional_kernels import power_law
from poslsh.seeds import blake2b_seed
from ...util import fmt, progress, replot_saved, torch_threads
from ..harness import Run
from ..metrics import gpu_time, keys_per_query, loglog_slope, relative_error
from .design import NAME, Config, _jobs, _label, check
from .report import replot


def _forward(backend: Backend, spec, nq: int, nk: int, device: torch.device) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The call to time: (q, k, v) -> out [1, H, nq, D]. FlexAttention's block mask is built here, once:
    like the partitions it depends only on positions and is shared by every layer (at 256K its index
    tensors are ~0.5 GB each, which would otherwise be rebuilt inside every timed call)."""
    if backend.name == "flex":
        from poslsh.attention.flex import flex_attention_spec, flex_mods

        mods = flex_mods(spec, nq, nk, device, with_q_blocks=False)
        return lambda q, k, v: flex_attention_spec(q, k, v, spec, mods=mods)[0]
    return lambda q, k, v: backend(q, k, v, spec)[0]


def _measure(forward: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor,
             config: Config) -> tuple[Tensor, float, str]:
    """(output of the last call, seconds per call, how it was timed); see the package docstring."""
    last: dict[str, Tensor] = {}

    def call() -> None:
        last["out"] = forward(q, k, v)

    if q.device.type == "cuda":
        ms, how = gpu_time(call, config.warmup_ms, config.rep_ms)
        return last["out"], ms / 1e3, how
    runs = []
    for _ in range(max(1, config.repeats)):
        t0 = time.process_time()
        call()
        runs.append(time.process_time() - t0)
    return last["out"], statistics.median(runs), f"process CPU time, median of {len(runs)}"


def _inputs(n: int, heads: int, d: int, dtype: torch.dtype, device: torch.device, seed: int,
            query_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """q ~ query_scale N(0, 1), k, v ~ N(0, 1), each [1, H, n, D] in ``dtype``, drawn on ``device``
    (at 256K tokens a CPU copy would take GBs) in float32, or float64 when that is the dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = (torch.randn(1, heads, n, d, generator=g, dtype=draw, device=device) for _ in range(3))
    return (q * query_scale).to(dtype), k.to(dtype), v.to(dtype)

def _panel(config: Config, session: Run, panel: dict[str, Any], jobs: list[tuple[str, dict]], *,
           slopes: Tensor | None, kernel, seed: int) -> None:
    """Measure ``jobs`` into ``panel["points"]`` (n and heads from the panel) for ALiBi (slopes) or a
    kernel, saving the JSON after each point. Once the time budget is spent the points not started
    are recorded as skipped. A point that raises is recorded as failed and the rest go on: on a
    one-shot GPU run one broken backend must not lose the other measurements."""
    n, heads, points = panel["n"], panel["heads"], panel["points"]
    name = f"{'alibi' if kernel is None else 'heavy'} n={n}"
    if session.late():
        points += [{"method": m, **opts, "skipped": "time budget"} for m, opts in jobs]
        session.log(f"{name}: skipped (time budget)")
        session.save()
        return
    device = torch.device(config.device)
    dtype, ref_dtype = getattr(torch, config.dtype), getattr(torch, config.reference_dtype)
    q, k, v = _inputs(n, heads, config.head_dim, dtype, device, seed, config.query_scale)
    pos = dict(slopes=slopes) if kernel is None else dict(kernel=kernel)
    try:
        exact = _reference(config, session, panel, q, k, v, pos, ref_dtype)
    except Exception as err:  # noqa: BLE001 - recorded; the next panel still runs
        panel["failed"] = repr(err)[:400]
        points += [{"method": m, **opts, "skipped": "reference failed"} for m, opts in jobs]
        session.log(f"{name}: reference failed: {panel['failed']}")
        session.save()
        return
    for i, (method, opts) in enumerate(jobs):
        if session.late():
            points += [{"method": m, **o, "skipped": "time budget"} for m, o in jobs[i:]]
            session.log(f"{name}: time budget spent, {len(jobs) - i} point(s) skipped")
            session.save()
            return
        try:
            point = _point(config, method, opts, q, k, v, exact, pos, seed)
        except Exception as err:  # noqa: BLE001 - recorded, see the docstring
            point = {"method": method, **opts, "failed": repr(err)[:400]}
        points.append(point)
        session.log(f"{name}: {_label(point)}: " + (point.get("failed") or
                f"error {fmt(point['error'])}, {fmt(point['seconds'] * 1e3)} ms ({point['backend']})"))
        session.save()


def _reference(config: Config, session: Run, panel: dict[str, Any], q: Tensor, k: Tensor, v: Tensor, pos: dict,
               ref_dtype: torch.dtype) -> Tensor:
    """Exact attention in ``ref_dtype`` on the same (rounded) inputs, once per panel: [1, H, n, D]."""
    qr, kr, vr = (t.to(ref_dtype) for t in (q, k, v))
    if config.error_rows:
        qr = qr[:, :, -config.error_rows:]  # the last rows: queries sit at the last key positions
    spec = resolve_spec(qr, kr, vr, causal=config.causal, method="exact", **pos)
    backend = select_backend(qr, spec, "auto")
    t0 = time.perf_counter()
    exact = _forward(backend, spec, qr.shape[2], panel["n"], q.device)(qr, kr, vr)
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    panel["reference"] = {"backend": backend.name, "dtype": str(ref_dtype).removeprefix("torch."),
                          "wall_seconds": time.perf_counter() - t0}
    session.log(f"n={panel['n']}: reference ({backend.name}, {panel['reference']['dtype']}) in "
            f"{panel['reference']['wall_seconds']:.1f} s")
    return exact


def _point(config: Config, method: str, opts: dict[str, Any], q: Tensor, k: Tensor, v: Tensor, exact: Tensor,
           pos: dict, seed: int) -> dict[str, Any]:
    """One method's error (mean over the partition draws), time (first draw) and keys per query."""
    n, heads = q.shape[2], q.shape[1]
    draws = config.seeds if method in ("lsh", "hybrid") else 1
    errs, pairs, seconds, how, backend = [], [], 0.0, "", ""
    for draw in range(draws):
        gen = torch.Generator().manual_seed(blake2b_seed(config.seed, seed, method, sorted(opts.items()), draw))
        kw = {key: val for key, val in opts.items() if key != "near"}
        spec = resolve_spec(q, k, v, causal=config.causal, method=method, generator=gen, **pos, **kw)
        if "near" in opts:  # explicit near-field half-widths (heavy panel)
            spec = dataclasses.replace(spec, window=torch.full((heads,), int(opts["near"])))
        try:
            chosen = select_backend(q, spec, config.backend)
        except ValueError:  # e.g. a method or kernel the named backend does not implement
            chosen = select_backend(q, spec, "auto")
        forward = _forward(chosen, spec, n, n, q.device)
        if draw == 0:
            out, seconds, how = _measure(forward, q, k, v, config)
        else:
            out = forward(q, k, v)
        errs.append(float(relative_error(out[:, :, -exact.shape[2]:], exact)))
        del out
        pairs.append(keys_per_query(spec, n, n))
        backend = chosen.name
    return {"method": method, **opts, "error": sum(errs) / len(errs), "errors": errs, "seconds": seconds,
            "timing": how, "pairs": sum(pairs) / len(pairs), "backend": backend}


def _fit(xs: list[float], ys: list[float]) -> float | None:
    return loglog_slope(xs, [max(y, 1e-300) for y in ys])  # an error of 0 counts as tiny, not as missing


def convergence(config: Config) -> dict[str, Any]:
    """Max-norm, spectral and attention errors vs r per sampling mode, with fitted slopes."""
    from poslsh.attention.fused import fused_attention
    from poslsh.mask_errors import mask_errors

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
                gen = torch.Generator().manual_seed(blake2b_seed(config.seed, sampling, seed, r))
                parts = sample_partitions(n, slopes, r, sampling=sampling, generator=gen)
                errs = mask_errors(parts, "dense")
                est = fused_attention(q, k, v, resolve_spec(q, k, v, causal=config.causal, method="lsh", partitions=parts))[0]
                att = relative_error(est, exact, dim=(-1, -2))[0]  # per head
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
    """Measure, write ``out_dir/pareto.json`` (and the PNGs unless ``plots`` is off), return the saved
    document; with ``replot``, only redraw that JSON's PNGs into ``out_dir`` and return it."""
    if not config.replot:
        check(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    with torch_threads(config.threads), torch.no_grad():
        doc = _run(config, out_dir)
    if config.plots:
        replot(doc, out_dir)
    return doc


def _run(config: Config, out_dir: Path) -> dict:
    results: dict[str, Any] = {"partial": True, "convergence": None, "alibi": [], "heavy": None, "seconds": 0.0}
    session = Run(NAME, out_dir / f"{NAME}.json", config, results, deadline_s=config.budget_s, stream=sys.stderr,
                  stamp="6.1f")
    session.save()
    if config.convergence:
        results["convergence"] = convergence(config)
        session.log("convergence done")
    for i, n in enumerate(config.n):
        panel = {"n": n, "heads": config.heads, "kernel": None, "points": []}
        results["alibi"].append(panel)
        _panel(config, session, panel, _jobs(config, config.window_eps, None), slopes=alibi_slopes(config.heads),
               kernel=None, seed=1 + i)
    if config.heavy_n > 0:
        kernel = power_law(config.heavy_p)
        results["heavy"] = {"n": config.heavy_n, "heads": config.heavy_heads, "kernel": kernel.name, "points": []}
        _panel(config, session, results["heavy"], _jobs(config, config.heavy_window_eps, config.heavy_hybrid_near),
               slopes=None, kernel=kernel, seed=2 + len(config.n))
    results["partial"] = False
    session.log("done")
    return session.save()
