"""GPU benchmark: positional-LSH attention (Triton, FlexAttention, split) against exact ALiBi
(FlexAttention), dense causal SDPA without bias (the throughput ceiling) and the per-head window.

One run on one GPU: B = 1, H = 32, D = 128, bfloat16, causal, Press slopes; r in {1, 4, 8, 16};
n from 4K to 1M. For every column: median time (``triton.testing.do_bench``; calls slower than
0.2 s: median of 3 event-timed calls), TFLOP/s on the pairs that column computes (fwd: 4 D per pair,
fwd+bwd: 14 D per pair), speedup over exact, relative output error against exact FlexAttention on
the same inputs, peak extra memory. The floor of the Triton kernel is max(FLOPs of its computed tiles
/ the measured SDPA rate, bytes / the measured copy bandwidth).

Results are saved after every measurement (a crash keeps what was measured). Needs CUDA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .common import fmt, gpu_time, load_results, markdown_table, pyplot, save_results

NAME = "bench"

COLUMNS = ("exact_flex", "sdpa_dense", "window_flex", "lsh_flex", "lsh_split", "lsh_triton")
LABELS = {
    "exact_flex": "exact ALiBi (Flex)",
    "sdpa_dense": "dense causal SDPA, no bias",
    "window_flex": "per-head window (Flex)",
    "lsh_flex": "LSH (Flex)",
    "lsh_split": "LSH (split)",
    "lsh_triton": "LSH (Triton)",
}


@dataclass
class Config:
    ns: tuple[int, ...] = (4096, 16384, 65536, 262144, 1048576)
    samples: tuple[int, ...] = (1, 4, 8, 16)
    heads: int = 32
    dim: int = 128
    causal: bool = True
    window_eps: float = 1e-3
    query_scale: float = 2.0  # q ~ 2 N(0, 1), as in the design brief's anchor errors
    exact_max_n: int = 262144  # exact ALiBi in Flex beyond this: minutes per call; skipped
    sdpa_max_n: int = 262144
    split_max_n: int = 16384  # the torch split backend launches per (head, sample, block length)
    split_samples: tuple[int, ...] = (8,)
    flex_lsh_samples: tuple[int, ...] = (8,)  # at every n; the other r only at flex_all_r_n
    flex_all_r_n: int = 262144
    backward: bool = True
    backward_max_n_flex: int = 262144  # flex fwd+bwd (exact, window, lsh) up to here
    warmup_ms: int = 25
    rep_ms: int = 100
    seed: int = 0
    check: bool = True  # float64 correctness of the Triton kernel on the GPU first
    variants: bool = True  # time a few tile configurations of the Triton kernel at 256K, r = 8
    # Only these columns (exact_flex, sdpa_dense, window_flex, lsh_flex, lsh_split, lsh_triton); empty: all.
    columns: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _peak_gb(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _rel_opt(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    return None if a is None or b is None else _rel(a, b)


def _safe(fn: Callable[[], Any]) -> Any:
    """fn() or None if it raises (the timing row then records the error)."""
    try:
        return fn()
    except Exception as err:
        print(f"[bench] failed: {err!r}"[:300], flush=True)
        return None


def _ceilings() -> dict[str, float]:
    from triton.testing import do_bench

    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    bw = 2 * x.numel() * 2 / ms / 1e9
    del x, y
    return {"copy_TBps": bw, "copy_ms_1GiB": ms}


def _gpu_check(full: bool = True) -> list[dict[str, Any]]:
    """The Triton kernel against float64 on the GPU (fresh random inputs, poisoned outputs)."""
    from ..alibi import alibi_slopes
    from ..attention.triton_lsh import lsh_attention_triton_fn
    from ..hashing import sample_partitions

    out = []
    for B, H, Hkv, Nq, Nk, D, r, causal, scheme, dt in [
        (1, 8, 4, 1000, 1000, 128, 8, True, "grid", torch.bfloat16),
    ] + ([] if not full else [
        (1, 8, 8, 700, 1025, 64, 4, False, "cut", torch.float32),
        (1, 8, 8, 1024, 1024, 128, 16, True, "grid", torch.float32),
    ]):
        parts = sample_partitions(Nk, alibi_slopes(H), r, scheme=scheme,
                                  generator=torch.Generator().manual_seed(Nk), device="cuda")
        q = (2 * torch.randn(B, H, Nq, D, device="cuda")).to(dt).requires_grad_()
        k = torch.randn(B, Hkv, Nk, D, device="cuda").to(dt).requires_grad_()
        v = torch.randn(B, Hkv, Nk, D, device="cuda").to(dt).requires_grad_()
        torch.full((1 << 27,), float("nan"), device="cuda")  # poison the allocator's blocks
        o, lse = lsh_attention_triton_fn(q, k, v, parts, causal=causal)
        do = torch.randn_like(o)
        g = torch.autograd.grad(o, (q, k, v), do)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        grp = H // Hkv
        c = parts.mean_mask()[:, Nk - Nq:, :]
        s = qd @ kd.repeat_interleave(grp, 1).transpose(-1, -2) / math.sqrt(D) + c.log()
        if causal:
            i = torch.arange(Nq, device="cuda")[:, None] + Nk - Nq
            s = s.masked_fill(torch.arange(Nk, device="cuda")[None] > i, float("-inf"))
        ro = torch.softmax(s, -1) @ vd.repeat_interleave(grp, 1)
        rg = torch.autograd.grad(ro, (qd, kd, vd), do.double())
        errs = [_rel(o, ro)] + [_rel(a, b) for a, b in zip(g, rg)]
        out.append({"case": f"B{B} H{H}/{Hkv} Nq{Nq} Nk{Nk} D{D} r{r} {'causal' if causal else 'bidir'} "
                             f"{scheme} {str(dt).replace('torch.', '')}",
                    "rel_err_out_dq_dk_dv": errs, "finite": bool(torch.isfinite(o).all())})
    return out


def _variants(H: int, D: int, causal: bool, slopes: torch.Tensor, config: Config) -> list[dict[str, Any]]:
    """A few tile configurations of the Triton kernel, forward and forward+backward, n = 256K, r = 8."""
    from ..attention.triton_lsh import default_config, lsh_attention_triton_fn, tile_counts
    from ..hashing import sample_partitions

    n, r = 262144, 8
    parts = sample_partitions(n, slopes, r, generator=torch.Generator().manual_seed(1), device="cuda")
    q, k, v = (torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    base = default_config(torch.bfloat16, D)
    out = []
    fwd = {"64x32 w4 s3 (default)": {}, "64x32 w4 s2": dict(num_stages=2), "64x64 w4 s3": dict(BLOCK_N=64),
           "128x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8), "64x16 w4 s3": dict(BLOCK_N=16)}
    for name, over in fwd.items():
        cfg = dict(base, **over)
        try:
            ms, _ = gpu_time(lambda: lsh_attention_triton_fn(q, k, v, parts, causal=causal, config=cfg), 25, 100)
            ms2, _ = gpu_time(lambda: lsh_attention_triton_fn(q, k, v, parts, causal=causal, config=cfg), 25, 100)
            tc = tile_counts(parts, n, causal, cfg["BLOCK_M"], cfg["BLOCK_N"])
            out.append({"pass": "fwd", "config": name, "ms": ms, "ms_again": ms2, "pairs": tc["pairs"],
                        "tflops": 4 * D * tc["pairs"] / ms / 1e9})
        except Exception as err:
            out.append({"pass": "fwd", "config": name, "error": repr(err)[:300]})
        print(f"[bench] variant {out[-1]}", flush=True)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)
    bwd = {"bwd 64x32 w4 s2 (default)": {}, "bwd 32x32 w4 s2": dict(BWD_BLOCK_M=32),
           "bwd 64x32 w4 s3": dict(bwd_num_stages=3), "bwd 64x16 w4 s2": dict(BWD_BLOCK_N=16)}
    for name, over in bwd.items():
        cfg = dict(base, **over)
        try:
            ms, _ = gpu_time(lambda: torch.autograd.grad(
                lsh_attention_triton_fn(qg, kg, vg, parts, causal=causal, config=cfg)[0], (qg, kg, vg), do), 10, 100)
            out.append({"pass": "fwd+bwd", "config": name, "ms": ms})
        except Exception as err:
            out.append({"pass": "fwd+bwd", "config": name, "error": repr(err)[:300]})
        print(f"[bench] variant {out[-1]}", flush=True)
    del q, k, v, qg, kg, vg, do
    torch.cuda.empty_cache()
    return out


def _window_pairs(windows: torch.Tensor, n: int) -> int:
    total = 0
    for w in windows.tolist():
        w = min(int(w), n - 1)
        total += (w + 1) * n - w * (w + 1) // 2
    return total


def _block_mask_pairs(bm: Any, heads: int) -> int:
    blocks = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
    return blocks * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1] * (heads // bm.kv_num_blocks.shape[1])


def _split_pairs(parts: Any, n: int) -> int:
    """Causal pairs of the split backend: sum over heads, samples and positions of p - s_t(p) + 1."""
    pos = torch.arange(n, dtype=torch.int64)
    total = 0
    for h in range(parts.num_heads):
        w = parts.widths[h].cpu()[:, None].clamp(max=4 * n)
        u = parts.offsets[h].cpu()[:, None] % w
        s = (torch.div(pos + u, w, rounding_mode="floor") * w - u).clamp(min=0)
        total += int((pos - s + 1).sum())
    return total


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run(config: Config, out_dir: Path) -> dict[str, Any]:
    """Measure every column; write out_dir/gpu_bench.json (after every measurement) and PNGs."""
    if not torch.cuda.is_available():
        raise RuntimeError("poslsh bench needs a CUDA GPU")
    from .. import attention as poslsh_attention
    from ..alibi import alibi_slopes
    from ..attention import resolve_spec
    from ..attention.flex import flex_attention_spec, flex_mods
    from ..attention.triton_lsh import default_config, lsh_attention_triton_fn, tile_counts
    from ..hashing import sample_partitions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_bench.json"
    H, D, causal = config.heads, config.dim, config.causal
    dt = torch.bfloat16
    tcfg = default_config(dt, D)
    res: dict[str, Any] = {"rows": [], "notes": [], "ceilings": {}, "correctness": [],
                           "triton_config": tcfg, "shape": {"B": 1, "H": H, "D": D, "dtype": "bfloat16",
                                                           "causal": causal}}

    def save() -> None:
        save_results(path, config, res)

    def note(msg: str) -> None:
        res["notes"].append(msg)
        print(f"[bench] {msg}", flush=True)

    t_start = time.time()
    res["ceilings"] = _ceilings()
    if config.check:
        res["correctness"] = _gpu_check(full=config.variants)
        print(f"[bench] correctness {res['correctness']}", flush=True)
    save()
    slopes = alibi_slopes(H)
    flops_per_pair = {"fwd": 4 * D, "fwd+bwd": 14 * D}
    if config.variants:
        res["triton_variants"] = _variants(H, D, causal, slopes, config)
        save()

    def add(n: int, col: str, r: int | None, pas: str, fn: Callable[[], Any], pairs: int | None,
            out: torch.Tensor | None = None, ref: torch.Tensor | None = None, extra: dict | None = None) -> None:
        row: dict[str, Any] = {"n": n, "column": col, "r": r, "pass": pas}
        try:
            ms, how = gpu_time(fn, config.warmup_ms, config.rep_ms)
            row.update(ms=ms, timing=how, peak_extra_gb=_peak_gb(fn))
            if pairs:
                row["pairs"] = pairs
                row["tflops"] = flops_per_pair[pas] * pairs / ms / 1e9
            if out is not None and ref is not None and out.shape == ref.shape:
                row["rel_err_vs_exact"] = _rel(out, ref)
        except Exception as err:  # one failing column must not lose the rest of the run
            row["error"] = repr(err)[:400]
        if extra:
            row.update(extra)
        res["rows"].append(row)
        print(f"[bench {time.time() - t_start:5.0f}s] n={n} {col} r={r} {pas}: "
              + (f"{row['ms']:.3f} ms" if "ms" in row else row.get("error", "")), flush=True)
        save()

    def want(col: str) -> bool:
        return not config.columns or col in config.columns

    parts_by_n: dict[int, dict[int, Any]] = {}
    # ---- phase 1: forward of every column, backward of SDPA and Triton -------------------------
    for n in config.ns:
        g = torch.Generator().manual_seed(config.seed + n)
        q = (config.query_scale * torch.randn(1, H, n, D, generator=g)).to("cuda", dt)
        k = torch.randn(1, H, n, D, generator=g).to("cuda", dt)
        v = torch.randn(1, H, n, D, generator=g).to("cuda", dt)
        parts_by_n[n] = {r: sample_partitions(n, slopes, r, generator=torch.Generator().manual_seed(r + n),
                                              device="cuda") for r in config.samples}
        ref = None
        with torch.no_grad():
            if n <= config.exact_max_n and want("exact_flex"):
                spec = resolve_spec(q, k, v, causal=causal, method="exact")
                mods = flex_mods(spec, n, n, q.device, with_q_blocks=False)
                ref = _safe(lambda: flex_attention_spec(q, k, v, spec, mods=mods)[0])
                add(n, "exact_flex", None, "fwd", lambda: flex_attention_spec(q, k, v, spec, mods=mods),
                    H * n * (n + 1) // 2, ref, ref, {"computed_pairs": _block_mask_pairs(mods[1], H)})
                del mods
            elif n == max(config.ns):
                note(f"exact ALiBi (Flex) skipped at n={n}: quadratic, ~{1.5 * (n / 262144) ** 2:.0f} s per "
                     f"call by the 256K anchor")
            if n <= config.sdpa_max_n and want("sdpa_dense"):
                add(n, "sdpa_dense", None, "fwd",
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                    H * n * (n + 1) // 2)
            spec_w = resolve_spec(q, k, v, causal=causal, method="window", window_eps=config.window_eps)
            mods_w = _safe(lambda: flex_mods(spec_w, n, n, q.device, with_q_blocks=False)) if want("window_flex") else None
            if mods_w is not None:
                o_w = _safe(lambda: flex_attention_spec(q, k, v, spec_w, mods=mods_w)[0])
                add(n, "window_flex", None, "fwd", lambda: flex_attention_spec(q, k, v, spec_w, mods=mods_w),
                    _window_pairs(spec_w.window, n), o_w, ref, {"computed_pairs": _block_mask_pairs(mods_w[1], H)})
                del o_w
            del mods_w
            for r in config.samples:
                parts = parts_by_n[n][r]
                o_t = _safe(lambda: lsh_attention_triton_fn(q, k, v, parts, causal=causal)[0])
                tc = tile_counts(parts, n, causal, tcfg["BLOCK_M"], tcfg["BLOCK_N"])
                if want("lsh_triton"):
                    add(n, "lsh_triton", r, "fwd", lambda: lsh_attention_triton_fn(q, k, v, parts, causal=causal),
                        tc["pairs"], o_t, ref, {"tiles": tc})
                if want("lsh_flex") and (r in config.flex_lsh_samples or n == config.flex_all_r_n):
                    spec_l = resolve_spec(q, k, v, causal=causal, method="lsh", partitions=parts)
                    mods_l = _safe(lambda: flex_mods(spec_l, n, n, q.device, with_q_blocks=False))
                    if mods_l is None:
                        continue
                    o_f = _safe(lambda: flex_attention_spec(q, k, v, spec_l, mods=mods_l)[0])
                    add(n, "lsh_flex", r, "fwd", lambda: flex_attention_spec(q, k, v, spec_l, mods=mods_l),
                        _block_mask_pairs(mods_l[1], H), o_f, ref, {"rel_diff_vs_triton": _rel_opt(o_f, o_t)})
                    del mods_l, o_f
                if want("lsh_split") and n <= config.split_max_n and r in config.split_samples:
                    o_s = _safe(lambda: poslsh_attention(q, k, v, partitions=parts, causal=causal, backend="split"))
                    add(n, "lsh_split", r, "fwd",
                        lambda: poslsh_attention(q, k, v, partitions=parts, causal=causal, backend="split"),
                        _split_pairs(parts, n), o_s, ref, {"rel_diff_vs_triton": _rel_opt(o_s, o_t)})
                    del o_s
                del o_t
        if n > config.split_max_n and n == max(config.ns):
            note(f"LSH split skipped above n={config.split_max_n} and for r not in {config.split_samples}: "
                 "the torch split backend runs one batched attention per (head, sample, block length) from "
                 "Python; see its times at small n")
        if config.backward:
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            do = torch.randn_like(q)
            if n <= config.sdpa_max_n and want("sdpa_dense"):
                add(n, "sdpa_dense", None, "fwd+bwd", lambda: torch.autograd.grad(
                    torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal),
                    (qg, kg, vg), do), H * n * (n + 1) // 2)
            for r in config.samples if want("lsh_triton") else ():
                parts = parts_by_n[n][r]
                tc = tile_counts(parts, n, causal, tcfg["BLOCK_M"], tcfg["BLOCK_N"])
                add(n, "lsh_triton", r, "fwd+bwd", lambda: torch.autograd.grad(
                    lsh_attention_triton_fn(qg, kg, vg, parts, causal=causal)[0], (qg, kg, vg), do), tc["pairs"])
            del qg, kg, vg, do
        del q, k, v, ref
        torch.cuda.empty_cache()

    # ---- phase 2: FlexAttention backward (last: the riskiest compiled kernels) ----------------
    if config.backward:
        for n in config.ns:
            if n > config.backward_max_n_flex:
                note(f"Flex fwd+bwd skipped at n={n} (> backward_max_n_flex={config.backward_max_n_flex})")
                continue
            g = torch.Generator().manual_seed(config.seed + n)
            q = (config.query_scale * torch.randn(1, H, n, D, generator=g)).to("cuda", dt).requires_grad_()
            k = torch.randn(1, H, n, D, generator=g).to("cuda", dt).requires_grad_()
            v = torch.randn(1, H, n, D, generator=g).to("cuda", dt).requires_grad_()
            do = torch.randn_like(q)
            specs = []
            if n <= config.exact_max_n and want("exact_flex"):
                specs.append(("exact_flex", None, resolve_spec(q, k, v, causal=causal, method="exact")))
            if want("window_flex"):
                specs.append(("window_flex", None, resolve_spec(q, k, v, causal=causal, method="window",
                                                                window_eps=config.window_eps)))
            for r in config.flex_lsh_samples if want("lsh_flex") else ():
                specs.append(("lsh_flex", r, resolve_spec(q, k, v, causal=causal, method="lsh",
                                                          partitions=parts_by_n[n][r])))
            for col, r, spec in specs:
                mods = _safe(lambda: flex_mods(spec, n, n, q.device, with_q_blocks=True))
                if mods is None:
                    continue
                if col == "exact_flex":
                    pairs = H * n * (n + 1) // 2
                elif col == "window_flex":
                    pairs = _window_pairs(spec.window, n)
                else:
                    pairs = _block_mask_pairs(mods[1], H)
                add(n, col, r, "fwd+bwd", lambda: torch.autograd.grad(
                    flex_attention_spec(q, k, v, spec, mods=mods)[0], (q, k, v), do), pairs)
                del mods
            del q, k, v, do
            torch.cuda.empty_cache()

    _derive(res, config)
    res["wall_s"] = time.time() - t_start
    save()
    try:
        make_plots(res, out_dir)
    except Exception as err:  # plots are rebuilt from the JSON by bench/plot_gpu_bench.py
        note(f"plotting failed: {err!r}")
        save()
    return load_results(path)


# --------------------------------------------------------------------------------------------------
# Derived numbers, summary, plots (all from the saved rows)
# --------------------------------------------------------------------------------------------------


def _row(rows: list[dict], n: int, col: str, r: int | None, pas: str) -> dict | None:
    for row in rows:
        if row["n"] == n and row["column"] == col and row.get("r") == r and row["pass"] == pas and "ms" in row:
            return row
    return None


def _derive(res: dict[str, Any], config: Config) -> None:
    rows = res["rows"]
    # speedups over exact
    for row in rows:
        if "ms" not in row:
            continue
        ex = _row(rows, row["n"], "exact_flex", None, row["pass"])
        if ex:
            row["speedup_vs_exact"] = ex["ms"] / row["ms"]
    # SDPA rate: the best dense causal SDPA forward rate measured in this run
    sd = [r["tflops"] for r in rows if r["column"] == "sdpa_dense" and r["pass"] == "fwd" and "tflops" in r]
    sdb = [r["tflops"] for r in rows if r["column"] == "sdpa_dense" and r["pass"] == "fwd+bwd" and "tflops" in r]
    res["ceilings"]["sdpa_fwd_TFLOPs"] = max(sd) if sd else None
    res["ceilings"]["sdpa_fwd_bwd_TFLOPs"] = max(sdb) if sdb else None
    bw = res["ceilings"].get("copy_TBps")
    D, H = config.dim, config.heads
    for row in rows:
        if row["column"] != "lsh_triton" or "ms" not in row:
            continue
        rate = res["ceilings"]["sdpa_fwd_TFLOPs"] if row["pass"] == "fwd" else res["ceilings"]["sdpa_fwd_bwd_TFLOPs"]
        flops = (4 if row["pass"] == "fwd" else 14) * D * row["pairs"]
        n = row["n"]
        nbytes = (4 if row["pass"] == "fwd" else 11) * H * n * D * 2
        t_flop = flops / (rate * 1e9) if rate else None
        t_byte = nbytes / (bw * 1e9) if bw else None
        floor = max(x for x in (t_flop, t_byte) if x is not None)
        row["floor_ms"] = floor
        row["floor_bound"] = "flops" if (t_flop or 0) >= (t_byte or 0) else "bytes"
        row["floor_fraction"] = floor / row["ms"]
    # log-log slopes 16K..1M
    slopes = {}
    for col in ("lsh_triton", "lsh_flex", "window_flex"):
        for r in (config.samples if col != "window_flex" else (None,)):
            pts = [(row["n"], row["ms"]) for row in rows if row["column"] == col and row.get("r") == r
                   and row["pass"] == "fwd" and "ms" in row and row["n"] >= 16384]
            if len(pts) >= 2:
                xs = [math.log(a) for a, _ in pts]
                ys = [math.log(b) for _, b in pts]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                sl = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                slopes[f"{col}" + (f" r={r}" if r else "")] = {"slope": sl, "n": [a for a, _ in pts]}
    res["loglog_slopes_16K_up"] = slopes
    # targets of issue 4
    t = {}
    n0 = 262144
    tri = _row(rows, n0, "lsh_triton", 8, "fwd")
    flx = _row(rows, n0, "lsh_flex", 8, "fwd")
    ex = _row(rows, n0, "exact_flex", None, "fwd")
    if tri and flx:
        t["fwd_256K_r8_triton_over_flex"] = {"value": tri["ms"] / flx["ms"], "target": "<= 0.5",
                                             "met": tri["ms"] / flx["ms"] <= 0.5}
    if tri:
        t["fwd_256K_r8_vs_prototype_11.3ms"] = {"value": tri["ms"] / 11.3, "target": "<= 0.5",
                                               "met": tri["ms"] <= 5.65}
    if tri and ex:
        t["fwd_256K_r8_speedup_vs_exact"] = {"value": ex["ms"] / tri["ms"], "target": ">= 250",
                                             "met": ex["ms"] / tri["ms"] >= 250}
    trb = _row(rows, n0, "lsh_triton", 8, "fwd+bwd")
    exb = _row(rows, n0, "exact_flex", None, "fwd+bwd")
    if trb and exb:
        t["fwd_bwd_256K_r8_speedup_vs_exact"] = {"value": exb["ms"] / trb["ms"], "target": ">= 100",
                                                 "met": exb["ms"] / trb["ms"] >= 100}
    s8 = slopes.get("lsh_triton r=8")
    if s8:
        lo_n, hi_n = min(s8["n"]), max(s8["n"])
        t[f"loglog_slope_triton_r8_{lo_n // 1024}K_to_{hi_n // 1024}K"] = {
            "value": s8["slope"], "target": "<= 1.1 (16K..1M)", "met": s8["slope"] <= 1.1,
            "n_measured": s8["n"]}
    if tri and "floor_fraction" in tri:
        t["floor_fraction_fwd_256K_r8"] = {"value": tri["floor_fraction"], "target": ">= 0.6",
                                           "met": tri["floor_fraction"] >= 0.6}
    res["targets"] = t


def summarize(results: dict[str, Any], out_dir: Path) -> str:
    """Markdown: the forward and forward+backward tables, targets, ceilings, plots."""
    res = results.get("results", results)
    env = results.get("environment", {})
    rows = res["rows"]
    ns = sorted({r["n"] for r in rows})
    lines = [f"## GPU benchmark ({env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')})", ""]
    shape = res.get("shape", {})
    lines.append(f"B=1, H={shape.get('H')}, D={shape.get('D')}, {shape.get('dtype')}, causal, Press slopes. "
                 "Time = median ms; TFLOP/s on the pairs each column computes; err = relative output error "
                 "against exact ALiBi (Flex) on the same inputs.")
    c = res.get("ceilings", {})
    lines.append(f"Ceilings measured in this run: copy {fmt(c.get('copy_TBps'))} TB/s, dense causal SDPA "
                 f"{fmt(c.get('sdpa_fwd_TFLOPs'))} TFLOP/s forward, {fmt(c.get('sdpa_fwd_bwd_TFLOPs'))} fwd+bwd.")
    for pas in ("fwd", "fwd+bwd"):
        lines += ["", f"### {pas}", ""]
        head = ["n", "column", "r", "ms", "TFLOP/s", "speedup vs exact", "err vs exact", "peak extra GB"]
        body = []
        for n in ns:
            for col in COLUMNS:
                for row in rows:
                    if row["n"] == n and row["column"] == col and row["pass"] == pas:
                        cells = [row.get("ms", row.get("error", "–")[:40]), row.get("tflops"),
                                 row.get("speedup_vs_exact"), row.get("rel_err_vs_exact"), row.get("peak_extra_gb")]
                        body.append([f"{n // 1024}K", LABELS[col], row.get("r") or "–"]
                                    + ["–" if x is None else x for x in cells])
        lines.append(markdown_table(head, body))
    tgt = res.get("targets", {})
    if tgt:
        lines += ["", "### Targets (issue 4)", ""]
        lines.append(markdown_table(["target", "value", "wanted", "met"],
                                    [[k, v["value"], v["target"], "yes" if v["met"] else "NO"] for k, v in tgt.items()]))
    fl = [r for r in rows if r["column"] == "lsh_triton" and "floor_ms" in r]
    if fl:
        lines += ["", "### Triton kernel against its floor", ""]
        lines.append(markdown_table(["n", "r", "pass", "ms", "floor ms", "bound", "fraction"],
                                    [[f"{r['n'] // 1024}K", r["r"], r["pass"], r["ms"], r["floor_ms"], r["floor_bound"],
                                      r["floor_fraction"]] for r in fl]))
    if res.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {x}" for x in res["notes"]]
    for png in ("gpu_bench_time.png", "gpu_bench_speedup.png"):
        if (Path(out_dir) / png).exists():
            lines += ["", f"![{png}]({png})"]
    return "\n".join(lines)


def make_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time vs n (log-log, forward and fwd+bwd) and speedup over exact, from the result rows."""
    res = results.get("results", results)
    rows = res["rows"]
    plt = pyplot()
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, pas in zip(axes, ("fwd", "fwd+bwd")):
        for col in COLUMNS:
            rs = sorted({r.get("r") for r in rows if r["column"] == col and r["pass"] == pas and "ms" in r},
                        key=lambda x: x or 0)
            for r in rs:
                pts = sorted((row["n"], row["ms"]) for row in rows if row["column"] == col and row.get("r") == r
                             and row["pass"] == pas and "ms" in row)
                if not pts:
                    continue
                if col.startswith("lsh") and r not in (8, None) and len(pts) < 2:
                    continue
                style = "-" if col == "lsh_triton" else "--"
                if col == "lsh_triton":
                    color = plt.cm.Reds(0.35 + 0.65 * math.log2(r) / 4)
                else:
                    color = {"exact_flex": "tab:blue", "sdpa_dense": "tab:orange", "window_flex": "tab:green",
                             "lsh_flex": "tab:purple", "lsh_split": "tab:brown"}[col]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, color=color,
                        label=LABELS[col] + (f" r={r}" if r else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens)")
        ax.set_ylabel("median time (ms)")
        shape = res["shape"]
        ax.set_title(f"{pas}: B={shape['B']}, H={shape['H']}, D={shape['D']}, {shape['dtype']}, "
                     f"{'causal' if shape['causal'] else 'bidirectional'}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(out_dir) / "gpu_bench_time.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    fig, ax = plt.subplots(figsize=(7, 5))
    for col in ("window_flex", "lsh_flex", "lsh_triton", "sdpa_dense"):
        for pas in ("fwd", "fwd+bwd"):
            r = 8 if col.startswith("lsh") else None
            pts = sorted((row["n"], row["speedup_vs_exact"]) for row in rows if row["column"] == col
                         and row.get("r") == r and row["pass"] == pas and "speedup_vs_exact" in row)
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], "-" if pas == "fwd" else ":", marker="o", ms=3,
                        label=f"{LABELS[col]}{' r=8' if r else ''} {pas}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (tokens)")
    ax.set_ylabel("speedup over exact ALiBi (Flex)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(out_dir) / "gpu_bench_speedup.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths


def readme_section(doc: dict[str, Any]) -> str:
    """The README's compact view of one saved run: time per column at r = 8 (the other r stay in the
    full report), error against exact, and the issue's targets as this run measured them."""
    res = doc["results"]
    rows = res["rows"]
    ns = sorted({row["n"] for row in rows})
    cols = [(c, 8 if c.startswith("lsh") else None) for c in COLUMNS
            if any(row["column"] == c and "ms" in row for row in rows)]
    label = lambda c, r: LABELS[c] + (f", r={r}" if r else "")  # noqa: E731
    kib = lambda n: f"{n // 1024}K"  # noqa: E731
    parts = [f"GPU: {doc['environment']['device']}, B=1, H={res['shape']['H']}, D={res['shape']['D']}, "
             f"{res['shape']['dtype']}, {'causal' if res['shape']['causal'] else 'bidirectional'}, Press slopes"]
    for pas in ("fwd", "fwd+bwd"):
        present = [(c, r) for c, r in cols if any(_row(rows, n, c, r, pas) for n in ns)]
        if not present:
            continue
        body = []
        for n in ns:
            cells = []
            for c, r in present:
                row = _row(rows, n, c, r, pas)
                cells.append("–" if row is None else fmt(row["ms"]) + (
                    f" ({fmt(row['speedup_vs_exact'])}×)" if c != "exact_flex" and "speedup_vs_exact" in row else ""))
            body.append([kib(n)] + cells)
        parts.append(f"{pas}: median ms (speedup over exact ALiBi in FlexAttention, same run)\n\n"
                     + markdown_table(["n"] + [label(c, r) for c, r in present], body))
    err = lambda n, c, r: (row := _row(rows, n, c, r, "fwd")) and row.get("rel_err_vs_exact")  # noqa: E731
    err_cols = [(c, r) for c, r in cols if c != "exact_flex" and any(err(n, c, r) is not None for n in ns)]
    if err_cols:
        parts.append("relative output error against exact ALiBi on the same inputs\n\n" + markdown_table(
            ["n"] + [label(c, r) for c, r in err_cols],
            [[kib(n)] + [fmt(err(n, c, r)) if err(n, c, r) is not None else "–" for c, r in err_cols] for n in ns]))
    n_top = max(ns)
    lsh, win = _row(rows, n_top, "lsh_triton", 8, "fwd"), _row(rows, n_top, "window_flex", None, "fwd")
    if lsh and win and "rel_err_vs_exact" in lsh and "rel_err_vs_exact" in win:
        parts.append(f"**Honest reading at n = {kib(n_top)}:** LSH (Triton, r = 8) takes {fmt(lsh['ms'])} ms with "
                     f"relative error {fmt(lsh['rel_err_vs_exact'])}; the per-head truncated window takes "
                     f"{fmt(win['ms'])} ms with error {fmt(win['rel_err_vs_exact'])}: the window's error is "
                     f"{fmt(win['rel_err_vs_exact'] / lsh['rel_err_vs_exact'])}× LSH's, at "
                     f"{fmt(win['ms'] / lsh['ms'])}× its time.")
    if res.get("targets"):
        parts.append("issue 4 targets, as this run measured them\n\n" + markdown_table(
            ["target", "value", "wanted", "met"],
            [[k, fmt(t["value"]), t["target"], "yes" if t["met"] else "**no**"] for k, t in res["targets"].items()]))
    return "\n\n".join(parts)
