"""attn-error, measuring: exact ALiBi and the LSH estimate on random inputs, the window at LSH-fused's
pair count, the pairs each method evaluates and the uniform bound; the JSON document and its PNGs.

Cost is counted as the (query, key) pairs a method evaluates:

* LSH "fused": the union of the r blocks of each query (keys with c_pj > 0);
* LSH "split": the sum of the r block sizes (each pass evaluates its own block);
* window: sum_p min(p, w) + 1 (causal) for half-width w.

The window baseline at each r gets the half-width w_h whose pair count is closest to LSH-fused's
for that head, so the two curves compare equal work. Beside them: the 1/sqrt(r) law and, from
``poslsh.theory``, the uniform bound 2 V e^{2 beta} rho / max(1, S - rho) turned into a relative
Frobenius error (times sqrt(N D) / ||O_h||), with rho the row-sum mask error, either the high
probability bound (``row_sum_error_bound``) or the one measured on the drawn masks (``mask_errors``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poslsh.alibi import alibi_slopes
from poslsh.attention.dispatch import resolve_spec
from poslsh.attention.fused import fused_attention
from poslsh.attention.ranges import Support, nonzero_pairs, split_pairs
from poslsh.hashing import Partitions, sample_partitions
from poslsh.seeds import crc32_seed
from ...util import check_fields, progress, replot_saved, save_results, torch_threads
from ..metrics import loglog_slope, relative_error
from .design import FIT_FROM, NAME, Config
from .report import replot

try:  # written in parallel by the theory issue; the experiment runs without it
    from poslsh import theory as _theory
    from poslsh.mask_errors import mask_errors as _mask_errors

    HAVE_BOUND = hasattr(_theory, "attention_error_bound") and hasattr(_theory, "row_sum_error_bound")
except ImportError:  # pragma: no cover - depends on what is installed
    HAVE_BOUND = False


def lsh_pairs(parts: Partitions, causal: bool) -> tuple[Tensor, Tensor]:
    """Pairs evaluated per head by LSH: (fused: union of blocks, split: sum of blocks), float64 [H]."""
    support = Support("lsh", causal, partitions=parts)
    return nonzero_pairs(support, parts.n, parts.n).double(), split_pairs(support, parts.n, parts.n).double()


def window_pairs(n: int, width: Tensor, causal: bool) -> Tensor:
    """Pairs evaluated by a window of half-width w: [len(width)] for every w in ``width``."""
    return nonzero_pairs(Support("window", causal, window=width), n, n).double()


def matched_widths(n: int, pairs: Tensor, causal: bool) -> Tensor:
    """Per head, the window half-width whose pair count is closest to ``pairs`` [H]: int64 [H]."""
    table = window_pairs(n, torch.arange(n), causal)  # increasing in w
    return (table[None, :] - pairs[:, None]).abs().argmin(-1)


def run(config: Config, out_dir: str | Path) -> dict:
    """Measure, write ``out_dir/attn-error.json`` and the PNGs, return the saved document (with
    ``replot``: only redraw that JSON's PNGs)."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    check_fields(config)
    with torch_threads(config.threads):
        return _run(config, out_dir)


def _run(config: Config, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = sorted(set(config.samples))
    n, h, d = config.n, config.heads, config.head_dim
    slopes = alibi_slopes(h)
    started = time.perf_counter()
    curves: dict[tuple[str, float], dict[str, Any]] = {}
    jobs = [(scale, seed) for scale in config.logit_scales for seed in range(config.seeds)]
    for scale, seed in progress(jobs, desc=NAME):
        g = torch.Generator().manual_seed(crc32_seed(config.seed, scale, seed))
        q = torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * scale
        k = torch.randn(1, h, n, d, generator=g, dtype=torch.float64) * scale
        v = torch.randn(1, h, n, d, generator=g, dtype=torch.float64)
        exact = fused_attention(q, k, v, resolve_spec(q, k, v, slopes=slopes, causal=config.causal,
                                                      method="exact"))[0]
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        beta = float(logits.abs().max())  # the bound's logit bound: the realised max |logit|
        vmax = float(v.abs().max())
        window_spec = resolve_spec(q, k, v, slopes=slopes, causal=config.causal, method="window")
        for scheme in config.schemes:
            rec = curves.setdefault((scheme, scale), {
                "scheme": scheme, "logit_scale": scale, "beta": [], "lsh": [], "window": [], "pairs_fused": [],
                "pairs_split": [], "pairs_window": [], "window_width": [], "bound": [], "bound_measured": []})
            rec["beta"].append(beta)
            per_seed = {key: [] for key in ("lsh", "window", "pairs_fused", "pairs_split", "pairs_window",
                                            "window_width", "bound", "bound_measured")}
            for r in samples:
                gen = torch.Generator().manual_seed(crc32_seed(config.seed, scale, seed, scheme, r))
                parts = sample_partitions(n, slopes, r, scheme=scheme, generator=gen)
                spec = resolve_spec(q, k, v, causal=config.causal, method="lsh", partitions=parts)
                est = fused_attention(q, k, v, spec)[0]
                union, total = lsh_pairs(parts, config.causal)
                width = matched_widths(n, union, config.causal)
                win = fused_attention(q, k, v, dataclasses.replace(window_spec, window=width))[0]
                per_seed["lsh"].append(relative_error(est, exact, dim=(-1, -2))[0].tolist())  # per head
                per_seed["window"].append(relative_error(win, exact, dim=(-1, -2))[0].tolist())
                per_seed["pairs_fused"].append(union.tolist())
                per_seed["pairs_split"].append(total.tolist())
                per_seed["pairs_window"].append(window_pairs(n, width, config.causal).tolist())
                per_seed["window_width"].append(width.tolist())
                if HAVE_BOUND:
                    # Entrywise bound -> relative Frobenius bound: sqrt(N D) * bound / ||O_h||.
                    to_rel = math.sqrt(n * d) / exact.norm(dim=(-1, -2))[0]
                    rho = torch.tensor([_theory.row_sum_error_bound(n, float(m), r, config.delta)
                                        for m in slopes.tolist()])
                    measured = _mask_errors(parts)["row_sum"].cpu()
                    per_seed["bound"].append(
                        (_theory.attention_error_bound(rho, beta, vmax) * to_rel).tolist())
                    per_seed["bound_measured"].append(
                        (_theory.attention_error_bound(measured, beta, vmax) * to_rel).tolist())
            for key, value in per_seed.items():
                rec[key].append(value)  # [seed][r][head]
    results: dict[str, Any] = {"samples": samples, "slopes": slopes.tolist(), "have_bound": HAVE_BOUND,
                               "curves": [], "seconds": 0.0}
    for rec in curves.values():
        mean = {key: torch.tensor(val, dtype=torch.float64).mean(0).T.tolist() if val and val[0] else []  # [head][r]
                for key, val in rec.items() if isinstance(val, list) and key != "beta"}
        mean.update(scheme=rec["scheme"], logit_scale=rec["logit_scale"], beta=rec["beta"])
        # Least-squares exponent of err ~ r^a over r >= FIT_FROM (None with fewer than two such r).
        fit = [i for i, r in enumerate(samples) if r >= FIT_FROM]
        mean["exponent"] = [loglog_slope([samples[i] for i in fit], [e[i] for i in fit]) for e in mean["lsh"]]
        results["curves"].append(mean)
    results["seconds"] = time.perf_counter() - started
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    replot(doc, out_dir)
    return doc
