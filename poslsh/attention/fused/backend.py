"""The "fused" backend: one pass of attention with collision-count weights (LSH), and the same
tiled pass with banded ALiBi weights for "window" and "exact".

For LSH, query p and key j get weight c_pj = #{t : j in block_t(p)} / r, i.e. score + log c_pj.
Blocks are contiguous, so j is in p's block of sample t iff start_t(p) <= j < end_t(p)
(``Partitions.bounds_at``), and a tile of queries [p0, p1] needs only the keys in
[min_t start_t(p0), max_t end_t(p1)) (starts and ends are non-decreasing in p): the union of the
blocks, not the sum of their sizes. Memory per step is bounded by ``tiled.TILE_BYTES``.

"hybrid" (``HybridRule``): the band rule's exact weights for |p - j| <= w_h and the collision rule's
weights beyond; the tile's key range is the union of the band's and the blocks' ranges.

Decoding (at most ``speed.DECODE_ROWS`` query rows, ALiBi weights, scores within ``tiled.TILE_BYTES``):
the tiled engine's loop over heads costs ~25 small tensor operations per head, host work that dwarfs
the arithmetic of a few rows (on a CPU, a 4-head BLOOM layer's decode step: ~1.2 ms in the loop, where
the model's own attention takes a few operations). ``few_rows_attention`` computes the same weights for
every head at once (``few_rows_log_weights``: the band as ``BandRule``, the collision counts as
``CollisionRule``, by scattering each row's block bounds and a cumulative sum) and attends with
``reference.dense_attention``: a constant number of operations whatever the head count. A decoding step
through an ``AttentionPlan`` that needs no LSE and has no padding goes on to ``last_row_attention`` (three
matrix operations with the plan's weights), falling back here when its output is not finite. Its
weights for "lsh" on grid partitions come from ``GridLastRow`` (eight operations for one causal row at
the last key, where ``few_rows_log_weights`` takes about 25 for general rows).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ...hashing import Partitions
from . import tiled
from ..core import AttentionSpec
from ..reference import dense_attention
from ..speed import DECODE_ROWS
from .tiled import tiled_attention
from ..window import BandRule, band_rules

__all__ = ["CollisionRule", "GridLastRow", "HybridRule", "collision_rules", "fused_attention", "few_rows_attention",
           "few_rows_log_weights", "last_row_attention", "supports_fused", "takes_few_rows"]

class CollisionRule:
    """Weights c_pj = #{t : start_t(p) <= j < end_t(p)} / r for one head (and j <= p when causal).

    The block bounds of the tile's query rows are computed per tile (``Partitions.bounds_at``: from
    (W, U) for grid, by binary search in the cut table for cut), never for all n positions: with
    many samples an [r, n] table per head, let alone [H, r, n], would not fit (r = 10^6 at n = 512
    and H = 8 is 33 GB). A tile's rows need r bounds each (``row_bytes``), which the engine's tile
    size accounts for.
    """

    def __init__(self, parts: Partitions, causal: bool) -> None:
        """parts: the partitions of this head alone (``Partitions.head``)."""
        self.parts, self.causal = parts, causal
        self.r, self.n = parts.num_samples, parts.n
        self.table = parts.cut_table() if parts.scheme == "cut" else None
        self.row_bytes = 8 * self.r  # one int64 per sample and row, for each of a few temporaries

    @functools.cached_property
    def span(self) -> float:
        """The typical union of a query's blocks (sets the tile size): the mean over evenly spaced
        positions, as many as one budget of bounds holds. Computed only when a tile size needs it
        (not for a call of at most ``tiled.MIN_TILE`` query rows, e.g. decoding)."""
        parts, causal = self.parts, self.causal
        count = max(1, min(self.n, (tiled.TILE_BYTES // 8) // self.r))
        pos = torch.linspace(0, self.n - 1, count, device=parts.device).round().long()
        start, end = self.bounds(pos)
        reach = pos - start.amin(0)  # keys left of p in the union, per p
        if not causal:
            reach = reach + end.amax(0) - pos
        return float(reach.double().mean()) + 1.0

    def bounds(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Block bounds of positions pos [P] in every sample: int64 [r, P] each."""
        start, end = self.parts.bounds_at(pos, self.table)
        return start[0], end[0]

    def tile_ranges(self, firsts: Tensor, lasts: Tensor) -> tuple[list[int], list[int]]:
        los, his = [], []
        step = max(1, (tiled.TILE_BYTES // 8) // self.r)  # tiles per batch of bounds, within the budget
        for i in range(0, firsts.numel(), step):
            f, last = firsts[i:i + step], lasts[i:i + step]
            los += self.bounds(f)[0].amin(0).tolist()
            his += (last + 1).tolist() if self.causal else self.bounds(last)[1].amax(0).tolist()
        return los, his

    def log_weight(self, pos_q: Tensor, pos_k: Tensor, dtype: torch.dtype) -> Tensor:
        # count(p, j) is a step function of j: +1 at each start_t(p), -1 at each end_t(p). Scatter
        # the r steps of every row and take a cumulative sum: O(T * (L + r)), not O(T * L * r).
        # pos_k is a contiguous range [lo, hi); steps outside it are clipped to its ends.
        lo, num_k = int(pos_k[0]), pos_k.numel()
        start, end = self.bounds(pos_q)
        s = (start - lo).clamp(0, num_k).T  # [T, r]
        e = (end - lo).clamp(0, num_k).T
        steps = torch.zeros(pos_q.numel(), num_k + 1, dtype=dtype, device=pos_q.device)
        steps.scatter_add_(1, s, torch.ones_like(s, dtype=dtype))
        steps.scatter_add_(1, e, torch.full_like(e, -1, dtype=dtype))
        count = steps[:, :num_k].cumsum(1)  # integers, exact in floating point
        logw = torch.log(count / self.r)  # log 0 = -inf: never in a common block
        if self.causal:
            logw = logw.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
        return logw


class HybridRule:
    """Exact weights inside the band |p - j| <= w (``BandRule``), collision means beyond
    (``CollisionRule``): E[weight] = f(|p - j|) everywhere, the near field without variance."""

    def __init__(self, band: BandRule, far: CollisionRule) -> None:
        self.band, self.far = band, far
        self.row_bytes = far.row_bytes

    @property
    def span(self) -> float:
        return max(self.band.span, self.far.span)

    def tile_ranges(self, firsts: Tensor, lasts: Tensor) -> tuple[list[int], list[int]]:
        (blo, bhi), (flo, fhi) = self.band.tile_ranges(firsts, lasts), self.far.tile_ranges(firsts, lasts)
        return [min(a, b) for a, b in zip(blo, flo)], [max(a, b) for a, b in zip(bhi, fhi)]

    def log_weight(self, pos_q: Tensor, pos_k: Tensor, dtype: torch.dtype) -> Tensor:
        near = (pos_q[:, None] - pos_k[None, :]).abs() <= self.band.width
        return torch.where(near, self.band.log_weight(pos_q, pos_k, dtype), self.far.log_weight(pos_q, pos_k, dtype))


def collision_rules(spec: AttentionSpec):
    """One ``CollisionRule`` per head, built when the engine reaches the head (a generator)."""
    return (CollisionRule(spec.partitions.head(h), spec.causal) for h in range(spec.num_heads))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Tiled one-pass attention for every method (see module docstring).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32, float64 for float64 inputs).
    """
    if takes_few_rows(q, k, spec.kernels):
        return few_rows_attention(q, k, v, spec)
    if spec.rule.only_collisions:
        rules = collision_rules(spec)
    elif spec.rule.near_far:
        rules = (HybridRule(b, c) for b, c in zip(band_rules(spec, k.shape[2]), collision_rules(spec)))
    else:
        rules = band_rules(spec, k.shape[2])
    return tiled_attention(q, k, v, spec, rules)


def takes_few_rows(q: Tensor, k: Tensor, kernels: tuple | None = None) -> bool:
    """Whether ``fused_attention`` runs a call as ``few_rows_attention``: at most ``DECODE_ROWS`` query
    rows, ALiBi weights (``kernels``, the spec's, None), and [B, H, Nq, Nk] scores (counted at 8 bytes: the
    scores and the weights of the same size live at once) within ``tiled.TILE_BYTES`` or the keys' own
    bytes: a decoding row's scores are a small part of its cache (2 / D of it for 4 query heads per KV
    head in bf16), and the tiled path took 1.6x as long for one row (H = 32 at 64K keys on a CPU: 430 ms
    in 96 tiles against 263, the time of reading K and V)."""
    b, h, nq, _ = q.shape
    scores = b * h * nq * (k.shape[2] + 1) * 8
    return nq <= DECODE_ROWS and kernels is None and scores <= max(tiled.TILE_BYTES, k.numel() * k.element_size())


def few_rows_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                       log_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``fused_attention`` of a few query rows (decoding), every head at once: the weights of
    ``few_rows_log_weights`` [H, Nq, Nk], then one dense softmax (``reference.dense_attention``). Memory
    O(B * H * Nq * Nk): ``fused_attention`` sends a call here only when that fits ``tiled.TILE_BYTES``.
    ALiBi only (``spec.kernels`` None).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].
        log_weights: [H, Nq, Nk] (broadcastable), what ``few_rows_log_weights`` would give, from a caller
            that keeps them (``AttentionPlan``'s decoding table); None: computed here.

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] in the compute dtype).
    """
    if log_weights is None:
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        log_weights = few_rows_log_weights(spec, q.shape[2], k.shape[2], q.device, dtype)
    return dense_attention(q, k, v, spec, log_weights)


def last_row_attention(q: Tensor, k: Tensor, v: Tensor, log_weights: Tensor, scale: float) -> Tensor | None:
    """``few_rows_attention``'s output for one query row per head without its LSE, as three matrix
    operations in the compute dtype: the scores of each KV head's query group against its keys (grouped
    KV by broadcasting, never a copy of the keys per query head), plus the weights, softmax, times V.
    For a decoding step whose row sees at least one key (a causal query at the last key, no padding: its
    own key has weight 1). torch's SDPA with the weights as a float mask took 2-48x as long on a CPU
    (H = 32, 8 KV heads, D = 128: 22 ms against 2.3 ms on 1770 keys, 2.3 s against 48 ms on 16K keys).

    Args:
        q: [B, H, 1, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; log_weights: [H, 1, Nk] (-inf where W = 0).

    Returns:
        out [B, H, 1, Dv] in q's dtype, or None when it is not finite: a non-finite key or value reaches
        the rows that give it weight 0 (0 x inf), so such a call is left to ``few_rows_attention``'s
        careful path.
    """
    b, h, _, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = (x if x.dtype == cdt else x.to(cdt) for x in (q, k, v))
    scores = torch.matmul(qc.reshape(b, hkv, h // hkv, d), kc.transpose(-1, -2))  # [B, Hkv, group, Nk]
    scores.mul_(scale).add_(log_weights.reshape(hkv, h // hkv, nk))
    out = torch.matmul(torch.softmax(scores, dim=-1), vc).reshape(b, h, 1, dv)
    if not math.isfinite(out.sum().item()):
        return None
    return out if out.dtype == q.dtype else out.to(q.dtype)


def few_rows_log_weights(spec: AttentionSpec, nq: int, nk: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """log W of every head for query positions q_offset .. q_offset + Nq - 1 against keys 0 .. Nk - 1:
    [H, Nq, Nk] in ``dtype``, -inf where W = 0. What ``BandRule`` (exact, window, the hybrid's near
    field), ``CollisionRule`` (lsh, the hybrid's far field) and ``HybridRule`` give head by head, for all
    heads in a constant number of tensor operations; the collision counts from the rows' block bounds
    (``Partitions.bounds_at``, [H, r, Nq]) scattered as +1/-1 steps and summed along the keys, O(H * Nq *
    (Nk + r)), never the [H, Nk, Nk] mean mask the reference builds."""
    rule = spec.rule
    pos_q = torch.arange(spec.q_offset, spec.q_offset + nq, device=device)
    diff = pos_q[:, None] - torch.arange(nk, device=device)  # p - j, [Nq, Nk]
    logw = None
    if rule.collisions:
        parts = spec.partitions
        start, end = parts.bounds_at(pos_q, parts.cut_table() if parts.scheme == "cut" else None)  # [H, r, Nq]
        h, r = start.shape[:2]
        steps = torch.zeros(h, nq, nk + 1, dtype=dtype, device=device)
        ones = torch.ones(h, nq, r, dtype=dtype, device=device)
        steps.scatter_add_(2, start.clamp(0, nk).transpose(1, 2), ones)
        steps.scatter_add_(2, end.clamp(0, nk).transpose(1, 2), -ones)
        logw = torch.log(steps[..., :nk].cumsum(-1) / r)  # log 0 = -inf: never in a common block
    if rule.exact_band:
        exact = diff.abs() * spec.slopes.to(device, dtype).neg().view(-1, 1, 1)  # -m_h |p - j|, in dtype
        if rule.bounded:
            w = spec.window.to(device).view(-1, 1, 1)
            outside = diff > w
            if not spec.causal:  # a causal call drops every j > p below anyway
                outside = outside | (diff < -(w if spec.window_right is None else spec.window_right.to(device).view(-1, 1, 1)))
            logw = exact.masked_fill(outside, float("-inf")) if logw is None else torch.where(outside, logw, exact)
        else:
            logw = exact
    if spec.causal:
        logw = logw.masked_fill(diff < 0, float("-inf"))
    return logw


class GridLastRow:
    """log W of the LSH collision counts on grid partitions for one causal query at the last of n keys (a
    decoding step), every head at once: ``few_rows_log_weights``'s row (the reference) in eight tensor
    operations (nine while the keys are fewer than the widest block), where that takes about 25.

    The query at sequence position P lies phi_t = (P + U_t) mod W_t positions past the start of its block in
    sample t, so of the keys P - n + 1 .. P (indices 0 .. n - 1) it shares that block with those from index
    max(0, n - 1 - phi_t) on (causal: the keys end at P). The count of key i is the number of samples whose
    first shared key is at or before i, a cumulative sum of r unit steps, and log(count / r) is a lookup in
    a table of its r + 1 values: no logarithm per key (on the CPU, that of count 0 takes a slow path).
    """

    def __init__(self, widths: Tensor, offsets: Tensor, dtype: torch.dtype) -> None:
        """widths, offsets: the grid's (W, U), int64 [H, r], on the device of the calls; dtype: the weights'."""
        self.widths, self.offsets = widths, offsets
        self.ones = torch.ones_like(widths)
        r = widths.shape[1]
        self.log_mean = torch.log(torch.arange(r + 1, dtype=dtype, device=widths.device) / r)  # log(c / r), c = 0..r
        self.widest = int(widths.max())

    def __call__(self, position: int, n: int) -> Tensor:
        """log W [H, 1, n] (-inf where no block is shared) of the query at sequence position ``position``
        (>= n - 1) over the keys at positions position - n + 1 .. position."""
        phi = (self.offsets + position).remainder_(self.widths)
        if n < self.widest:  # a block may start before the first key (it then shares them all)
            phi = phi.clamp_(max=n - 1)
        h = phi.shape[0]
        steps = torch.zeros(h, n, dtype=torch.int64, device=phi.device)
        count = steps.scatter_add_(1, torch.rsub(phi, n - 1), self.ones).cumsum_(1)
        return self.log_mean.index_select(0, count.view(-1)).view(h, 1, n)


def supports_fused(q: Tensor, spec: AttentionSpec) -> bool:
    """Every method, dtype and device."""
    return True
