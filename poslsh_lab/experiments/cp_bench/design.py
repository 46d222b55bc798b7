"""cp-bench, the design of the run: its Config (every field a flag), the methods and dtypes it takes and
its checks, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...util import Count, CountOrZero, Fraction, Positive, check_fields

NAME = "cp-bench"
PLOT = "cp_bench.png"
METHODS = ("window", "lsh", "hybrid", "exact")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """What to run. Defaults: the committed CPU run (about 25 minutes on 2 shared cores).

    Attributes:
        world_sizes: Ranks W to measure (sub-groups 0..W-1 of the launched processes; without torchrun the
            largest is the number of processes spawned).
        lengths: Tokens per rank n (the sequence is W x n: weak scaling).
        methods: Methods to measure.
        batch: Batch size B.
        heads: Query heads H, with Press slopes.
        kv_heads: Key/value heads (grouped KV); 0 means as many as the query heads.
        head_dim: Head dimension D.
        dtype: Dtype of q, k, v.
        causal: Causal attention (--no-causal: bidirectional).
        window_eps: Truncation level of the window method.
        samples: Partitions r of lsh and hybrid.
        hybrid_eps: Target error of the hybrid (sets its near-field widths).
        scheme: Positional LSH scheme.
        halo: Halo per KV head (head) or every head the widest head's (max).
        halo_max: Also measure halo max (forward time and bytes) at the largest world size.
        exact_layout: Layout of the causal exact ring (zigzag balances its work).
        exact_max_local: Longest per-rank length timed for exact attention (a ring: quadratic).
        check_max_total: Check against one process on the gathered sequence up to this total length.
        check_lengths: Extra per-rank lengths where only the check runs (not timed).
        backward: Also time forward+backward and check the gradients.
        repeats: Timed calls per point (the median is kept).
        warmup: Untimed calls before the timed ones.
        threads: Torch CPU threads per process; 0 keeps torch's default.
        device: Where to run; auto is CUDA under torchrun when it is available, else the CPU.
        backend: Backend of the local attention calls (auto picks per call).
        seed: Seed of inputs and partitions.
        replot: A saved cp-bench.json: only redraw its PNG and report into --out (every other flag is
            ignored; nothing is launched).
    """

    world_sizes: tuple[Count, ...] = (1, 2, 4)
    lengths: tuple[Count, ...] = (2048, 8192)
    methods: tuple[Literal["window", "lsh", "hybrid", "exact"], ...] = METHODS
    batch: Count = 1
    heads: Count = 8
    kv_heads: CountOrZero = 0
    head_dim: Count = 64
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    causal: bool = True
    window_eps: Fraction = 1e-3
    samples: Count = 8
    hybrid_eps: Positive = 1e-2
    scheme: Literal["grid", "cut"] = "grid"
    halo: Literal["head", "max"] = "head"
    halo_max: bool = True
    exact_layout: Literal["zigzag", "contiguous"] = "zigzag"
    exact_max_local: CountOrZero = 2048
    check_max_total: CountOrZero = 8192
    check_lengths: tuple[Count, ...] = ()
    backward: bool = True
    repeats: Count = 3
    warmup: CountOrZero = 1
    threads: CountOrZero = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: str = "auto"
    seed: int = 0
    replot: str = ""


def check(config: Config) -> None:
    """Refuse a config that cannot run, naming the field."""
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {sorted(unknown)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    check_fields(config)
    if not config.world_sizes:
        raise ValueError("world_sizes must name one or more process counts")
