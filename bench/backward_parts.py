"""Where a Triton backward's time goes: the GPU time of each kernel of one forward and one backward
(the forward, the delta rowsum(dO * O), dK/dV, dQ) per method and length, from torch's profiler, so
issue 23's ratio backward / forward (target <= 3) can be read kernel by kernel.

B = 1, H = 32, D = 128, bf16, causal, Press slopes, window eps 1e-3, hybrid eps 1e-2, r = 8 grid
partitions (``kernel_sweep.inputs``), the shipped tile configs. Each (method, n) runs one warm-up step,
then ``--steps`` profiled forward + backward steps; a kernel's time is its mean per step. JSON rows:
{method, n, kernels: {name: ms per step}, forward_ms, backward_ms, backward_over_forward}.

    python bench/backward_parts.py --json /tmp/out/backward_parts.json [--methods window lsh] [--n 65536]
    TRITON_INTERPRET=1 python bench/backward_parts.py --tiny     # CPU smoke run (no profiler times)
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_sweep import inputs  # noqa: E402

from poslsh.attention.triton import launch  # noqa: E402

FORWARD_KERNELS = ("_fwd_kernel",)


def kernel_times(method: str, n: int, h: int, d: int, dtype: torch.dtype, device: str, r: int, steps: int) -> dict:
    """{kernel name: GPU ms per forward + backward step} (empty on the CPU: no CUDA profiler there)."""
    q, k, v, spec = inputs(method, n, h, d, dtype, device, r, grad=True)
    do = torch.randn(q.shape, dtype=dtype, device=device)

    def step():
        out, _ = launch.triton_attention(q, k, v, spec)
        torch.autograd.grad(out, (q, k, v), do)

    step()  # compiles
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.key] += event.device_time_total / 1e3 / steps  # us -> ms per step
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["window", "lsh", "hybrid", "exact"])
    p.add_argument("--n", nargs="+", type=int, default=[65536, 262144])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=120.0, help="start no new case after this many seconds")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run under TRITON_INTERPRET=1 (H = 2, D = 16, n = 40)")
    p.add_argument("--json", help="write the rows here (after every case)")
    args = p.parse_args(argv)
    device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA device (or --tiny under TRITON_INTERPRET=1)")
    h, d, dtype, r = (2, 16, torch.float16, 2) if args.tiny else (32, 128, torch.bfloat16, 8)
    lengths = [40] if args.tiny else args.n
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.machine()}), interpreted",
           "torch": torch.__version__, "triton": triton.__version__,
           "shape": dict(B=1, H=h, D=d, dtype=str(dtype).removeprefix("torch."), causal=True, slopes="Press",
                         window_eps=1e-3, hybrid_eps=1e-2, samples=r, scheme="grid"),
           "timing": "torch.profiler CUDA kernel time, mean per forward + backward step", "rows": []}
    t0 = time.monotonic()
    for method in args.methods:
        for n in lengths:
            if time.monotonic() - t0 > args.budget_s:
                doc["stopped_by_budget"] = True
                break
            kernels = kernel_times(method, n, h, d, dtype, device, r, args.steps)
            fwd = sum(ms for name, ms in kernels.items() if any(f in name for f in FORWARD_KERNELS))
            bwd = sum(kernels.values()) - fwd
            row = dict(method=method, n=n, kernels=kernels, forward_ms=fwd, backward_ms=bwd,
                       backward_over_forward=bwd / fwd if fwd else None)
            doc["rows"].append(row)
            print(f"{method:7s} n={n:<7d} fwd {fwd:7.3f} ms  bwd {bwd:7.3f} ms  ratio "
                  f"{row['backward_over_forward'] or float('nan'):5.2f}  "
                  + ", ".join(f"{name[:28]} {ms:.3f}" for name, ms in kernels.items()), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
