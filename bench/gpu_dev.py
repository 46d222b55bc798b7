"""Development script for the Triton LSH kernel on the GPU (one call of the device tool):
ceilings, correctness against float64 for several configs (poisoned outputs), and timings of
several kernel variants. Prints a short table; full log in $OUT/dev_log.txt.

    python bench/gpu_dev.py [--quick]
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from poslsh import alibi_slopes, sample_partitions  # noqa: E402
from poslsh.attention import resolve_spec  # noqa: E402
from poslsh.attention.flex import flex_attention_spec  # noqa: E402
from poslsh.attention.triton_lsh import default_config, lsh_attention_triton_fn, tile_counts  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/out")
os.makedirs(OUT, exist_ok=True)
LOG = open(os.path.join(OUT, "dev_log_flex.txt" if "--flex-check" in sys.argv else "dev_log.txt"), "w")
DEV = "cuda"
SUMMARY: list[str] = []


def P(*a) -> None:
    print(*a, flush=True)
    print(*a, file=LOG, flush=True)


def poison() -> None:
    x = torch.full((1 << 28,), float("nan"), device=DEV)
    del x


def ref64(q, k, v, parts, causal, scale, qoff):
    B, H, Nq, D = q.shape
    g = H // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    c = parts.mean_mask()[:, qoff:qoff + Nq, :].to(q.device)
    s = scale * q.double() @ k.transpose(-1, -2) + c.log()
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None] + qoff
        j = torch.arange(k.shape[2], device=q.device)[None]
        s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def sdpa_lowp(q, k, v, parts, causal, qoff):
    """Exact attention in q's dtype with the same weights as a float bias (the bf16 yardstick)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    Nq, Nk = q.shape[2], k.shape[2]
    c = parts.mean_mask()[:, qoff:qoff + Nq, :].to(q.device).log()
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None] + qoff
        j = torch.arange(Nk, device=q.device)[None]
        c = c.masked_fill(j > i, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=c[None].to(q.dtype))


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ceilings() -> dict:
    x = torch.randn(1 << 30, device=DEV, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e9  # TB/s (read + write)
    del x, y
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    mm = 2 * 8192**3 / ms / 1e9
    n = 16384
    q, k, v = (torch.randn(1, 32, n, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    ms = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                  warmup=50, rep=300, return_mode="median")
    sd = 4 * 128 * 32 * (n * (n + 1) / 2) / ms / 1e9
    r = dict(copy_TBps=bw, matmul_TFLOPs=mm, sdpa_causal_16K_TFLOPs=sd, sdpa_16K_ms=ms)
    P("ceilings", r)
    SUMMARY.append(f"copy {bw:.2f} TB/s | mm {mm:.0f} TFLOP/s | SDPA causal 16K {sd:.0f} TFLOP/s ({ms:.2f} ms)")
    return r


def check_triton() -> bool:
    ok = True
    cases = [  # B, H, Hkv, Nq, Nk, D, r, causal, scheme, dtype
        (2, 8, 8, 1000, 1000, 128, 8, True, "grid", torch.float32),
        (1, 8, 2, 777, 1025, 64, 4, False, "grid", torch.float32),
        (1, 8, 8, 1024, 1024, 128, 8, True, "cut", torch.float32),
        (2, 8, 4, 1000, 1000, 128, 8, True, "grid", torch.bfloat16),
        (1, 8, 8, 513, 1024, 128, 16, False, "cut", torch.float16),
        (1, 8, 8, 1, 2049, 128, 8, True, "grid", torch.bfloat16),
        (1, 8, 1, 1500, 1500, 96, 8, True, "grid", torch.bfloat16),
    ]
    for B, H, Hkv, Nq, Nk, D, r, causal, scheme, dt in cases:
        torch.manual_seed(Nq + Nk)
        parts = sample_partitions(Nk, alibi_slopes(H), r, scheme=scheme,
                                  generator=torch.Generator().manual_seed(Nk), device=DEV)
        q = (torch.randn(B, H, Nq, D, device=DEV) * 2).to(dt).requires_grad_()
        k = (torch.randn(B, Hkv, Nk, D, device=DEV) * 2).to(dt).requires_grad_()
        v = torch.randn(B, Hkv, Nk, D, device=DEV).to(dt).requires_grad_()
        qoff, scale = Nk - Nq, 1 / math.sqrt(D)
        poison()
        o, lse = lsh_attention_triton_fn(q, k, v, parts, causal=causal)
        do = torch.randn_like(o)
        poison()
        gq, gk, gv = torch.autograd.grad(o, (q, k, v), do)
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ro, rl = ref64(qd, kd, vd, parts, causal, scale, qoff)
        rq, rk, rv = torch.autograd.grad(ro, (qd, kd, vd), do.double())
        errs = [rel(o, ro), rel(lse, rl), rel(gq, rq), rel(gk, rk), rel(gv, rv)]
        finite = all(torch.isfinite(t).all().item() for t in (o, lse, gq, gk, gv))
        if dt == torch.float32:
            good = finite and max(errs) <= 1e-5
            yard = [1e-5] * 5
        else:
            ql, kl, vl = (x.detach().requires_grad_() for x in (q, k, v))
            so = sdpa_lowp(ql, kl, vl, parts, causal, qoff)
            sq, sk, sv = torch.autograd.grad(so, (ql, kl, vl), do)
            yard = [rel(so, ro), 0, rel(sq, rq), rel(sk, rk), rel(sv, rv)]
            good = finite and all(e <= 2 * y + 1e-7 for e, y in zip(errs, yard) if y > 0) and errs[1] < 1e-2
        ok &= good
        P(f"triton B{B} H{H}/{Hkv} Nq{Nq} Nk{Nk} D{D} r{r} {'causal' if causal else 'bidir'} {scheme} {dt}: "
          f"o {errs[0]:.2e} lse {errs[1]:.2e} dq {errs[2]:.2e} dk {errs[3]:.2e} dv {errs[4]:.2e} | "
          f"yardstick o {yard[0]:.2e} dq {yard[2]:.2e} dk {yard[3]:.2e} dv {yard[4]:.2e} -> {'OK' if good else 'FAIL'}")
    SUMMARY.append(f"triton correctness: {'all OK' if ok else 'FAILURES (see log)'}")
    return ok


def check_flex() -> bool:
    ok = True
    from poslsh.attention.reference import reference_attention
    for method, causal, Hkv, grad in [("lsh", True, 2, True), ("exact", False, 4, False), ("window", True, 4, False)]:
        B, H, N, D = 1, 4, 1024, 64
        q = torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16).requires_grad_(grad)
        k = torch.randn(B, Hkv, N, D, device=DEV, dtype=torch.bfloat16).requires_grad_(grad)
        v = torch.randn(B, Hkv, N, D, device=DEV, dtype=torch.bfloat16).requires_grad_(grad)
        sl = alibi_slopes(H) * 0.1
        spec = resolve_spec(q, k, v, slopes=sl, causal=causal, method=method, samples=8, window_eps=1e-2,
                            generator=torch.Generator().manual_seed(0))
        t0 = time.time()
        o, lse = flex_attention_spec(q, k, v, spec)
        qd, kd, vd = (x.detach().double().requires_grad_(grad) for x in (q, k, v))
        spec64 = resolve_spec(qd, kd, vd, slopes=sl, causal=causal, method=method, window_eps=1e-2,
                              partitions=spec.partitions if method == "lsh" else None)
        ro, rl = reference_attention(qd, kd, vd, spec64)
        errs = [rel(o, ro), rel(lse, rl)]
        if grad:
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            rg = torch.autograd.grad(ro, (qd, kd, vd), do.double())
            errs += [rel(a, b) for a, b in zip(g, rg)]
        good = max(errs) < 2e-2
        ok &= good
        P(f"flex {method} causal={causal} Hkv={Hkv}: " + " ".join(f"{e:.2e}" for e in errs)
          + f" ({time.time() - t0:.1f}s) {'OK' if good else 'FAIL'}")
    SUMMARY.append(f"flex correctness: {'all OK' if ok else 'FAILURES'}")
    return ok


def bench_variants(quick: bool) -> None:
    n, H, D, r = 262144, 32, 128, 8
    slopes = alibi_slopes(H)
    parts = sample_partitions(n, slopes, r, generator=torch.Generator().manual_seed(0), device=DEV)
    q, k, v = (torch.randn(1, H, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    base = default_config(torch.bfloat16, D)
    variants = {
        "128x64 w8 s3": dict(),
        "128x64 w4 s3": dict(num_warps=4),
        "128x32 w4 s3": dict(BLOCK_N=32, num_warps=4),
        "64x64 w4 s3": dict(BLOCK_M=64, num_warps=4),
        "64x32 w4 s3": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4),
        "128x64 w8 s2": dict(num_stages=2),
        "split W<=32: 64x32": dict(SMALL_W=32, SMALL_BLOCK_M=64, SMALL_BLOCK_N=32, small_num_warps=4,
                                   small_num_stages=3),
        "split W<=64: 64x32": dict(SMALL_W=64, SMALL_BLOCK_M=64, SMALL_BLOCK_N=32, small_num_warps=4,
                                   small_num_stages=3),
        "split W<=16: 64x16": dict(SMALL_W=16, SMALL_BLOCK_M=64, SMALL_BLOCK_N=16, small_num_warps=4,
                                   small_num_stages=3),
        "64x32 w4 s4": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=4),
    }
    if quick:
        variants = dict(list(variants.items())[:2])
    ref_o = None
    for name, over in variants.items():
        cfg = dict(base, **over)
        try:
            f = lambda: lsh_attention_triton_fn(q, k, v, parts, causal=True, config=cfg)  # noqa: E731
            o, _ = f()
            if ref_o is None:
                ref_o = o
            diff = rel(o, ref_o)
            ms = do_bench(f, warmup=25, rep=200, return_mode="median")
            ms2 = do_bench(f, warmup=25, rep=200, return_mode="median")
            tc = tile_counts(parts, n, True, cfg["BLOCK_M"], cfg["BLOCK_N"])
            tf = tc["pairs"] * 4 * D / ms / 1e9
            P(f"fwd 256K r8 {name}: {ms:.3f} ms (again {ms2:.3f}); tiles {tc['boundary']}+{tc['interior']} "
              f"-> {tf:.0f} TFLOP/s on tiles (whole-tile count; split variants use the big config's count); "
              f"vs first {diff:.1e}")
            SUMMARY.append(f"fwd 256K r8 {name}: {ms:.3f} / {ms2:.3f} ms")
        except Exception as err:  # keep going: one broken variant must not cost the call
            P(f"variant {name} failed: {err!r}")
    # forward+backward, backward variants
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    bwd_variants = {
        "bwd 64x64 w4 s2": dict(),
        "bwd 64x64 w4 s3": dict(bwd_num_stages=3),
        "bwd 32x64 w4 s2": dict(BWD_BLOCK_M=32),
        "bwd 64x128 w8 s2": dict(BWD_BLOCK_N=128, bwd_num_warps=8),
        "bwd 64x32 w4 s2": dict(BWD_BLOCK_N=32),
    }
    if quick:
        bwd_variants = dict(list(bwd_variants.items())[:1])
    for name, over in bwd_variants.items():
        cfg = dict(base, **over)
        try:
            def fb():
                o, _ = lsh_attention_triton_fn(qg, kg, vg, parts, causal=True, config=cfg)
                return torch.autograd.grad(o, (qg, kg, vg), do)
            g = fb()
            ms = do_bench(fb, warmup=10, rep=100, return_mode="median")
            P(f"fwd+bwd 256K r8 {name}: {ms:.3f} ms; |dq| {g[0].float().norm():.3e} |dk| {g[1].float().norm():.3e}")
            SUMMARY.append(f"fwd+bwd 256K r8 {name}: {ms:.3f} ms")
        except Exception as err:
            P(f"bwd variant {name} failed: {err!r}")
    # flex LSH at 256K r8 (the prototype took 11.3 ms)
    spec = resolve_spec(q, k, v, causal=True, method="lsh", partitions=parts)
    t0 = time.time()
    flex_attention_spec(q, k, v, spec)
    torch.cuda.synchronize()
    ct = time.time() - t0
    ms = do_bench(lambda: flex_attention_spec(q, k, v, spec), warmup=10, rep=100, return_mode="median")
    P(f"flex lsh fwd 256K r8: {ms:.3f} ms (first call incl. compile {ct:.1f}s)")
    SUMMARY.append(f"flex lsh fwd 256K r8: {ms:.3f} ms")


def main() -> None:
    quick = "--quick" in sys.argv
    t0 = time.time()
    P(torch.cuda.get_device_name(), torch.__version__)
    if "--flex-check" in sys.argv:  # run alone: an illegal access would poison the whole process
        check_flex()
    else:
        if "--no-ceilings" not in sys.argv:
            ceilings()
        if "--no-check" not in sys.argv:
            check_triton()
        P(f"[{time.time() - t0:.0f}s]")
        bench_variants(quick)
    P(f"[{time.time() - t0:.0f}s] done")
    print("\n==== SUMMARY ====")
    for line in SUMMARY:
        print(line)


if __name__ == "__main__":
    main()
