"""How a sequence is laid out over ranks, and helpers to shard and gather tensors accordingly.

* ``"contiguous"``: rank r holds positions [s_r, e_r), in rank order; lengths may differ (``shard``
  splits as evenly as possible, the first N mod W ranks one longer).
* ``"zigzag"`` (exact causal attention only): the sequence is cut into 2W near-equal chunks and rank r
  holds chunks r and 2W-1-r, concatenated. Under a causal mask the contiguous ring does r + 1 blocks'
  work on rank r (the last rank waits on every step's slowest); with zigzag every rank holds one early
  and one late chunk, so every rank does the same work on every step (up to one chunk's rounding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .plan import shard_bounds

__all__ = ["LAYOUTS", "even_lengths", "rank_segments", "shard_positions", "shard", "gather"]

LAYOUTS = ("contiguous", "zigzag")


def even_lengths(n: int, parts: int) -> list[int]:
    """n split into ``parts`` lengths differing by at most one, the longer first."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def rank_segments(lengths: list[int], layout: str) -> list[list[tuple[int, int, int]]]:
    """Per rank, the global position ranges it holds: [(start, stop, local offset), ...].

    ``lengths``: every rank's local length (for zigzag, they must be what ``shard`` gives)."""
    if layout == "contiguous":
        bounds = shard_bounds(lengths)
        return [[(bounds[r], bounds[r + 1], 0)] for r in range(len(lengths))]
    world, total = len(lengths), sum(lengths)
    chunks = even_lengths(total, 2 * world)
    starts = shard_bounds(chunks)
    out = []
    for r in range(world):
        a, b = r, 2 * world - 1 - r
        out.append([(starts[a], starts[a + 1], 0), (starts[b], starts[b + 1], chunks[a])])
    expected = [chunks[r] + chunks[2 * world - 1 - r] for r in range(world)]
    if lengths != expected:
        raise ValueError(f"layout='zigzag' needs the shard lengths that shard(..., layout='zigzag') gives for "
                         f"N={total} on {world} ranks, {expected}; got {lengths}")
    return out


def shard_positions(n: int, world: int, rank: int, layout: str = "contiguous") -> Tensor:
    """Global positions (int64 [n_r]) that ``rank`` holds, in its local order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "contiguous":
        lengths = even_lengths(n, world)
    else:
        chunks = even_lengths(n, 2 * world)
        lengths = [chunks[r] + chunks[2 * world - 1 - r] for r in range(world)]
    return torch.cat([torch.arange(a, b) for a, b, _ in rank_segments(lengths, layout)[rank]])


def shard(x: Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """This rank's part of a full-sequence tensor (sequence along ``dim``)."""
    return x.index_select(dim, shard_positions(x.shape[dim], world, rank, layout).to(x.device))


def gather(x: Tensor, group=None, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full-sequence tensor from every rank's shard (uneven lengths allowed): an all-gather.

    For checking and tests; not counted as attention traffic."""
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[dim]], device=x.device)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lengths, n, group=group)
    lengths = [int(t) for t in lengths]
    longest = max(lengths)
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, longest - x.shape[dim]]
    padded = torch.nn.functional.pad(x, pad) if longest > x.shape[dim] else x.contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    pieces = [p.narrow(dim, 0, m) for p, m in zip(parts, lengths)]
    local = torch.cat(pieces, dim)
    if layout == "contiguous":
        return local
    order = torch.cat([torch.arange(a, b) for segs in rank_segments(lengths, layout) for a, b, _ in segs])
    out = torch.empty_like(local)
    out.index_copy_(dim, order.to(x.device), local)
    return out
