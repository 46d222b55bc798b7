"""pareto, the design of the run: its Config (every field a flag), the checks of a config, the grid
of points of a panel and their labels, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...util import Count, CountOrZero, Fraction, NonNegative, Positive, TwoOrMore, check_fields

NAME = "pareto"
PLOT = "pareto.png"
PLOT_CONV = "pareto_convergence.png"
SAMPLINGS = ("iid", "stratified", "qmc")


@dataclass
class Config:
    """What to measure. Defaults take about a minute on one CPU thread.

    Attributes:
        n: Sequence lengths, one ALiBi panel each.
        heads: Attention heads of the ALiBi panels, with Press slopes.
        head_dim: Head dimension D.
        dtype: Dtype of q, k, v and of the measured methods.
        reference_dtype: Dtype of the exact attention the errors are measured against.
        device: Device to run on, e.g. cpu or cuda.
        backend: Attention backend (falls back to auto for a method it does not accept), e.g. fused, triton, flex or auto.
        causal: Causal attention (--no-causal: bidirectional).
        query_scale: Queries are query_scale times N(0, 1) (peaked rows, as in the design anchors).
        error_rows: Errors over the last error_rows query rows only (0: every row); every method still runs on all rows.
        window_eps: Truncation levels of the window baseline.
        samples: Partitions r of the LSH points.
        samplings: Joint laws of the r partitions for LSH.
        hybrid_eps: Near-field targets of the hybrid points.
        hybrid_samples: Partitions r of the hybrid points.
        hybrid_sampling: Joint law of the hybrid's partitions.
        heavy_n: Length of the heavy-tailed kernel panel (0: no such panel).
        heavy_heads: Heads of the heavy-tailed panel.
        heavy_p: Exponent p of the kernel (1 + d)^-p of the heavy-tailed panel.
        heavy_window_eps: Truncation levels of the window in the heavy-tailed panel.
        heavy_hybrid_near: Near-field half-widths of the hybrid in the heavy-tailed panel (a tail this heavy meets no hybrid_eps target).
        convergence: Also measure the error-versus-r slopes per sampling mode (CPU-sized whatever the device).
        conv_n: Sequence length of the convergence part.
        conv_samples: Partitions r of the convergence part.
        conv_seeds: Independent draws per point of the convergence part.
        fit_from: Slopes are fitted on r at least this large.
        seeds: Partition draws averaged per LSH or hybrid point.
        repeats: CPU timed calls per point (the median is kept).
        warmup_ms: GPU warm-up time per point in milliseconds.
        rep_ms: GPU measuring time per point in milliseconds.
        budget_s: Wall-time budget in seconds; points not started by then are recorded as skipped (0: none).
        plots: Write the PNG plots (a GPU run can leave them to --replot).
        threads: Torch CPU threads; 0 keeps torch's default.
        seed: Base seed of every draw.
        replot: A saved pareto.json: only redraw its PNGs into --out (every other flag is ignored).
    """

    n: tuple[TwoOrMore, ...] = (4096,)  # one ALiBi panel per length
    heads: Count = 8
    head_dim: Count = 64
    dtype: Literal["float16", "bfloat16", "float32", "float64"] = "float32"
    reference_dtype: Literal["float32", "float64"] = "float64"
    device: str = "cpu"
    backend: str = "fused"
    causal: bool = True
    query_scale: Positive = 2.0
    # Errors over the last error_rows query rows only (0: every row). Each method still runs on all n
    # rows (its time is the full call's); only the reference is cut: exact float32 attention of all
    # rows took 114 s at n = 256K on an H200, of the last 8192 rows ~1/32 of that.
    error_rows: CountOrZero = 0
    window_eps: tuple[Fraction, ...] = (0.3, 0.1, 3e-2, 1e-2, 1e-3, 1e-4)
    samples: tuple[Count, ...] = (4, 8, 16, 32)
    samplings: tuple[Literal["iid", "stratified", "qmc"], ...] = SAMPLINGS
    hybrid_eps: tuple[Positive, ...] = (0.3, 0.1, 3e-2, 1e-2)
    hybrid_samples: tuple[Count, ...] = (8,)
    hybrid_sampling: Literal["iid", "stratified", "qmc"] = "qmc"
    heavy_n: CountOrZero = 2048
    heavy_heads: Count = 4
    heavy_p: Positive = 0.5
    heavy_window_eps: tuple[Fraction, ...] = (0.3, 0.1, 0.05, 3e-2, 2e-2)
    # hybrid_eps asks the far field's RMS row-weight error to be <= eps; for a tail this heavy the
    # LSH far field cannot meet any such target below ~1 (its variance grows with n), so the heavy
    # panel sets the near field directly: these half-widths.
    heavy_hybrid_near: tuple[CountOrZero, ...] = (16, 64, 256)
    convergence: bool = True
    conv_n: TwoOrMore = 256
    conv_samples: tuple[Count, ...] = (4, 8, 16, 32, 64, 128, 256)
    conv_seeds: Count = 3
    fit_from: Count = 8
    seeds: Count = 2
    repeats: Count = 1
    warmup_ms: CountOrZero = 25
    rep_ms: Count = 100
    budget_s: NonNegative = 0.0
    plots: bool = True
    threads: CountOrZero = 1
    seed: int = 0
    replot: str = ""


def unused(config: Config) -> dict[str, str]:
    """The fields this config does not read, with why (the command warns when they are set)."""
    out = {}
    if not config.convergence:
        out.update(dict.fromkeys(("conv_n", "conv_samples", "conv_seeds", "fit_from"), "--no-convergence"))
    if config.heavy_n == 0:
        out.update(dict.fromkeys(("heavy_heads", "heavy_p", "heavy_window_eps", "heavy_hybrid_near"), "--heavy-n 0"))
    if config.device.startswith("cuda"):
        out["repeats"] = "a GPU point is timed for --warmup-ms and --rep-ms"
    else:
        out.update(dict.fromkeys(("warmup_ms", "rep_ms"), "they time GPU points, and --device is not cuda"))
    return out


def check(config: Config) -> None:
    """Refuse a config that cannot run, naming the field."""
    check_fields(config)
    if not config.n:
        raise ValueError("n must name one or more lengths")


def _jobs(config: Config, window_eps: tuple[float, ...], near: tuple[int, ...] | None) -> list[tuple[str, dict]]:
    """A panel's points, most informative first (a budget cuts the tail): exact, the windows, the
    hybrid, then LSH by increasing r. Hybrid points use ``hybrid_eps`` (the API's target), or, with
    ``near``, these near-field half-widths."""
    jobs: list[tuple[str, dict[str, Any]]] = [("exact", {})]
    jobs += [("window", {"window_eps": e}) for e in window_eps]
    for r in config.hybrid_samples:
        jobs += ([("hybrid", {"sampling": config.hybrid_sampling, "samples": r, "hybrid_eps": e})
                  for e in config.hybrid_eps] if near is None else
                 [("hybrid", {"sampling": config.hybrid_sampling, "samples": r, "near": w}) for w in near])
    jobs += [("lsh", {"sampling": s, "samples": r}) for r in config.samples for s in config.samplings]
    return jobs


def _label(p: dict) -> str:
    if p["method"] == "window":
        return f"window eps={p['window_eps']:g}"
    if p["method"] == "lsh":
        return f"lsh {p['sampling']} r={p['samples']}"
    if p["method"] == "hybrid":
        target = f"eps={p['hybrid_eps']:g}" if "hybrid_eps" in p else f"near={p['near']}"
        return f"hybrid {p['sampling']} r={p['samples']} {target}"
    return p["method"]


