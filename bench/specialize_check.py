"""Do Triton's integer specialisations compile new forward kernels in the middle of decoding? (CUDA)

Triton's JIT specialises an int argument on ``== 1`` and on divisibility by 16, so a decoding step whose
key count Nk, query offset or key tiles per split changes class may compile another ``_fwd_kernel``
variant: a stall of a second in a user's generation. This script decodes ``--steps`` steps (B = 1,
H = 32, D = 128, bf16, Nq = 1, a cache growing by one key per step from ``--nk``) through the public call
per method, in a fresh Triton cache directory, and reports per step the wall time and the number of
compiled ``_fwd_kernel`` variants; then the prefill forward at ``--prefill`` (causal, Nq = Nk) per
method, ``triton.testing.do_bench`` median ms.

``--variant nospec`` runs the library as it ships (``_fwd_kernel`` with ``do_not_specialize`` on
``forward.DECODE_VARYING``: Nk, q_offset, split_tiles); ``--variant spec`` first rebinds the kernel with
Triton's default specialisation (session 7's kernel). Without ``--variant`` both run, each in its own
process on the same card, and the JSON holds both.

    python bench/specialize_check.py [--steps 40] [--nk 4096] [--prefill 65536] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

METHODS = ("exact", "window", "lsh")
STALL_MS = 50.0  # a later step this slow compiled something (a warm step takes well under 1 ms)


def _variants(kernel) -> int | None:
    """Compiled variants in the JIT's per-device caches (None where this Triton keeps them elsewhere)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    return sum(len(entry[0]) for entry in caches.values())


def run(variant: str, steps: int, nk: int, prefill: int) -> dict:
    import torch
    import triton

    import poslsh
    from poslsh.attention.triton import launch

    if variant == "spec":  # every int specialised, as Triton does by default
        launch._fwd_kernel = triton.jit(launch._fwd_kernel.fn)
    kernel = launch._fwd_kernel
    torch.manual_seed(0)
    H, D = 32, 128
    cache_k = torch.randn(1, H, nk + steps, D, device="cuda", dtype=torch.bfloat16)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(1, H, 1, D, device="cuda", dtype=torch.bfloat16)
    out = {"variant": variant, "decode": {}, "prefill_ms": {}}
    for method in METHODS:
        times = []
        for i in range(steps):
            n = nk + i
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            poslsh.attention(q, cache_k[:, :, :n], cache_v[:, :, :n], method=method, q_offset=n - 1,
                             backend="triton")
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        later = times[1:]  # the first step compiles the method's kernel whatever the binding
        out["decode"][method] = {"step_ms": [round(t, 3) for t in times], "first_ms": round(times[0], 3),
                                 "max_later_ms": round(max(later), 3),
                                 "median_ms": round(sorted(later)[len(later) // 2], 3),
                                 "stalls": sum(t > STALL_MS for t in later),
                                 "compiled_variants_after": _variants(kernel)}
        print(variant, method, "decode:", {k: v for k, v in out["decode"][method].items() if k != "step_ms"},
              flush=True)
    qp = torch.randn(1, H, prefill, D, device="cuda", dtype=torch.bfloat16)
    kp, vp = torch.randn_like(qp), torch.randn_like(qp)
    for method in METHODS:
        fn = lambda: poslsh.attention(qp, kp, vp, method=method, backend="triton")  # noqa: E731
        fn()
        out["prefill_ms"][method] = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        print(variant, method, f"prefill {prefill}: {out['prefill_ms'][method]:.3f} ms", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["spec", "nospec"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nk", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=65536)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.variant:
        result = run(args.variant, args.steps, args.nk, args.prefill)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    import torch
    import triton

    from poslsh.attention.triton.forward import DECODE_VARYING

    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": triton.__version__,
               "command": "python3 bench/specialize_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "do_not_specialize": list(DECODE_VARYING), "stall_ms": STALL_MS, "steps": args.steps, "nk": args.nk, "prefill_n": args.prefill, "runs": []}
    for variant in ("spec", "nospec"):
        with tempfile.TemporaryDirectory() as cache:  # a fresh compile cache: every compile is seen
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--nk", str(args.nk),
                   "--prefill", str(args.prefill)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr[-4000:])
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results["runs"].append(json.loads(lines[-1][7:]) if lines else {"variant": variant, "rc": proc.returncode})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
