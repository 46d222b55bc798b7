"""ALiBi slopes and the positional kernel B_ij = exp(-m |i - j|) that positional LSH approximates.

Attention with linear biases (Press et al., 2022) adds -m_h |i - j| to the logits of head h.
Multiplicatively, row i of the softmax is proportional to exp(q_i . k_j / sqrt(d)) * B_ij with
B_ij = e^{-m_h |i - j|}: B is the matrix that positional LSH writes as an expectation of masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .checks import describe

__all__ = ["alibi_slopes", "alibi_kernel", "alibi_bias", "check_slopes"]


def alibi_slopes(num_heads: int) -> Tensor:
    """Press et al.'s slope schedule, exactly as BLOOM's ``build_alibi_tensor`` builds it.

    For a power of two H the slopes are 2^(-8h/H), h = 1..H. Otherwise, with P the largest power of
    two below H, the first P slopes are those of P heads and the remaining H - P are the odd-indexed
    slopes (1st, 3rd, ...) of the 2P-head schedule.

    Returns:
        float64 tensor [num_heads], decreasing within each of the two groups.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** k for k in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = min(closest, num_heads - closest)
        slopes += [extra_base ** k for k in range(1, 1 + 2 * extra, 2)]
    return torch.tensor(slopes, dtype=torch.float64)


# Every backend computes scores in float32 (or wider): a slope beyond float32's range would turn into
# inf there and give inf * 0 = NaN on the diagonal.
MAX_SLOPE = torch.finfo(torch.float32).max


def check_slopes(slopes: Tensor | float | list, name: str = "slopes", *, allow_grad: bool = False) -> Tensor:
    """Validate slopes and return them as a 1-D float64 CPU tensor [H].

    Slopes must be real (not bool or complex), finite, >= 0 (0 means no positional decay: one block)
    and at most float32's largest value. A tensor that requires grad is refused unless
    ``allow_grad`` (then the result stays attached to it, so gradients reach the caller's slopes).
    """
    if isinstance(slopes, Tensor):
        if slopes.dtype == torch.bool or slopes.is_complex():
            raise TypeError(f"{name} must be real numbers, got dtype {slopes.dtype}")
        if slopes.requires_grad and not allow_grad:
            raise ValueError(f"{name} require grad, but this function does not differentiate them; pass "
                             f"{name}.detach()")
        s = slopes.to("cpu", torch.float64) if slopes.requires_grad else slopes.detach().to("cpu", torch.float64)
    else:
        dtype = getattr(slopes, "dtype", None)  # numpy arrays and scalars
        if isinstance(dtype, np.dtype) and dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real numbers, got dtype {dtype}")
        for x in slopes if isinstance(slopes, (list, tuple)) else [slopes]:
            if isinstance(x, (bool, np.bool_, complex, np.complexfloating)):
                raise TypeError(f"{name} must be real numbers, got {describe(x)}")
        try:
            s = torch.as_tensor(slopes, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a tensor or a sequence of numbers, got {type(slopes).__name__}") from err
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D with one slope per head, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        raise ValueError(f"{name} must hold at least one slope")
    values = s.tolist()  # H floats: checked in Python, cheaper than three tensor reductions per call
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"{name} must be finite, got {values}")
    if any(x < 0 for x in values):
        raise ValueError(f"{name} must be >= 0, got {values}")
    if any(x > MAX_SLOPE for x in values):
        raise ValueError(f"{name} must be at most {MAX_SLOPE:.4g} (float32's largest value: kernels compute in "
                         f"float32), got {s.tolist()}")
    return s


def _check_length(n: int, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return n


def alibi_bias(n: int, slope: float | Tensor | list[float], causal: bool = False, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
    """Additive ALiBi bias -slope * |i - j| as a dense matrix, -inf above the diagonal if causal.

    Args:
        slope: one slope (a number or a 0-d tensor) -> [n, n]; several (a sequence or a 1-D tensor of
            H slopes, e.g. ``alibi_slopes(H)``) -> [H, n, n], one matrix per head.
    """
    _check_length(n)
    many = isinstance(slope, (list, tuple)) or getattr(slope, "ndim", 0) >= 1
    s = check_slopes(slope, "slope").to(device)
    pos = torch.arange(n, device=device, dtype=torch.float64)
    bias = -s[:, None, None] * (pos[:, None] - pos[None, :]).abs()
    if causal:
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    return (bias if many else bias[0]).to(dtype)


def alibi_kernel(n: int, slope: float | Tensor | list[float], causal: bool = False,
                 device: torch.device | str | None = None) -> Tensor:
    """The dense ALiBi kernel B_ij = exp(-slope |i - j|), float64 [n, n] (or [H, n, n] for H slopes, as
    ``alibi_bias``); zero above the diagonal if causal."""
    return alibi_bias(n, slope, causal=causal, device=device).exp()
