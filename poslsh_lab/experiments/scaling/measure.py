"""scaling, measuring: one forward call of each method at each length, timed with its peak memory
(``metrics.cpu_time_and_memory``), and the fitted growth exponents; the JSON document and its PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from poslsh.alibi import alibi_slopes
from poslsh.attention import attention
from ...util import progress, replot_saved, save_results, torch_threads
from ..metrics import cpu_time_and_memory, loglog_slope
from .design import NAME, Config, check
from .report import replot


def run_method(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config,
               generator: torch.Generator) -> torch.Tensor:
    """One forward of ``method`` ("exact", "window", "lsh-split", "lsh-fused")."""
    slopes = alibi_slopes(q.shape[1])
    with torch.no_grad():
        if method in ("exact", "window"):
            return attention(q, k, v, slopes=slopes, causal=config.causal, method=method,
                             window_eps=config.window_eps if method == "window" else None, backend="fused")
        backend = method.split("-")[1]
        return attention(q, k, v, slopes=slopes, causal=config.causal, method="lsh", samples=config.samples,
                         scheme=config.scheme, generator=generator, backend=backend)


def run(config: Config, out_dir: str | Path) -> dict:
    """Time every method at every length, write ``out_dir/scaling.json`` and the PNG (with ``replot``:
    only redraw that JSON's PNG)."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    check(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    with torch_threads(config.threads):
        jobs = [(n, m) for n in sorted(config.lengths) for m in config.methods
                if m != "exact" or n <= config.exact_max]
        g = torch.Generator().manual_seed(config.seed)
        warm = torch.randn(1, config.heads, 256, config.head_dim, generator=g)
        for m in config.methods:  # first calls pay one-time costs (imports, allocator warm-up)
            run_method(m, warm, warm, warm, config, torch.Generator().manual_seed(0))
        for n, method in progress(jobs, desc=NAME):
            g = torch.Generator().manual_seed(config.seed + n)
            q, k, v = (torch.randn(1, config.heads, n, config.head_dim, generator=g) for _ in range(3))
            gen = torch.Generator().manual_seed(config.seed)
            stats = cpu_time_and_memory(lambda: run_method(method, q, k, v, config, gen), config.repeats)
            rows.append({"n": n, "method": method, **stats})
    results = {"rows": rows, "slopes": alibi_slopes(config.heads).tolist(),
               "exponents": _exponents(rows, config.fit_from),
               "threads": config.threads if config.threads > 0 else threads}
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    replot(doc, out_dir)
    return doc


def _exponents(rows: list[dict], fit_from: int = 0) -> dict[str, dict[str, float | None]]:
    """Least-squares log-log slope of CPU time, wall time and memory growth vs n, per method, over its
    lengths >= fit_from (all its lengths when fewer than two qualify, e.g. exact)."""

    def slope(pts: list[tuple[int, float]]) -> float | None:
        return loglog_slope([n for n, _ in pts], [y for _, y in pts])

    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        if sum(r["n"] >= fit_from for r in mine) >= 2:
            mine = [r for r in mine if r["n"] >= fit_from]
        out[method] = {"time": slope([(r["n"], r["cpu_seconds"]) for r in mine]),
                       "wall_time": slope([(r["n"], r["seconds"]) for r in mine]),
                       "memory": slope([(r["n"], r["peak_rss_delta"]) for r in mine])}
    return out
