"""How far the mean of sampled block masks, B-hat = (1/r) sum_t M_t, is from the ALiBi kernel B.

B_ij = q^|i-j| with q = e^{-m} (bidirectional, so B and B-hat are symmetric) and
M_t[i, j] = [i and j share a block in sample t]. Three norms of the error E = B-hat - B, per head:

* ``max``: max_ij |E_ij| (the max norm; Hoeffding controls it),
* ``spectral``: ||E||_2 = max |eigenvalue of E| (matrix Bernstein controls it),
* ``row_sum``: max_i sum_j |E_ij| (the infinity-to-infinity operator norm; it bounds the attention
  output error, see ``poslsh.theory.attention_error_bound``).

Two ways to compute them:

* dense (small n): form B-hat and B, float64, ``torch.linalg.eigvalsh`` for the spectral norm.
* structured (any n, never an n x n matrix):
  - B-hat x by prefix sums: (M_t x)_i = P[end_t(i)] - P[start_t(i)] with P the prefix sums of x;
  - B x by two decaying linear recurrences (forward and backward), vectorised as scaled cumulative
    sums inside chunks plus a log-depth scan of the carries between chunks (``KernelOperator``);
  - the spectral norm by Lanczos with full reorthogonalisation on x -> B-hat x - B x;
  - max and row-sum norms exactly from the piecewise-constant structure of each row of B-hat: for
    j > i, B-hat_ij = (1/r) #{t : end_t(i) > j} only changes at the r block ends, and B_ij is
    monotone in |i - j|, so on each constant piece the max of |E_ij| is at an endpoint and the sum
    of |E_ij| is a geometric sum in closed form. O(n r log r) per head.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .alibi import alibi_kernel
from .hashing import Partitions

__all__ = [
    "METHODS",
    "DENSE_MAX_N",
    "count_matrix",
    "mask_errors",
    "mask_errors_dense",
    "mask_errors_structured",
    "KernelOperator",
    "MeanMaskOperator",
    "lanczos_norm",
    "select_head",
]

METHODS = ("auto", "dense", "structured")
# ``method="auto"`` is dense up to this n: eigvalsh of a 512 x 512 matrix takes milliseconds,
# and the structured path is exact for max/row-sum and converged to ~1e-8 for the spectral norm.
DENSE_MAX_N = 512
# Chunks of the scaled cumulative sum span at most this much decay (m * chunk_length), so the
# scale factors stay within e^{+-30}: no overflow, and exp's rounding costs ~30 ulp at most.
_CHUNK_DECAY = 30.0


def _check_partitions(partitions: Partitions) -> None:
    if not isinstance(partitions, Partitions):
        raise TypeError(f"partitions must be a poslsh.Partitions, got {type(partitions).__name__}")


def _check_alibi(partitions: Partitions) -> None:
    """The errors are measured against B_ij = e^{-m|i-j|}: every head needs a finite slope."""
    _check_partitions(partitions)
    if not bool(torch.isfinite(partitions.slopes).all()):
        raise ValueError("partitions must be drawn for ALiBi slopes: mask errors are measured against "
                         f"e^(-slope |i-j|), got slopes {partitions.slopes.tolist()} (NaN: a general kernel)")


def select_head(partitions: Partitions, head: int) -> Partitions:
    """The partitions of one head as a one-head ``Partitions`` (same samples, no copy of other heads)."""
    _check_partitions(partitions)
    if not 0 <= head < partitions.num_heads:
        raise ValueError(f"head must be in [0, {partitions.num_heads}), got {head}")
    return partitions.head(head)


def count_matrix(partitions: Partitions) -> Tensor:
    """C_ij = #{t : i and j share a block in sample t}: int64 [H, n, n], without forming [H, r, n, n].

    For j >= i, C_ij = #{t : end_t(i) > j}: a histogram of the block ends of row i, summed from the
    right. Cost O(H r n + H n^2). ``count_matrix(p) / r`` is B-hat.
    """
    _check_partitions(partitions)
    h, n = partitions.num_heads, partitions.n
    _, end = partitions.block_bounds()  # [H, r, n], values in 1..n
    rows = torch.arange(h * n, device=end.device).reshape(h, 1, n)
    flat = (rows * (n + 1) + end).reshape(-1)
    hist = torch.bincount(flat, minlength=h * n * (n + 1)).reshape(h, n, n + 1)
    above = hist.flip(-1).cumsum(-1).flip(-1)  # above[h, i, e] = #{t : end_t(i) >= e}
    upper = above[..., 1:]  # upper[h, i, j] = #{t : end_t(i) > j}, valid for j >= i
    pos = torch.arange(n, device=end.device)
    return torch.where(pos[None, :] >= pos[:, None], upper, upper.transpose(-1, -2))


# ----------------------------------------------------------------------------- dense


def mask_errors_dense(partitions: Partitions) -> dict[str, Tensor]:
    """Errors of B-hat against the bidirectional kernel B, by forming both (float64). Small n only.

    Returns:
        dict with float64 tensors [H]: ``max`` (max_ij |E_ij|), ``spectral`` (||E||_2, from all
        eigenvalues of the symmetric E), ``row_sum`` (max_i sum_j |E_ij|) and ``spectral_residual``
        (zeros: the dense spectral norm is exact up to rounding).
    """
    _check_alibi(partitions)
    r, n = partitions.num_samples, partitions.n
    bhat = count_matrix(partitions).to(torch.float64) / r
    out = {k: torch.zeros(partitions.num_heads, dtype=torch.float64) for k in ("max", "spectral", "row_sum")}
    for h, slope in enumerate(partitions.slopes.tolist()):
        err = bhat[h].cpu() - alibi_kernel(n, slope)
        out["max"][h] = err.abs().max()
        out["spectral"][h] = torch.linalg.eigvalsh(err).abs().max()
        out["row_sum"][h] = err.abs().sum(-1).max()
    out["spectral_residual"] = torch.zeros(partitions.num_heads, dtype=torch.float64)
    return out


# ----------------------------------------------------------------------------- B x


class KernelOperator:
    """x -> B x with B_ij = e^{-slope |i - j|}, [n, n], in O(n) time and memory, float64.

    B x = f + b - x where f_i = sum_{j<=i} q^{i-j} x_j (forward recurrence f_i = q f_{i-1} + x_i)
    and b is the same recurrence run backwards. A Python loop over n would be slow, so:

    1. split positions into chunks of length c with slope * c <= 30; inside a chunk,
       f_local[a] = q^a * cumsum_b(q^{-b} x_b): the scale factors stay within e^{+-30}, so nothing
       overflows, and the rounding error of the cumulative sum is relative to
       sum_b q^{a-b} |x_b|, i.e. to (B|x|)_i, not to the large intermediate values;
    2. the carry between chunks obeys F_k = T_k + Q F_{k-1} with Q = q^c (T_k the chunk's local
       total); it is solved exactly by a Hillis-Steele scan, F += Q^s F shifted by s for
       s = 1, 2, 4, ..., stopping once Q^s underflows to 0 or s reaches the number of chunks
       (at most ~5 steps when Q <= e^{-30}); all multipliers are in [0, 1], so it is stable.

    Slope 0 is one chunk and a plain cumulative sum (B is all ones).
    """

    def __init__(self, n: int, slope: float, device: torch.device | str | None = None):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        slope = float(slope)
        if not math.isfinite(slope) or slope < 0:
            raise ValueError(f"slope must be finite and >= 0, got {slope}")
        self.n, self.slope = n, slope
        c = n if slope == 0 else max(1, min(n, int(_CHUNK_DECAY / slope)))
        self.chunk = c
        self.num_chunks = -(-n // c)
        a = torch.arange(c, dtype=torch.float64, device=device)
        self._up = torch.exp(slope * a)  # q^{-a}
        self._down = torch.exp(-slope * a)  # q^{a}
        self._down_next = torch.exp(-slope * (a + 1))  # q^{a+1}: weight of the carry entering a chunk
        self._chunk_decay = math.exp(-slope * c)  # Q = q^c

    def _forward(self, x: Tensor) -> Tensor:
        """f_i = sum_{j<=i} q^{i-j} x_j along the last dimension."""
        n, c, k = self.n, self.chunk, self.num_chunks
        batch = x.shape[:-1]
        xp = torch.nn.functional.pad(x, (0, k * c - n)) if k * c != n else x
        local = torch.cumsum(xp.reshape(*batch, k, c) * self._up, dim=-1) * self._down
        if k > 1:
            carry = local[..., -1].clone()  # chunk totals T_k, then the full sums F_k
            s, qs = 1, self._chunk_decay
            while s < k and qs > 0.0:
                carry[..., s:] = carry[..., s:] + qs * carry[..., :-s]
                s, qs = 2 * s, qs * qs
            local[..., 1:, :] += carry[..., :-1, None] * self._down_next
        return local.reshape(*batch, k * c)[..., :n]

    def matvec(self, x: Tensor) -> Tensor:
        """B x for x float64 [..., n] -> [..., n]."""
        if x.shape[-1] != self.n:
            raise ValueError(f"x must have last dimension n = {self.n}, got shape {tuple(x.shape)}")
        x = x.to(torch.float64)
        forward = self._forward(x)
        backward = self._forward(x.flip(-1)).flip(-1)
        return forward + backward - x

    __call__ = matvec


# ----------------------------------------------------------------------------- B-hat x


class MeanMaskOperator:
    """x -> B-hat x for one head, B-hat = (1/r) sum_t M_t, in O(r n) time.

    (M_t x)_i is the sum of x over i's block in sample t. Per sample, the block sums are differences
    of the prefix sums of x at the block starts, then every position picks its block's sum by its
    block id: one gather along sorted ids per sample, which is several times faster than gathering
    prefix sums at both ends of every position's block. Holds int64 [r, n] block ids and
    [r, blocks + 1] block starts.
    """

    def __init__(self, partitions: Partitions, head: int = 0):
        one = select_head(partitions, head).to("cpu")
        self.n, self.samples = one.n, one.num_samples
        ids = one.block_ids()[0]  # [r, n]
        blocks = int(ids[:, -1].max()) + 1
        pos = torch.arange(self.n).expand_as(ids)
        # starts[t, b] = first position of block b in sample t; n for b past the sample's last block,
        # so that differences of prefix sums give 0 there and the true sum for the last block.
        starts = torch.full((self.samples, blocks + 1), self.n, dtype=torch.int64)
        self._starts = starts.scatter_reduce(1, ids, pos, reduce="amin")
        self._ids = ids

    def matvec(self, x: Tensor) -> Tensor:
        """B-hat x for x float64 [n] -> [n]."""
        if x.shape != (self.n,):
            raise ValueError(f"x must have shape ({self.n},), got {tuple(x.shape)}")
        prefix = torch.nn.functional.pad(torch.cumsum(x.to(torch.float64), 0), (1, 0))
        block_sums = prefix[self._starts].diff(dim=1)  # [r, blocks]
        return block_sums.gather(1, self._ids).sum(0) / self.samples

    __call__ = matvec


# ----------------------------------------------------------------------------- spectral norm


def lanczos_norm(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    *,
    rtol: float = 1e-8,
    max_iter: int = 300,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float, int]:
    """||A||_2 = max |eigenvalue| of a symmetric operator A [n, n], by Lanczos with full reorthogonalisation.

    Each step orthogonalises the new vector against every previous Lanczos vector twice
    ("twice is enough"), so the basis stays orthonormal to rounding and no spurious copies of
    converged Ritz values appear. Stops when the Ritz value theta of largest magnitude has residual
    ||A y - theta y|| = beta_k |s_k| <= rtol |theta|, when the Krylov space becomes invariant
    (beta_k ~ 0: then its Ritz values are exact eigenvalues, and with a random start every distinct
    eigenvalue has a nonzero component, so the norm is exact), or after ``max_iter`` steps.

    Why the answer is trustworthy: Ritz values interlace the spectrum, so |theta| <= ||A|| always
    (the estimate never overshoots), and some eigenvalue lies within the residual of theta. That the
    largest one has been found is probabilistic over the random start. For y in K_{k-1}(A, v),
    A y lies in K_k, so y^T A^2 y = ||P A P y||^2 <= max|theta|^2 ||y||^2 (P the projector on K_k);
    and K_{k-1}(A, v) contains the Krylov space of A^2 from v after k' = floor((k-2)/2) products.
    Hence max|theta|^2 is at least the Lanczos estimate of lambda_max(A^2) (A^2 is PSD) after k'
    products, for which Kuczynski and Wozniakowski (1992) prove, for a uniformly random start,
    P(relative error >= eps) <= 1.648 sqrt(n) exp(-(2k' - 1) sqrt(eps)) whatever the spectrum.
    At n = 1e5 and k = 150 steps that is 2e-4 for eps = 1e-2 (0.5 % in the norm). In practice the
    residual test stops much earlier (20-90 steps at n = 1e5), and the estimate agrees with dense
    eigvalsh wherever both run (tests/test_masks.py).

    Returns:
        (estimate of ||A||_2, residual of that Ritz pair, number of Lanczos steps).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    max_iter = max(1, min(n, max_iter))
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = torch.randn(n, generator=generator, dtype=dtype)
    basis = torch.empty(max_iter, n, dtype=dtype)
    basis[0] = v / v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta, residual = 0.0, float("inf")
    for k in range(max_iter):
        w = matvec(basis[k]).to(dtype)
        q = basis[: k + 1]
        coef = q @ w
        w = w - q.T @ coef
        coef2 = q @ w
        w = w - q.T @ coef2
        alphas.append(float(coef[k] + coef2[k]))
        beta = float(w.norm())
        last = k == max_iter - 1
        if last or k < 20 or k % 4 == 3 or beta == 0.0:
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                t += torch.diag(off, 1) + torch.diag(off, -1)
            vals, vecs = torch.linalg.eigh(t)
            idx = int(vals.abs().argmax())
            theta = abs(float(vals[idx]))
            residual = beta * abs(float(vecs[-1, idx]))
            invariant = beta <= 1e-13 * max(theta, float(vals.abs().max())) or beta == 0.0
            if invariant or residual <= rtol * theta or last:
                if invariant:
                    residual = 0.0 if beta == 0.0 else residual
                return theta, residual, k + 1
        betas.append(beta)
        basis[k + 1] = w / beta
    return theta, residual, max_iter  # not reached: the loop returns at its last step


# ----------------------------------------------------------------------------- max and row-sum norms


def _one_side_errors(extent: Tensor, reach: Tensor, slope: float, r: int) -> tuple[Tensor, Tensor]:
    """Errors along one side of each row, from how far each sample's block reaches.

    Args:
        extent: int64 [rows, r], sorted ascending: sample t's block covers distances 1..extent_t on
            this side of the row's diagonal entry.
        reach: int64 [rows], how many entries the row has on this side (distances 1..reach).

    Returns:
        (max over d in 1..reach of |c(d) - q^d|, sum over the same d), float64 [rows] each, where
        c(d) = #{t : extent_t >= d} / r. c is constant, c_k = (r-k)/r, on the piece
        d in [extent_(k) + 1, extent_(k+1)], k = 0..r (extent_(0) = 0, extent_(r+1) = reach).
    """
    rows, dev = extent.shape[0], extent.device
    bounds = torch.cat([torch.zeros(rows, 1, dtype=extent.dtype, device=dev), extent, reach[:, None]], dim=1)
    lo, hi = bounds[:, :-1] + 1, bounds[:, 1:]  # piece k is d in [lo_k, hi_k], [rows, r+1]
    valid = lo <= hi
    q = math.exp(-slope)
    q_hi = torch.exp(-slope * bounds.to(torch.float64))
    q_lo, q_hi = q_hi[:, :-1] * q, q_hi[:, 1:]  # q^lo, q^hi
    k = torch.arange(r + 1, dtype=torch.float64, device=dev)
    level = (r - k) / r  # c_k
    # Max: q^d is monotone, so |c - q^d| is largest at an end of the piece.
    peak = torch.where(valid, torch.maximum((level - q_lo).abs(), (level - q_hi).abs()), 0.0).amax(dim=1)
    # Sum: q^d >= c_k exactly when d <= d*_k = floor(ln(1/c_k) / m), which depends on k only;
    # split each piece there and sum each part in closed form.
    if slope == 0.0:
        cross = torch.full((r + 1,), 2**62, dtype=torch.int64, device=dev)  # q^d = 1 >= c always
    else:
        cross_f = torch.where(level > 0, -torch.log(level) / slope, float(2**62)).clamp(max=float(2**62))
        cross = torch.floor(cross_f).to(torch.int64)
    upper_hi = torch.minimum(hi, cross)  # d in [lo, min(hi, d*)]: q^d - c >= 0
    lower_lo = torch.maximum(lo, cross + 1)  # d in [max(lo, d* + 1), hi]: c - q^d > 0
    n_up = (upper_hi - lo + 1).clamp(min=0).to(torch.float64)
    n_low = (hi - lower_lo + 1).clamp(min=0).to(torch.float64)
    if slope == 0.0:
        geo_up, geo_low = n_up, n_low
    else:
        # sum_{d=a}^{a+len-1} q^d = q^a (1 - q^len) / (1 - q), with expm1 so tiny slopes keep digits.
        unit = 1.0 / -math.expm1(-slope)
        q_cross = torch.exp(-slope * (cross + 1).clamp(max=2**40).to(torch.float64))
        q_lower_lo = torch.where(cross + 1 > lo, q_cross, q_lo)
        geo_up = q_lo * -torch.expm1(-slope * n_up) * unit
        geo_low = q_lower_lo * -torch.expm1(-slope * n_low) * unit
    total = torch.where(valid, (geo_up - level * n_up) + (level * n_low - geo_low), 0.0).sum(dim=1)
    return peak, total


def _sorted_rows(x: Tensor) -> Tensor:
    small = x.abs().max() < 2**31 if x.numel() else True
    y = x.to(torch.int32) if small else x
    return y.contiguous().sort(dim=1).values.to(torch.int64)


def _structured_max_row_sum(start: Tensor, end: Tensor, slope: float) -> tuple[float, float]:
    """Exact max-norm and row-sum-norm errors of one head from its block bounds [r, n]."""
    r, n = start.shape
    pos = torch.arange(n, dtype=torch.int64, device=start.device)
    best_max, best_row = 0.0, 0.0
    step = max(1, (1 << 21) // (r + 1))  # rows per chunk: bounds the [rows, r+1] temporaries
    for a in range(0, n, step):
        b = min(n, a + step)
        i = pos[a:b]
        # Rows contiguous and int32 before sorting along samples: several times faster than
        # sorting the transposed int64 view.
        right = _sorted_rows(end[:, a:b].T - 1 - i[:, None])  # block of i reaches i+1..end-1
        left = _sorted_rows(i[:, None] - start[:, a:b].T)  # and start..i-1
        peak_r, sum_r = _one_side_errors(right, n - 1 - i, slope, r)
        _, sum_l = _one_side_errors(left, i.clone(), slope, r)
        # E is symmetric, so the upper triangle (the right sides) already holds every |E_ij|.
        best_max = max(best_max, float(peak_r.max()))
        best_row = max(best_row, float((sum_r + sum_l).max()))
    return best_max, best_row


def mask_errors_structured(
    partitions: Partitions,
    *,
    rtol: float = 1e-6,
    max_iter: int = 300,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Errors of B-hat against the bidirectional kernel B without forming any n x n matrix.

    max and row_sum are exact (piecewise-constant rows, O(n r log r) per head); spectral is the
    Lanczos estimate of ``lanczos_norm`` on x -> B-hat x - B x (O(n r) per step), never larger
    than the true norm and converged to relative residual ``rtol`` unless ``max_iter`` ran out
    (check ``spectral_residual``). ``seed`` fixes the Lanczos start vector, so results are
    reproducible.

    Returns:
        dict with float64 tensors [H]: ``max``, ``spectral``, ``row_sum``, ``spectral_residual``.
    """
    _check_alibi(partitions)
    h = partitions.num_heads
    out = {k: torch.zeros(h, dtype=torch.float64) for k in ("max", "spectral", "row_sum", "spectral_residual")}
    for head, slope in enumerate(partitions.slopes.tolist()):
        one = select_head(partitions, head).to("cpu")
        start, end = (t[0] for t in one.block_bounds())
        out["max"][head], out["row_sum"][head] = _structured_max_row_sum(start, end, slope)
        bhat = MeanMaskOperator(one)
        kernel = KernelOperator(one.n, slope)
        gen = torch.Generator().manual_seed(seed)
        norm, residual, _ = lanczos_norm(lambda x: bhat(x) - kernel(x), one.n, rtol=rtol,
                                         max_iter=max_iter, generator=gen)
        out["spectral"][head], out["spectral_residual"][head] = norm, residual
    return out


def mask_errors(partitions: Partitions, method: str = "auto", **kwargs) -> dict[str, Tensor]:
    """Max-norm, spectral-norm and row-sum-norm error of B-hat = mean of the sampled masks against B.

    Args:
        partitions: H heads x r samples of positional-LSH partitions of n positions.
        method: "dense" (forms n x n matrices; small n), "structured" (O(n r) memory; any n), or
            "auto" (dense for n <= DENSE_MAX_N, else structured).
        **kwargs: passed to ``mask_errors_structured`` (rtol, max_iter, seed).

    Returns:
        dict of float64 tensors [H]: ``max``, ``spectral``, ``row_sum``, ``spectral_residual``.
    """
    _check_partitions(partitions)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "dense" if partitions.n <= DENSE_MAX_N else "structured"
    if method == "dense":
        return mask_errors_dense(partitions)
    return mask_errors_structured(partitions, **kwargs)
