"""What does the first exact prefill at a new prompt length cost, per backend? (CUDA)

cuDNN builds an execution graph for every new shape; Triton compiles once per kernel variant (the key
count is not specialised). ``backend="auto"`` ranks backends by warm speed (``speed_table.json``), so a
generation workload whose prompts all differ in length may pay cuDNN's build at every prompt. Per
length (several never seen before), per backend: the first call's wall time (a build or compile
included) and the warm median (``triton.testing.do_bench``), causal exact ALiBi, B = 1, bf16, at the
BLOOM-560m head shape (H = 16, D = 64) and a 7B one (H = 32, D = 128). The Triton kernels are compiled
once before the first length, so its "first" column is a new length's cost, not a compile.

    python bench/first_call.py [--lengths 8192 8200 12000 16384] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SHAPES = ((16, 64), (32, 128))
BACKENDS = ("auto", "triton", "cudnn")  # auto first: its first call meets the length cold


def _wall_ms(fn) -> float:
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 8200, 12000, 16384])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch
    import triton

    import poslsh
    from poslsh.attention.dispatch import select_backend, resolve_spec

    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__,
               "cudnn": torch.backends.cudnn.version(),
               "command": "python3 bench/first_call.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": []}
    torch.manual_seed(0)
    for h, d in SHAPES:
        warm = torch.randn(1, h, 1000, d, device="cuda", dtype=torch.bfloat16)
        poslsh.attention(warm, warm, warm, backend="triton")  # compiles the forward for this head dim
        for n in args.lengths:
            q, k, v = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            for backend in BACKENDS:
                fn = lambda: poslsh.attention(q, k, v, backend=backend)  # noqa: E731
                try:
                    first = _wall_ms(fn)
                    warm_ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    row = {"heads": h, "head_dim": d, "n": n, "backend": backend, "first_ms": round(first, 3),
                           "warm_ms": round(warm_ms, 4)}
                except Exception as err:  # a refusal is a result of its own
                    row = {"heads": h, "head_dim": d, "n": n, "backend": backend, "error": repr(err)[:300]}
                if backend == "auto":  # after its warm median (its calls' work may have paid for a build)
                    row["auto_picks_warm"] = select_backend(q, resolve_spec(q, k, v), "auto", grad=False).name
                results["rows"].append(row)
                print(row, flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
