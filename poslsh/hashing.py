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

Correlated sampling (``sampling=``, grid only) and general kernels (``kernel=``, grid only): see
``_grid_from_uniforms`` below. Each (head, sample) is a pair (W, U) obtained from a point
(x0, x1) of the unit square: W by inverting the exact width law (``poslsh.kernels.sample_widths``)
at 1 - x0, U = floor(x1 W). Every point is exactly uniform on the square whatever ``sampling`` is,
so every sample keeps the exact marginal law and E[B-hat] = B; only the joint law of the r points
of a head changes:

* ``"iid"``: independent points (for ALiBi without ``kernel`` the original G1 + G2 sampler runs,
  bit-identical for a given seed).
* ``"stratified"``: jittered sampling: the square is cut into an a x b grid of cells (a * b = r,
  a the largest divisor of r not above sqrt(r); b strata along the width coordinate), each sample
  gets one cell chosen by a random permutation and a uniform point inside it.
* ``"qmc"``: a randomly shifted rank-1 lattice (Cranley-Patterson rotation): x_t = frac(t (1, z) / r
  + Delta), Delta uniform on the square, z the generator maximising the lattice's shortest vector.

Why two coordinates and not three (G1, G2, U): the collision indicator of a pair is a function of
the point with a boundary of finite length, and stratifying a d-dimensional integrand with such
discontinuities gives RMS error ~ r^(-1/2 - 1/(2d)): -0.75 for d = 2, only -0.67 for d = 3.

The cut scheme refuses ``sampling != "iid"``: a pair d apart collides iff none of its d gaps is
cut, an intersection of d independent events, i.e. an integrand of dimension d (up to n - 1) with
no low-dimensional structure. Stratifying each gap's r uniforms (Latin per gap) keeps each
sample's law but only removes the additive (single-gap) part of the variance, so the rate stays
near r^(-1/2) (measured, n = 64, RMS entry error of B-hat from r = 16 to 256: slopes -0.57 and
-0.50 at m = 0.05 and 0.3 against iid's -0.49, constants 25-35% lower) while costing n r uniforms
instead of one per cut; sharing one random shift across the samples of a gap makes it worse (the
uncovered fraction of a circle by d random arcs does not vanish as r grows).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .alibi import _check_length, check_slopes

__all__ = ["Partitions", "sample_partitions", "SCHEMES", "SAMPLINGS"]

SCHEMES = ("grid", "cut")
SAMPLINGS = ("iid", "stratified", "qmc")

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

    ``slopes`` float64 [H] are the slopes the partitions were drawn for. ``kernels``: for
    partitions drawn for general kernels (``sample_partitions(..., kernel=...)``), the H
    ``poslsh.kernels.Kernel`` objects, and then ``slopes`` holds each head's ALiBi slope or NaN
    for a head whose kernel is not exponential; None for ALiBi partitions.
    """

    n: int
    slopes: Tensor
    scheme: str
    widths: Tensor | None = None
    offsets: Tensor | None = None
    cut_positions: Tensor | None = None
    cut_pointers: Tensor | None = None
    kernels: tuple | None = None

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
                          move(self.cut_positions), move(self.cut_pointers), self.kernels)

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


# --------------------------------------------------------------------------------------------------
# Correlated sampling and general kernels (grid): points of the unit square -> (W, U).
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def lattice_generator(r: int) -> int:
    """z for the rank-1 lattice {t (1, z) / r mod 1}: coprime to r, maximising the shortest nonzero
    lattice vector on the torus (exhaustive for r <= 4096; beyond, the golden-ratio choice
    z ~ r / phi, which is the optimum, the Fibonacci lattice, when r is a Fibonacci number)."""
    if r <= 2:
        return 1
    if r > 4096:
        z = round(r / ((1 + math.sqrt(5)) / 2))
        while math.gcd(z, r) != 1:
            z += 1
        return z
    zs = torch.tensor([z for z in range(1, r) if math.gcd(z, r) == 1], dtype=torch.float64)
    t = torch.arange(1, r, dtype=torch.float64)
    x = t / r
    y = torch.remainder(t[None, :] * zs[:, None], r) / r  # [Z, r-1]
    dx, dy = torch.minimum(x, 1 - x), torch.minimum(y, 1 - y)
    shortest = (dx[None, :] ** 2 + dy ** 2).amin(1)
    return int(zs[int(shortest.argmax())])


def _stratum_counts(r: int) -> tuple[int, int]:
    """(a, b) with a * b = r, a the largest divisor of r with a <= sqrt(r)."""
    a = max(d for d in range(1, math.isqrt(r) + 1) if r % d == 0)
    return a, r // a


def unit_square_points(heads: int, samples: int, sampling: str, generator: torch.Generator | None) -> Tensor:
    """r points of [0, 1)^2 per head, each exactly uniform, jointly iid / stratified / lattice.

    Returns:
        float64 [H, r, 2]; heads are independent of each other.
    """
    if sampling == "iid":
        return torch.rand((heads, samples, 2), dtype=torch.float64, generator=generator)
    if sampling == "stratified":
        a, b = _stratum_counts(samples)
        # A uniformly random cell per sample (a random permutation of the r cells), so that every
        # sample, not just the set, is uniform on the square.
        cells = torch.argsort(torch.rand((heads, samples), dtype=torch.float64, generator=generator), dim=1)
        jitter = torch.rand((heads, samples, 2), dtype=torch.float64, generator=generator)
        x0 = (torch.div(cells, a, rounding_mode="floor") + jitter[..., 0]) / b
        x1 = (torch.remainder(cells, a) + jitter[..., 1]) / a
        return torch.stack([x0, x1], -1).clamp(max=1 - 2**-53)  # rounding must not reach 1
    if sampling == "qmc":
        z = lattice_generator(samples)
        t = torch.arange(samples, dtype=torch.float64)
        base = torch.stack([t / samples, torch.remainder(t * z, samples) / samples], -1)  # [r, 2]
        shift = torch.rand((heads, 1, 2), dtype=torch.float64, generator=generator)
        return torch.remainder(base[None] + shift, 1.0).clamp(max=1 - 2**-53)
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def _grid_from_uniforms(kernels, points: Tensor) -> tuple[Tensor, Tensor]:
    """(W, U) of every head and sample from points [H, r, 2] of the unit square (see module doc).

    W inverts the kernel's width law at u = 1 - x0 in (0, 1]; U = floor(x1 W) is uniform on
    {0..W-1} given W. An unbounded W (atom at infinity, slope 0) gets U = 0.
    """
    from .kernels import sample_widths  # kernels imports nothing from here; lazy keeps import order free

    width = sample_widths(kernels, 1.0 - points[..., 0], UNBOUNDED_WIDTH)
    offset = torch.minimum(torch.floor(points[..., 1] * width).to(torch.int64), width - 1)
    offset = torch.where(width == UNBOUNDED_WIDTH, torch.zeros_like(offset), offset)
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
    slopes: Tensor | list[float] | float | None,
    samples: int,
    *,
    scheme: str = "grid",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    sampling: str = "iid",
    kernel=None,
) -> Partitions:
    """Draw ``samples`` positional-LSH partitions of 0..n-1 for each head.

    Args:
        n: number of positions (keys), >= 1.
        slopes: ALiBi slopes, one per head, finite and >= 0: [H]; None when ``kernel`` is given.
        samples: r, the number of partitions per head, >= 1.
        scheme: "grid" (equal-width blocks, random width and offset) or "cut" (independent cuts).
        generator: a CPU ``torch.Generator``; the same seed gives the same partitions.
        device: where the returned index tensors live (sampling always runs on the CPU).
        sampling: "iid" (independent samples), "stratified" or "qmc" (the r samples of a head are
            negatively correlated, each keeping its exact law; grid only, see module docstring).
        kernel: a ``poslsh.kernels.Kernel`` or one per head (grid only): partitions for
            P[same block] = f(|i - j|) instead of ALiBi. Mutually exclusive with ``slopes``.

    Returns:
        ``Partitions`` with P[same block] = exp(-slope |i - j|) (or f(|i - j|)) for every pair,
        head and sample.
    """
    _check_length(n)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    kernels = None
    if kernel is not None:
        from .kernels import as_kernels, check_kernel

        if slopes is not None:
            raise ValueError("give either slopes (ALiBi) or kernel, not both")
        kernels = tuple(check_kernel(k) for k in as_kernels(kernel))
        s = torch.tensor([math.nan if k.slope is None else k.slope for k in kernels], dtype=torch.float64)
    elif slopes is None:
        raise ValueError("slopes must be given (or a kernel)")
    else:
        s = check_slopes(slopes)
    if scheme == "cut" and (sampling != "iid" or kernels is not None):
        raise ValueError(
            f"scheme='cut' supports only sampling='iid' and ALiBi slopes (got sampling={sampling!r}"
            f"{', a kernel' if kernels is not None else ''}): independent cuts give P[collide] = q^d, "
            "a product over the d gaps, so general kernels are not reachable, and the collision event "
            "is d-dimensional, so stratifying samples does not improve the r^(-1/2) rate; use scheme='grid'")
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise TypeError(f"samples must be an int, got {type(samples).__name__}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if scheme == "grid":
        if kernels is None and sampling == "iid":  # the original sampler: same seed, same partitions
            widths, offsets = _sample_grid(n, s, samples, generator)
        else:
            from .kernels import alibi

            if kernels is None:  # one Kernel per distinct slope, so equal heads are inverted together
                unique = {m: alibi(m) for m in s.tolist()}
                ks = tuple(unique[m] for m in s.tolist())
            else:
                ks = kernels
            points = unit_square_points(len(ks), samples, sampling, generator)
            widths, offsets = _grid_from_uniforms(ks, points)
        parts = Partitions(n, s, "grid", widths=widths, offsets=offsets, kernels=kernels)
    else:
        positions, pointers = _sample_cuts(n, s, samples, generator)
        parts = Partitions(n, s, "cut", cut_positions=positions, cut_pointers=pointers)
    return parts if device is None else parts.to(device)
