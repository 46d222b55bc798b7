"""The split backend on the GPU (issue 13): each attention primitive checked against float64, then
timed beside the fused Triton kernel, with the bytes floor of the split form.

    python bench/split_gpu.py --out DIR                     # H200 defaults; about --budget-s 150 s
    python bench/split_gpu.py --device cpu --ns 512 1024 --dtype float32 --heads 4 --head-dim 32 --out DIR

(i) checks: for every primitive, a few small cases (grid and cut, causal and bidirectional, grouped
KV, Nq < Nk, padding) run in the benchmark dtype with the allocator poisoned by NaNs first, forward
and q/k/v gradients of a loss through out and lse, against ``backend="reference"`` in float64 on the
same (rounded) inputs and partitions. (ii) timings: ``poslsh.attention(..., backend="split",
primitive=p)`` per primitive and the fused kernel (``backend="triton"``; ``"fused"`` on the CPU),
forward and forward+backward, B = 1, Press slopes, causal, partitions sampled once per n; CUDA:
``experiments.metrics.gpu_time`` (``triton.testing.do_bench`` median), CPU: best of ``--reps``.
(iii) ``DIR/split_gpu.json``: environment (date, device, versions, command), config, the checks, every
timing row (or the error that stopped it, or "skipped: time budget"), the measured copy bandwidth
and per n the bytes and the floor of the split form (``poslsh.attention.split.split_bytes``) and of
the fused one, the split/fused ratios and the log-log slopes from the smallest to the largest n.

The order of the measurements puts the issue's targets first (the fused kernel and the first
primitive at every n, forward then forward+backward), then the other primitives; a measurement whose
predicted cost would pass ``--budget-s`` is skipped and recorded as such, and the checks stop after a
third of the budget (each FlexAttention case compiles). The JSON is rewritten after
every measurement, so a run that is killed keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import poslsh
from poslsh.attention import resolve_spec
from poslsh.attention.split.primitives import Primitive, resolve_primitive
from poslsh.attention.split.backend import plan_split, split_bytes
from poslsh_lab.util import save_results

NAME = "split_gpu"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--ns", type=int, nargs="+", default=[16384, 65536, 262144, 1048576])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--primitives", nargs="+", default=["sdpa", "torch", "flex"])
    p.add_argument("--budget-s", type=float, default=150.0, help="stop measuring after this many seconds")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-fused", action="store_true")
    p.add_argument("--old-split", default=None, metavar="REV",
                   help="also time the split backend of this git revision (e.g. the commit before issue 13)")
    p.add_argument("--reps", type=int, default=3, help="CPU: best of this many calls")
    p.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-n", type=int, default=None,
                   help="where the forward time goes at this n, for block primitives (default: 262144 if in "
                        "--ns, else the largest n; 0: off)")
    return p.parse_args(argv)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def poison(device: torch.device) -> None:
    """Fill the CUDA caching allocator's free blocks with NaN, so an output element a kernel forgets to
    write shows up as NaN instead of a plausible stale value."""
    if device.type == "cuda":
        torch.full((1 << 28,), float("nan"), device=device)
        torch.cuda.synchronize()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:600]


# --------------------------------------------------------------------------------------------------
# (i) correctness against float64
# --------------------------------------------------------------------------------------------------

CHECK_CASES = [  # B, H, Hkv, Nq, Nk, D, scheme, causal, left padding
    (1, 4, 2, 300, 300, 64, "grid", True, 0),
    (2, 4, 4, 200, 300, 64, "grid", False, 37),
    (1, 4, 2, 257, 257, 64, "cut", True, 0),
]


def check_primitive(prim: str, device: torch.device, dtype: torch.dtype, samples: int, backward: bool) -> list[dict]:
    tol = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    cases = CHECK_CASES[:1] if prim == "flex" else CHECK_CASES  # each flex case compiles (tens of seconds)
    if prim == "flex" and device.type != "cuda":
        backward = False  # torch's FlexAttention has no CPU backward
    rows = []
    for b, h, hkv, nq, nk, d, scheme, causal, pad in cases:
        row: dict[str, Any] = {"primitive": prim, "case": f"B{b} H{h}/{hkv} Nq{nq} Nk{nk} D{d} {scheme} "
                                                          f"{'causal' if causal else 'bidir'} pad{pad}",
                               "backward": backward}
        try:
            g = torch.Generator().manual_seed(nk)
            q = (2 * torch.randn(b, h, nq, d, generator=g)).to(device, dtype)
            k = torch.randn(b, hkv, nk, d, generator=g).to(device, dtype)
            v = torch.randn(b, hkv, nk, d, generator=g).to(device, dtype)
            kpm = None
            if pad:
                kpm = torch.ones(b, nk, dtype=torch.bool, device=device)
                kpm[0, :pad] = False
            parts = poslsh.sample_partitions(nk, poslsh.alibi_slopes(h), samples, scheme=scheme,
                                             generator=torch.Generator().manual_seed(1), device=device)
            do = torch.randn(b, h, nq, d, generator=g).to(device)
            dl = torch.randn(b, h, nq, generator=g).to(device)
            kw = dict(method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm, return_lse=True)
            ins = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            ref_ins = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
            poison(device)
            out, lse = poslsh.attention(*ins, backend="split", primitive=prim, **kw)
            ref, ref_lse = poslsh.attention(*ref_ins, backend="reference", **kw)
            finite = bool(torch.isfinite(out).all() and torch.isfinite(lse).all())
            row.update(rel_err_out=rel(out, ref), max_err_lse=float((lse.detach().double() - ref_lse.detach()).abs().max()))
            errs = [row["rel_err_out"]]
            if backward:
                loss = lambda o, l_: (o.double() * do.double()).sum() + (l_.double() * dl.double()).sum()  # noqa: E731
                poison(device)
                gs = torch.autograd.grad(loss(out, lse), ins)
                rgs = torch.autograd.grad(loss(ref, ref_lse), ref_ins)
                row["rel_err_dq_dk_dv"] = [rel(a, c) for a, c in zip(gs, rgs)]
                errs += row["rel_err_dq_dk_dv"]
                finite = finite and all(bool(torch.isfinite(x).all()) for x in gs)
            row.update(finite=finite, tolerance=tol, ok=finite and max(errs) <= tol)
        except Exception as err:  # recorded; the run goes on
            row.update(ok=False, error=error_text(err))
        print(f"[check] {row}", flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# (ii) timing
# --------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], Any], device: torch.device, args: argparse.Namespace) -> tuple[float, str]:
    if device.type == "cuda":
        from poslsh_lab.experiments.metrics import gpu_time

        return gpu_time(fn, args.warmup_ms, args.rep_ms)
    fn()  # warm
    best = math.inf
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, f"best of {args.reps} (CPU, {torch.get_num_threads()} thread(s))"


def copy_bandwidth(device: torch.device, args: argparse.Namespace) -> float:
    """Bytes per second of ``y.copy_(x)`` (read + write counted), 1 GiB on CUDA, 64 MiB on the CPU."""
    x = torch.randn((1 << 29) if device.type == "cuda" else (1 << 25), device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms, _ = time_ms(lambda: y.copy_(x), device, args)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def load_old_split(rev: str):
    """poslsh/attention/split.py as it was at ``rev`` (git show), importable beside the current one."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:poslsh/attention/split.py"], check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from ..", "from poslsh.").replace("from .", "from poslsh.attention.")
    path = Path(tempfile.mkdtemp()) / "old_split.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_split", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class TimedPrimitive(Primitive):
    """A primitive with every forward call timed (CUDA events, or the wall clock on the CPU) and keyed
    by its block length."""

    def __init__(self, inner: Primitive) -> None:
        super().__init__(None, inner.name)
        self.inner, self.calls = inner, []

    def supports(self, q):
        return self.inner.supports(q)

    def backward(self, *args, **kw):
        return self.inner.backward(*args, **kw)

    def __call__(self, q, k, v, causal):
        cuda = q.device.type == "cuda"
        a = torch.cuda.Event(enable_timing=True) if cuda else time.perf_counter()
        if cuda:
            a.record()
        res = self.inner(q, k, v, causal)
        if cuda:
            b = torch.cuda.Event(enable_timing=True)
            b.record()
        else:
            b = time.perf_counter()
        self.calls.append((q.shape[2], q.shape[0] * q.shape[1], a, b))
        return res

    def summary(self) -> dict[str, Any]:
        """Milliseconds, calls and blocks of the primitive calls per block-length class."""
        classes: dict[str, dict[str, float]] = {}
        for length, blocks, a, b in self.calls:
            ms = a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3
            key = next(f"L<={c}" for c in (8, 32, 128, 512, 2048, 1 << 62) if length <= c).replace(str(1 << 62), "inf")
            c = classes.setdefault(key, {"ms": 0.0, "calls": 0, "blocks": 0, "rows": 0})
            c["ms"] += ms
            c["calls"] += 1
            c["blocks"] += blocks
            c["rows"] += blocks * length
        return classes


def profile(prim_name: str, q, k, v, parts, device: torch.device) -> dict[str, Any]:
    """One forward with the primitive calls timed: per block-length class and in total, beside the
    whole call (the difference is planning, gathers and the merge)."""
    prim = TimedPrimitive(resolve_primitive(prim_name))
    poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="split", primitive=prim)  # warm
    prim.calls.clear()
    sync(device)
    t0 = time.perf_counter()
    poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="split", primitive=prim)
    sync(device)
    total = (time.perf_counter() - t0) * 1e3
    classes = prim.summary()
    return {"primitive": prim_name, "total_ms": total, "primitive_ms": sum(c["ms"] for c in classes.values()),
            "by_block_length": classes}


def loglog_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(ms) against log(n)."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in points], [math.log(ms) for _, ms in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    out_path = args.out / f"{NAME}.json"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    res: dict[str, Any] = {"load_average_start": list(os.getloadavg()), "command": "python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)),
                           "checks": [], "rows": [], "per_n": {}, "derived": {}}

    def save() -> None:
        derive(res, args)
        save_results(out_path, config, res)

    def elapsed() -> float:
        return time.perf_counter() - start

    fused_backend = "triton" if device.type == "cuda" else "fused"
    try:
        res["copy_bandwidth_Bps"] = copy_bandwidth(device, args)
    except Exception as err:
        res["copy_bandwidth_Bps"] = None
        res["copy_bandwidth_error"] = error_text(err)
    save()
    if not args.no_check:
        for p in args.primitives:
            if elapsed() > args.budget_s / 3:
                res["checks"].append({"primitive": p, "ok": None, "skipped": f"time budget ({args.budget_s:.0f} s)"})
                continue
            res["checks"] += check_primitive(p, device, dtype, args.samples, not args.no_backward)
            save()

    old = None
    if args.old_split:
        try:
            old = load_old_split(args.old_split)
        except Exception as err:
            res["old_split_error"] = error_text(err)
    columns = ([] if args.no_fused else ["fused"]) + [f"split_{p}" for p in args.primitives] + (["split_old"] if old else [])
    primary = set(columns[:2])
    passes = ["fwd"] + ([] if args.no_backward else ["fwd_bwd"])
    order = [(pas, col, n) for group in (True, False) for pas in passes for col in columns
             if (col in primary) == group for n in sorted(args.ns)]

    inputs: dict[int, tuple] = {}

    def setup(n: int):
        if n not in inputs:
            inputs.clear()  # one n at a time in memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=device).manual_seed(args.seed)
            h, d = args.heads, args.head_dim
            q = (2 * torch.randn(1, h, n, d, device=device, generator=g)).to(dtype)
            k = torch.randn(1, h, n, d, device=device, generator=g).to(dtype)
            v = torch.randn(1, h, n, d, device=device, generator=g).to(dtype)
            parts = poslsh.sample_partitions(n, poslsh.alibi_slopes(h), args.samples,
                                             generator=torch.Generator().manual_seed(args.seed), device=device)
            inputs[n] = (q, k, v, parts)
        return inputs[n]

    def call(col: str, n: int, grad: bool) -> Callable[[], Any]:
        q, k, v, parts = setup(n)
        ins = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        if col == "fused":
            fwd = lambda: poslsh.attention(*ins, method="lsh", partitions=parts, backend=fused_backend)  # noqa: E731
        elif col == "split_old":
            spec = resolve_spec(*ins, method="lsh", partitions=parts)
            fwd = lambda: old.split_attention(*ins, spec)[0]  # noqa: E731
        else:
            p = col.removeprefix("split_")
            fwd = lambda: poslsh.attention(*ins, method="lsh", partitions=parts, backend="split",  # noqa: E731
                                           primitive=p)
        if not grad:
            return fwd
        do = torch.randn(q.shape, device=device, dtype=dtype)

        def step():
            for t in ins:
                t.grad = None
            fwd().backward(do)
        return step

    last_ms: dict[tuple[str, str], tuple[int, float]] = {}
    for pas, col, n in order:
        row: dict[str, Any] = {"n": n, "column": col, "pass": pas}
        prev = last_ms.get((pas, col))
        predicted_s = 0.0 if prev is None else prev[1] * 1e-3 * n / prev[0]
        if elapsed() + 0.5 + 5 * predicted_s > args.budget_s:
            row["skipped"] = f"time budget ({args.budget_s:.0f} s)"
        elif col == "split_flex" and pas == "fwd_bwd" and device.type != "cuda":
            row["skipped"] = "FlexAttention has no CPU backward"
        else:
            try:
                fn = call(col, n, pas == "fwd_bwd")
                ms, how = time_ms(fn, device, args)
                row.update(ms=ms, how=how)
                last_ms[(pas, col)] = (n, ms)
                if col.startswith("split_") and col != "split_old":
                    q, k, v, parts = setup(n)
                    spec = resolve_spec(q, k, v, method="lsh", partitions=parts)
                    row["primitive_calls"] = (args.samples if col == "split_flex"
                                              else plan_split(spec, n, n, k.shape[1], device).num_calls)
            except Exception as err:
                row["error"] = error_text(err)
                traceback.print_exc(limit=2)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        row["elapsed_s"] = elapsed()
        print(f"[time] {row}", flush=True)
        res["rows"].append(row)
        save()
    res["profile"] = []
    for p in args.primitives:
        n = args.profile_n if args.profile_n is not None else (262144 if 262144 in args.ns else max(args.ns))
        if not n or p == "flex":
            continue
        if elapsed() + 10 > args.budget_s:
            res["profile"].append({"primitive": p, "n": n, "skipped": f"time budget ({args.budget_s:.0f} s)"})
            continue
        try:
            q, k, v, parts = setup(n)
            res["profile"].append({"n": n, **profile(p, q, k, v, parts, device)})
        except Exception as err:
            res["profile"].append({"primitive": p, "n": n, "error": error_text(err)})
        print(f"[profile] {res['profile'][-1]}", flush=True)
        save()
    res["total_s"] = elapsed()
    res["load_average_end"] = list(os.getloadavg())
    save()
    return res


def derive(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Per n: bytes and floors (ms at the measured copy bandwidth), split/fused ratios; per column the
    log-log slope of time against n."""
    bw = res.get("copy_bandwidth_Bps")
    itemsize = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    times = {(r["n"], r["column"], r["pass"]): r["ms"] for r in res["rows"] if "ms" in r}
    for n in sorted(args.ns):
        b = split_bytes(1, args.heads, n, args.head_dim, args.samples, itemsize)
        entry: dict[str, Any] = {"bytes": b}
        if bw:
            entry["floor_ms"] = {key: val / bw * 1e3 for key, val in b.items()}
        for pas in ("fwd", "fwd_bwd"):
            fused = times.get((n, "fused", pas))
            for col in {c for (m, c, p) in times if m == n and p == pas and c != "fused"}:
                ms = times[(n, col, pas)]
                if fused:
                    entry.setdefault(f"{pas}_over_fused", {})[col] = ms / fused
                if bw:
                    key = "split_fwd" if pas == "fwd" else "split_fwd_bwd"
                    entry.setdefault(f"{pas}_floor_over_measured", {})[col] = entry["floor_ms"][key] / ms
        res["per_n"][str(n)] = entry
    slopes: dict[str, float] = {}
    for pas in ("fwd", "fwd_bwd"):
        for col in {c for (_, c, p) in times if p == pas}:
            pts = sorted((n, ms) for (n, c, p), ms in times.items() if c == col and p == pas)
            s = loglog_slope(pts)
            if s is not None:
                slopes[f"{pas}/{col} n={pts[0][0]}..{pts[-1][0]}"] = s
    res["derived"]["loglog_slope"] = slopes
    run = [c for c in res["checks"] if "skipped" not in c]
    res["derived"]["checks_ok"] = all(c.get("ok") for c in run) if run else None


if __name__ == "__main__":
    main()
