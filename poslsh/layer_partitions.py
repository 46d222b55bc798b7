"""Positional-LSH partitions fixed per layer for every sequence length (evaluation, cached decoding).

``LayerPartitions(slopes, samples, scheme, seed, layer).get(n)`` returns the partitions of positions
0..n-1; those of n are the restriction of those of any m > n, whatever was asked first:

* grid: the widths and offsets of each head and sample are drawn once from (seed, layer) (jointly
  iid, stratified or lattice: ``sampling``); the block of position i is floor((i + U) / W) for every
  length.
* cut: every gap is cut independently with probability 1 - e^{-m}; the cuts among positions
  [c*C, (c+1)*C) (C = ``CUT_CHUNK``) are drawn from their own generator seeded by (seed, layer, c),
  so the cuts of a prefix never depend on how long a sequence was requested.

The partitions asked for are kept for the ``cache_size`` most recently used (length, device) pairs
(an LRU): decoding asks for every length once, evaluation for a few lengths again and again. The
transformers patch (``integrations.hf``), ``nn.ALiBiAttention`` in eval mode and the LM through it
all draw their fixed partitions here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from .checks import as_int
from .hashing import Partitions, check_scheme, sample_partitions
from .seeds import seed_for

__all__ = ["LayerPartitions", "CUT_CHUNK"]

CUT_CHUNK = 4096


class LayerPartitions:
    """Fixed positional-LSH partitions of one layer, for any sequence length.

    The partitions for n positions are the restriction of those for any longer sequence, so
    cached decoding and full recomputation agree.
    """

    def __init__(self, slopes: Tensor, samples: int, scheme: str, seed: int, layer: int,
                 sampling: str = "iid", cache_size: int = 64) -> None:
        check_scheme(scheme, sampling)
        self.slopes, self.samples, self.scheme, self.seed, self.layer = slopes, samples, scheme, seed, layer
        self.cache_size = cache_size
        self._grid: tuple[Tensor, Tensor] | None = None
        self._grid_copies: dict = {}  # device, and its text as ``get`` is given it -> (W, U) there
        self._chunks: list[tuple[Tensor, Tensor]] = []  # per chunk: (row ids, positions) of its cuts
        self._cache: OrderedDict[tuple, Partitions] = OrderedDict()
        self._first_reachable: tuple[int, int, int] | None = None  # grid: (from t, until t, the value)
        if scheme == "grid":
            g = torch.Generator().manual_seed(seed_for(seed, layer, "grid"))
            p = sample_partitions(1, slopes, samples, scheme="grid", generator=g, sampling=sampling)
            self._grid = (p.widths, p.offsets)  # (W, U) do not depend on the length

    def _cut_chunk(self, c: int) -> tuple[Tensor, Tensor]:
        while len(self._chunks) <= c:
            k = len(self._chunks)
            g = torch.Generator().manual_seed(seed_for(self.seed, self.layer, "cut", k))
            # Cuts of a fresh sequence of CUT_CHUNK + 1 positions sit at 1..CUT_CHUNK; shifted they are
            # the block starts among positions k*C .. k*C + C - 1 (each gap cut independently).
            p = sample_partitions(CUT_CHUNK + 1, self.slopes, self.samples, scheme="cut", generator=g)
            rows = torch.repeat_interleave(torch.arange(p.cut_pointers.numel() - 1), p.cut_pointers.diff())
            pos = p.cut_positions + k * CUT_CHUNK - 1
            keep = pos >= 1  # position 0 always starts a block; it is not a cut
            self._chunks.append((rows[keep], pos[keep]))
        return self._chunks[c]

    def get(self, n: int, device: torch.device | str = "cpu") -> Partitions:
        """Partitions of positions 0..n-1 for every head, index tensors on ``device``."""
        key = (n, str(device))
        if key in self._cache:
            return self._recall(key)
        if self.scheme == "grid":
            # The same (W, U) tensors on a device for every length, so users of the partitions can tell
            # that two lengths share them (poslsh.attention's plans are keyed by their identity).
            w, u = self._grid_on(device)  # checked when drawn; n here:
            n = as_int(n, "n", minimum=1)
            return self._remember(key, Partitions._unchecked(n=n, slopes=self.slopes, scheme="grid", widths=w,
                                                             offsets=u))
        else:
            chunks = [self._cut_chunk(c) for c in range((n - 1) // CUT_CHUNK + 1)]
            rows = torch.cat([r for r, _ in chunks])
            pos = torch.cat([p for _, p in chunks])
            keep = pos < n
            parts = self._cut(n, rows[keep], pos[keep])
        return self._remember(key, parts.to(device))

    def _grid_on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """The grid's (W, U) on ``device``, copied there once (found by the device as given: a decode
        step's lookup builds no ``torch.device``)."""
        found = self._grid_copies.get(device)
        if found is None:
            where = torch.device(device)
            if where not in self._grid_copies:
                w, u = self._grid
                self._grid_copies[where] = (w.to(where), u.to(where))
            found = self._grid_copies[device] = self._grid_copies[where]
        return found

    def window(self, start: int, n: int, device: torch.device | str = "cpu") -> Partitions:
        """Partitions of positions start..start+n-1, re-indexed to 0..n-1 (for a cache whose first
        ``start`` positions were evicted): the same blocks, cut to the window."""
        if start == 0:
            return self.get(n, device)
        key = (start, n, str(device))
        if key in self._cache:
            return self._recall(key)
        if self.scheme == "grid":
            w, u = self._grid
            # floor((i + start + U) / W) = floor((i + (start + U) mod W) / W) + const: the same blocks.
            parts = Partitions(n, self.slopes, "grid", widths=w, offsets=torch.remainder(u + start, w))
        else:
            full = self.get(start + n)
            rows = torch.repeat_interleave(torch.arange(full.cut_pointers.numel() - 1), full.cut_pointers.diff())
            keep = full.cut_positions > start
            parts = self._cut(n, rows[keep], full.cut_positions[keep] - start)
        return self._remember(key, parts.to(device))

    def _cut(self, n: int, rows: Tensor, pos: Tensor) -> Partitions:
        """Cut-scheme partitions of n positions from cuts given as (head * samples + sample, position)."""
        order = torch.argsort(rows * (n + 1) + pos)
        rows, pos = rows[order], pos[order]
        pointers = torch.zeros(self.slopes.numel() * self.samples + 1, dtype=torch.int64)
        pointers[1:] = torch.bincount(rows, minlength=self.slopes.numel() * self.samples).cumsum(0)
        return Partitions(n, self.slopes, "cut", cut_positions=pos, cut_pointers=pointers)

    @property
    def cached(self) -> tuple[tuple, ...]:
        """The keys ((n, device) or (start, n, device)) whose partitions are kept, least recent first."""
        return tuple(self._cache)

    def _recall(self, key: tuple) -> Partitions:
        self._cache.move_to_end(key)
        return self._cache[key]

    def _remember(self, key: tuple, parts: Partitions) -> Partitions:
        self._cache[key] = parts
        while len(self._cache) > self.cache_size:  # bounded: the least recently used goes
            self._cache.popitem(last=False)
        return parts

    def block_starts_at(self, t: int) -> Tensor:
        """Start of the block holding position ``t`` in every head and sample: int64 [H, r]."""
        if self.scheme == "grid":
            w, u = self._grid
            return (torch.div(t + u, w, rounding_mode="floor") * w - u).clamp(min=0)
        parts = self.get(t + 1)
        h, r = self.slopes.numel(), self.samples
        rows = torch.repeat_interleave(torch.arange(h * r), parts.cut_pointers.diff())
        start = torch.zeros(h * r, dtype=torch.int64)
        start.scatter_reduce_(0, rows, parts.cut_positions, reduce="amax")  # the last cut <= t, else 0
        return start.reshape(h, r)

    def first_reachable(self, t: int) -> int:
        """The smallest of ``block_starts_at(t)`` over heads and samples: the first position any query at
        position >= t can share a block with.

        Grid: the block starts t - (t + U) mod W never decrease with t, so the smallest holds until a block
        attaining it ends: kept with that range, it is computed again only past it (eviction asks it of
        every layer at every decoding step; tensor operations cost ~20-50 us a step on the host, a range
        check nothing)."""
        if self.scheme == "grid":
            known = self._first_reachable
            if known is not None and known[0] <= t < known[1]:
                return known[2]
            w, u = self._grid
            starts = t - torch.remainder(u + t, w)  # [H, r], unclipped
            first = int(starts.min())
            until = int((starts + w)[starts == first].min())  # the first end of a block that attains it
            self._first_reachable = (t, until, max(0, first))
            return max(0, first)
        return int(self.block_starts_at(t).min())
