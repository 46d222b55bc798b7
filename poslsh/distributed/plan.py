"""Which keys each shard of a sequence needs, and from whom: pure integer arithmetic, no communication.

The global sequence has positions 0..N-1, cut into contiguous shards [s_r, e_r) in rank order. For
window, lsh and hybrid attention the keys with nonzero weight for query p of head h form one interval
(the *reach* of p)

* window: [p - w_h, p + w_h] (causal: [p - w_h, p]);
* lsh:    [min_t start_t(p), max_t end_t(p)), the union of p's r blocks (causal: clipped at p);
* hybrid: the union of the two,

and both ends are non-decreasing in p (block starts and ends are). So a shard's queries need the keys
[reach_lo(s), reach_hi(e - 1)), per head: its halo is what lies outside [s, e). For a grid sample
start_t(s) = floor((s + U)/W) W - U, so the left halo of a shard is at most max W - 1 keys, and the exact
need is computed from (W, U) at the shard's first position; the cut scheme looks up the last cut <= s.

Every rank computes the same ``HaloPlan`` from the shard lengths and the shared partitions: what it
receives from each owner, what it sends to each consumer (halos longer than the neighbouring shard
reach further owners directly), and how its queries split into an *interior* (every reach inside the
shard: computable before the halo arrives) and left / right *edges* (the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..attention.ranges import Support, key_ranges_at
from ..hashing import Partitions

__all__ = ["Reach", "Segment", "HaloPlan", "plan_halo", "shard_bounds"]


def shard_bounds(lengths: list[int]) -> list[int]:
    """Shard starts and the total: [0, n_0, n_0 + n_1, ..., N] for shard lengths n_r."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return bounds


@dataclass(frozen=True)
class Reach:
    """The positional reach of every query head: ``window`` int64 [H] half-widths (window, hybrid) and/or
    global ``partitions`` (lsh, hybrid); ``n`` the global length."""

    n: int
    causal: bool
    window: Tensor | None = None
    partitions: Partitions | None = None

    @property
    def method(self) -> str:
        if self.window is not None and self.partitions is not None:
            return "hybrid"
        return "window" if self.window is not None else "lsh"

    def bounds(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        """Keys [lo, hi) reached by query position p, per head: int64 [H, P] each, within [0, n)
        (``poslsh.attention.ranges``, the one definition of a query's reach, for rows [p, p])."""
        pos = torch.tensor(positions, dtype=torch.int64)
        support = Support(self.method, self.causal, 0, self.window, self.partitions)
        r = key_ranges_at(support, pos, pos, self.n, torch.device("cpu"), full=False)
        return r.lo, r.hi

    def interior(self, s: int, e: int) -> tuple[int, int]:
        """[a, b): the queries of the shard [s, e) whose reach lies inside it in every head.

        Band: p - w_h >= s iff p >= s + w_h, and p + w_h < e iff p < e - w_h. Blocks: p's blocks all start
        at or after s iff p >= end_t(s - 1) for every t (the blocks holding s - 1 end there), and all
        end at or before e iff p < start_t(e) for every t."""
        a, b = s, e
        left, right = s > 0, not self.causal and e < self.n
        if self.window is not None:
            a = max(a, s + int(self.window.max())) if left else a
            b = min(b, e - int(self.window.max())) if right else b
        if self.partitions is not None and (left or right):
            start, end = self.partitions.bounds_at(torch.tensor([max(s - 1, 0), min(e, self.n - 1)]))
            a = max(a, int(end[..., 0].max())) if left else a
            b = min(b, int(start[..., 1].min())) if right else b
        return min(a, e), max(b, s)


@dataclass(frozen=True)
class Segment:
    """Queries [q0, q1) of a shard computed against keys [k0, k1) (global positions); ``edge`` when the
    keys reach outside the shard (computed once the halo has arrived)."""

    q0: int
    q1: int
    k0: int
    k1: int
    edge: bool


@dataclass(frozen=True)
class HaloPlan:
    """One rank's part of the exchange.

    Attributes:
        rank, bounds: this rank and every shard's [bounds[r], bounds[r + 1]).
        need_lo, need_hi: int [Hkv]: keys [need_lo[g], need_hi[g]) of KV head g this rank reads.
        window: (lo, hi) = (min need_lo, max need_hi): the span of its (zero-filled) halo buffers.
        recv: {owner: [(g, lo, hi), ...]} key slices (global positions) to receive.
        send: {consumer: [(g, lo, hi), ...]} slices of this rank's keys to send.
        segments: the shard's queries in order: left edge, interior, right edge (or one edge).
    """

    rank: int
    bounds: list[int]
    need_lo: list[int]
    need_hi: list[int]
    window: tuple[int, int]
    recv: dict[int, list[tuple[int, int, int]]]
    send: dict[int, list[tuple[int, int, int]]]
    segments: list[Segment]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]


def _needs(reach: Reach, bounds: list[int], group: int, uniform: bool) -> list[tuple[list[int], list[int]]]:
    """Per shard: keys [lo_g, hi_g) its queries read, per KV head (the widest of its query heads), from
    one evaluation of the reach at every shard's first and last position."""
    w = len(bounds) - 1
    lo, hi = reach.bounds(bounds[:-1] + [b - 1 for b in bounds[1:]])  # [H, 2W]
    lo = lo[:, :w].reshape(-1, group, w).amin(1)  # [Hkv, W]
    hi = hi[:, w:].reshape(-1, group, w).amax(1)
    if uniform:  # one halo length for every head: the widest reach
        lo, hi = lo.amin(0, keepdim=True).expand_as(lo), hi.amax(0, keepdim=True).expand_as(hi)
    lo, hi = lo.T.tolist(), hi.T.tolist()
    return list(zip(lo, hi))


def _overlaps(need_lo: list[int], need_hi: list[int], s: int, e: int, a: int, b: int) -> list[tuple[int, int, int]]:
    """Slices of [a, b) (the owner's shard) that a consumer with shard [s, e) and needs [lo_g, hi_g) reads."""
    out = []
    for g, (lo, hi) in enumerate(zip(need_lo, need_hi)):
        for x, y in ((max(lo, a), min(s, b)), (max(e, a), min(hi, b))):  # left halo, right halo
            if x < y:
                out.append((g, x, y))
    return out


def _segments(reach: Reach, s: int, e: int) -> list[Segment]:
    """Left edge [s, a), interior [a, b), right edge [b, e) (``Reach.interior``), each with the key range
    its queries reach: [reach_lo(first query), reach_hi(last query)) over every head."""
    a, b = reach.interior(s, e)
    pos = [s, max(a - 1, s), min(a, e - 1), max(b - 1, s), min(b, e - 1), e - 1]
    lo, hi = reach.bounds(pos)
    lo, hi = lo.amin(0).tolist(), hi.amax(0).tolist()
    if a >= b:  # no interior (a shard shorter than its reach): one edge
        return [Segment(s, e, lo[0], hi[5], True)]
    segs = [Segment(s, a, lo[0], hi[1], True)] if a > s else []
    segs.append(Segment(a, b, lo[2], hi[3], False))
    if b < e:
        segs.append(Segment(b, e, lo[4], hi[5], True))
    return segs


def plan_halo(reach: Reach, lengths: list[int], rank: int, kv_heads: int, uniform: bool = False) -> HaloPlan:
    """This rank's ``HaloPlan`` for shards of the given lengths (every rank computes the same needs).

    Args:
        reach: the method's reach (global window widths and/or partitions).
        lengths: shard length of every rank, each >= 1, summing to reach.n.
        rank: this rank.
        kv_heads: Hkv; query head h reads KV head h // (H / Hkv).
        uniform: one halo length for every KV head (the widest) instead of each head's own.
    """
    bounds = shard_bounds(lengths)
    num_heads = (reach.window if reach.window is not None else reach.partitions.slopes).numel()
    group = num_heads // kv_heads
    needs = _needs(reach, bounds, group, uniform)
    s, e = bounds[rank], bounds[rank + 1]
    recv, send = {}, {}
    for other in range(len(lengths)):
        if other == rank:
            continue
        a, b = bounds[other], bounds[other + 1]
        mine = _overlaps(*needs[rank], s, e, a, b)
        if mine:
            recv[other] = mine
        theirs = _overlaps(*needs[other], a, b, s, e)
        if theirs:
            send[other] = theirs
    lo, hi = needs[rank]
    return HaloPlan(rank, bounds, lo, hi, (min(lo), max(hi)), recv, send, _segments(reach, s, e))
