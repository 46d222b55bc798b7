"""Positional LSH: random hashes of positions 0..n-1 into contiguous buckets with
P[h(i) = h(j)] = q^|i - j|, q = e^{-m}, one independent hash per head and sample.

Two exact schemes (docs/MATH.md, section 2, has the proofs):

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
(x0, x1) of the unit square: W by inverting the exact width law (``poslsh.positional_kernels.sample_widths``)
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

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .alibi import check_slopes
from .checks import as_int, check_generator

__all__ = ["Partitions", "sample_partitions", "check_scheme", "normalize_grid", "SCHEMES", "SAMPLINGS"]

SCHEMES = ("grid", "cut")
SAMPLINGS = ("iid", "stratified", "qmc")

# Stands for an infinite grid width (slope 0): far beyond any sequence length, small enough that
# i + U never overflows int64.
UNBOUNDED_WIDTH = 2**62

# Elements of the per-chunk index tensors of ``Partitions.mean_mask`` (8 MiB of int64).
CHUNK_ELEMENTS = 1 << 20


def _geometric(shape: tuple[int, ...], slope: Tensor, generator: torch.Generator | None) -> Tensor:
    """Failures before a success of probability 1 - e^{-slope}: P(G >= k) = e^{-slope k}, int64.

    Inversion: G = floor(-log(u) / slope) with u uniform on (0, 1]. ``slope`` broadcasts against
    ``shape``; slope 0 gives UNBOUNDED_WIDTH. Drawn on ``slope``'s device.
    """
    u = 1.0 - torch.rand(shape, dtype=torch.float64, generator=generator, device=slope.device)  # (0, 1]
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
    ``poslsh.positional_kernels.Kernel`` objects, and then ``slopes`` holds each head's ALiBi slope or NaN
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

    def __post_init__(self) -> None:
        _check_partitions(self)

    @classmethod
    def _unchecked(cls, **fields) -> "Partitions":
        """Build from parts of checked partitions (a device move, one head) without checking again:
        each check is a reduction, i.e. a host synchronisation when the tensors are on a GPU."""
        parts = object.__new__(cls)
        for name in _PARTITION_FIELDS:
            object.__setattr__(parts, name, fields.get(name))
        return parts

    def _derived(self, **changes) -> "Partitions":
        """``dataclasses.replace`` without the checks, for partitions valid by construction from these
        (a sample of them, a window of their positions)."""
        return Partitions._unchecked(**{**{name: getattr(self, name) for name in _PARTITION_FIELDS}, **changes})

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
        """The same partitions with their index tensors on ``device`` (slopes stay on the CPU)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Partitions._unchecked(n=self.n, slopes=self.slopes, scheme=self.scheme, widths=move(self.widths),
                                     offsets=move(self.offsets), cut_positions=move(self.cut_positions),
                                     cut_pointers=move(self.cut_pointers), kernels=self.kernels)

    def head(self, h: int) -> "Partitions":
        """The partitions of head h alone (one head, all r samples; views of these tensors)."""
        kernels = None if self.kernels is None else (self.kernels[h],)
        common = dict(n=self.n, slopes=self.slopes[h:h + 1], scheme=self.scheme, kernels=kernels)
        if self.scheme == "grid":
            return Partitions._unchecked(widths=self.widths[h:h + 1], offsets=self.offsets[h:h + 1], **common)
        r = self.num_samples
        ptr = self.cut_pointers[h * r:(h + 1) * r + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return Partitions._unchecked(cut_positions=self.cut_positions[lo:hi], cut_pointers=ptr - lo, **common)

    def restrict(self, start: int, stop: int) -> "Partitions":
        """The same partitions seen on the positions [start, stop) only, re-indexed from 0.

        Position i of the result is position start + i here; two positions share a block in the
        result iff they do here (``block_ids()[..., start:stop]`` up to a constant per head and
        sample). Grid: offsets U' = (U + start) mod W; cut: the cuts strictly inside (start, stop),
        shifted by -start. A shard of a long sequence uses this to run the global partitions on its
        local keys (``poslsh.distributed``).
        """
        if (isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, int)
                or not isinstance(stop, int) or not 0 <= start < stop <= self.n):
            raise ValueError(f"restrict needs ints 0 <= start < stop <= n = {self.n}, got start={start!r}, "
                             f"stop={stop!r}")
        if self.scheme == "grid":
            return self._derived(n=stop - start, offsets=torch.remainder(self.offsets + start, self.widths))
        # Each (head, sample) row's cuts are sorted: two binary searches per row cut out its slice.
        ptr = self.cut_pointers.tolist()
        kept, counts = [], []
        for row in range(len(ptr) - 1):
            cuts = self.cut_positions[ptr[row]:ptr[row + 1]]
            bounds = torch.tensor([start, stop - 1], device=cuts.device)
            lo, hi = torch.searchsorted(cuts, bounds, right=True).tolist()  # cuts in (start, stop - 1]
            kept.append(cuts[lo:hi] - start)
            counts.append(hi - lo)
        pointers = torch.zeros(len(counts) + 1, dtype=torch.int64)
        pointers[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return self._derived(n=stop - start, cut_positions=torch.cat(kept),
                             cut_pointers=pointers.to(self.cut_pointers.device))

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

    def cut_table(self) -> Tensor:
        """The cuts of each (head, sample) in ascending order, padded with n: int64 [H, r, c + 1], c the
        most cuts of any (head, sample). The form ``bounds_at`` searches (build it once, reuse it)."""
        h, r = self.num_heads, self.num_samples
        counts = self.cut_pointers.diff()
        width = int(counts.max()) + 1 if counts.numel() else 1
        table = torch.full((h * r, width), self.n, dtype=torch.int64, device=self.device)
        rows = torch.repeat_interleave(torch.arange(h * r, device=self.device), counts)
        cols = torch.arange(self.cut_positions.numel(), device=self.device) - torch.repeat_interleave(
            self.cut_pointers[:-1], counts)
        table[rows, cols] = self.cut_positions
        return table.view(h, r, width)

    def bounds_at(self, positions: Tensor, table: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """First and one-past-last position of the block holding each of ``positions``, per head and
        sample, without forming anything of size [H, r, n].

        Args:
            positions: int [P], values in 0..n-1.
            table: for the cut scheme, ``cut_table()`` (built here when None).

        Returns:
            (start, end), int64 [H, r, P] each, with start <= p < end, clipped to [0, n]. Grid: from
            (W, U) in closed form; cut: the last cut <= p and the first cut > p, by binary search.
        """
        pos = positions.to(device=self.device, dtype=torch.int64)
        if self.scheme == "grid":
            w, u = self.widths, self.offsets
            if self.n < 2**30:  # p + U < 2n fits int32 once widths above n are re-expressed: ~4x faster division
                (w, u), pos = normalize_grid(w, u, self.n), pos.to(torch.int32)
            w, u = w[..., None], u[..., None]
            start = torch.div(pos + u, w, rounding_mode="floor") * w - u
            return start.clamp(min=0).long(), (start + w).clamp(max=self.n).long()
        table = self.cut_table() if table is None else table
        h, r, width = table.shape
        flat = table.reshape(h * r, width)
        idx = torch.searchsorted(flat, pos.expand(h * r, -1).contiguous(), right=True)  # cuts <= p
        end = flat.gather(1, idx)  # the first cut > p, or the padding n
        start = torch.where(idx > 0, flat.gather(1, (idx - 1).clamp(min=0)), 0)
        return start.view(h, r, -1), end.view(h, r, -1)

    def block_bounds(self) -> tuple[Tensor, Tensor]:
        """First position and one-past-last position of every position's block.

        Returns:
            (start, end), int64 [H, r, n] each, with start <= i < end, clipped to [0, n].
        """
        return self.bounds_at(torch.arange(self.n, device=self.device))

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
        """The empirical mean B-hat = (1/r) sum_t M_t: float64 [H, n, n]. For small n only.

        Row i counts, per key j, the samples whose block of i holds j: +1 at start_t(i), -1 at
        end_t(i), summed over t and accumulated along j. Rows are taken a few at a time, so besides
        the output only O(H r) per row is allocated (nothing of size [H, r, n] when r is large)."""
        h, r, n = self.num_heads, self.num_samples, self.n
        out = torch.empty(h, n, n, dtype=torch.float64, device=self.device)
        table = self.cut_table() if self.scheme == "cut" else None
        step = max(1, min(n, CHUNK_ELEMENTS // (h * r)))
        for p0 in range(0, n, step):
            pos = torch.arange(p0, min(n, p0 + step), device=self.device)
            start, end = (b.transpose(1, 2) for b in self.bounds_at(pos, table))  # [H, P, r]
            steps = torch.zeros(h, pos.numel(), n + 1, dtype=torch.float64, device=self.device)
            steps.scatter_add_(2, start, torch.ones(start.shape, dtype=torch.float64, device=self.device))
            steps.scatter_add_(2, end, torch.full(end.shape, -1.0, dtype=torch.float64, device=self.device))
            out[:, p0:p0 + pos.numel()] = steps[..., :n].cumsum(-1) / r  # integer counts: exact
        return out


_PARTITION_FIELDS = tuple(f.name for f in dataclasses.fields(Partitions))  # (read per decode step)


def check_given_partitions(partitions, samples, scheme) -> None:
    """Given partitions decide the number of samples and the scheme; a ``samples`` or ``scheme`` given
    beside them that says otherwise was ignored without a word before (lsh, samples=16 with partitions of
    8 ran with 8)."""
    if not isinstance(partitions, Partitions):
        return  # None, or the dispatcher reports the type
    if samples is not None and as_int(samples, "samples", minimum=1) != partitions.num_samples:
        raise ValueError(f"samples={samples!r}, but the partitions given hold {partitions.num_samples} samples "
                         "(partitions decide r: omit samples, or draw partitions of that many samples)")
    if scheme is not None and scheme != partitions.scheme:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        raise ValueError(f"scheme={scheme!r}, but the partitions given are of scheme {partitions.scheme!r} "
                         "(omit scheme, or draw partitions of that scheme)")


def normalize_grid(widths: Tensor, offsets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Grid (W, U) int [H, r] -> int32 [H, r] giving the same blocks on positions 0..n-1.

    A width above n has at most one boundary inside [0, n), at c = W - U; it is re-expressed with
    width n (offset n - c, or 0 when c >= n), so that p + U fits in int32 (slope-0 heads store
    W = 2^62).
    """
    w = widths.to(torch.int64)
    u = offsets.to(torch.int64)
    big = w > n
    c = w - u
    u2 = torch.where(c >= n, torch.zeros_like(u), n - c)
    w = torch.where(big, torch.full_like(w, n), w)
    u = torch.where(big, u2, u)
    return w.to(torch.int32).contiguous(), u.to(torch.int32).contiguous()


def _check_index(t, name: str) -> Tensor:
    if not isinstance(t, Tensor) or t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    return t


def _check_partitions(p: Partitions) -> None:
    """``Partitions.__post_init__``: the fields describe r >= 1 partitions of 0..n-1 per head."""
    object.__setattr__(p, "n", as_int(p.n, "n", minimum=1))
    if p.scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {p.scheme!r}")
    s = p.slopes
    if not isinstance(s, Tensor) or not s.is_floating_point() or s.ndim != 1 or s.numel() < 1:
        raise TypeError(f"slopes must be a 1-D float tensor with one slope per head, got "
                        f"{getattr(s, 'shape', type(s).__name__)}")
    known = s[~s.isnan()]  # NaN: a head drawn for a kernel that is not exponential
    if bool((known < 0).any()) or bool(torch.isinf(known).any()):
        raise ValueError(f"slopes must be >= 0 and finite (or NaN for a non-exponential kernel), got {s.tolist()}")
    if p.kernels is not None and len(p.kernels) != s.numel():
        raise ValueError(f"kernels must hold one kernel per head ({s.numel()}), got {len(p.kernels)}")
    h = p.num_heads
    if p.scheme == "grid":
        if p.widths is None or p.offsets is None:
            raise ValueError("grid partitions need widths and offsets")
        if p.cut_positions is not None or p.cut_pointers is not None:
            raise ValueError("grid partitions take widths and offsets only (cut_positions and cut_pointers None)")
        w, u = _check_index(p.widths, "widths"), _check_index(p.offsets, "offsets")
        if w.ndim != 2 or w.shape[0] != h:
            raise ValueError(f"widths must have one row per head ({h}) and one column per sample, got shape "
                             f"{tuple(w.shape)}")
        if u.shape != w.shape or u.device != w.device:
            raise ValueError(f"offsets must have the shape of widths [H, r] = {tuple(w.shape)} on its device, got "
                             f"{tuple(u.shape)} on {u.device}")
        if w.shape[1] < 1:
            raise ValueError("partitions must hold at least one sample")
        if bool((w < 1).any()):
            raise ValueError(f"widths must be >= 1, got min {int(w.min())}")
        if bool(((u < 0) | (u >= w)).any()):
            raise ValueError("offsets must lie in 0..widths-1")
        return
    if p.widths is not None or p.offsets is not None:
        raise ValueError("cut partitions take cut_positions and cut_pointers only (widths and offsets None)")
    if p.cut_positions is None or p.cut_pointers is None:
        raise ValueError("cut partitions need cut_positions and cut_pointers")
    pos, ptr = _check_index(p.cut_positions, "cut_positions"), _check_index(p.cut_pointers, "cut_pointers")
    if pos.ndim != 1 or ptr.ndim != 1 or pos.device != ptr.device:
        raise ValueError("cut_positions and cut_pointers must be 1-D, on one device")
    if ptr.numel() < h + 1 or (ptr.numel() - 1) % h:
        raise ValueError(f"cut_pointers must have H * r + 1 entries (H = {h} heads, r >= 1 samples), got "
                         f"{ptr.numel()}")
    if int(ptr[0]) != 0:
        raise ValueError(f"cut_pointers must start at 0, got {int(ptr[0])}")
    counts = ptr.diff()
    if bool((counts < 0).any()):
        raise ValueError("cut_pointers must be non-decreasing")
    if int(ptr[-1]) != pos.numel():
        raise ValueError(f"cut_pointers must end at len(cut_positions) = {pos.numel()}, got {int(ptr[-1])}")
    if pos.numel():
        if bool(((pos < 1) | (pos > p.n - 1)).any()):
            raise ValueError(f"cut_positions must lie in 1..n-1 = 1..{p.n - 1}")
        first = torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)
        first[ptr[:-1][counts > 0]] = True  # the first cut of each (head, sample) may be below its predecessor
        if bool(((pos.diff() <= 0) & ~first[1:]).any()):
            raise ValueError("cut_positions must increase within each (head, sample)")


def _sample_grid(n: int, slopes: Tensor, samples: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(W, U) int64 [H, r] on ``slopes``' device, with no host synchronisation (a GPU draw per call
    stays on the GPU: fresh partitions at every training step or call)."""
    h = slopes.numel()
    m = slopes[:, None]
    width = 1 + _geometric((h, samples), m, generator) + _geometric((h, samples), m, generator)
    u = torch.rand((h, samples), dtype=torch.float64, generator=generator, device=slopes.device)
    offset = torch.minimum(torch.floor(u * width).to(torch.int64), width - 1)
    flat = m == 0
    return torch.where(flat, UNBOUNDED_WIDTH, width), torch.where(flat, 0, offset)


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
    from .positional_kernels import sample_widths  # kernels imports nothing from here; lazy keeps import order free

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


def check_scheme(scheme: str, sampling: str = "iid", kernel: bool = False) -> None:
    """A known scheme and sampling mode, and a combination the scheme can draw."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if scheme == "cut" and (sampling != "iid" or kernel):
        raise ValueError(
            f"scheme='cut' supports only sampling='iid' and ALiBi slopes (got sampling={sampling!r}"
            f"{', a kernel' if kernel else ''}): independent cuts give P[collide] = q^d, "
            "a product over the d gaps, so general kernels are not reachable, and the collision event "
            "is d-dimensional, so stratifying samples does not improve the r^(-1/2) rate; use scheme='grid'")


def sampling_bytes(n: int, slopes: Tensor, samples: int, scheme: str) -> tuple[int, int]:
    """About the memory that drawing partitions needs (bytes), and what the result keeps.

    grid: per (head, sample) W and U (int64, kept) and the float64 uniforms drawn for them; cut: per
    expected cut its int64 position (kept), and for the head with the most cuts the float64 and
    int64 temporaries of its r draws of block lengths (``_sample_cuts``)."""
    h = slopes.numel()
    if scheme == "grid":
        return 48 * h * samples, 16 * h * samples
    p = -torch.expm1(-slopes.nan_to_num(0.0))  # cut probability 1 - q per head
    per_sample = (n - 1) * p
    lengths = per_sample + 8 * torch.sqrt(per_sample + 1) + 16  # what _sample_cuts draws per sample
    kept = int(8 * samples * float(per_sample.sum()))
    return kept + int(32 * samples * float(lengths.max())), kept


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on a device (MemAvailable on a Linux CPU), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(n: int, slopes: Tensor, samples: int, scheme: str, device=None) -> None:
    """Refuse, naming ``samples``, a request whose partitions cannot fit in memory (before any work:
    otherwise the allocator fails mid-way with a raw error)."""
    need, kept = sampling_bytes(n, slopes, samples, scheme)
    if max(need, kept) < 1 << 28:  # small requests fit: no memory query (a driver call per draw)
        return
    places = [(torch.device("cpu"), need)]
    if device is not None and torch.device(device).type != "cpu":
        places.append((torch.device(device), kept))
    for where, nbytes in places:
        free = _available_bytes(where)
        if free is not None and nbytes > free:
            raise MemoryError(
                f"samples={samples} ({slopes.numel()} heads, scheme={scheme!r}, n={n}) needs about "
                f"{nbytes / 1e9:.3g} GB to draw and hold the partitions, more than the {free / 1e9:.3g} GB "
                f"available on {where}; use fewer samples")


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
        device: where the returned index tensors live; grid iid partitions without a ``generator`` are
            drawn there (no host round trip on a GPU), everything else on the CPU and moved.
        sampling: "iid" (independent samples), "stratified" or "qmc" (the r samples of a head are
            negatively correlated, each keeping its exact law; grid only, see module docstring).
        kernel: a ``poslsh.positional_kernels.Kernel`` or one per head (grid only): partitions for
            P[same block] = f(|i - j|) instead of ALiBi. Mutually exclusive with ``slopes``.

    Returns:
        ``Partitions`` with P[same block] = exp(-slope |i - j|) (or f(|i - j|)) for every pair,
        head and sample.
    """
    n = as_int(n, "n", minimum=1)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    kernels = None
    if kernel is not None:
        from .positional_kernels import as_kernels, check_kernel

        if slopes is not None:
            raise ValueError("give either slopes (ALiBi) or kernel, not both")
        kernels = tuple(check_kernel(k) for k in as_kernels(kernel))
        s = torch.tensor([math.nan if k.slope is None else k.slope for k in kernels], dtype=torch.float64)
    elif slopes is None:
        raise ValueError("slopes must be given (or a kernel)")
    else:
        s = check_slopes(slopes)
    check_scheme(scheme, sampling, kernels is not None)
    samples = as_int(samples, "samples", minimum=1)
    generator = check_generator(generator)
    check_fits(n, s, samples, scheme, device)
    if scheme == "grid":
        if kernels is None and sampling == "iid":  # the original sampler: same seed, same partitions
            # Without a (CPU) generator, draw where the partitions go: on a GPU that is a few kernels and
            # no host round trip; with one, on the CPU as always, so a seed gives the same partitions.
            here = device if generator is None and device is not None else "cpu"
            widths, offsets = _sample_grid(n, s.to(here), samples, generator)
        else:
            from .positional_kernels import alibi

            if kernels is None:  # one Kernel per distinct slope, so equal heads are inverted together
                unique = {m: alibi(m) for m in s.tolist()}
                ks = tuple(unique[m] for m in s.tolist())
            else:
                ks = kernels
            points = unit_square_points(len(ks), samples, sampling, generator)
            widths, offsets = _grid_from_uniforms(ks, points)
        parts = Partitions._unchecked(n=n, slopes=s, scheme="grid", widths=widths, offsets=offsets, kernels=kernels)
    else:
        # Valid by construction (tests/test_hashing.py): checking ~1e7 cuts again would add ~20%.
        positions, pointers = _sample_cuts(n, s, samples, generator)
        parts = Partitions._unchecked(n=n, slopes=s, scheme="cut", cut_positions=positions, cut_pointers=pointers)
    return parts if device is None else parts.to(device)
