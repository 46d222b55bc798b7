"""attn-error, the design of the run: its Config (every field a flag), the names of its files and the
values of r the error's exponent is fitted over, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...util import Count, CountOrZero, Fraction, Positive

NAME = "attn-error"
PLOT = "attn_error_vs_r.png"
PLOT_BOUND = "attn_error_bound.png"
FIT_FROM = 4  # the exponent is fitted over r >= FIT_FROM (r = 1, 2 sit before the asymptotic regime)


@dataclass
class Config:
    """What to measure. Defaults take ~20 s on a 2-core CPU.

    Attributes:
        n: Sequence length.
        heads: Attention heads, with Press slopes.
        head_dim: Head dimension D.
        samples: Numbers of partitions r.
        logit_scales: Multipliers of q (larger: more peaked attention rows).
        schemes: Positional LSH schemes to compare.
        seeds: Independent draws of inputs and partitions per point.
        causal: Causal attention (--no-causal: bidirectional).
        delta: Failure probability of the theoretical bound.
        plot_heads: Head indices shown in the per-head figure.
        threads: Torch CPU threads; 0 keeps torch's default (small operations run fastest on one thread).
        seed: Base seed of every draw.
        replot: A saved attn-error.json: only redraw its PNGs into --out (every other flag is ignored).
    """

    n: Count = 256
    heads: Count = 8
    head_dim: Count = 32
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    logit_scales: tuple[Positive, ...] = (0.5, 1.0, 2.0)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    seeds: Count = 2
    causal: bool = True
    delta: Fraction = 0.1
    plot_heads: tuple[CountOrZero, ...] = (0, 2, 4, 7)
    threads: CountOrZero = 1
    seed: int = 0
    replot: str = ""
