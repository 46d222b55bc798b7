"""scaling, the design of the run: its Config (every field a flag), the methods it times, its checks and
the flags a run ignores, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...util import Count, CountOrZero, Fraction, check_fields

NAME = "scaling"
PLOT = "scaling.png"
METHODS = ("exact", "window", "lsh-split", "lsh-fused")


@dataclass
class Config:
    """What to time. Defaults take ~20 s on a 2-core CPU.

    Attributes:
        lengths: Sequence lengths n to time.
        exact_max: Longest length for exact attention (it is quadratic).
        heads: Attention heads, with Press slopes.
        head_dim: Head dimension D.
        samples: Partitions r for LSH.
        scheme: Positional LSH scheme.
        window_eps: Truncation level of the window method.
        causal: Causal attention (--no-causal: bidirectional).
        methods: Methods to time.
        repeats: Timed calls per point (the best is kept).
        threads: Torch CPU threads; 0 keeps torch's default (1 is the steadiest on a shared machine).
        fit_from: Growth exponents are fitted on lengths at least this long.
        seed: Seed of inputs and partitions.
        replot: A saved scaling.json: only redraw its PNG into --out (every other flag is ignored).
    """

    lengths: tuple[Count, ...] = (1024, 2048, 4096, 8192, 16384)
    exact_max: CountOrZero = 4096
    heads: Count = 4
    head_dim: Count = 64
    samples: Count = 8
    scheme: Literal["grid", "cut"] = "grid"
    window_eps: Fraction = 1e-3
    causal: bool = True
    methods: tuple[Literal["exact", "window", "lsh-split", "lsh-fused"], ...] = METHODS
    repeats: Count = 1
    threads: CountOrZero = 1
    fit_from: Count = 4096
    seed: int = 0
    replot: str = ""


def unused(config: Config) -> dict[str, str]:
    """The fields this config's methods do not read, with why (the command warns when they are set)."""
    out = {}
    if not any(m.startswith("lsh") for m in config.methods):
        out.update(samples="--methods has no lsh method", scheme="--methods has no lsh method")
    if "window" not in config.methods:
        out["window_eps"] = "--methods has no window"
    if "exact" not in config.methods:
        out["exact_max"] = "--methods has no exact"
    return out


def check(config: Config) -> None:
    """Refuse a config that cannot run, naming the field."""
    check_fields(config)
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {sorted(unknown)}")
