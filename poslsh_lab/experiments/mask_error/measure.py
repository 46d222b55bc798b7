"""mask-error, measuring: for each sequence length n, slope m, scheme and seed, draw r_max partitions once
and measure the errors of B-hat built from the first r of them, r = 1, 2, 4, ..., r_max (nested
prefixes: each is a valid set of r independent samples; nesting makes each curve smoother, seeds
give the spread), and beside every measurement the theoretical levels from ``poslsh.theory`` (the
eps that the Hoeffding and matrix-Bernstein sample counts guarantee with probability >= 1 - delta
at that r) and the block-size bound; the JSON document and its PNGs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from poslsh import theory
from poslsh.hashing import Partitions, sample_partitions
from poslsh.mask_errors import mask_errors
from poslsh.seeds import crc32_seed
from ...util import progress, replot_saved, save_results
from .design import NAME, Config, check
from .report import replot


def _prefix(parts: Partitions, r: int) -> Partitions:
    """The first r samples of every head (a valid draw of r independent samples)."""
    if parts.scheme == "grid":
        return Partitions(parts.n, parts.slopes, "grid", widths=parts.widths[:, :r].contiguous(),
                          offsets=parts.offsets[:, :r].contiguous())
    assert parts.num_heads == 1, "prefixes of cut partitions are taken one head at a time"
    ptr = parts.cut_pointers[: r + 1]
    return Partitions(parts.n, parts.slopes, "cut", cut_positions=parts.cut_positions[: int(ptr[-1])],
                      cut_pointers=ptr)


def _num_blocks(parts: Partitions) -> torch.Tensor:
    """Number of blocks of each head and sample, int64 [H, r], from the compact representation."""
    if parts.scheme == "grid":
        return torch.div(parts.n - 1 + parts.offsets, parts.widths, rounding_mode="floor") + 1
    return (parts.cut_pointers.diff() + 1).reshape(parts.num_heads, parts.num_samples)


def run(config: Config, out_dir: str | Path) -> dict:
    """Measure, write ``out_dir/mask-error.json`` and the PNGs, and return the saved document (with
    ``replot``: only redraw that JSON's PNGs)."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    check(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = sorted(set(config.samples))
    r_max = samples[-1]
    records: list[dict[str, Any]] = []
    jobs = [(n, m, s, k) for n in config.lengths for m in config.slopes for s in config.schemes
            for k in range(config.seeds)]
    start = time.perf_counter()
    for n, slope, scheme, k in progress(jobs, desc=NAME):
        gen = torch.Generator().manual_seed(crc32_seed(config.seed, n, slope, scheme, k))
        parts = sample_partitions(n, [slope], r_max, scheme=scheme, generator=gen)
        largest = parts.max_block_size()[0]  # [r_max]
        blocks = _num_blocks(parts)[0]  # [r_max]
        for r in samples:
            sub = _prefix(parts, r)
            t0 = time.perf_counter()
            err = mask_errors(sub, config.method, rtol=config.rtol)
            records.append({
                "n": n, "slope": slope, "scheme": scheme, "seed": k, "samples": r,
                "max": float(err["max"][0]), "spectral": float(err["spectral"][0]),
                "row_sum": float(err["row_sum"][0]), "spectral_residual": float(err["spectral_residual"][0]),
                "largest_block": int(largest[:r].max()),
                "mean_largest_block": float(largest[:r].double().mean()),
                "mean_block": float(n / blocks[:r].double().mean()),
                "seconds": time.perf_counter() - t0,
            })
    theory_rows = []
    for n in config.lengths:
        for slope in config.slopes:
            for r in samples:
                theory_rows.append({
                    "n": n, "slope": slope, "samples": r,
                    "max_eps": theory.max_norm_eps(n, r, config.delta),
                    "spectral_eps": theory.spectral_eps(n, slope, r, config.delta),
                    "row_sum_bound": theory.row_sum_error_bound(n, slope, r, config.delta),
                    "block_bound": theory.block_size_bound(n, slope, r, config.delta),
                    "kernel_norm": theory.kernel_norm_bound(n, slope),
                })
    results = {"records": records, "theory": theory_rows, "seconds": time.perf_counter() - start}
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    replot(doc, out_dir)
    return doc
