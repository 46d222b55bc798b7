"""bench, the design of the run: its Config (every field a flag), the columns (method, backend,
label), the kernel-check cases, the tile variants of the sweep and the calls of each phase, shared by
measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass

from ...util import Count, CountOrZero, Fraction, NonNegative, Positive

NAME = "bench"

# column -> (method, backend, label)
COLUMNS: dict[str, tuple[str, str, str]] = {
    "sdpa": ("none", "sdpa", "dense causal SDPA, no bias"),
    "exact_triton": ("exact", "triton", "exact ALiBi (Triton)"),
    "exact_flex": ("exact", "flex", "exact ALiBi (Flex)"),
    "window_triton": ("window", "triton", "per-head window (Triton)"),
    "window_flex": ("window", "flex", "per-head window (Flex)"),
    "hybrid_triton": ("hybrid", "triton", "hybrid (Triton)"),
    "lsh_triton": ("lsh", "triton", "LSH (Triton)"),
    "lsh_flex": ("lsh", "flex", "LSH (Flex)"),
    # the paper's form: r block-local attentions on a kernel without bias, merged by LSE
    "split_sdpa": ("lsh", "split", "LSH as r short attentions (SDPA flash)"),
    "split_flex": ("lsh", "split", "LSH as r short attentions (Flex, no score_mod)"),
}
PRIMITIVES = {"split_sdpa": "sdpa", "split_flex": "flex"}
LABELS = {c: v[2] for c, v in COLUMNS.items()}
METHOD_ORDER = ("exact", "window", "hybrid", "lsh")


@dataclass
class Config:
    """What to benchmark (the flags of ``poslsh bench``).

    Attributes:
        phases: Phases to run, each one of checks, offsets, sweep, forward, decode, backward.
        ns: Sequence lengths n of the forward phase.
        decode_ns: KV-cache lengths of the decode phase.
        heads: Query heads H.
        dim: Head dimension D.
        causal: Causal attention (--no-causal: bidirectional).
        window_eps: Truncation level of the window columns.
        hybrid_eps: Near-field target of the hybrid column.
        samples: Partitions r of the LSH and hybrid columns.
        query_scale: Queries are query_scale times N(0, 1), as in the design anchors.
        exact_max_n: Longest n for exact ALiBi and dense SDPA (seconds per call beyond).
        flex_ns: Lengths for the FlexAttention columns (Flex compiles once per shape).
        backward_ns: Lengths of the backward phase.
        exact_max_n_backward: Longest n for exact ALiBi in the backward phase.
        sweep_n: Length of the tile sweeps of window, hybrid and LSH.
        sweep_exact_n: Length of the tile sweep of exact ALiBi.
        columns: Only these columns, each one of sdpa, exact_triton, exact_flex, window_triton, window_flex, hybrid_triton, lsh_triton, lsh_flex (none: all).
        warm_workers: Processes that compile the timed kernels in parallel first (0: none).
        budget_s: Nothing new starts after this many seconds (0: no limit).
        warmup_ms: Warm-up time per measurement in milliseconds.
        rep_ms: Measuring time per measurement in milliseconds.
        seed: Seed of inputs and partitions.
        device: Device: cuda, or cpu for a dry run at tiny sizes (Triton under TRITON_INTERPRET=1, for tests).
    """

    phases: tuple[str, ...] = ("checks", "offsets", "sweep", "forward", "decode", "backward")
    ns: tuple[Count, ...] = (4096, 16384, 65536, 262144, 1048576)
    decode_ns: tuple[Count, ...] = (16384, 65536, 262144, 1048576)
    heads: Count = 32
    dim: Count = 128
    causal: bool = True
    window_eps: Fraction = 1e-3
    hybrid_eps: Positive = 1e-2
    samples: Count = 8
    query_scale: Positive = 2.0  # q ~ 2 N(0, 1), as in the design brief's anchor errors
    exact_max_n: CountOrZero = 262144  # exact ALiBi and dense SDPA beyond this: seconds per call; skipped
    flex_ns: tuple[Count, ...] = (16384, 65536, 262144)  # Flex compiles once per shape: its n are fewer
    backward_ns: tuple[Count, ...] = (16384, 65536, 262144)
    exact_max_n_backward: CountOrZero = 65536
    sweep_n: Count = 262144  # window, hybrid and LSH tile sweeps; exact at sweep_exact_n
    sweep_exact_n: Count = 65536
    columns: tuple[str, ...] = ()  # only these (keys of COLUMNS); empty: all
    warm_workers: CountOrZero = 8  # processes that compile the timed kernels in parallel first (0: none)
    budget_s: NonNegative = 540.0  # nothing new starts after this many seconds (0: no limit)
    warmup_ms: CountOrZero = 25
    rep_ms: Count = 100
    seed: int = 0
    device: str = "cuda"  # "cpu": a dry run at tiny sizes (Triton under TRITON_INTERPRET=1), for tests


# --------------------------------------------------------------------------------------------------
# The calls of each phase, described by plain values so that warm-up workers can rebuild them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One timed call: column at key length n with nq queries, pass "fwd" or "fwd+bwd", optional
    Triton config overrides; ``direct`` times the kernel without the dispatcher."""

    column: str
    n: int
    nq: int
    pas: str = "fwd"
    config: tuple = ()
    direct: bool = False


CHECK_CASES = [  # B, H, Hkv, Nq, Nk, D, causal, dtype, padding, config
    (2, 8, 4, 1000, 1000, 128, True, "float32", False, {}),
    (1, 8, 2, 777, 1025, 64, False, "float32", False, {}),
    (2, 8, 8, 600, 900, 128, True, "float32", True, {}),
    (1, 8, 8, 1, 3001, 128, True, "float32", False, {}),
    (2, 8, 4, 1000, 1000, 128, True, "bfloat16", False, {}),
    (1, 8, 1, 1500, 1500, 96, True, "bfloat16", False, {}),
]


# Call 1 of 2026-12-01 measured the forward variants of exact (64K), window and LSH (256K): the winners
# are the defaults in tuned.json; these are what is left to decide (see bench/NOTES.md).
SWEEP_FWD = {
    "hybrid": [dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=3), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4,
               num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)],
}
_DKDV_32x64 = dict(BWD_BLOCK_M=32, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=2)
_DKDV_64x32 = dict(BWD_BLOCK_M=64, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)
SWEEP_BWD = {
    # dK/dV with 64-key tiles (the warpgroup MMA's M), dQ with 128-row tiles (the same for its M)
    "alibi": [dict(_DKDV_32x64, DQ_BLOCK_M=128, DQ_BLOCK_N=64, dq_num_warps=8),
              dict(_DKDV_32x64, DQ_BLOCK_M=64, DQ_BLOCK_N=64, dq_num_warps=4), _DKDV_32x64, _DKDV_64x32],
    "lsh": [_DKDV_64x32, dict(BWD_BLOCK_M=64, BWD_BLOCK_N=16, bwd_num_warps=4, bwd_num_stages=2),
            dict(_DKDV_64x32, DQ_BLOCK_M=128, DQ_BLOCK_N=32, dq_num_warps=8),
            dict(_DKDV_64x32, DQ_BLOCK_M=64, DQ_BLOCK_N=16)],
}


def _cfg_key(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def sweep_calls(cfg: Config) -> list[Call]:
    calls = []
    for method in METHOD_ORDER:
        n = cfg.sweep_exact_n if method == "exact" else cfg.sweep_n
        calls += [Call(f"{method}_triton", n, n, "fwd", _cfg_key(v), True) for v in SWEEP_FWD.get(method, ())]
        nb = min(n, 65536)
        family = "lsh" if method in ("lsh", "hybrid") else "alibi"
        calls += [Call(f"{method}_triton", nb, nb, "fwd+bwd", _cfg_key(v), True) for v in SWEEP_BWD[family]]
    return calls


def _want(cfg: Config, col: str) -> bool:
    return not cfg.columns or col in cfg.columns


def forward_calls(cfg: Config, pas: str) -> list[Call]:
    ns = cfg.ns if pas == "fwd" else cfg.backward_ns
    calls = []
    for n in ns:
        for col, (method, backend, _) in COLUMNS.items():
            if not _want(cfg, col):
                continue
            if method in ("exact", "none") and n > (cfg.exact_max_n if pas == "fwd" else cfg.exact_max_n_backward):
                continue
            if (backend == "flex" or col == "split_flex") and n not in cfg.flex_ns:
                continue
            calls.append(Call(col, n, n, pas))
            if pas == "fwd" and backend in ("triton", "flex") and n in cfg.flex_ns:
                calls.append(Call(col, n, n, pas, (), True))
    return calls


def decode_calls(cfg: Config) -> list[Call]:
    calls = []
    for n in cfg.decode_ns:
        for col, (method, backend, _) in COLUMNS.items():
            if not _want(cfg, col) or backend in ("flex", "split") and col not in ("window_flex", "exact_flex"):
                continue
            calls.append(Call(col, n, 1, "fwd"))
            if backend == "triton":
                calls.append(Call(col, n, 1, "fwd", (), True))
    return calls
