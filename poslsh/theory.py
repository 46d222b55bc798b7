"""Sample counts, block-size bounds and the attention error bound of positional LSH.

Notation: n positions, slope m >= 0, q = e^{-m}, kernel B_ij = q^|i-j| ([n, n], bidirectional),
r independent partitions (samples) per head with masks M_1..M_r, E[M_t] = B, and
B-hat = (1/r) sum_t M_t. delta is a failure probability, eps an error level. Every bound holds for
both sampling schemes ("grid" and "cut"): they only use that two positions d apart share a block
with probability exactly q^d, and that one sample's masks are independent of the others'.

Each function's docstring states the inequality it implements and what it assumes. The inverse
functions (``max_norm_eps``, ``spectral_eps``) give the error level that a given r guarantees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "max_norm_samples",
    "max_norm_eps",
    "block_size_bound",
    "block_tail_probability",
    "kernel_norm_bound",
    "spectral_samples",
    "spectral_eps",
    "row_sum_error_bound",
    "attention_error_bound",
]


# ----------------------------------------------------------------------------- validation


def _int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _slope(value) -> float:
    slope = _real(value, "slope")
    if slope < 0:
        raise ValueError(f"slope must be >= 0, got {slope}")
    return slope


def _positive(value, name: str) -> float:
    value = _real(value, name)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _delta(value) -> float:
    delta = _real(value, "delta")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


# ----------------------------------------------------------------------------- max norm


def max_norm_samples(n: int, eps: float, delta: float, heads: int = 1) -> int:
    """Samples r such that P(max_{h, i, j} |B-hat_ij - B_ij| >= eps) <= delta.

    Inequality: each off-diagonal entry of B-hat is a mean of r i.i.d. Bernoulli(B_ij) variables,
    so Hoeffding gives P(|B-hat_ij - B_ij| >= eps) <= 2 exp(-2 r eps^2). A union bound over the
    N = heads * n (n - 1) / 2 pairs i < j (B-hat and B are symmetric, and the diagonal is exactly 1
    in both) gives failure probability <= 2 N exp(-2 r eps^2) <= delta when
    r >= ln(2 N / delta) / (2 eps^2).

    Assumptions: samples independent across t (any dependence across heads is allowed: the union
    bound does not need independence). No slope enters: the bound is uniform in m. n = 1 (no
    off-diagonal pair) and eps >= 1 (an entry error is < 1 unless B_ij is 0 or 1, and then it is 0)
    need one sample.
    """
    n, heads = _int(n, "n"), _int(heads, "heads")
    eps, delta = _positive(eps, "eps"), _delta(delta)
    pairs = heads * n * (n - 1) / 2
    if pairs == 0 or eps >= 1:
        return 1
    return max(1, math.ceil(math.log(2 * pairs / delta) / (2 * eps**2)))


def max_norm_eps(n: int, samples: int, delta: float, heads: int = 1) -> float:
    """The eps that ``max_norm_samples`` guarantees with r = samples: sqrt(ln(2N/delta) / (2r)).

    Same inequality and assumptions as ``max_norm_samples`` (N = heads n (n-1)/2); 0 when n = 1.
    """
    n, samples, heads = _int(n, "n"), _int(samples, "samples"), _int(heads, "heads")
    delta = _delta(delta)
    pairs = heads * n * (n - 1) / 2
    if pairs == 0:
        return 0.0
    return math.sqrt(math.log(2 * pairs / delta) / (2 * samples))


# ----------------------------------------------------------------------------- block sizes


def block_tail_probability(n: int, slope: float, length: int) -> float:
    """Upper bound on P(one sample has a block longer than ``length``): min(1, (n - length) q^length).

    A block longer than L contains positions i and i + L for some i in 0..n-L-1, and each such
    pair collides with probability exactly q^L (both schemes); union bound over the n - L values
    of i. 0 when length >= n (no block can be longer than n).
    """
    n, length = _int(n, "n"), _int(length, "length")
    slope = _slope(slope)
    if length >= n:
        return 0.0
    return min(1.0, (n - length) * math.exp(-slope * length))


def block_size_bound(n: int, slope: float, samples: int, delta: float) -> int:
    """L such that, with probability >= 1 - delta, every block of every sample has length <= L.

    Inequality: P(positions i and i + L share a block) = q^L for both schemes, and a block of
    length >= L + 1 contains such a pair for some start i. A union over the < n starts and the r
    samples gives P(some block > L) <= n r q^L <= delta for L = ceil(ln(n r / delta) / m).

    Assumptions: one head (for H heads pass delta / H); clipped at n (no block exceeds n), so
    slope 0 (one block of length n) gives n. The bound is O(log(n r / delta) / m); the mean block is
    (1 + q) / (1 - q) ~ 2/m positions per position's block for "grid", 1/(1 - q) ~ 1/m per block
    for "cut".
    """
    n, samples = _int(n, "n"), _int(samples, "samples")
    slope, delta = _slope(slope), _delta(delta)
    if slope == 0:
        return n
    length = math.ceil(math.log(n * samples / delta) / slope)
    return int(min(n, max(1, length)))


# ----------------------------------------------------------------------------- spectral norm


def kernel_norm_bound(n: int, slope: float) -> float:
    """||B||_2 <= max_i sum_j q^|i-j| (the largest row sum, the middle row) <= coth(m/2) = (1+q)/(1-q).

    B is symmetric with nonnegative entries, so its spectral norm is at most its infinity norm.
    Returns n for slope 0 (B is all ones, ||B|| = n exactly).
    """
    n, slope = _int(n, "n"), _slope(slope)
    if slope == 0:
        return float(n)
    i = (n - 1) // 2
    q = math.exp(-slope)
    side = lambda k: q * -math.expm1(-slope * k) / -math.expm1(-slope)  # noqa: E731  sum_{d=1}^k q^d
    return 1.0 + side(i) + side(n - 1 - i)


def _second_moment_bound(slope: float) -> float:
    """E|block containing i|^2 <= 2q/(1-q)^2 + ((1+q)/(1-q))^2 for either scheme.

    For any position i the block is [i - A, i + C] with P(A >= a, C >= c) = q^(a+c) on the infinite
    line (both schemes; docs/MATH.md, section 2), so A and C are independent geometric,
    E(1 + A + C)^2 = Var(A) + Var(C) + (1 + EA + EC)^2. Clipping to 0..n-1 only shortens blocks.
    """
    q = math.exp(-slope)
    p = -math.expm1(-slope)
    return 2 * q / p**2 + ((1 + q) / p) ** 2


def _spectral_required(n: int, slope: float, eps: float, delta: float, length: int) -> float:
    """r (real) that the matrix Bernstein step needs when blocks are capped at ``length``."""
    b = kernel_norm_bound(n, slope)
    norm_cond = min(length, b + eps / 2)  # ||B'|| for the conditioned mean B'
    tail = block_tail_probability(n, slope, length)
    var = min(length * norm_cond, _second_moment_bound(slope) / (1 - tail))  # ||E M'^2|| <= this
    t = eps / 2
    return 2 * math.log(4 * n / delta) * (var + length * t / 3) / t**2


def _spectral_cap(n: int, slope: float, eps: float, delta: float, samples: int) -> int:
    """Smallest block cap L with r * p_L <= delta/2 and n * p_L <= eps/2 (p_L = block_tail_probability)."""
    need = max(2 * samples / delta, 2 * n / eps)
    # Both conditions read p_L <= 1/need; (n - L) q^L <= n q^L <= 1/need once L >= ln(n need)/m.
    # p_L = (n - L) q^L is decreasing in L, so bisect for the smallest L below that which still works.
    ok = lambda L: samples * block_tail_probability(n, slope, L) <= delta / 2 \
        and n * block_tail_probability(n, slope, L) <= eps / 2  # noqa: E731
    hi = min(n, max(1, math.ceil(math.log(n * need) / slope)))
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def spectral_samples(n: int, slope: float, eps: float, delta: float) -> int:
    """Samples r such that P(||B-hat - B||_2 >= eps) <= delta (one head).

    Inequality (matrix Bernstein, Tropp 2015, Thm 6.6.1): for independent zero-mean symmetric
    d x d matrices X_t with ||X_t|| <= R and ||sum_t E X_t^2|| <= s^2,
    P(||sum_t X_t|| >= t) <= 2 d exp(-(t^2/2) / (s^2 + R t/3)).

    Applied to X_t = (M_t - B)/r it needs ||M_t|| bounded, but ||M_t|| = largest block, which is
    bounded only with high probability. Handled honestly, with delta split in halves:

    1. Cap L: A_t = {every block of sample t has length <= L}; P(not A_t) <= p_L := (n - L) q^L
       (``block_tail_probability``). L is the smallest integer with r p_L <= delta/2 and
       n p_L <= eps/2, so P(some sample violates its cap) <= delta/2.
    2. On the event that all A_t hold, the masks are i.i.d. draws M'_t of the law of M given A,
       with mean B'. Since B = P(A) B' + P(not A) E[M | not A] and both means are PSD with norm
       <= n, ||B' - B|| = P(not A) ||B' - E[M | not A]|| <= n p_L <= eps/2.
    3. Bernstein for X_t = (M'_t - B')/r with t = eps/2 and d = n: both M'_t and B' are PSD with
       norm <= L, so R = L/r. M'^2 <= L M' in PSD order (each block J_b has J_b^2 = |b| J_b), so
       E (M' - B')^2 <= E M'^2 <= L B', and ||B'|| <= min(L, ||B|| + eps/2), ||B|| <= the largest
       row sum of B <= coth(m/2) (``kernel_norm_bound``). Also ||E M'^2|| <= max row sum of
       E M'^2 <= E|block(i)|^2 / P(A) <= (2q/(1-q)^2 + ((1+q)/(1-q))^2) / (1 - p_L); we take the
       smaller. With s^2 = var / r, requiring the tail <= delta/2 gives
       r >= 2 ln(4n/delta) (var + L eps/6) / (eps/2)^2.
    So P(||B-hat - B|| >= eps) <= delta/2 + delta/2. r enters the cap through r p_L, so r and L are
    found together by the fixed-point iteration r <- required(L(r)) from r = 1, which increases
    and stops at the smallest r satisfying both.

    Assumptions: one head (for H heads pass delta / H); samples independent. slope 0 needs one
    sample (every mask is the all-ones B).
    """
    n, slope = _int(n, "n"), _slope(slope)
    eps, delta = _positive(eps, "eps"), _delta(delta)
    if slope == 0 or n == 1:
        return 1
    samples = 1
    for _ in range(200):
        length = _spectral_cap(n, slope, eps, delta, samples)
        needed = max(1, math.ceil(_spectral_required(n, slope, eps, delta, length)))
        if needed <= samples:
            return samples
        samples = needed
    return samples  # the iteration grows like log; it settles in a handful of steps


def spectral_eps(n: int, slope: float, samples: int, delta: float) -> float:
    """The smallest eps (to a relative 1e-6) for which ``spectral_samples(n, slope, eps, delta) <= samples``.

    The error level the matrix-Bernstein bound guarantees with probability >= 1 - delta for r =
    ``samples``; same assumptions as ``spectral_samples``. Found by bisection on log eps: the
    required r decreases as eps grows. 0 for slope 0 or n = 1.
    """
    n, samples, slope = _int(n, "n"), _int(samples, "samples"), _slope(slope)
    delta = _delta(delta)
    if slope == 0 or n == 1:
        return 0.0
    lo, hi = 1e-12, 1e12
    while hi / lo > 1 + 1e-6:
        mid = math.sqrt(lo * hi)
        if spectral_samples(n, slope, mid, delta) <= samples:
            hi = mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- row sums and attention


def row_sum_error_bound(n: int, slope: float, samples: int, delta: float) -> float:
    """rho with P(max_i sum_j |B-hat_ij - B_ij| > rho) <= delta (one head).

    Derivation, with delta split in halves:

    1. L = block_size_bound(n, slope, r, delta/2): with probability >= 1 - delta/2 every block has
       length <= L, so two positions >= L apart never share a block: B-hat_ij = 0 and the error
       there is exactly B_ij = q^|i-j|. A row has at most two entries at each distance d, so this
       tail contributes at most 2 sum_{d=L}^{n-1} q^d.
    2. For 1 <= |i-j| <= L-1: Hoeffding plus a union over the N = sum_{d=1}^{L-1} (n - d) pairs
       i < j gives |B-hat_ij - B_ij| < e := sqrt(ln(4N/delta) / (2r)) for all of them with
       probability >= 1 - delta/2. An entry error is also at most max(q^d, 1 - q^d) (both B-hat and
       B lie in [0, 1]), so each distance contributes at most 2 min(e, max(q^d, 1 - q^d)).

    rho = sum_{d=1}^{L-1} 2 min(e, max(q^d, 1 - q^d)) + 2 sum_{d=L}^{n-1} q^d. slope 0 gives 0 (every
    mask is B). Assumptions: as for ``max_norm_samples`` and ``block_size_bound``.
    """
    n, samples, slope = _int(n, "n"), _int(samples, "samples"), _slope(slope)
    delta = _delta(delta)
    if slope == 0 or n == 1:
        return 0.0
    length = block_size_bound(n, slope, samples, delta / 2)
    near = min(length - 1, n - 1)
    total = 0.0
    if near >= 1:
        pairs = near * n - near * (near + 1) / 2
        e = math.sqrt(math.log(4 * pairs / delta) / (2 * samples))
        d = torch.arange(1, near + 1, dtype=torch.float64)
        b = torch.exp(-slope * d)
        total += float(2 * torch.minimum(torch.full_like(b, e), torch.maximum(b, 1 - b)).sum())
    if length <= n - 1:  # sum_{d=L}^{n-1} q^d in closed form
        total += 2 * math.exp(-slope * length) * math.expm1(-slope * (n - length)) / math.expm1(-slope)
    return total


def attention_error_bound(
    row_sum_error: float | Tensor,
    logit_bound: float,
    value_bound: float,
    *,
    row_mass: float | Tensor = 1.0,
) -> float | Tensor:
    """Entrywise bound on |O-hat_i - O_i| for the positional-LSH attention estimator, for all Q, K, V.

    Setting: a_ij = exp(s_ij) with logits s_ij = q_i . k_j * scale, |s_ij| <= beta (``logit_bound``);
    values |v_j| <= V entrywise (``value_bound``); w_ij = a_ij B_ij (exact ALiBi weights) and
    w-hat_ij = a_ij B-hat_ij (the estimator's, numerator and denominator both use B-hat);
    O_i = sum_j w_ij v_j / sum_j w_ij, O-hat_i = sum_j w-hat_ij v_j / sum_j w-hat_ij.

    Derivation. Since sum_j w_ij (v_j - O_i) = 0,
        O-hat_i - O_i = sum_j w-hat_ij (v_j - O_i) / W-hat_i
                      = sum_j (w-hat_ij - w_ij)(v_j - O_i) / W-hat_i,   W-hat_i = sum_j w-hat_ij.
    O_i is a convex combination of the v_j, so |v_j - O_i| <= 2V entrywise;
    |w-hat_ij - w_ij| = a_ij |B-hat_ij - B_ij| <= e^beta |B-hat_ij - B_ij|; and
    W-hat_i >= e^-beta sum_j B-hat_ij. Since B-hat_ii = 1, sum_j B-hat_ij >= 1; and
    sum_j B-hat_ij >= sum_j B_ij - sum_j |B-hat_ij - B_ij| >= S_i - rho_i with S_i = sum_j B_ij.
    Hence, with rho_i = sum_j |B-hat_ij - B_ij| (``row_sum_error``),

        |O-hat_i - O_i| <= 2 V e^{2 beta} rho_i / max(1, S_i - rho_i).

    ``row_mass`` is a lower bound on S_i over the rows considered (default 1, which gives the plain
    2 V e^{2 beta} rho). Bidirectional rows have S_i >= (1 - q^n)/(1 - q) (a corner row), causal
    rows S_i = (1 - q^{i+1})/(1 - q) >= 1; for small slopes S ~ 1/m, so the improvement is large.
    The causal estimator restricts both sums to j <= i; the same derivation holds with rho_i the
    row-sum error over j <= i, which is at most the bidirectional one.

    Returns:
        the bound, same type/shape as ``row_sum_error`` broadcast with ``row_mass``.
    """
    beta = _real(logit_bound, "logit_bound")
    vb = _real(value_bound, "value_bound")
    if beta < 0:
        raise ValueError(f"logit_bound must be >= 0, got {beta}")
    if vb < 0:
        raise ValueError(f"value_bound must be >= 0, got {vb}")
    factor = 2 * vb * math.exp(2 * beta)
    if isinstance(row_sum_error, Tensor) or isinstance(row_mass, Tensor):
        rho = torch.as_tensor(row_sum_error, dtype=torch.float64)
        mass = torch.as_tensor(row_mass, dtype=torch.float64)
        if (rho < 0).any() or not torch.isfinite(rho).all():
            raise ValueError("row_sum_error must be finite and >= 0")
        return factor * rho / torch.clamp(mass - rho, min=1.0)
    rho = _real(row_sum_error, "row_sum_error")
    mass = _real(row_mass, "row_mass")
    if rho < 0:
        raise ValueError(f"row_sum_error must be >= 0, got {rho}")
    return factor * rho / max(1.0, mass - rho)
