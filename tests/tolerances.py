"""What a result in a low-precision dtype can be held to: exact attention's own rounding in that dtype.
Shared by the conformance suite and the entry-point tests (importing this sets no environment)."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||b|| = 0: the absolute difference)."""
    a, b = a.double(), b.double()
    scale = float(b.norm())
    return float((a - b).norm()) / (scale if scale > 0 else 1.0)


def rounding_floor(out64: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of the float64 oracle output rounded to ``dtype``: what exact attention in that
    dtype cannot avoid (its output is stored there)."""
    return rel_err(out64.to(dtype), out64)


def low_precision_bound(out64: torch.Tensor, dtype: torch.dtype) -> float:
    """Within 2x of exact attention's own rounding error in ``dtype`` (plus float32 compute noise)."""
    return 2 * rounding_floor(out64, dtype) + 1e-5
