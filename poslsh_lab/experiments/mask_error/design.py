"""mask-error, the design of the run: its Config (every field a flag), its checks and the names of its
files, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...util import Count, Fraction, Positive, check_fields

NAME = "mask-error"

PLOTS = {"max": "mask_error_max.png", "spectral": "mask_error_spectral.png", "blocks": "block_sizes.png"}


@dataclass
class Config:
    """What to measure. The defaults take ~30 s on a 2-core CPU; ``--lengths 100000`` scales up.

    Attributes:
        lengths: Sequence lengths n, one row of panels each.
        slopes: ALiBi slopes m, one column of panels each.
        samples: Numbers of masks r averaged (nested prefixes of one draw of the largest).
        schemes: Positional LSH schemes to compare.
        seeds: Independent draws per (n, slope, scheme), for the spread.
        delta: Failure probability of the plotted bounds.
        seed: Base seed of every draw.
        method: How the errors are computed: dense n x n matrices, structured (no n x n matrix), or auto (dense up to n = 512).
        rtol: Relative Lanczos residual of the structured spectral norm (1e-2 puts the value within about 0.3 percent).
        replot: A saved mask-error.json: only redraw its PNGs into --out (every other flag is ignored).
    """

    lengths: tuple[Count, ...] = (256, 4096)
    slopes: tuple[Positive, ...] = (2.0, 0.5, 1 / 16, 1 / 256)
    samples: tuple[Count, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    schemes: tuple[Literal["grid", "cut"], ...] = ("grid", "cut")
    seeds: Count = 3
    delta: Fraction = 0.1
    seed: int = 0
    method: Literal["auto", "dense", "structured"] = "auto"
    rtol: Positive = 1e-2
    replot: str = ""


def check(config: Config) -> None:
    """Refuse a config that cannot run, naming the field."""
    check_fields(config)
    if not config.samples:
        raise ValueError("samples must name at least one r")
