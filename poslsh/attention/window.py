"""Banded ALiBi: the "window" baseline (exact weights truncated at |p - j| <= w_h) and "exact"
(the band of width Nk), both run by the tiled engine; and FlashAttention's ``window_size=(left,
right)`` read once into per-head widths (``window_size_widths``).

Truncating head h at w_h = ceil(ln(1/eps) / m_h) drops keys whose weight is at most
e^{-m_h w_h} <= eps relative to the diagonal: a small, deterministic error at cost ~w_h keys per
query (2 w_h + 1 bidirectional), so near-linear in n. Every report puts LSH beside it.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from ..hashing import UNBOUNDED_WIDTH
from .core import AttentionSpec

__all__ = ["window_sizes", "kernel_window_sizes", "hybrid_widths", "window_size_widths", "BandRule", "band_rules"]


def _side(entry, h: int) -> Tensor:
    """One side of ``window_size``: an int, H ints, or an integer tensor (0-d or [H]) -> int64 [H],
    FlashAttention's -1 (unbounded) read as ``UNBOUNDED_WIDTH``."""
    if isinstance(entry, Tensor):
        if entry.dtype.is_floating_point or entry.dtype.is_complex or entry.dtype == torch.bool:
            raise TypeError(f"window_size sizes must be integers, got a {entry.dtype} tensor")
        sizes = entry.detach().to("cpu", torch.int64).reshape(-1)
        if sizes.numel() == 1:
            sizes = sizes.expand(h)
    elif isinstance(entry, int) and not isinstance(entry, bool):
        sizes = torch.full((h,), entry, dtype=torch.int64)
    elif isinstance(entry, Sequence) and not isinstance(entry, str) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in entry):
        sizes = torch.tensor(list(entry), dtype=torch.int64)
    else:
        raise TypeError(f"window_size entries must be an int or H ints (one per head), got {entry!r}")
    if sizes.numel() != h:
        raise ValueError(f"window_size needs one size per query head ({h}), got {sizes.numel()}")
    if (sizes < -1).any():
        raise ValueError(f"window_size sizes must be >= 0 or -1 (unbounded), got {sizes.tolist()}")
    return torch.where(sizes < 0, UNBOUNDED_WIDTH, sizes)


def window_size_widths(window_size, causal: bool, h: int) -> tuple[bool, Tensor | None, Tensor | None]:
    """FlashAttention's ``(causal, window_size=(left, right))`` -> (causal, left [H], right [H] or None).

    Query position p sees keys p - left <= j <= p + right, -1 meaning unbounded on that side; causal
    means right = 0, and a window whose right sides are all 0 is causal. The one place -1 is read:
    unbounded sides come back as ``hashing.UNBOUNDED_WIDTH``, which the resolution caps at Nk - 1 like
    any other width. ``left`` is None when nothing is cut (exact attention); ``right`` is None when
    the band is causal or symmetric.

    Args:
        window_size: a pair (a tuple, list or 2-element tensor); each side an int, H ints or an integer
            tensor.
        causal: FlashAttention's ``causal``.
        h: query heads.
    """
    if isinstance(window_size, Tensor):
        if window_size.numel() != 2 and not (window_size.ndim >= 1 and window_size.shape[0] == 2):
            raise TypeError(f"window_size must be a pair (left, right), got a tensor of shape "
                            f"{tuple(window_size.shape)}")
        window_size = tuple(window_size.reshape(2, -1))
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = (_side(w, h) for w in window_size)
    causal = bool(causal) or bool((right == 0).all())
    if causal or torch.equal(left, right):
        right = None
    if bool((left == UNBOUNDED_WIDTH).all()) and right is None:
        left = None  # exact attention, causal or two-sided
    return causal, left, right


def window_sizes(slopes: Tensor, eps: float, n: int) -> Tensor:
    """Per-head half-widths w_h = ceil(ln(1/eps) / m_h), capped at n - 1 (slope 0 -> n - 1).

    Args:
        slopes: float64 [H], >= 0.
        eps: the largest dropped weight relative to the diagonal, in (0, 1).
        n: number of key positions.

    Returns:
        int64 CPU tensor [H].
    """
    # Python floats (IEEE float64, the same arithmetic as a float64 tensor): a few microseconds instead
    # of tens for the tensor ops, on every call of every layer.
    cap, scale = max(n - 1, 0), math.log(1.0 / eps)
    return torch.tensor([math.ceil(min(scale / m, cap)) if m > 0 else cap  # min first: scale / m may be inf
                         for m in slopes.detach().to("cpu", torch.float64).tolist()], dtype=torch.int64)


def kernel_window_sizes(kernels, eps: float, n: int) -> Tensor:
    """``window_sizes`` for general kernels: per head the smallest w with f(w) <= eps, capped at n - 1
    (every dropped weight is <= eps). int64 CPU tensor [H]."""
    return torch.tensor([k.window(eps, n) for k in kernels], dtype=torch.int64)


# ALiBi weights past TAIL_DECAYS / m are below e^-80 of a row's (~1.8e-35: far below float64's resolution
# of any sum the hybrid's widths compare).
TAIL_DECAYS = 80.0


def hybrid_widths(slopes: Tensor, eps: float, samples: int, n: int, kernels=None) -> Tensor:
    """Near-field half-widths w_h of the hybrid estimator for a target error ``eps``.

    The target: the RMS relative error of a query's total positional weight (uniform logits, an
    interior causal row, i.i.d. samples) is at most eps. The near field |p - j| <= w is exact; the
    far field is estimated by the r-sample collision mean, so the error is the far field's standard
    deviation. In one sample the block of p reaches A keys to the left with P(A >= a) = f(a), so the
    far keys it adds number F = (A - w)+ with

        E[F] = sum_{k > w} f(k),     E[F^2] = sum_{k > w} (2 (k - w) - 1) f(k),

    and the relative error of the row weight Z = sum_{d < n} f(d) is sqrt(Var F / r) / Z. For ALiBi
    (n -> inf) that is sqrt((q^{w+1} (1 + q) - q^{2(w+1)}) / r): the far field's mean is only
    q^{w+1}, but its standard deviation is ~ sqrt(q^{w+1} / r) because a block reaching past w is
    rare and adds ~1/r of the row's weight when it does. So hybrid(eps) needs q^{w+1} ~ r eps^2,
    about twice the window that truncation needs for error eps (measured in ``experiments.pareto``).
    Bidirectional rows (left and right far fields) are within a factor 4 / (1 + q)^2 of this.
    Stratified / qmc samples have lower variance, so the widths are conservative for them.

    Args:
        slopes: float64 [H] (used when ``kernels`` is None); slope 0 -> n - 1 (all exact).
        eps: target RMS relative error, > 0.
        samples: r.
        n: number of key positions.
        kernels: optional H ``Kernel``.

    Returns:
        int64 CPU tensor [H], each in [0, n - 1].
    """
    # O(n) per head on the host (~0.1 s at n = 256K, H = 32): cached, since the same widths are asked
    # for at every call of a layer (without the cache the hybrid's host time exceeded its GPU time).
    per_head = tuple(kernels) if kernels is not None else tuple(float(m) for m in slopes.detach().cpu().tolist())
    eps, samples, n = float(eps), int(samples), int(n)
    if kernels is None:  # a decode loop asks at every key count: past the tail, one cached entry
        reach = _tail_reach(per_head)
        if reach is not None and n > reach:
            widths = _tail_widths(per_head, eps, samples)
            if widths is not None:
                return torch.tensor(widths, dtype=torch.int64)
    return torch.tensor(_hybrid_widths(per_head, kernels is not None, eps, samples, n), dtype=torch.int64)


def hybrid_widths_settle_past(slopes: Tensor, eps: float, samples: int) -> int | None:
    """The key count past which ``hybrid_widths(slopes, eps, samples, n)`` no longer depend on n (the ALiBi
    tail ``_tail_reach``), or None where unknown (a slope 0, eps below ~1e-17)."""
    per_head = tuple(float(m) for m in slopes.detach().cpu().tolist())
    reach = _tail_reach(per_head)
    return reach if reach is not None and _tail_widths(per_head, float(eps), int(samples)) is not None else None


@functools.lru_cache(maxsize=64)
def _tail_reach(per_head: tuple) -> int | None:
    """ALiBi weights past TAIL_DECAYS / m keys are below e^-80 of a row's weight, so widths computed over
    that many keys (the widest head's) hold for every longer n; None with a slope 0."""
    if not all(m > 0 for m in per_head):
        return None
    return max(math.ceil(TAIL_DECAYS / m) for m in per_head)


@functools.lru_cache(maxsize=64)
def _tail_widths(per_head: tuple, eps: float, samples: int) -> tuple[int, ...] | None:
    """The widths over ``_tail_reach`` keys, or None where one reaches the end (eps below ~1e-17: then each n
    is computed over its own keys)."""
    reach = _tail_reach(per_head)
    widths = _hybrid_widths(per_head, False, eps, samples, reach)
    return widths if all(w < reach - 1 for w in widths) else None


@functools.lru_cache(maxsize=64)
def _hybrid_widths(per_head: tuple, are_kernels: bool, eps: float, samples: int, n: int) -> tuple[int, ...]:
    out = []
    d = torch.arange(n, dtype=torch.float64)
    for head in per_head:
        if not are_kernels and head == 0:
            out.append(n - 1)
            continue
        f = head.values(n) if are_kernels else torch.exp(-head * d)
        # Suffix sums over k > w, for every w = 0..n-1 at once: O(n) per head.
        t0 = f.flip(0).cumsum(0).flip(0) - f  # sum_{k > w} f(k)
        t1 = (d * f).flip(0).cumsum(0).flip(0) - d * f  # sum_{k > w} k f(k)
        second = 2 * t1 - (2 * d + 1) * t0
        var = (second - t0 ** 2).clamp(min=0) / samples
        ok = (var <= (eps * float(f.sum())) ** 2).nonzero()
        out.append(int(ok[0]) if ok.numel() else n - 1)
    return tuple(out)


class BandRule:
    """Weights f(|p - j|) for p - w <= j <= p + right (right = w unless given; j <= p when causal),
    zero elsewhere; f = e^{-m d} (ALiBi) unless a ``kernel`` is given. ``slope`` is a float, or a 0-d
    tensor that requires grad (trainable slopes: the log-weights then carry its gradient)."""

    row_bytes = 0

    def __init__(self, slope: float | Tensor, width: int, causal: bool, n: int, kernel=None,
                 right: int | None = None) -> None:
        self.slope, self.width, self.causal, self.n, self.kernel = slope, width, causal, n, kernel
        self.right = 0 if causal else (width if right is None else right)
        self.span = float(min(n, width + self.right + 1))
        self._log_table: Tensor | None = None  # kernel: log f(d), d = 0..min(w, n-1), built on first use

    def _kernel_log_weight(self, dist: Tensor, dtype: torch.dtype) -> Tensor:
        # One O(w) table of log f per head, then a gather per score: a general f costs several
        # float64 transcendentals per element, which would dominate the tile's matmul on the CPU.
        if self._log_table is None or self._log_table.device != dist.device or self._log_table.dtype != dtype:
            d = torch.arange(min(max(self.width, self.right), self.n - 1) + 2, dtype=torch.float64, device=dist.device)
            self._log_table = self.kernel.log_f(d).to(dtype)
        return self._log_table[dist.clamp(max=self._log_table.numel() - 1)]

    def tile_ranges(self, firsts: Tensor, lasts: Tensor) -> tuple[list[int], list[int]]:
        lo = (firsts - self.width).clamp(min=0)
        hi = (lasts + self.right + 1).clamp(max=self.n)
        return lo.tolist(), hi.tolist()

    def log_weight(self, pos_q: Tensor, pos_k: Tensor, dtype: torch.dtype) -> Tensor:
        if self.kernel is None:
            diff = (pos_q[:, None] - pos_k[None, :]).to(dtype)
            slope = self.slope.to(diff.device, dtype) if isinstance(self.slope, Tensor) else self.slope
            logw = diff.abs() * (-slope)
        else:
            diff = pos_q[:, None] - pos_k[None, :]
            logw = self._kernel_log_weight(diff.abs(), dtype)  # beyond w: masked below
        return logw.masked_fill((diff > self.width) | (diff < -self.right), float("-inf"))


def band_rules(spec: AttentionSpec, n: int) -> list[BandRule]:
    """One ``BandRule`` per head: width w_h for "window" (right side ``spec.window_right`` when given;
    the near field of "hybrid"), n - 1 (everything) for "exact"."""
    widths = spec.window.tolist() if spec.window is not None else [n - 1] * spec.num_heads
    rights = spec.window_right.tolist() if spec.window_right is not None else [None] * spec.num_heads
    kernels = spec.kernels if spec.kernels is not None else [None] * spec.num_heads
    slopes = list(spec.slopes) if spec.slopes.requires_grad else spec.slopes.tolist()  # 0-d tensors keep the graph
    return [BandRule(m, int(w), spec.causal, n, kern, r) for m, w, r, kern in zip(slopes, widths, rights, kernels)]
