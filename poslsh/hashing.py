"""Positional LSH: random hashes of positions 0..n-1 into contiguous buckets with
P[h(i) = h(j)] = q^|i - j|, q = e^{-m}, one independent hash per head and sample.

Two exact schemes (see ../shared/DESIGN.md):

* ``"grid"``: width W = 1 + G1 + G2 with G1, G2 i.i.d. geometric (failures before a success of
  probability 1 - q), offset U uniform on {0..W-1}, h(i) = floor((i + U) / W). Every block has the
  same width, so a sample is two integers whatever n is. Given W, two positions d apart collide
  with probability (1 - d/W)+, and sum_w w (1-q)^2 q^(w-1) (1 - d/w)+ = q^d.
* ``"cut"``: cut each of the n - 1 gaps independently with probability 1 - q. Blocks have geometric
  lengths; a sample is the list of its cut positions, drawn as cumulative geometric gaps so the cost
  is the number of cuts, not n.

Slope 0 means q = 1: one block covering every position (stored as an unbounded grid width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .alibi import _check_length, check_slopes

__all__ = ["Partitions", "sample_partitions", "SCHEMES"]

SCHEMES = ("grid", "cut")

# Stands for an infinite grid width (slope 0): far beyond any sequence length, small enough that
# i + U never overflows int64.
UNBOUNDED_WIDTH = 2**62


def _geometric(shape: tuple[int, ...], slope: Tensor, generator: torch.Generator | None) -> Tensor:
    """Failures before a success of probability 1 - e^{-slope}: P(G >= k) = e^{-slope k}, int64.

    Inversion: G = floor(-log(u) / slope) with u uniform on (0, 1]. ``slope`` broadcasts against
    ``shape``; slope 0 gives UNBOUNDED_WIDTH.
    """
    u = 1.0 - torch.rand(shape, dtype=torch.float64, generator=generator)  # (0, 1]
    g = torch.floor(-torch.log(u) / slope)
    return g.clamp(max=float(UNBOUNDED_WIDTH // 4)).nan_to_num(nan=0.0).to(torch.int64)


@dataclass(frozen=True)
class Partitions:
    """r random contiguous partitions of positions 0..n-1 for each of H heads.

    Exactly one of the two representations is set:

    * grid: ``widths`` and ``offsets``, int64 [H, r]; block of position i is floor((i + U) / W).
    * cut: ``cut_positions`` int64 [C] (sorted within each (head, sample); a value c means a new
      block starts at position c) and ``cut_pointers`` int64 [H * r + 1], CSR-style: the cuts of
      head h, sample t are cut_positions[cut_pointers[h*r + t] : cut_pointers[h*r + t + 1]].

    ``slopes`` float64 [H] are the slopes the partitions were drawn for.
    """

    n: int
    slopes: Tensor
    scheme: str
    widths: Tensor | None = None
    offsets: Tensor | None = None
    cut_positions: Tensor | None = None
    cut_pointers: Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.slopes.numel()

    @property
    def num_samples(self) -> int:
        if self.scheme == "grid":
            return self.widths.shape[1]
        return (self.cut_pointers.numel() - 1) // self.num_heads

    @property
    def device(self) -> torch.device:
        return (self.widths if self.scheme == "grid" else self.cut_positions).device

    def to(self, device: torch.device | str) -> "Partitions":
        """The same partitions with their index tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Partitions(self.n, self.slopes, self.scheme, move(self.widths), move(self.offsets),
                          move(self.cut_positions), move(self.cut_pointers))

    def block_ids(self) -> Tensor:
        """Block index of every position: int64 [H, r, n], 0 at position 0, steps of 0 or 1."""
        pos = torch.arange(self.n, device=self.device)
        if self.scheme == "grid":
            w, u = self.widths[..., None], self.offsets[..., None]
            return torch.div(pos + u, w, rounding_mode="floor")
        h, r = self.num_heads, self.num_samples
        starts = torch.zeros(h * r, self.n, dtype=torch.int64, device=self.device)
        counts = self.cut_pointers.diff()
        rows = torch.repeat_interleave(torch.arange(h * r, device=self.device), counts)
        starts[rows, self.cut_positions] = 1
        return starts.cumsum(-1).reshape(h, r, self.n)

    def block_bounds(self) -> tuple[Tensor, Tensor]:
        """First position and one-past-last position of every position's block.

        Returns:
            (start, end), int64 [H, r, n] each, with start <= i < end, clipped to [0, n].
        """
        if self.scheme == "grid":
            pos = torch.arange(self.n, device=self.device)
            w, u = self.widths[..., None], self.offsets[..., None]
            start = torch.div(pos + u, w, rounding_mode="floor") * w - u
            return start.clamp(min=0), (start + w).clamp(max=self.n)
        ids = self.block_ids()
        pos = torch.arange(self.n, device=self.device).expand_as(ids)
        first = torch.full_like(ids, self.n)
        first = first.scatter_reduce(-1, ids, pos, reduce="amin")
        last = torch.full_like(ids, -1).scatter_reduce(-1, ids, pos, reduce="amax")
        return first.gather(-1, ids), last.gather(-1, ids) + 1

    def block_sizes(self) -> Tensor:
        """Length of every position's block (within 0..n-1): int64 [H, r, n]."""
        start, end = self.block_bounds()
        return end - start

    def max_block_size(self) -> Tensor:
        """Largest block (within 0..n-1) of each head and sample: int64 [H, r], without forming [H, r, n]."""
        if self.scheme == "grid":
            # The first block is [0, W - U); every later one has width W except a clipped last one,
            # so the second block's clipped length is the largest of the later ones.
            first = (self.widths - self.offsets).clamp(max=self.n)
            second = torch.minimum(self.widths, self.n - first)
            return torch.maximum(first, second)
        # Block lengths are the gaps between consecutive block starts, with 0 and n as sentinels.
        counts = self.cut_pointers.diff()
        prev = torch.zeros_like(self.cut_positions)
        prev[1:] = self.cut_positions[:-1]
        row_first = self.cut_pointers[:-1][counts > 0]
        prev[row_first] = 0
        gaps = self.cut_positions - prev
        widest = torch.segment_reduce(gaps.double(), "max", lengths=counts, unsafe=True, initial=0)
        padded = torch.cat([self.cut_positions.new_zeros(1), self.cut_positions])
        last = torch.where(counts > 0, padded[self.cut_pointers[1:]], 0)  # last block start, 0 if none
        return torch.maximum(widest.long(), self.n - last).reshape(self.num_heads, self.num_samples)

    def dense_masks(self) -> Tensor:
        """M_t[i, j] = [i and j share a block]: bool [H, r, n, n]. For small n only."""
        ids = self.block_ids()
        return ids[..., :, None] == ids[..., None, :]

    def mean_mask(self) -> Tensor:
        """The empirical mean B-hat = (1/r) sum_t M_t: float64 [H, n, n]. For small n only."""
        ids = self.block_ids()
        out = torch.zeros(self.num_heads, self.n, self.n, dtype=torch.float64, device=self.device)
        for t in range(self.num_samples):  # one [H, n, n] at a time keeps memory at O(H n^2)
            out += (ids[:, t, :, None] == ids[:, t, None, :]).to(torch.float64)
        return out / self.num_samples


def _sample_grid(n: int, slopes: Tensor, samples: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    h = slopes.numel()
    m = slopes[:, None]
    width = 1 + _geometric((h, samples), m, generator) + _geometric((h, samples), m, generator)
    u = torch.rand((h, samples), dtype=torch.float64, generator=generator)
    offset = torch.minimum(torch.floor(u * width).to(torch.int64), width - 1)
    flat = slopes == 0
    width[flat] = UNBOUNDED_WIDTH
    offset[flat] = 0
    return width, offset


def _sample_cuts(n: int, slopes: Tensor, samples: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Block starts as cumulative sums of block lengths 1 + Geometric(1 - q), per head and sample."""
    chunks, counts = [], []
    for m in slopes.tolist():
        if m == 0 or n == 1:
            counts.append(torch.zeros(samples, dtype=torch.int64))
            continue
        p = -math.expm1(-m)  # cut probability 1 - q
        expected = (n - 1) * p
        # Enough lengths to cover n with overwhelming probability; topped up below if not.
        k = int(expected + 8 * math.sqrt(expected + 1) + 16)
        # Lengths are clipped at n (only whether a block reaches past n matters): unclipped, tiny
        # slopes give lengths near 2^60 whose cumulative sum overflows int64 into negative "cuts".
        starts = torch.cumsum(1 + _geometric((samples, k), torch.tensor(m), generator).clamp(max=n), dim=1)
        while bool((starts[:, -1] < n).any()):
            more = 1 + _geometric((samples, k), torch.tensor(m), generator).clamp(max=n)
            starts = torch.cat([starts, starts[:, -1:] + more.cumsum(1)], dim=1)
        keep = starts < n
        chunks.append(starts[keep])
        counts.append(keep.sum(1))
    positions = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)
    pointers = torch.zeros(slopes.numel() * samples + 1, dtype=torch.int64)
    pointers[1:] = torch.cat(counts).cumsum(0)
    return positions, pointers


def sample_partitions(
    n: int,
    slopes: Tensor | list[float] | float,
    samples: int,
    *,
    scheme: str = "grid",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Partitions:
    """Draw ``samples`` independent positional-LSH partitions of 0..n-1 for each head.

    Args:
        n: number of positions (keys), >= 1.
        slopes: ALiBi slopes, one per head, finite and >= 0: [H].
        samples: r, the number of independent partitions per head, >= 1.
        scheme: "grid" (equal-width blocks, random width and offset) or "cut" (independent cuts).
        generator: a CPU ``torch.Generator``; the same seed gives the same partitions.
        device: where the returned index tensors live (sampling always runs on the CPU).

    Returns:
        ``Partitions`` with P[same block] = exp(-slope |i - j|) for every pair, head and sample.
    """
    _check_length(n)
    s = check_slopes(slopes)
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples must be an int, got {type(samples).__name__}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if scheme == "grid":
        widths, offsets = _sample_grid(n, s, samples, generator)
        parts = Partitions(n, s, "grid", widths=widths, offsets=offsets)
    else:
        positions, pointers = _sample_cuts(n, s, samples, generator)
        parts = Partitions(n, s, "cut", cut_positions=positions, cut_pointers=pointers)
    return parts if device is None else parts.to(device)
