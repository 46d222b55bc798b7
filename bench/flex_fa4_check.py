"""FlexAttention's FlashAttention-4 backend (``kernel_options={"BACKEND": "FLASH"}``: flash_attn.cute on
NVIDIA's CuTe DSL) against the default Triton flex backend (``"TRITON"``) for causal ALiBi: the score_mod
adds -m_h (q_idx - kv_idx), Press slopes (``poslsh.alibi_slopes``), the mask is causal.

    bash bench/flex_fa4.sh run --json "$OUT/flex_fa4.json"     # on the GPU machine (installs the wheels)
    python3 bench/flex_fa4_check.py --cpu-selftest              # here: argument parsing, reference, mask

B = 1, H = 32, D = 128, bf16, q, k, v ~ N(0, 1), scale 1/sqrt(D), flex_attention compiled with
``torch.compile(..., dynamic=False)`` (as the repo's flex backend does), block mask built directly from
its causal block structure (diagonal blocks partial, the rest full; ``BlockMask.from_kv_blocks``).

(i) checks at n = --n-check (1024): each backend's output (and, unless --no-bwd, the q/k/v gradients of
<out, dO>) against a float64 dense reference on the same bf16-rounded inputs: max relative error
max|x - ref| / max|ref| and the norm-relative error |x - ref| / |ref|; the bound is 2x (4x for gradients)
the reference's own bf16 rounding error in the same measure (the test suite's convention).
(ii) timings at --sizes (16384 65536): forward, then forward + backward (``torch.autograd.grad`` of out
with a random dO); ``triton.testing.do_bench`` median for calls under 0.2 s, else the median of 3 event-
timed calls; the first call (compile + CuTe DSL JIT + run) is timed too. Order: checks (forward), forward
timings, gradient checks, forward + backward timings; a step predicted to end past --budget-s is recorded
as skipped instead of run.
(iii) --json PATH: date, device, versions (torch, triton, CUDA, flash-attn-4, nvidia-cutlass-dsl, ...),
the exact command, config, checks, rows, skipped; rewritten after every step.

Exit status: 0 when FLASH imported, every FLASH check ran and passed; 1 otherwise (the errors are printed
and stored, never passed over).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata as _md
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

BLOCK = 128
PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
            "nvidia-cutlass-dsl-libs-cu13", "nvidia-cutlass-dsl-libs-cu12", "quack-kernels", "apache-tvm-ffi",
            "torch-c-dlpack-ext", "cuda-bindings", "cuda-python", "triton")
BACKENDS = ("FLASH", "TRITON")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here")
    p.add_argument("--n-check", type=int, default=1024, help="sequence length of the float64 check")
    p.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536], help="timed sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--variants", nargs="+", default=["tensor"], choices=["tensor", "analytic"],
                   help="tensor: slopes[h] read from a captured CUDA tensor (an aux tensor for FA4), as "
                        "poslsh's flex backend does; analytic: m_h = 2^(-8(h+1)/H) computed in the score_mod "
                        "(power-of-two H only)")
    p.add_argument("--no-bwd", action="store_true", help="forward only (no gradient checks or fwd+bwd timings)")
    p.add_argument("--budget-s", type=float, default=200.0, help="skip steps predicted to end past this")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-selftest", action="store_true",
                   help="run the parts that need no GPU (reference, block mask, JSON) on the CPU and exit")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="walk the whole GPU procedure on the CPU with eager flex_attention for every backend "
                        "(no kernel_options, wall-clock timing): tests the script, measures nothing")
    args = p.parse_args(argv)
    if args.n_check % BLOCK or any(n % BLOCK for n in args.sizes):
        p.error(f"--n-check and --sizes must be multiples of {BLOCK}")
    if "analytic" in args.variants and args.heads & (args.heads - 1):
        p.error("--variants analytic needs a power-of-two --heads")
    return args


# --------------------------------------------------------------------------------------------------
# Pieces that need no GPU
# --------------------------------------------------------------------------------------------------


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:1500]


def press_slopes(heads: int) -> tuple[torch.Tensor, str]:
    """float64 [H]; from poslsh when importable (the repo's definition), else Press's formula."""
    try:
        import poslsh

        return poslsh.alibi_slopes(heads).double(), "poslsh.alibi_slopes"
    except Exception as err:  # the check must still run where the package does not import
        print(f"[flex_fa4] poslsh.alibi_slopes unavailable ({error_text(err)}); using Press's formula")
        closest = 2 ** math.floor(math.log2(heads))
        base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
        s = [base ** k for k in range(1, closest + 1)]
        if closest != heads:
            extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
            s += [extra ** k for k in range(1, 1 + 2 * min(closest, heads - closest), 2)]
        return torch.tensor(s, dtype=torch.float64), "formula"


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal ALiBi attention in float64: softmax(scale q k^T - m_h (i - j), j <= i) v; [B, H, N, D]."""
    q, k, v = q.double(), k.double(), v.double()
    n, nk = q.shape[-2], k.shape[-2]
    i = torch.arange(n, device=q.device, dtype=torch.float64)[:, None]
    j = torch.arange(nk, device=q.device, dtype=torch.float64)[None, :]
    s = (q @ k.transpose(-1, -2)) * scale - slopes.double().to(q.device)[:, None, None] * (i - j)
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def errors(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """max|x - ref| / max|ref| and |x - ref| / |ref| (Frobenius), in float64."""
    d = x.detach().double() - ref.detach().double()
    r = ref.detach().double()
    return {"max_rel": float(d.abs().max() / r.abs().max().clamp(min=1e-300)),
            "rel": float(d.norm() / r.norm().clamp(min=1e-300))}


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_block_mask(n: int, device: torch.device | str):
    """The causal BlockMask of n x n (n a multiple of BLOCK) from its block structure: query block i sees key
    blocks 0..i-1 in full and block i partially (index tensors [1, 1, nb, nb], full width)."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = n // BLOCK
    i = torch.arange(nb, device=device, dtype=torch.int32)
    kv_num = torch.ones(1, 1, nb, device=device, dtype=torch.int32)
    kv_idx = torch.zeros(1, 1, nb, nb, device=device, dtype=torch.int32)
    kv_idx[0, 0, :, 0] = i
    full_num = i.view(1, 1, nb).clone()
    full_idx = torch.arange(nb, device=device, dtype=torch.int32).expand(nb, nb).reshape(1, 1, nb, nb).contiguous()
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal,
                                    seq_lengths=(n, n))


def alibi_score_mod(variant: str, slopes32: torch.Tensor, heads: int) -> Callable:
    """score - m_h (q_idx - kv_idx); m_h from the captured tensor (``tensor``) or computed (``analytic``)."""
    if variant == "tensor":
        def score_mod(score, b, h, q_idx, kv_idx):
            d = (q_idx - kv_idx).to(torch.float32)
            return score - slopes32[h] * d
    else:
        c = -(8.0 / heads) * math.log(2.0)  # m_h = 2^(-8 (h + 1) / H) = exp(c (h + 1)) for power-of-two H

        def score_mod(score, b, h, q_idx, kv_idx):
            d = (q_idx - kv_idx).to(torch.float32)
            return score - torch.exp((h + 1).to(torch.float32) * c) * d
    return score_mod


def pairs(n: int) -> int:
    return n * (n + 1) // 2


def tflops(ms: float | None, n: int, b: int, h: int, d: int, backward: bool) -> float | None:
    """4 D FLOP per causal pair forward, 14 D forward + backward (as bench/NOTES.md counts)."""
    if ms is None or ms <= 0:
        return None
    return (14 if backward else 4) * d * pairs(n) * b * h / (ms * 1e-3) / 1e12


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "torch_git": getattr(torch.version, "git_version", None)}
    for name in PACKAGES:
        try:
            v[name] = _md.version(name)
        except _md.PackageNotFoundError:
            v[name] = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        v["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception as err:
        v["driver"] = error_text(err)
    return v


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def cpu_selftest(args: argparse.Namespace) -> int:
    """What can be checked without a GPU: the reference against SDPA with an additive bias, the block mask
    against create_block_mask, eager flex_attention with the score_mods against the reference, the JSON."""
    import tempfile

    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch.manual_seed(0)
    failures = []

    def expect(name: str, ok: bool, detail: str) -> None:
        print(f"[selftest] {'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    slopes, src = press_slopes(8)
    expect("slopes", slopes.shape == (8,) and abs(float(slopes[0]) - 0.5) < 1e-15, f"{src}, m_0 = {float(slopes[0])}")
    B, H, N, D = 2, 8, 256, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    scale = D ** -0.5
    ref = reference(q, k, v, slopes, scale)
    i = torch.arange(N, dtype=torch.float64)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :])
    bias = bias.masked_fill(i[None, :] > i[:, None], float("-inf"))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    e = errors(sdpa, ref)
    expect("reference vs SDPA + bias (float64)", e["max_rel"] < 1e-12, f"{e}")
    try:
        import poslsh

        out = poslsh.attention(q, k, v, causal=True, backend="reference", scale=scale)
        e = errors(out[0] if isinstance(out, tuple) else out, ref)
        expect("reference vs poslsh.attention(backend='reference')", e["max_rel"] < 1e-12, f"{e}")
    except Exception as err:  # poslsh absent or its API moved: said, not counted
        print(f"[selftest] skip poslsh reference comparison: {error_text(err)}")

    for n_mask in (N, 1024):
        mine, theirs = causal_block_mask(n_mask, "cpu"), create_block_mask(causal, 1, 1, n_mask, n_mask, device="cpu")
        same = (torch.equal(mine.to_dense(), theirs.to_dense())
                and int(mine.q_num_blocks.sum()) == int(theirs.q_num_blocks.sum())
                and int(mine.full_q_num_blocks.sum()) == int(theirs.full_q_num_blocks.sum()))
        expect(f"causal_block_mask({n_mask}) == create_block_mask", same,
               f"partial blocks {int(mine.kv_num_blocks.sum())}, full {int(mine.full_kv_num_blocks.sum())}")
    mine = causal_block_mask(N, "cpu")

    q32, k32, v32 = q.float(), k.float(), v.float()
    slopes32 = slopes.float()
    for variant in ("tensor", "analytic"):
        out = flex_attention(q32, k32, v32, score_mod=alibi_score_mod(variant, slopes32, H), block_mask=mine,
                             scale=scale)
        e = errors(out, ref)
        expect(f"eager flex_attention ({variant}) vs reference", e["max_rel"] < 1e-5, f"{e}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sub" / "x.json"
        write_json(path, {"a": 1, "p": Path("/x")})
        expect("write_json", json.loads(path.read_text()) == {"a": 1, "p": "/x"}, str(path))
    expect("tflops", abs(tflops(1.0, 1024, 1, 32, 128, False) - 4 * 128 * pairs(1024) * 32 / 1e9) < 1e-9, "fwd count")
    print(f"[selftest] {len(failures)} failed: {failures}" if failures else "[selftest] all passed")
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------
# GPU run
# --------------------------------------------------------------------------------------------------


def flash_import() -> dict[str, Any]:
    """Import flash_attn.cute (what torch's FLASH backend needs) and report; the traceback is printed."""
    t = time.perf_counter()
    try:
        importlib.import_module("cutlass.cute")
        mod = importlib.import_module("flash_attn.cute")
        iface = importlib.import_module("flash_attn.cute.interface")
        missing = [f for f in ("_flash_attn_fwd", "_flash_attn_bwd") if not hasattr(iface, f)]  # torch calls these
        if missing:
            raise ImportError(f"flash_attn.cute.interface lacks {missing}")

        res = {"ok": True, "seconds": round(time.perf_counter() - t, 2), "file": getattr(mod, "__file__", None)}
        print(f"[flex_fa4] import flash_attn.cute: OK in {res['seconds']} s ({res['file']})")
        return res
    except BaseException as err:  # noqa: BLE001 - reported, never passed over
        print("[flex_fa4] import flash_attn.cute: FAILED")
        traceback.print_exc()
        return {"ok": False, "error": error_text(err), "traceback": traceback.format_exc()[-4000:]}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], warmup_ms: int, rep_ms: int, dev: torch.device) -> dict[str, Any]:
    """First call (compile + JIT + run) wall time, then do_bench median (calls under 0.2 s) or the median of
    3 event-timed calls (on the CPU, --dry-run-cpu: the median of 3 wall-clock timed calls)."""
    t0 = time.perf_counter()
    fn()
    sync(dev)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    fn()
    sync(dev)
    est = (time.perf_counter() - t1) * 1e3
    if dev.type != "cuda":
        times = [est]
        for _ in range(2):
            t2 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t2) * 1e3)
        return {"ms": statistics.median(times), "how": "median of 3 wall-clock calls (CPU dry run)",
                "first_call_s": round(first, 3), "step_s": round(time.perf_counter() - t0, 2)}
    from triton.testing import do_bench

    if est <= 200:
        ms, how = float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")), "do_bench median"
    else:
        from poslsh_lab.experiments.metrics import event_times

        ms, how = statistics.median([est] + event_times(fn, 2)), "median of 3 calls (first wall-clock timed)"
    return {"ms": ms, "how": how, "first_call_s": round(first, 3), "step_s": round(time.perf_counter() - t0, 2)}


def run(args: argparse.Namespace) -> int:
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    t_start = time.perf_counter()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 256)
    dev = torch.device("cpu" if args.dry_run_cpu else "cuda")
    B, H, D = args.batch, args.heads, args.head_dim
    scale = D ** -0.5
    slopes64, slope_src = press_slopes(H)
    slopes32 = slopes64.float().to(dev)
    result: dict[str, Any] = {
        "name": "flex_fa4" + ("_dry_run_cpu" if args.dry_run_cpu else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu (dry run)" if args.dry_run_cpu else torch.cuda.get_device_name(dev),
        "capability": None if args.dry_run_cpu else list(torch.cuda.get_device_capability(dev)),
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "config": {"B": B, "H": H, "D": D, "dtype": "bfloat16", "causal": True, "scale": scale, "slopes": slope_src,
                   "block": BLOCK, "n_check": args.n_check, "sizes": args.sizes, "backends": args.backends,
                   "variants": args.variants, "backward": not args.no_bwd, "budget_s": args.budget_s,
                   "compile": "torch.compile(flex_attention, dynamic=False)", "inputs": "q, k, v ~ N(0, 1)",
                   "flops": "4 D per causal pair forward, 14 D forward + backward"},
        "flash_import": flash_import(), "checks": [], "rows": [], "skipped": [],
    }
    print(f"[flex_fa4] {result['device']} cc {result['capability']}; versions {json.dumps(result['versions'])}")
    save = lambda: write_json(args.json, {**result, "wall_s": round(time.perf_counter() - t_start, 1)})  # noqa: E731
    save()
    backends = [b for b in args.backends if b != "FLASH" or result["flash_import"]["ok"] or args.dry_run_cpu]
    if "FLASH" in args.backends and "FLASH" not in backends:
        result["skipped"].append({"what": "every FLASH step", "why": "flash_attn.cute did not import"})
    if args.dry_run_cpu:  # every "backend" the same CPU code: eager flex, or (flex has no CPU backward) dense
        def compiled(q, k, v, kernel_options=None, **kw):
            if q.requires_grad and torch.is_grad_enabled():
                return reference(q, k, v, slopes64, scale).to(q.dtype)
            return flex_attention(q, k, v, **kw)
    else:
        compiled = torch.compile(flex_attention, dynamic=False)
    first_seen: dict[tuple, float] = {}  # (backend, variant, backward) -> last first-call seconds
    masks: dict[int, Any] = {}

    def mask(n: int):
        if n not in masks:
            masks.clear()
            masks[n] = causal_block_mask(n, dev)
        return masks[n]

    def fn_for(backend: str, variant: str, n: int, q, k, v, do, backward: bool) -> Callable[[], Any]:
        sm, bm, opts = alibi_score_mod(variant, slopes32, H), mask(n), {"BACKEND": backend}

        def fwd():
            return compiled(q, k, v, score_mod=sm, block_mask=bm, scale=scale, kernel_options=opts)
        if not backward:
            return fwd
        return lambda: torch.autograd.grad(fwd(), (q, k, v), do)

    def fits(key: tuple, what: str, n: int, est_call_s: float) -> bool:
        """Predicted end of this step (first call as at the last size, or a default compile time, plus the
        timed calls) within the budget; else recorded as skipped."""
        default = (60.0 if key[0] == "FLASH" else 20.0) * (1.5 if key[2] else 1.0)
        compile_s = first_seen.get(key, default)
        elapsed = time.perf_counter() - t_start
        if elapsed + compile_s + est_call_s <= args.budget_s:
            return True
        result["skipped"].append({"what": what, "n": n, "why": f"predicted past --budget-s {args.budget_s} "
                                  f"(elapsed {elapsed:.0f} s, predicted {compile_s + est_call_s:.0f} s)"})
        print(f"[flex_fa4] skip {what} n={n}: budget")
        save()
        return False

    def inputs(n: int, grad: bool):
        g = torch.Generator(device=dev.type).manual_seed(args.seed + n)
        q, k, v, do = (torch.randn(B, H, n, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        if grad:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        return q, k, v, do

    def check(backward: bool) -> None:
        n = args.n_check
        q, k, v, do = inputs(n, backward)
        qd, kd, vd = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
        ref = reference(qd, kd, vd, slopes64, scale)
        ref_grads = torch.autograd.grad(ref, (qd, kd, vd), do.double()) if backward else None
        bound_fwd = errors(ref.to(torch.bfloat16), ref)
        for backend in backends:
            for variant in args.variants:
                key = (backend, variant, backward)
                what = f"check {'fwd+bwd' if backward else 'fwd'} {backend}/{variant}"
                if not fits(key, what, n, 5.0):
                    continue
                entry: dict[str, Any] = {"backend": backend, "variant": variant, "n": n, "backward": backward}
                t = time.perf_counter()
                try:
                    out = fn_for(backend, variant, n, q, k, v, do, False)()
                    if backward:
                        grads = torch.autograd.grad(out, (q, k, v), do)
                    sync(dev)
                    entry["first_call_s"] = round(time.perf_counter() - t, 2)
                    first_seen[key] = entry["first_call_s"]
                    e = errors(out, ref)
                    entry["out"] = {**e, "bound_max_rel": 2 * bound_fwd["max_rel"], "bound_rel": 2 * bound_fwd["rel"]}
                    ok = e["max_rel"] <= 2 * bound_fwd["max_rel"] and e["rel"] <= 2 * bound_fwd["rel"]
                    if backward:
                        for name, gx, gr in zip(("dq", "dk", "dv"), grads, ref_grads):
                            b0 = errors(gr.to(torch.bfloat16), gr)
                            ge = errors(gx, gr)
                            entry[name] = {**ge, "bound_max_rel": 4 * b0["max_rel"], "bound_rel": 4 * b0["rel"]}
                            ok = ok and ge["max_rel"] <= 4 * b0["max_rel"] and ge["rel"] <= 4 * b0["rel"]
                    entry["ok"] = bool(ok)
                except Exception as err:  # noqa: BLE001 - recorded and printed
                    entry.update(ok=False, error=error_text(err), first_call_s=round(time.perf_counter() - t, 2))
                    traceback.print_exc()
                print(f"[flex_fa4] {what} n={n}: " + json.dumps({k_: v_ for k_, v_ in entry.items()
                                                                 if k_ not in ("backend", "variant", "n")}))
                result["checks"].append(entry)
                save()
        del q, k, v, do, qd, kd, vd, ref, ref_grads

    def timings(backward: bool) -> None:
        for n in args.sizes:
            q, k, v, do = inputs(n, backward)
            for backend in backends:
                for variant in args.variants:
                    key = (backend, variant, backward)
                    phase = "fwd+bwd" if backward else "fwd"
                    prev = [r for r in result["rows"] if (r["backend"], r["variant"], r["phase"]) ==
                            (backend, variant, phase) and r.get("ms")]
                    est_call_s = (prev[-1]["ms"] * (n / prev[-1]["n"]) ** 2 / 1e3 * 8 if prev else 3.0) + 1.0
                    if not fits(key, f"time {phase} {backend}/{variant}", n, est_call_s):
                        continue
                    row: dict[str, Any] = {"backend": backend, "variant": variant, "phase": phase, "n": n}
                    try:
                        row.update(time_ms(fn_for(backend, variant, n, q, k, v, do, backward),
                                           args.warmup_ms, args.rep_ms, dev))
                        first_seen[key] = row["first_call_s"]
                        row["tflops"] = tflops(row["ms"], n, B, H, D, backward)
                    except Exception as err:  # noqa: BLE001
                        row.update(ms=None, error=error_text(err))
                        traceback.print_exc()
                    print(f"[flex_fa4] time {phase} {backend}/{variant} n={n}: " + json.dumps(
                        {k_: v_ for k_, v_ in row.items() if k_ not in ("backend", "variant", "phase", "n")}))
                    result["rows"].append(row)
                    save()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            del q, k, v, do

    check(False)
    timings(False)
    if not args.no_bwd:
        check(True)
        timings(True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    flash_checks = [c for c in result["checks"] if c["backend"] == "FLASH"]
    if args.dry_run_cpu:
        ok = all(c.get("ok") for c in result["checks"])
    elif "FLASH" in args.backends:
        ok = result["flash_import"]["ok"] and bool(flash_checks) and all(c.get("ok") for c in flash_checks)
    else:
        ok = all(c.get("ok") for c in result["checks"])
    print(f"[flex_fa4] done in {result['wall_s']} s: FLASH import {result['flash_import']['ok']}, "
          f"checks {[(c['backend'], c['variant'], c['backward'], c.get('ok')) for c in result['checks']]}, "
          f"{len(result['rows'])} rows, {len(result['skipped'])} skipped" + ("" if args.json is None else
                                                                            f"; JSON {args.json}"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cpu_selftest:
        return cpu_selftest(args)
    if args.dry_run_cpu:
        return run(args)
    if not torch.cuda.is_available():
        print("[flex_fa4] no CUDA device: run this on the GPU machine (or use --cpu-selftest)")
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
