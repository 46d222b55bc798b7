"""General positional kernels f(d), d = |i - j| = 0, 1, 2, ..., for positional LSH.

The grid scheme realises any kernel that is convex and non-increasing on the integers with
f(0) = 1 (docs/MATH.md, section 2): draw a width W with

    P(W = w) = w (f(w-1) - 2 f(w) + f(w+1)),   w >= 1,      plus   P(W = inf) = f_inf = lim f(d),

and an offset U uniform on {0..W-1}; then P[h(i) = h(j)] = sum_w P(W = w) (1 - d/w)+ + f_inf = f(d).

Sampling W needs no table. Summing the law by parts (with g(v) = f(v) - f(v+1), which is
non-negative and non-increasing, so v g(v) -> 0) gives the survival function in closed form,

    S(w) = P(W > w) = (w + 1) (f(w) - f(w+1)) + f(w+1)        (the atom at infinity included),

so W = min{w >= 1 : S(w) < u} for u uniform on (0, 1] is found by bisection over w in
[1, 2^60]: O(60) vectorised evaluations of f per draw, exact for heavy tails as for light ones (no
truncated cumulative table, no tail approximation). The only approximation: a width beyond
``MAX_FINITE_WIDTH`` = 2^60 is stored as the unbounded width, which changes collision probabilities
of positions < n by at most n / 2^60.

Each kernel supplies ``decrement(d) = f(d) - f(d+1)`` in a cancellation-free form, because S(w)
multiplies it by w + 1: the naive difference of two nearly equal floats would lose ~log10(w) digits.

Kernels here (d >= 0 is the distance; every formula is the exact f used):

* ``alibi(m)``:          f(d) = exp(-m d)                        (ALiBi; m >= 0)
* ``kerple_power(a, b)``: f(d) = exp(-a d^b), a > 0, 0 < b <= 1  (KERPLE "power": bias -a d^b;
  b > 1 is not convex at d = 0 and is refused)
* ``kerple_log(r1, r2)``: f(d) = (1 + r2 d)^(-r1), r1, r2 > 0    (KERPLE "logarithmic": bias
  -r1 log(1 + r2 d)); ``power_law(p)`` = ``kerple_log(p, 1)`` = (1 + d)^(-p), heavy-tailed
  for small p (p <= 1: the row mass sum_d f(d) diverges, so truncation must keep long windows)
* ``from_table(values, beyond="last" | "zero")``: f(d) = values[d] for d < len(values); beyond the
  table f is its last value (default: always convex, leaves an atom at W = inf of that mass) or 0
  (then the table's last two values must keep convexity at the junction).

Validation (``check_kernel``): f(0) = 1, f >= 0, non-increasing, and convex, checked on the table
(tables) or on d = 0 .. ``CHECK_LENGTH`` (parametric kernels, whose parameter ranges already imply
it); a violation raises ValueError naming the first offending d.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Kernel", "alibi", "kerple_power", "kerple_log", "power_law", "from_table", "check_kernel",
           "as_kernels", "width_survival", "sample_widths", "kernel_matrix", "MAX_FINITE_WIDTH"]

# Widths above this are stored as the unbounded width (hashing.UNBOUNDED_WIDTH): see module docstring.
MAX_FINITE_WIDTH = 2**60
# Parametric kernels are checked numerically on d = 0 .. CHECK_LENGTH (their parameter ranges imply
# the property everywhere; the check guards against a wrong formula).
CHECK_LENGTH = 4096
# Slack for rounding in the checks: a table is accepted if violations are below this (absolute).
TOLERANCE = 1e-12

FloatFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Kernel:
    """A positional kernel f(d) on d = 0, 1, 2, ... (float64 in, float64 out, elementwise).

    Attributes:
        name: a readable description with its parameters, e.g. "alibi(m=0.25)".
        f: d -> f(d).
        decrement: d -> f(d) - f(d+1), computed without cancellation.
        limit: lim_{d -> inf} f(d) (the mass of the width atom at infinity).
        slope: the ALiBi slope if this kernel is exp(-m d), else None.
        table_length: for tables, the number of given values (f is extended beyond it), else None.
    """

    name: str
    f: FloatFn = field(repr=False)
    decrement: FloatFn = field(repr=False)
    limit: float = 0.0
    slope: float | None = None
    table_length: int | None = None

    def __call__(self, d: Tensor | int | float) -> Tensor:
        return self.f(torch.as_tensor(d, dtype=torch.float64))

    def log_f(self, d: Tensor) -> Tensor:
        """log f(d) (-inf where f = 0), float64; ALiBi's is exactly -m d."""
        if self.slope is not None:
            return -self.slope * d.to(torch.float64)
        return torch.log(self.f(d.to(torch.float64)))

    def values(self, n: int) -> Tensor:
        """f(0), ..., f(n-1): float64 [n]."""
        return self.f(torch.arange(n, dtype=torch.float64))

    def window(self, eps: float, n: int) -> int:
        """Truncation half-width: the smallest w with f(w) <= eps (so every dropped weight is <= eps),
        capped at n - 1; for ALiBi ceil(ln(1/eps)/m), as ``window_sizes`` computes it."""
        if self.slope is not None:
            return n - 1 if self.slope == 0 else int(min(n - 1, math.ceil(math.log(1.0 / eps) / self.slope)))
        return _first_below(lambda w: self.f(w.to(torch.float64)) <= eps, n)


def _first_below(pred: Callable[[Tensor], Tensor], n: int) -> int:
    """Smallest w in [0, n-1] with pred(w) true (pred monotone false..true), n - 1 if none."""
    lo, hi = 0, n - 1
    if not bool(pred(torch.tensor([hi]))[0]):
        return n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if bool(pred(torch.tensor([mid]))[0]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _positive(x: float, name: str, allow_zero: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {x!r}")
    return float(x)


def alibi(m: float) -> Kernel:
    """ALiBi: f(d) = exp(-m d), m >= 0 (m = 0: f = 1, one block)."""
    m = _positive(m, "m", allow_zero=True)
    if m == 0:
        return Kernel("alibi(m=0)", lambda d: torch.ones_like(d), lambda d: torch.zeros_like(d), 1.0, 0.0)
    p = -math.expm1(-m)  # 1 - e^{-m} without cancellation for small m
    return Kernel(f"alibi(m={m:g})", lambda d: torch.exp(-m * d), lambda d: torch.exp(-m * d) * p, 0.0, m)


def kerple_power(a: float, b: float) -> Kernel:
    """KERPLE power form: bias -a d^b, f(d) = exp(-a d^b), a > 0, 0 < b <= 1 (b = 1 is ALiBi)."""
    a, b = _positive(a, "a"), _positive(b, "b")
    if b > 1:
        raise ValueError(f"kerple_power needs b <= 1 for convexity (f''(0+) < 0 when b > 1), got b={b}")

    def dec(d: Tensor) -> Tensor:
        # (d+1)^b - d^b = d^b expm1(b log1p(1/d)) for d > 0 (no cancellation), 1 at d = 0.
        step = torch.where(d > 0, d.pow(b) * torch.expm1(b * torch.log1p(1.0 / d.clamp(min=1.0))), torch.ones_like(d))
        return torch.exp(-a * d.pow(b)) * -torch.expm1(-a * step)

    return Kernel(f"kerple_power(a={a:g}, b={b:g})", lambda d: torch.exp(-a * d.pow(b)), dec, 0.0,
                  a if b == 1 else None)


def kerple_log(r1: float, r2: float) -> Kernel:
    """KERPLE logarithmic form: bias -r1 log(1 + r2 d), f(d) = (1 + r2 d)^(-r1), r1, r2 > 0."""
    r1, r2 = _positive(r1, "r1"), _positive(r2, "r2")

    def f(d: Tensor) -> Tensor:
        return torch.exp(-r1 * torch.log1p(r2 * d))

    def dec(d: Tensor) -> Tensor:
        # f(d) - f(d+1) = f(d) (1 - ((1 + r2 d) / (1 + r2 (d+1)))^r1) = -f(d) expm1(-r1 log1p(r2 / (1 + r2 d)))
        return f(d) * -torch.expm1(-r1 * torch.log1p(r2 / (1.0 + r2 * d)))

    return Kernel(f"kerple_log(r1={r1:g}, r2={r2:g})", f, dec, 0.0, None)


def power_law(p: float) -> Kernel:
    """f(d) = (1 + d)^(-p), p > 0: ``kerple_log(p, 1)``; heavy-tailed (divergent row mass) for p <= 1."""
    k = kerple_log(p, 1.0)
    return Kernel(f"power_law(p={float(p):g})", k.f, k.decrement, 0.0, None)


def from_table(values: Sequence[float] | Tensor, beyond: str = "last") -> Kernel:
    """A user's table f(0..L-1) = values, extended beyond L by its last value ("last", the default:
    f then tends to values[-1], an atom at W = inf of that mass) or by 0 ("zero": widths <= L)."""
    v = torch.as_tensor(values, dtype=torch.float64).detach().cpu().flatten()
    if v.numel() == 0:
        raise ValueError("from_table needs at least one value (f(0) = 1)")
    if beyond not in ("last", "zero"):
        raise ValueError(f"beyond must be 'last' or 'zero', got {beyond!r}")
    if not torch.isfinite(v).all():
        raise ValueError(f"table values must be finite, got {v.tolist()[:8]}...")
    tail = float(v[-1]) if beyond == "last" else 0.0
    ext = torch.cat([v, torch.tensor([tail, tail], dtype=torch.float64)])
    length = v.numel()

    def f(d: Tensor) -> Tensor:
        idx = d.clamp(max=length).to(torch.int64)  # index L holds the extension value
        return ext.to(d.device)[idx]

    def dec(d: Tensor) -> Tensor:
        idx = d.clamp(max=length).to(torch.int64)
        table = ext.to(d.device)
        return table[idx] - table[idx + 1]  # differences of given numbers: exact as given

    kernel = Kernel(f"table(L={length}, beyond={beyond})", f, dec, tail, None, length)
    check_kernel(kernel)
    return kernel


def check_kernel(kernel: Kernel, length: int | None = None) -> Kernel:
    """Raise ValueError unless f(0) = 1, f >= 0, f non-increasing and convex on d = 0..length
    (default: the table plus two extension points, or CHECK_LENGTH); names the first bad d."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"expected a poslsh.positional_kernels.Kernel, got {type(kernel).__name__}")
    if length is None:
        length = kernel.table_length + 2 if kernel.table_length is not None else CHECK_LENGTH
    d = torch.arange(length + 2, dtype=torch.float64)
    f = kernel.f(d)
    if abs(float(f[0]) - 1.0) > TOLERANCE:
        raise ValueError(f"kernel {kernel.name}: f(0) must be 1, got f(0) = {float(f[0])!r}")
    bad = (f < -TOLERANCE) | ~torch.isfinite(f)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"kernel {kernel.name}: f must be finite and >= 0, got f({i}) = {float(f[i])!r}")
    inc = f[1:] - f[:-1] > TOLERANCE
    if inc.any():
        i = int(inc.nonzero()[0]) + 1
        raise ValueError(f"kernel {kernel.name} is increasing at d = {i}: f({i - 1}) = {float(f[i - 1])!r} "
                         f"< f({i}) = {float(f[i])!r}; it must be non-increasing")
    second = f[:-2] - 2 * f[1:-1] + f[2:]  # Delta^2 f(d) at d = 1 .. length
    nonconvex = second < -TOLERANCE
    if nonconvex.any():
        i = int(nonconvex.nonzero()[0]) + 1
        raise ValueError(f"kernel {kernel.name} is not convex at d = {i}: f({i - 1}) - 2 f({i}) + f({i + 1}) = "
                         f"{float(second[i - 1]):.3e} < 0 (P(W = {i}) would be negative)")
    return kernel


def as_kernels(kernel: "Kernel | Sequence[Kernel]", num_heads: int | None = None) -> tuple[Kernel, ...]:
    """One kernel per head: a single kernel is repeated ``num_heads`` times (default 1)."""
    if isinstance(kernel, Kernel):
        return (kernel,) * (num_heads or 1)
    ks = tuple(kernel)
    if not ks or not all(isinstance(k, Kernel) for k in ks):
        raise TypeError("kernel must be a poslsh.positional_kernels.Kernel or a sequence of them, one per head")
    if num_heads is not None and len(ks) != num_heads:
        raise ValueError(f"kernel must have one entry per head ({num_heads}), got {len(ks)}")
    return ks


def width_survival(kernel: Kernel, w: Tensor) -> Tensor:
    """S(w) = P(W > w) = (w + 1)(f(w) - f(w+1)) + f(w+1), atom at infinity included: float64, w >= 0."""
    w = w.to(torch.float64)
    return (w + 1) * kernel.decrement(w) + kernel.f(w + 1)


def sample_widths(kernels: Sequence[Kernel], u: Tensor, unbounded: int) -> Tensor:
    """Invert the width law: W = min{w >= 1 : S(w) < u} per head, by bisection.

    Args:
        kernels: H kernels.
        u: float64 [H, r], uniform on (0, 1] (any joint law: each W has the exact law if its u does).
        unbounded: the integer stored for W = inf (and for W > MAX_FINITE_WIDTH).

    Returns:
        int64 [H, r].
    """
    out = torch.empty(u.shape, dtype=torch.int64)
    groups: dict[int, list[int]] = {}
    for h, k in enumerate(kernels):  # heads sharing a Kernel object are inverted together
        groups.setdefault(id(k), []).append(h)
    for rows in groups.values():
        k, idx = kernels[rows[0]], torch.tensor(rows)
        uh = u[idx]
        lo = torch.ones_like(uh, dtype=torch.int64)  # S(lo - 1) >= u holds for lo = 1: S(0) = 1
        hi = torch.full_like(lo, MAX_FINITE_WIDTH)
        finite = width_survival(k, hi) < uh  # else W = inf (atom) or beyond the cap
        # Invariant: S(lo - 1) >= u and S(hi) < u, so W in [lo, hi]. ~60 halvings.
        while bool((lo < hi).any()):
            mid = (lo + hi) // 2
            below = width_survival(k, mid) < uh
            hi = torch.where(below, mid, hi)
            lo = torch.where(below, lo, mid + 1)
        out[idx] = torch.where(finite, lo, torch.full_like(lo, unbounded))
    return out


def kernel_matrix(kernel: Kernel, n: int) -> Tensor:
    """Dense f(|i - j|): float64 [n, n] (small n; the target of B-hat)."""
    d = torch.arange(n, dtype=torch.float64)
    return kernel.f((d[:, None] - d[None, :]).abs())
