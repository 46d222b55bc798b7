"""Argument coercion shared by every entry point: numbers accepted as numbers, the rest refused by name.

A Python number, a numpy scalar and a 0-d tensor holding it are the same argument. A bool is not a
number here (``samples=True`` or ``scale=True`` is a mistake, not a 1) and a number is not a bool
(``causal=1``). A tensor that requires grad is refused where the value is used as a plain number:
taking its value would silently detach it.
"""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

__all__ = ["as_bool", "as_int", "as_float", "check_generator", "describe"]


def describe(value) -> str:
    """How an error message names a value: its type (with its package outside builtins) and value."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            return "a tensor that requires grad"
        if value.ndim:
            return f"a tensor of shape {tuple(value.shape)}"
        return f"a tensor of dtype {value.dtype}"
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    if isinstance(value, str):
        return f"{name} {value!r}"
    if isinstance(value, (numbers.Number, np.generic)):
        return f"{name} {value}"
    return name


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def _scalar_tensor(value, name: str, expected: str) -> torch.Tensor:
    if value.ndim != 0 or value.requires_grad:
        raise TypeError(f"{name} must be {expected}, got {describe(value)}")
    return value


def as_bool(value, name: str) -> bool:
    """A Python bool from a bool, a numpy bool or a 0-d bool tensor."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return bool(_scalar_tensor(value, name, "a bool").item())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {describe(value)}")


def as_int(value, name: str, minimum: int | None = None) -> int:
    """A Python int from an int, a numpy integer or a 0-d integer tensor; ``minimum`` is inclusive."""
    if _is_bool(value):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must be an int, got {describe(value)}")
        out = int(_scalar_tensor(value, name, "an int").item())
    else:
        try:
            out = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {describe(value)}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def as_float(value, name: str, *, above: float | None = None, below: float | None = None) -> float:
    """A finite Python float from a real number, a numpy real or a 0-d real tensor, optionally in the
    open interval (above, below)."""
    if _is_bool(value):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TypeError(f"{name} must be a real number, got {describe(value)}")
        out = float(_scalar_tensor(value, name, "a real number").item())
    elif isinstance(value, numbers.Real):
        out = float(value)
    else:
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    if above is not None and below is not None and not above < out < below:
        raise ValueError(f"{name} must be in ({above:g}, {below:g}), got {out}")
    if above is not None and not out > above:
        raise ValueError(f"{name} must be > {above:g}, got {out}")
    if below is not None and not out < below:
        raise ValueError(f"{name} must be < {below:g}, got {out}")
    return out


def check_generator(generator, name: str = "generator") -> torch.Generator | None:
    """None or a CPU ``torch.Generator`` (sampling runs on the CPU)."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {describe(generator)}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Generator, got one on {generator.device}")
    return generator
