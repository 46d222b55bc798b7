"""GPU benchmark of every method on its backends, through ``poslsh.attention`` as users call it.

One run on one GPU (B = 1, H = 32, D = 128, bfloat16, causal, Press slopes), in phases:

* ``checks``: every Triton kernel (exact, window, lsh, hybrid; forward and backward; padding, grouped
  KV, Nq < Nk, decoding) against the float64 reference on fresh random inputs, outputs poisoned;
* ``offsets``: a BLOOM-like fused-QKV view ([B, N, 3 H D] strides) past 2^31 element offsets, checked
  against float64 on the last rows and bit-for-bit against the same call on contiguous copies;
* ``sweep``: tile configurations of the Triton kernels per method, forward and backward; the fastest
  become this process's defaults and are written to ``tuned.json`` (the package ships that file);
* ``forward`` and ``backward``: every column (``COLUMNS``) at every n, median ms, TFLOP/s on the pairs
  the method needs, relative error against exact ALiBi on the same inputs; Triton also kernel-direct;
* ``decode``: one query against a KV cache of 16K..1M keys: time per call (and per generated token:
  wall clock of repeated calls through the public API).

Compiles are the slow part of a short GPU lease: before each timing phase, a pool of worker processes
runs every timed call once so that Triton's and Inductor's on-disk caches hold the kernels when the
main process times them. Results are saved after every measurement (a crash or the time budget keeps
what was measured). Derived numbers (floors, fractions, targets) are computed from the saved rows.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..util import fmt, load_results, markdown_table, pyplot
from .harness import Run
from .metrics import gpu_time, relative_error

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
    ns: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
    decode_ns: tuple[int, ...] = (16384, 65536, 262144, 1048576)
    heads: int = 32
    dim: int = 128
    causal: bool = True
    window_eps: float = 1e-3
    hybrid_eps: float = 1e-2
    samples: int = 8
    query_scale: float = 2.0  # q ~ 2 N(0, 1), as in the design brief's anchor errors
    exact_max_n: int = 262144  # exact ALiBi and dense SDPA beyond this: seconds per call; skipped
    flex_ns: tuple[int, ...] = (16384, 65536, 262144)  # Flex compiles once per shape: its n are fewer
    backward_ns: tuple[int, ...] = (16384, 65536, 262144)
    exact_max_n_backward: int = 65536
    sweep_n: int = 262144  # window, hybrid and LSH tile sweeps; exact at sweep_exact_n
    sweep_exact_n: int = 65536
    columns: tuple[str, ...] = ()  # only these (keys of COLUMNS); empty: all
    warm_workers: int = 8  # processes that compile the timed kernels in parallel first (0: none)
    budget_s: float = 540.0  # nothing new starts after this many seconds (0: no limit)
    warmup_ms: int = 25
    rep_ms: int = 100
    seed: int = 0
    device: str = "cuda"  # "cpu": a dry run at tiny sizes (Triton under TRITON_INTERPRET=1), for tests


# --------------------------------------------------------------------------------------------------
# Inputs and calls, described by plain values so that warm-up workers can rebuild them
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


def _inputs(cfg: Config, n: int, nq: int, grad: bool = False):
    # drawn on the device: a CPU draw of 3 x 1G values took ~20 s per call at 256K
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + n)
    H, D = cfg.heads, cfg.dim
    dt = torch.bfloat16 if cfg.device == "cuda" else torch.float32  # the interpreter has no bf16
    q = (cfg.query_scale * torch.randn(1, H, nq, D, generator=g, device=cfg.device)).to(dt)
    k = torch.randn(1, H, n, D, generator=g, device=cfg.device).to(dt)
    v = torch.randn(1, H, n, D, generator=g, device=cfg.device).to(dt)
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


_PARTS: dict = {}


def _partitions(cfg: Config, n: int):
    from ..alibi import alibi_slopes
    from ..hashing import sample_partitions

    key = (n, cfg.heads, cfg.samples, cfg.seed)
    if key not in _PARTS:
        _PARTS[key] = sample_partitions(n, alibi_slopes(cfg.heads), cfg.samples,
                                        generator=torch.Generator().manual_seed(cfg.seed + 7 * n), device=cfg.device)
    return _PARTS[key]


def _kwargs(cfg: Config, method: str, n: int) -> dict[str, Any]:
    kw: dict[str, Any] = dict(method=method, causal=cfg.causal)
    if method == "window":
        kw["window_eps"] = cfg.window_eps
    if method in ("lsh", "hybrid"):
        kw["partitions"] = _partitions(cfg, n)
    if method == "hybrid":
        kw["hybrid_eps"] = cfg.hybrid_eps
    return kw


def build(cfg: Config, call: Call):
    """(fn, out_fn, spec) for a Call: fn() runs it once (forward, or forward + backward); out_fn()
    returns the forward output for error measurement; spec is None for SDPA."""
    from .. import attention
    from ..attention import resolve_spec
    from ..attention.triton.launch import triton_attention

    method, backend, _ = COLUMNS[call.column]
    grad = call.pas == "fwd+bwd"
    q, k, v = _inputs(cfg, call.n, call.nq, grad)
    if method == "none":
        fwd = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal and call.nq > 1)  # noqa: E731
        spec = None
    else:
        kw = _kwargs(cfg, method, call.n)
        spec = resolve_spec(q, k, v, **kw)
        overrides = dict(call.config)
        if call.direct and backend == "triton":
            fwd = lambda: triton_attention(q, k, v, spec, overrides)[0]  # noqa: E731
        elif call.direct and backend == "flex":
            from ..attention.flex import flex_attention_spec, flex_mods

            mods = flex_mods(spec, call.nq, call.n, q.device, with_q_blocks=grad)
            fwd = lambda: flex_attention_spec(q, k, v, spec, mods=mods)[0]  # noqa: E731
        elif overrides:
            fwd = lambda: triton_attention(q, k, v, spec, overrides)[0]  # noqa: E731
        else:
            if call.column in PRIMITIVES:
                kw["primitive"] = PRIMITIVES[call.column]
            fwd = lambda: attention(q, k, v, backend=backend, **kw)  # noqa: E731
    if grad:
        do = torch.randn_like(q)
        fn = lambda: torch.autograd.grad(fwd(), (q, k, v), do)  # noqa: E731
    else:
        fn = fwd

    def out_fn():
        with torch.no_grad():
            return fwd()

    return fn, out_fn, spec


def _warm_one(args) -> str:
    cfg, call, tuned = args
    try:
        from ..attention.triton import launch

        launch.set_tuned(tuned)
        fn, _, _ = build(cfg, call)
        fn()
        torch.cuda.synchronize()
        return ""
    except torch.cuda.OutOfMemoryError:
        return ""  # several workers at once: the main process compiles this one
    except Exception as err:  # warming is best effort: the timed run records the error
        return f"{call}: {err!r}"[:300]
    finally:
        torch.cuda.empty_cache()


def _warm_size(call: Call) -> Call:
    """The same kernels at a smaller size: Triton specialises on the shapes' divisibility and on values
    equal to 1, not on the lengths, so 16K (decoding: 64K, where the key range is split as at 1M)
    compiles what 1M needs; FlexAttention compiles per shape and keeps its n."""
    if COLUMNS[call.column][1] != "triton":
        return call
    n = min(call.n, 65536 if call.nq == 1 else 16384)
    return dataclasses.replace(call, n=n, nq=1 if call.nq == 1 else n)


def warm(cfg: Config, calls: list[Call], log: Callable[[str], None]) -> None:
    """Run every call once in ``cfg.warm_workers`` spawned processes, so that their compiles (Triton,
    Inductor) land in the on-disk caches in parallel before the main process times them."""
    if cfg.warm_workers <= 0 or not calls or cfg.device != "cuda":
        return
    import multiprocessing as mp

    from ..attention.triton import launch

    t0 = time.time()
    ctx = mp.get_context("spawn")
    # Largest first, so the memory-heavy calls do not all overlap at the end.
    order = sorted({_warm_size(c) for c in calls}, key=lambda c: -(c.n * (2 if c.pas == "fwd+bwd" else 1)))
    tuned = dict(launch._TUNED)
    with ctx.Pool(min(cfg.warm_workers, len(order)), maxtasksperchild=8) as pool:
        errors = [e for e in pool.imap_unordered(_warm_one, [(cfg, c, tuned) for c in order]) if e]
    log(f"warmed {len(order)} calls in {time.time() - t0:.0f} s ({len(errors)} failed: {errors[:3]})")


# --------------------------------------------------------------------------------------------------
# Counting: pairs with nonzero weight, floors
# --------------------------------------------------------------------------------------------------


def method_pairs(spec, n: int, nq: int, heads: int = 1) -> int:
    """(query, key) pairs with nonzero weight summed over heads (batch 1); SDPA (spec None): the causal
    triangle of ``heads`` heads."""
    if spec is None:
        return heads * nq * (2 * n - nq + 1) // 2
    from ..attention.ranges import nonzero_pairs

    return int(nonzero_pairs(spec, nq, n).sum())


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(relative_error(a, b, dtype=torch.float64))


def _poison() -> None:
    x = torch.full((1 << 28,), float("nan"), device="cuda")  # the allocator hands these blocks out next
    del x


CHECK_CASES = [  # B, H, Hkv, Nq, Nk, D, causal, dtype, padding, config
    (2, 8, 4, 1000, 1000, 128, True, "float32", False, {}),
    (1, 8, 2, 777, 1025, 64, False, "float32", False, {}),
    (2, 8, 8, 600, 900, 128, True, "float32", True, {}),
    (1, 8, 8, 1, 3001, 128, True, "float32", False, {}),
    (2, 8, 4, 1000, 1000, 128, True, "bfloat16", False, {}),
    (1, 8, 1, 1500, 1500, 96, True, "bfloat16", False, {}),
    (1, 8, 4, 1000, 1000, 128, True, "float32", False, {"bwd_fused": True}),
    (1, 8, 4, 1000, 1000, 128, True, "bfloat16", True, {"bwd_fused": True}),
]


def check_one(args) -> dict[str, Any]:
    """One method and case against the float64 reference on the GPU: fp32 (bound 1e-5; fp32 dots in
    IEEE mode) or bf16 (bound: twice the error of exact bf16 attention with the same weights, SDPA with a
    dense bias), output, LSE and gradients, outputs poisoned first."""
    from ..alibi import alibi_slopes
    from ..attention import resolve_spec
    from ..attention.reference import dense_log_weights, reference_attention
    from ..attention.triton.launch import triton_attention

    method, (B, H, Hkv, Nq, Nk, D, causal, dtype, padded, over) = args
    dt = getattr(torch, dtype)
    case = str((B, H, Hkv, Nq, Nk, D, causal, dtype, padded, over))
    torch.manual_seed(Nq + Nk + D)
    q = (2 * torch.randn(B, H, Nq, D, device="cuda")).to(dt).requires_grad_()
    k = torch.randn(B, Hkv, Nk, D, device="cuda").to(dt).requires_grad_()
    v = torch.randn(B, Hkv, Nk, D, device="cuda").to(dt).requires_grad_()
    kpm = None
    if padded:
        kpm = torch.rand(B, Nk, device="cuda") > 0.2
        kpm[0, : Nk // 3] = False
    spec = resolve_spec(q, k, v, method=method, causal=causal, samples=8, window_eps=1e-3, hybrid_eps=5e-2,
                        key_padding_mask=kpm, slopes=alibi_slopes(H), generator=torch.Generator().manual_seed(Nk))
    _poison()
    try:
        o, lse = triton_attention(q, k, v, spec, over)
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, (q, k, v), do) if Nq > 1 else ()
    except Exception as err:
        return {"method": method, "case": case, "error": repr(err)[:300], "ok": False}
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = reference_attention(qd, kd, vd, spec)
    errs = {"out": _rel(o, ro), "lse": _rel(lse.masked_fill(lse < -1e29, 0), rl.masked_fill(rl < -1e29, 0))}
    if grads:
        rg = torch.autograd.grad(ro, (qd, kd, vd), do.double())
        errs.update({f"d{n}": _rel(a, b) for n, a, b in zip("qkv", grads, rg)})
    bound = 1e-5
    if dt != torch.float32:  # the yardstick: exact attention in bf16 with the same weights
        g = H // Hkv
        bias = dense_log_weights(spec, Nq, Nk, q.device)[None].expand(B, -1, -1, -1)
        if kpm is not None:
            bias = bias.masked_fill(~kpm[:, None, None, :], float("-inf"))
        yard = torch.nn.functional.scaled_dot_product_attention(
            q.detach(), k.detach().repeat_interleave(g, 1), v.detach().repeat_interleave(g, 1), attn_mask=bias.to(dt))
        live = (ro.abs().sum(-1, keepdim=True) > 0).to(ro.dtype)  # rows that see a key
        bound = 2 * _rel(yard.nan_to_num() * live, ro * live)
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x).all()) for x in grads)
    ok = finite and errs["out"] <= bound and errs["lse"] <= max(bound, 1e-5) and all(
        errs[x] <= (bound if dt == torch.float32 else 2 * bound) for x in ("dq", "dk", "dv") if x in errs)
    return {"method": method, "case": case, "rel_err": errs, "bound": bound, "finite": finite, "ok": ok}


def gpu_checks(workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every method's kernels on every ``CHECK_CASES`` case (``check_one``), in parallel processes (the
    compiles dominate), results in order."""
    jobs = [(m, c) for m in METHOD_ORDER for c in CHECK_CASES]
    if workers > 0:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            rows = pool.map(check_one, jobs)
    else:
        rows = [check_one(j) for j in jobs]
    for r in rows:
        log(f"check {r['method']} {r['case']}: " + ("ok " if r["ok"] else "FAILED ")
            + (" ".join(f"{a}={b:.2e}" for a, b in r["rel_err"].items()) + f" (bound {r['bound']:.1e})"
               if "rel_err" in r else r.get("error", "")))
    return rows


def offsets_check(cfg: Config, log: Callable[[str], None], n: int = 180_000) -> list[dict[str, Any]]:
    """BLOOM-7b1-like fused QKV projection output [1, N, 3 H D] viewed as q, k, v [1, H, N, D] (row
    stride 3 H D = 12288, so position x stride passes 2^31 past N = 174763): every method against
    float64 on the last 8 query rows, and bit-for-bit against the same call on contiguous copies."""
    from .. import attention
    from ..alibi import alibi_slopes

    H, D = cfg.heads, cfg.dim
    rows = []
    qkv = torch.randn(1, n, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [1, H, n, D], stride(2) = 3 H D
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    last = 8
    for method in METHOD_ORDER:
        kw = _kwargs(cfg, method, n)
        kw.pop("partitions", None)
        if method in ("lsh", "hybrid"):
            from ..hashing import sample_partitions

            kw["partitions"] = sample_partitions(n, alibi_slopes(H), 8, generator=torch.Generator().manual_seed(3),
                                                 device="cuda")
        try:
            out = attention(q, k, v, backend="triton", **kw)
            same = attention(qc, kc, vc, backend="triton", **kw)
            spec_kw = dict(kw)
            ref = attention(q[:, :, -last:].double(), k.double(), v.double(), backend="reference", **spec_kw) \
                if method in ("exact", "window") else None
            row = {"method": method, "n": n, "stride": q.stride(2), "max_offset": (n - 1) * q.stride(2),
                   "bitwise_equal_to_contiguous": bool(torch.equal(out, same)),
                   "finite": bool(torch.isfinite(out).all())}
            if ref is not None:
                row["rel_err_last_rows_vs_float64"] = _rel(out[:, :, -last:], ref)
        except Exception as err:
            row = {"method": method, "n": n, "error": repr(err)[:300]}
        rows.append(row)
        log(f"offsets {row}")
    del qkv, q, k, v, qc, kc, vc
    torch.cuda.empty_cache()
    return rows


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
              dict(_DKDV_32x64, DQ_BLOCK_M=64, DQ_BLOCK_N=64, dq_num_warps=4), _DKDV_32x64, _DKDV_64x32,
              dict(_DKDV_32x64, bwd_fused=True)],
    "lsh": [_DKDV_64x32, dict(BWD_BLOCK_M=64, BWD_BLOCK_N=16, bwd_num_warps=4, bwd_num_stages=2),
            dict(_DKDV_64x32, DQ_BLOCK_M=128, DQ_BLOCK_N=32, dq_num_warps=8),
            dict(_DKDV_64x32, DQ_BLOCK_M=64, DQ_BLOCK_N=16), dict(_DKDV_64x32, bwd_fused=True)],
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


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _wall_us(fn: Callable[[], Any], device: str, calls: int = 200) -> float:
    """Wall-clock microseconds per call of back-to-back calls (host overhead included), synchronised once."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _time(fn: Callable[[], Any], config: "Config") -> tuple[float, str]:
    if config.device == "cuda":
        return gpu_time(fn, config.warmup_ms, config.rep_ms)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3, "one wall-clock call (CPU dry run)"


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    """Run the phases; write out_dir/gpu_bench.json after every measurement, tuned.json and PNGs."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("poslsh bench needs a CUDA GPU (or --device cpu for a dry run at tiny sizes)")
    from ..attention.triton import launch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_bench.json"
    res: dict[str, Any] = {"rows": [], "notes": [], "ceilings": {}, "checks": [], "offsets": [], "sweep": [],
                           "tuned": {}, "shape": {"B": 1, "H": config.heads, "D": config.dim, "dtype": "bfloat16",
                                                  "causal": config.causal}}
    session = Run("bench", path, config, res, deadline_s=config.budget_s, seconds_key=None)
    log, save, late = session.log, session.save, session.late

    if config.device == "cuda":
        res["ceilings"] = _ceilings()
        log(f"ceilings {res['ceilings']}")
    save()
    if "checks" in config.phases:
        res["checks"] = gpu_checks(config.warm_workers, log)
        save()
    if "offsets" in config.phases and not late():
        res["offsets"] = offsets_check(config, log)
        save()

    def measure(call: Call, ref: torch.Tensor | None = None) -> dict[str, Any] | None:
        if late():
            return None
        row: dict[str, Any] = {"column": call.column, "n": call.n, "nq": call.nq, "pass": call.pas,
                               "direct": call.direct, "config": dict(call.config)}
        try:
            fn, out_fn, spec = build(config, call)
            ms, how = _time(fn, config)
            row.update(ms=ms, timing=how)
            if call.nq == 1:
                row["wall_us"] = _wall_us(fn, config.device, 200 if config.device == "cuda" else 2)
            row["pairs"] = method_pairs(spec, call.n, call.nq, config.heads)
            if ref is not None:
                o = out_fn()
                row["rel_err_vs_exact"] = _rel(o, ref)
        except Exception as err:  # one failing column must not lose the rest of the run
            row["error"] = repr(err)[:400]
        res["rows"].append(row)
        log(f"{call.column} n={call.n} nq={call.nq} {call.pas}{' direct' if call.direct else ''} "
            f"{dict(call.config) or ''}: " + (f"{row['ms']:.4f} ms" if "ms" in row else row["error"]))
        save()
        if config.device == "cuda":
            torch.cuda.empty_cache()
        return row

    if "sweep" in config.phases and not late():
        calls = sweep_calls(config)
        warm(config, calls, log)
        best: dict[tuple[str, str], tuple[float, dict]] = {}
        for call in calls:
            row = measure(call)
            if row is None or "ms" not in row:
                continue
            res["sweep"].append(row)
            method = COLUMNS[call.column][0]
            key = (method, call.pas)
            if key not in best or row["ms"] < best[key][0]:
                best[key] = (row["ms"], dict(call.config))
        for method in METHOD_ORDER:
            cfg = launch.default_config(method, torch.bfloat16, config.dim)
            for pas in ("fwd", "fwd+bwd"):
                if (method, pas) in best:
                    cfg.update(best[(method, pas)][1])
            res["tuned"][f"{method}/prefill/bfloat16/d{config.dim}"] = cfg
        if config.device == "cuda":  # the interpreter's tiles say nothing about a GPU
            launch.set_tuned(res["tuned"])
            launch.write_tuned(out_dir / "tuned.json", res["tuned"],
                               provenance={"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()})
        log(f"tuned {res['tuned']}")
        save()

    for phase, pas in (("forward", "fwd"), ("decode", None), ("backward", "fwd+bwd")):
        if phase == "decode":
            if "decode" in config.phases and not late():
                calls = decode_calls(config)
                warm(config, calls, log)
                for call in calls:
                    measure(call)
            continue
        if phase not in config.phases or late():
            continue
        calls = forward_calls(config, pas)
        warm(config, calls, log)
        for n in sorted({c.n for c in calls}):
            ref = None
            if pas == "fwd":
                ex = [c for c in calls if c.n == n and c.column in ("exact_triton", "exact_flex") and not c.direct]
                if ex:
                    try:
                        ref = build(config, ex[0])[1]()
                    except Exception as err:
                        log(f"reference at n={n} failed: {err!r}")
            for call in [c for c in calls if c.n == n]:
                measure(call, ref if COLUMNS[call.column][0] != "none" else None)
            del ref

    derive(res, config)
    res["wall_s"] = session.elapsed()
    save()
    try:
        make_plots(load_results(path), out_dir)
    except Exception as err:  # plots can be rebuilt from the JSON with --replot
        res["notes"].append(f"plotting failed: {err!r}")
        save()
    return load_results(path)


def _ceilings() -> dict[str, float]:
    from triton.testing import do_bench

    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e9
    del x, y
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm = 2 * 8192 ** 3 / do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") / 1e9
    del a, b
    torch.cuda.empty_cache()
    return {"copy_TBps": bw, "matmul_TFLOPs": mm}


# --------------------------------------------------------------------------------------------------
# Derived numbers, summary, plots (all from the saved rows)
# --------------------------------------------------------------------------------------------------


def find(rows: list[dict], column: str, n: int, pas: str = "fwd", nq: int | None = None, direct: bool = False):
    """The measured row (with "ms") of a column at n, or None."""
    for row in rows:
        if (row["column"] == column and row["n"] == n and row["pass"] == pas and row.get("direct", False) == direct
                and (nq is None and row["nq"] == row["n"] or row["nq"] == nq) and "ms" in row
                and not row.get("config")):
            return row
    return None


def derive(res: dict[str, Any], config: Config) -> None:
    """Rates, floors and the targets, from the rows."""
    rows = [r for r in res["rows"] if not r.get("config")]
    D, H = config.dim, config.heads
    bw = res["ceilings"].get("copy_TBps")
    sdpa_rate = {}
    for pas, per_pair in (("fwd", 4 * D), ("fwd+bwd", 14 * D)):
        rates = [per_pair * r["pairs"] / r["ms"] / 1e9 for r in rows if r["column"] == "sdpa" and r["pass"] == pas
                 and r["nq"] == r["n"] and "ms" in r]
        sdpa_rate[pas] = max(rates) if rates else None
    res["ceilings"]["sdpa_fwd_TFLOPs"], res["ceilings"]["sdpa_fwd_bwd_TFLOPs"] = sdpa_rate["fwd"], sdpa_rate["fwd+bwd"]
    for r in rows:
        if "ms" not in r or "pairs" not in r:
            continue
        per_pair = 4 * D if r["pass"] == "fwd" else 14 * D
        r["tflops"] = per_pair * r["pairs"] / r["ms"] / 1e9
        nbytes = (2 * r["nq"] + 2 * r["n"]) * H * D * 2 * (1 if r["pass"] == "fwd" else 2.5)
        t_flop = per_pair * r["pairs"] / (sdpa_rate[r["pass"]] * 1e9) if sdpa_rate[r["pass"]] else 0.0
        t_byte = nbytes / (bw * 1e9) if bw else 0.0
        r["floor_ms"] = max(t_flop, t_byte)
        r["floor_bound"] = "flops" if t_flop >= t_byte else "bytes"
        r["floor_fraction"] = r["floor_ms"] / r["ms"]
        ex = find(rows, "exact_flex", r["n"], r["pass"], r["nq"])
        if ex:
            r["speedup_vs_exact_flex"] = ex["ms"] / r["ms"]
    t: dict[str, dict] = {}

    def target(name: str, value: float | None, wanted: str, met: bool | None) -> None:
        if value is not None:
            t[name] = {"value": value, "wanted": wanted, "met": bool(met)}

    n0 = 262144
    wt, wf = find(rows, "window_triton", n0), find(rows, "window_flex", n0)
    if wt:
        target("window (eps 1e-3) forward at 256K, ms", wt["ms"], "<= 3.5", wt["ms"] <= 3.5)
    if wt and wf:
        target("window forward at 256K, Triton over Flex", wt["ms"] / wf["ms"], "<= 0.4", wt["ms"] / wf["ms"] <= 0.4)
    lt = find(rows, "lsh_triton", n0)
    if lt:
        target("LSH r=8 forward at 256K, ms", lt["ms"], "<= 3.0", lt["ms"] <= 3.0)
    for n in (16384, 65536):
        et, sd = find(rows, "exact_triton", n), find(rows, "sdpa", n)
        if et and sd:
            ratio = sd["ms"] / et["ms"]  # same pairs: throughput ratio
            target(f"exact ALiBi forward at {n // 1024}K, throughput over dense SDPA", ratio, ">= 0.9", ratio >= 0.9)
    for col in ("exact_triton", "window_triton", "hybrid_triton", "lsh_triton"):
        for n in sorted({r["n"] for r in rows if r["column"] == col and r["pass"] == "fwd+bwd"}):
            f, b = find(rows, col, n), find(rows, col, n, "fwd+bwd")
            if f and b:
                target(f"{LABELS[col]} fwd+bwd over fwd at {n // 1024}K", b["ms"] / f["ms"], "<= 3",
                       b["ms"] / f["ms"] <= 3)
    for col in ("window_triton", "lsh_triton", "hybrid_triton", "exact_triton"):
        for n in config.decode_ns:
            d = find(rows, col, n, nq=1)
            if not d or n < 65536:
                continue
            if col == "exact_triton":
                sd = find(rows, "sdpa", n, nq=1)
                if sd:
                    target(f"exact decode at {n // 1024}K keys, over dense SDPA", d["ms"] / sd["ms"], "<= 1.1",
                           d["ms"] / sd["ms"] <= 1.1)
            else:
                target(f"{LABELS[col]} decode at {n // 1024}K keys, us per call", d["ms"] * 1e3, "<= 30",
                       d["ms"] * 1e3 <= 30)
    res["targets"] = t


def speed_table(doc: dict[str, Any]) -> dict[str, Any]:
    """The ``poslsh.attention.speed`` table of one run: per method and regime ("prefill": as many queries
    as keys; "decode": one query), each backend's forward ms at each n, through the public call."""
    res = doc["results"]
    device = doc["environment"]["device"]
    table: dict[str, dict] = {}
    for r in res["rows"]:
        method, backend, _ = COLUMNS.get(r["column"], ("none", "", ""))
        if method == "none" or r.get("config") or r.get("direct") or r["pass"] != "fwd" or "ms" not in r:
            continue
        regime = "decode" if r["nq"] == 1 else "prefill" if r["nq"] == r["n"] else None
        if regime:
            entry = table.setdefault(method, {}).setdefault(regime, {}).setdefault(str(r["n"]), {})
            entry[backend] = min(r["ms"], entry.get(backend, math.inf))  # split: its fastest primitive
    return {"devices": {device: table}, "provenance": {"date": doc["environment"]["date"][:10],
                                                     "command": doc["environment"]["command"]}}


def summarize(results: dict[str, Any], out_dir: Path) -> str:
    """Markdown: checks, the tables per pass and decoding, targets, the plots."""
    res = results.get("results", results)
    env = results.get("environment", {})
    rows = [r for r in res["rows"] if not r.get("config")]
    lines = [f"## GPU benchmark ({env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')})",
             "", readme_section(results)]
    checks = res.get("checks", [])
    if checks:
        bad = [c for c in checks if not c.get("ok")]
        lines += ["", f"Correctness on the GPU: {len(checks) - len(bad)} of {len(checks)} kernel checks within their "
                      "bounds against float64" + (f"; failed: {[c['method'] + ' ' + c['case'] for c in bad]}" if bad else ".")]
    if res.get("offsets"):
        lines += ["", "Offsets past 2^31 elements (fused-QKV strided view): " + "; ".join(
            f"{o['method']}: " + ("error " + o["error"] if "error" in o else
                                  f"bitwise equal to contiguous {o['bitwise_equal_to_contiguous']}"
                                  + (f", rel. error {fmt(o['rel_err_last_rows_vs_float64'])}"
                                     if "rel_err_last_rows_vs_float64" in o else ""))
            for o in res["offsets"])]
    if res.get("sweep"):
        lines += ["", "### Tile sweep (Triton, kernel-direct)", ""]
        lines.append(markdown_table(["column", "n", "pass", "config", "ms"],
                                    [[r["column"], f"{r['n'] // 1024}K", r["pass"], str(r["config"]), r["ms"]]
                                     for r in res["sweep"]]))
    for png in ("gpu_bench_time.png", "gpu_bench_decode.png"):
        if (Path(out_dir) / png).exists():
            lines += ["", f"![{png}]({png})"]
    return "\n".join(lines)


def combine(docs: list[dict[str, Any]], passes: list[tuple[str, ...]]) -> dict[str, Any]:
    """One document from several runs of the benchmark (a short lease split into calls): from each run
    the rows of its ``passes`` entry ("fwd", "decode", "fwd+bwd"), and the first run's checks, sweep and
    ceilings; then ``derive`` over the union (the targets compare rows of different runs only where one
    run lacks a pass, e.g. fwd+bwd over fwd). The environments go to ``runs``."""
    out = {"environment": docs[0]["environment"], "config": docs[0]["config"], "runs": [], "results": {}}
    res = dict(docs[0]["results"], rows=[], notes=list(docs[0]["results"].get("notes", [])))
    for doc, take in zip(docs, passes):
        for r in doc["results"]["rows"]:
            kind = "decode" if r["nq"] == 1 else r["pass"]
            if kind in take and not r.get("config"):
                res["rows"].append(dict(r, run=len(out["runs"])))
        out["runs"].append({"command": doc["environment"]["command"], "date": doc["environment"]["date"],
                            "passes": list(take)})
    derive(res, Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in docs[0]["config"].items()
                          if k in {f.name for f in dataclasses.fields(Config)}}))
    out["results"] = res
    return out


PARTS = ("fwd", "errors", "fwd+bwd", "decode", "aims")


def readme_section(doc: dict[str, Any], parts: tuple[str, ...] = PARTS) -> str:
    """The compact view of a run (or ``combine``'s union): forward and fwd+bwd ms per column and n,
    errors, decoding, the aims; ``parts`` picks some."""
    res = copy.deepcopy(doc["results"] if "results" in doc else doc)
    if "config" in doc:  # a run cut short by an error saved its rows before deriving: derive here
        derive(res, Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc["config"].items()
                              if k in {f.name for f in dataclasses.fields(Config)}}))
    rows = [r for r in res["rows"] if not r.get("config")]
    kib = lambda n: f"{n // 1024}K" if n < 1 << 20 else f"{n >> 20}M"  # noqa: E731
    shape = res["shape"]
    which = parts
    parts = [f"B=1, H={shape['H']}, D={shape['D']}, {shape['dtype']}, "
             f"{'causal' if shape['causal'] else 'bidirectional'}, Press slopes"
             + ("; median ms through `poslsh.attention` (speedup over exact ALiBi in FlexAttention, same run)"
                if {"fwd", "fwd+bwd"} & set(which) else "")]
    for pas in [p for p in ("fwd", "fwd+bwd") if p in which]:
        ns = sorted({r["n"] for r in rows if r["pass"] == pas and r["nq"] == r["n"]})
        cols = [c for c in COLUMNS if any(find(rows, c, n, pas) for n in ns)]
        if not cols:
            continue
        body = []
        for n in ns:
            cells = []
            for c in cols:
                r = find(rows, c, n, pas)
                cells.append("–" if r is None else fmt(r["ms"]) + (
                    f" ({fmt(r['speedup_vs_exact_flex'])}×)" if "speedup_vs_exact_flex" in r and c != "exact_flex" else ""))
            body.append([kib(n)] + cells)
        parts.append(f"**{'forward' if pas == 'fwd' else 'forward + backward'}**\n\n"
                     + markdown_table(["n"] + [LABELS[c] for c in cols], body))
    ns = sorted({r["n"] for r in rows if "rel_err_vs_exact" in r})
    cols = [c for c in COLUMNS if any(find(rows, c, n) and "rel_err_vs_exact" in find(rows, c, n) for n in ns)]
    if cols and "errors" in which:
        parts.append("**relative output error against exact ALiBi, same inputs**\n\n" + markdown_table(
            ["n"] + [LABELS[c] for c in cols],
            [[kib(n)] + [fmt(find(rows, c, n)["rel_err_vs_exact"]) if find(rows, c, n) and "rel_err_vs_exact"
                         in find(rows, c, n) else "–" for c in cols] for n in ns]))
    dns = sorted({r["n"] for r in rows if r["nq"] == 1})
    dcols = [c for c in COLUMNS if any(find(rows, c, n, nq=1) for n in dns)]
    if dcols and "decode" in which:
        parts.append("**decoding: one query against a KV cache, µs per call (wall clock per call through the "
                     "public API in parentheses)**\n\n" + markdown_table(
                         ["cached keys"] + [LABELS[c] for c in dcols],
                         [[kib(n)] + ["–" if not (r := find(rows, c, n, nq=1)) else
                                      f"{fmt(r['ms'] * 1e3)} ({fmt(r.get('wall_us'))})" for c in dcols] for n in dns]))
    if res.get("targets") and "aims" in which:
        parts.append("**aims, as measured**\n\n" + markdown_table(
            ["aim", "measured", "wanted", "met"],
            [[k, fmt(v["value"]), v["wanted"], "yes" if v["met"] else "**no**"] for k, v in res["targets"].items()]))
    return "\n\n".join(parts)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time vs n per column (forward, forward + backward) and decoding time vs cached keys."""
    res = results.get("results", results)
    rows = [r for r in res["rows"] if not r.get("config")]
    plt = pyplot()
    colors = {"sdpa": "tab:gray", "exact_triton": "tab:blue", "exact_flex": "tab:blue", "window_triton": "tab:green",
              "window_flex": "tab:green", "hybrid_triton": "tab:orange", "lsh_triton": "tab:red", "lsh_flex": "tab:red",
              "split_sdpa": "tab:purple", "split_flex": "tab:purple"}
    shape = res["shape"]
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, (pas, nq1, title) in zip(axes, (("fwd", False, "forward"), ("fwd+bwd", False, "forward + backward"),
                                            ("fwd", True, "decoding (1 query)"))):
        for col in COLUMNS:
            pts = sorted((r["n"], r["ms"]) for r in rows if r["column"] == col and r["pass"] == pas
                         and not r.get("direct") and "ms" in r and ((r["nq"] == 1) if nq1 else (r["nq"] == r["n"])))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if col.endswith("flex") else "-",
                        marker="s" if col.startswith("split") else "o",
                        ms=3, color=colors[col], label=LABELS[col])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached keys" if nq1 else "sequence length n (tokens)")
        ax.set_ylabel("median time per call (ms)")
        ax.set_title(f"{title}: H={shape['H']}, D={shape['D']}, {shape['dtype']}, "
                     f"{'causal' if shape['causal'] else 'bidirectional'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(out_dir) / "gpu_bench_time.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def replot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    return make_plots(doc, out_dir)
