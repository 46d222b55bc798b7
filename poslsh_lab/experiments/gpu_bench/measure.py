"""bench, measuring: the phases on the GPU (kernel checks, offsets past 2^31, tile sweep, forward,
decoding, backward), the warm-up workers and the timing; the JSON document is rewritten after every
measurement (``experiments.harness.Run``)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ...util import check_fields, load_results, synchronize
from ..harness import Run
from ..metrics import gpu_time, relative_error
from .design import (CHECK_CASES, COLUMNS, METHOD_ORDER, PRIMITIVES, Call, Config, decode_calls, forward_calls,
                     sweep_calls)
from .report import derive, make_plots


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
    from poslsh.alibi import alibi_slopes
    from poslsh.hashing import sample_partitions

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
    from poslsh import attention
    from poslsh.attention import resolve_spec
    from poslsh.attention.triton.launch import triton_attention

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
            from poslsh.attention.flex import flex_attention_spec, flex_mods

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
        from poslsh.attention.triton import launch

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

    from poslsh.attention.triton import launch

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
    from poslsh.attention.ranges import nonzero_pairs

    return int(nonzero_pairs(spec, nq, n).sum())


# --------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(relative_error(a.detach(), b.detach(), dtype=torch.float64))


def _poison() -> None:
    x = torch.full((1 << 28,), float("nan"), device="cuda")  # the allocator hands these blocks out next
    del x


def check_one(args) -> dict[str, Any]:
    """One method and case against the float64 reference on the GPU: fp32 (bound 1e-5; fp32 dots in
    IEEE mode) or bf16 (bound: twice the error of exact bf16 attention with the same weights, SDPA with a
    dense bias), output, LSE and gradients, outputs poisoned first."""
    from poslsh.alibi import alibi_slopes
    from poslsh.attention import resolve_spec
    from poslsh.attention.reference import dense_log_weights, reference_attention
    from poslsh.attention.triton.launch import triton_attention

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
    from poslsh import attention
    from poslsh.alibi import alibi_slopes

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
            from poslsh.hashing import sample_partitions

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


# --------------------------------------------------------------------------------------------------
# Timing and the run
# --------------------------------------------------------------------------------------------------


def _wall_us(fn: Callable[[], Any], device: str, calls: int = 200) -> float:
    """Wall-clock microseconds per call of back-to-back calls (host overhead included), synchronised once."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
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
    check_fields(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("poslsh bench needs a CUDA GPU (or --device cpu for a dry run at tiny sizes)")
    from poslsh.attention.triton import launch

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
