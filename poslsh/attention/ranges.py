"""Where a method's weights are nonzero, tile by tile: the one place for per-query-tile key ranges.

Every method's nonzero weights in a query row p are one interval of keys containing p (causal: ending
at p): exact, everything; window, the band |p - j| <= w_h; lsh, the union of the r blocks holding p
(all contain p, so their union is an interval); hybrid, the union of both. For a tile of query rows at
positions [pa, pb] (the Triton kernels' BLOCK_M rows, FlexAttention's query blocks) this module gives,
per (head, tile),

* ``[lo, hi)``: every key with a nonzero weight for some row of the tile;
* ``[flo, fhi)``, inside it: keys that every row of the tile sees with the weight given by the score
  alone, no per-element mask: the band's keys within w_h of every row, for lsh the intersection of the
  r blocks of every row (collision count r: c = 1), for hybrid the union of those two (when both are
  non-empty they share the tile's middle, so the union is one interval; this is the Triton kernel's
  ``_plain_range``); causal, also keys <= pa.

Both come from block bounds at the tile's first and last rows: block starts and ends are
non-decreasing in the position, so the union of the rows' blocks is [min_t s_t(pa), max_t e_t(pb)) and
their intersection [max_t s_t(pb), min_t e_t(pa)). Grid partitions give them from the two scalars
(W, U) per head and sample, never forming [H, r, n]; cut partitions by a binary search in the cut
lists (both ``Partitions.bounds_at``), and the per-row summaries one head at a time. Membership is
symmetric (j is in p's block iff p is in j's), so the query rows that reach a key tile (the backward
pass's dK/dV loop) come from the same bounds (``query_ranges``).

Bounds are key positions 0..Nk; query row i sits at position q_offset + i (q_offset = Nk - Nq, so a
decoding query is the last position). Outputs are int64 [H, T] (exact: [1, T], the same for every
head) with lo <= flo <= fhi <= hi (an empty full part has flo == fhi).

The tile walk of the Triton kernels and of FlexAttention's block masks (``key_tiles``): key tiles
[floor(lo / N), ceil(hi / N)) are visited; those inside [ceil(flo / N), floor(fhi / N)) are plain
(FlexAttention's "full" blocks), the rest need the per-element mask (boundary tiles).

Any object with the attributes ``method``, ``causal``, ``q_offset``, ``window`` and ``partitions`` can
be passed as ``spec``: an ``AttentionSpec``, or a ``Support`` for callers without one (an experiment's
list of window widths, partitions alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..hashing import Partitions, normalize_grid
from ..mask_errors import select_head
from ..method import method_rule

__all__ = ["Support", "TileRanges", "normalize_grid", "block_bounds_at", "key_ranges", "key_ranges_at",
           "query_ranges", "key_tiles", "nonzero_pairs", "split_pairs", "computed_tiles"]

# Elements of [H, r, rows] bounds per chunk of rows in the per-row summaries (not [H, r, Nq] at once).
CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True, eq=False)
class Support:
    """What the nonzero pattern of a method's weights depends on (a subset of ``AttentionSpec``).

    Attributes:
        method: "exact", "window", "lsh" or "hybrid".
        causal: keys j <= p only.
        q_offset: key position of query row 0 (Nk - Nq).
        window: int [H] band half-widths ("window", "hybrid"), else None.
        partitions: ``Partitions`` over the Nk keys ("lsh", "hybrid"), else None.
        window_right: int [H], the band's right side where it differs from ``window`` (keys
            p - window[h] <= j <= p + window_right[h]), else None.
    """

    method: str
    causal: bool
    q_offset: int = 0
    window: Tensor | None = None
    partitions: Partitions | None = None
    window_right: Tensor | None = None


class TileRanges(NamedTuple):
    """Per (head, tile): all reached positions [lo, hi) and the full part [flo, fhi); int64 [H or 1, T]."""

    lo: Tensor
    hi: Tensor
    flo: Tensor
    fhi: Tensor


def block_bounds_at(partitions: Partitions, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Start and one-past-end of the block holding each of ``positions`` (int [P], in 0..n-1), per head
    and sample: int64 [H, r, P] each, without forming [H, r, n] (``Partitions.bounds_at``)."""
    return partitions.bounds_at(positions)


def _num_heads(spec) -> int:
    if spec.partitions is not None:
        return spec.partitions.num_heads
    if spec.window is not None:
        return spec.window.numel()
    return getattr(spec, "num_heads", 1)


def _around(spec, a: Tensor, b: Tensor, n: int, device: torch.device, full: bool = True,
            keys: bool = False) -> TileRanges:
    """Positions sharing a block / inside the band with some of [a, b] (lo, hi) and with all of them
    (flo, fhi; with ``full`` False left empty, flo = fhi = lo), before causal clipping; a, b int64 [T]
    (a <= b), positions 0..n-1. Block membership is symmetric; an asymmetric band (``window_right``)
    is not: for a tile of ``keys`` its sides swap (key j is seen from p in [j - right, j + left])."""
    rule = method_rule(spec.method)
    if rule.all_exact:
        lo, hi = torch.zeros_like(a)[None], torch.full_like(a, n)[None]
        return TileRanges(lo, hi, lo, hi)
    if rule.bounded:
        w = spec.window.to(device=device, dtype=torch.int64)[:, None]
        right = getattr(spec, "window_right", None)
        r = w if right is None else right.to(device=device, dtype=torch.int64)[:, None]
        if keys:
            w, r = r, w
        band = TileRanges((a - w).clamp(min=0), (b + r + 1).clamp(max=n), (b - w).clamp(min=0),
                          (a + r + 1).clamp(max=n))
        if not rule.collisions:
            return band
    sa, ea = block_bounds_at(spec.partitions, a)
    sb, eb = (sa, ea) if b is a else block_bounds_at(spec.partitions, b)
    lo = sa.amin(1).to(device=device, dtype=torch.int64)
    hi = eb.amax(1).to(device=device, dtype=torch.int64)
    if not full:
        if rule.near_far:
            lo, hi = torch.minimum(lo, band.lo), torch.maximum(hi, band.hi)
        return TileRanges(lo, hi, lo, lo)
    blocks = TileRanges(lo, hi, sb.amax(1).to(device=device, dtype=torch.int64),
                        ea.amin(1).to(device=device, dtype=torch.int64))
    if rule.only_collisions:
        return blocks
    # Hybrid: the union of the band and the blocks; full where every pair is near or in every block.
    near = band.flo < band.fhi
    both = near & (blocks.flo < blocks.fhi)
    flo = torch.where(near, torch.where(both, torch.minimum(blocks.flo, band.flo), band.flo), blocks.flo)
    fhi = torch.where(near, torch.where(both, torch.maximum(blocks.fhi, band.fhi), band.fhi), blocks.fhi)
    return TileRanges(torch.minimum(blocks.lo, band.lo), torch.maximum(blocks.hi, band.hi), flo, fhi)


def _tiles(count: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last index of each tile of ``block`` rows over 0..count-1: int64 [T] each."""
    first = torch.arange(0, count, block, device=device)
    return first, torch.clamp(first + block - 1, max=count - 1)


def _device(spec, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return spec.partitions.device if spec.partitions is not None else torch.device("cpu")


def key_ranges_at(spec, pa: Tensor, pb: Tensor, nk: int, device: torch.device, full: bool = True) -> TileRanges:
    """Keys reached by query rows whose positions run from pa to pb (per head, elementwise over the
    tensors of positions): lo/hi over all of them, flo/fhi by every one (``full``; else lo, hi only)."""
    lo, hi, flo, fhi = _around(spec, pa, pb, nk, device, full)
    if spec.causal:
        hi = torch.minimum(hi, pb + 1)
        fhi = torch.minimum(fhi, pa + 1)
    return TileRanges(lo, hi, flo, torch.maximum(fhi, flo))


def key_ranges(spec, nq: int, nk: int, block_m: int, device: torch.device | str | None = None) -> TileRanges:
    """Key positions per (head, query tile of ``block_m`` rows): see the module docstring.

    Args:
        spec: an ``AttentionSpec`` or ``Support``; nq, nk: query and key lengths; block_m: rows per tile.
        device: where to compute (default: the partitions' device, else the CPU).

    Returns:
        ``TileRanges`` of int64 [H, ceil(nq / block_m)] ([1, ...] for exact), positions in 0..nk.
    """
    dev = _device(spec, device)
    first, last = _tiles(nq, block_m, dev)
    return key_ranges_at(spec, first + spec.q_offset, last + spec.q_offset, nk, dev)


def query_ranges(spec, nq: int, nk: int, block_n: int, device: torch.device | str | None = None) -> TileRanges:
    """Query rows per (head, key tile of ``block_n`` keys): [lo, hi) holds every row with a nonzero
    weight on some key of the tile, [flo, fhi) the rows that weight every key of the tile by the score
    alone (the transpose of ``key_ranges``, for the dK/dV pass).

    Returns:
        ``TileRanges`` of int64 [H, ceil(nk / block_n)] ([1, ...] for exact), query rows in 0..nq.
    """
    dev = _device(spec, device)
    ka, kb = _tiles(nk, block_n, dev)
    lo, hi, flo, fhi = _around(spec, ka, kb, nk, dev, keys=True)
    if spec.causal:  # queries at or after the tile's first key (all of them: its last)
        lo = torch.maximum(lo, ka)
        flo = torch.maximum(flo, kb)
    qoff = spec.q_offset
    lo = (lo - qoff).clamp(0, nq)
    hi = torch.maximum((hi - qoff).clamp(0, nq), lo)
    flo = torch.minimum(torch.maximum(flo - qoff, lo), hi)
    fhi = torch.minimum(torch.maximum(fhi - qoff, flo), hi)
    return TileRanges(lo, hi, flo, fhi)


def key_tiles(ranges: TileRanges, block_n: int) -> TileRanges:
    """Positions -> tiles of ``block_n``: visited tiles [lo, hi) = [floor(lo/N), ceil(hi/N)), plain
    (FlexAttention "full") tiles [flo, fhi) = [ceil(flo/N), floor(fhi/N)) clipped into them."""
    lo = torch.div(ranges.lo, block_n, rounding_mode="floor")
    hi = torch.maximum(-torch.div(-ranges.hi, block_n, rounding_mode="floor"), lo)
    flo = torch.minimum(torch.maximum(-torch.div(-ranges.flo, block_n, rounding_mode="floor"), lo), hi)
    fhi = torch.minimum(torch.maximum(torch.div(ranges.fhi, block_n, rounding_mode="floor"), flo), hi)
    return TileRanges(lo, hi, flo, fhi)


def computed_tiles(spec, nq: int, nk: int, block_m: int, block_n: int) -> dict[str, int]:
    """Key tiles a kernel walking ``key_ranges`` visits, summed over heads and query tiles (batch 1).

    Returns:
        {"boundary": tiles needing the per-element mask, "interior": plain tiles (inside the full part),
         "pairs": (boundary + interior) * block_m * block_n}; for lsh and hybrid the same numbers as
        ``triton_lsh.tile_counts``.
    """
    t = key_tiles(key_ranges(spec, nq, nk, block_m), block_n)
    heads = _num_heads(spec) if t.lo.shape[0] == 1 else 1
    interior = int((t.fhi - t.flo).sum()) * heads
    boundary = int((t.hi - t.lo).sum()) * heads - interior
    return {"boundary": boundary, "interior": interior, "pairs": (boundary + interior) * block_m * block_n}


def nonzero_pairs(spec, nq: int, nk: int, device: torch.device | str | None = None) -> Tensor:
    """(query, key) pairs with a nonzero weight, per head: int64 [H]. Divided by nq: the method's keys
    per query (lsh: the union of the r blocks; what the fused estimator evaluates)."""
    dev = _device(spec, device)
    total = torch.zeros(_num_heads(spec), dtype=torch.int64, device=dev)
    for heads, part, pos in _row_chunks(spec, nq, dev):
        r = key_ranges_at(part, pos, pos, nk, dev, full=False)
        total[heads] += (r.hi - r.lo).sum(-1)
    return total


def split_pairs(spec, nq: int, nk: int, device: torch.device | str | None = None) -> Tensor:
    """Pairs the split estimator evaluates (r block-local passes), per head: int64 [H], the sum over
    samples and query rows of the row's block size (causal: its keys <= p). lsh only."""
    if spec.partitions is None:
        raise ValueError(f"split_pairs needs partitions (method 'lsh'), got method={spec.method!r}")
    dev = _device(spec, device)
    total = torch.zeros(spec.partitions.num_heads, dtype=torch.int64, device=dev)
    for heads, part, pos in _row_chunks(spec, nq, dev):
        s, e = block_bounds_at(part.partitions, pos)
        end = pos + 1 if spec.causal else e
        total[heads] += (end - s).to(dev).sum((-1, -2))
    return total


def _row_chunks(spec, nq: int, device: torch.device):
    """(heads, spec of those heads, positions of some query rows) covering every head and row: grid and
    the band in chunks of CHUNK_ELEMENTS / (H r) rows; cut one head at a time over all rows (its
    bounds [1, r, n] from one scan are cheaper than binary searches)."""
    parts = spec.partitions
    if parts is not None and parts.scheme == "cut":
        pos = torch.arange(nq, device=device) + spec.q_offset
        for h in range(parts.num_heads):
            window = None if spec.window is None else spec.window[h:h + 1]
            yield slice(h, h + 1), Support(spec.method, spec.causal, spec.q_offset, window, select_head(parts, h)), pos
        return
    per_row = _num_heads(spec) * (parts.num_samples if parts is not None else 1)
    step = max(1, CHUNK_ELEMENTS // per_row)
    for start in range(0, nq, step):
        yield slice(None), spec, torch.arange(start, min(start + step, nq), device=device) + spec.q_offset
