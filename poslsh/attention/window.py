"""Banded ALiBi: the "window" baseline (exact weights truncated at |p - j| <= w_h) and "exact"
(the band of width Nk), both run by the tiled engine.

Truncating head h at w_h = ceil(ln(1/eps) / m_h) drops keys whose weight is at most
e^{-m_h w_h} <= eps relative to the diagonal: a small, deterministic error at cost ~w_h keys per
query (2 w_h + 1 bidirectional), so near-linear in n. Every report puts LSH beside it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import AttentionSpec

__all__ = ["window_sizes", "BandRule", "band_rules"]


def window_sizes(slopes: Tensor, eps: float, n: int) -> Tensor:
    """Per-head half-widths w_h = ceil(ln(1/eps) / m_h), capped at n - 1 (slope 0 -> n - 1).

    Args:
        slopes: float64 [H], >= 0.
        eps: the largest dropped weight relative to the diagonal, in (0, 1).
        n: number of key positions.

    Returns:
        int64 CPU tensor [H].
    """
    s = slopes.detach().to("cpu", torch.float64)
    w = torch.full_like(s, float(max(n - 1, 0)))
    pos = s > 0
    w[pos] = torch.ceil(math.log(1.0 / eps) / s[pos]).clamp(max=float(max(n - 1, 0)))
    return w.to(torch.int64)


class BandRule:
    """Weights e^{-m |p - j|} for |p - j| <= w (and j <= p when causal), zero elsewhere."""

    def __init__(self, slope: float, width: int, causal: bool, n: int) -> None:
        self.slope, self.width, self.causal, self.n = slope, width, causal, n
        self.span = float(min(n, width + 1 if causal else 2 * width + 1))

    def tile_ranges(self, firsts: Tensor, lasts: Tensor) -> tuple[list[int], list[int]]:
        lo = (firsts - self.width).clamp(min=0)
        hi = lasts + 1 if self.causal else (lasts + self.width + 1).clamp(max=self.n)
        return lo.tolist(), hi.tolist()

    def log_weight(self, pos_q: Tensor, pos_k: Tensor, dtype: torch.dtype) -> Tensor:
        diff = (pos_q[:, None] - pos_k[None, :]).to(dtype)
        logw = diff.abs() * (-self.slope)
        out = diff.abs() > self.width
        if self.causal:
            out = out | (diff < 0)
        return logw.masked_fill(out, float("-inf"))


def band_rules(spec: AttentionSpec, n: int) -> list[BandRule]:
    """One ``BandRule`` per head: width w_h for "window", n - 1 (everything) for "exact"."""
    widths = spec.window.tolist() if spec.method == "window" else [n - 1] * spec.num_heads
    return [BandRule(float(m), int(w), spec.causal, n) for m, w in zip(spec.slopes.tolist(), widths)]
