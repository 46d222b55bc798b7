"""Host overhead of the FlexAttention backend over a direct ``flex_attention`` call with a prebuilt mask.

Three calls per method, all with the same q, k, v and (for lsh/hybrid) the same partitions:

* direct: ``flex_attention(q, k, v, score_mod, block_mask, ...)`` with mods built once beforehand;
* backend: ``flex_attention_spec(q, k, v, spec)`` on a spec resolved once (what a layer holding its
  spec pays);
* api: ``poslsh.attention(q, k, v, ..., backend=...)`` (validation, spec, dispatch: what users call).

Host time is measured with the kernel replaced by a stub that returns preallocated outputs, so the
numbers are the Python/host part only (the part that differs); ``--real`` also times the real calls
(eager on the CPU, compiled on CUDA, where the GPU time comes from ``experiments.metrics.gpu_time``).
On the CPU ``supports_flex`` refuses every call (eager Flex is slower than "fused"), so the api row goes
through a backend registered here, "flex_eager", with the same function and no device check.

    OMP_NUM_THREADS=1 python bench/flex_overhead.py                  # CPU, host time only
    python bench/flex_overhead.py --device cuda --n 16384 --real     # H200: host time and GPU time
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import poslsh
from poslsh.attention.flex import backend as flex
from poslsh.attention.dispatch import METHODS, register_backend, resolve_spec


def per_call_us(fn, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` calls, in microseconds."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


@contextmanager
def stub_kernel(q: torch.Tensor, dv: int):
    """Replace the Flex kernel by one returning preallocated (out, lse): what remains is host work."""
    out = q.new_zeros(q.shape[:-1] + (dv,))
    lse = torch.zeros(q.shape[:-1], dtype=torch.float32, device=q.device)
    saved = flex._flex_fn
    flex._flex_fn = lambda device: (lambda *a, **kw: (out, lse))
    try:
        yield
    finally:
        flex._flex_fn = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--real", action="store_true", help="also time the real (unstubbed) calls")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    backend = "flex"
    if dev.type != "cuda":
        register_backend("flex_eager", flex.flex_attention_spec, None, priority=-100, methods=METHODS)
        backend = "flex_eager"
    torch.manual_seed(0)
    b, h, n, d = 1, args.heads, args.n, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    print(f"device {dev}, B={b} H={h} N={n} D={d} {dtype}, torch {torch.__version__}, "
          f"poslsh {getattr(poslsh, '__version__', '?')}")
    print(f"{'method':8} {'direct us':>10} {'backend us':>11} {'api us':>8}   (host time per call, kernel stubbed)")
    for method in args.methods.split(","):
        kw = dict(method=method, causal=True)
        if method in ("lsh", "hybrid"):
            spec0 = resolve_spec(q, k, v, samples=args.samples, generator=torch.Generator().manual_seed(0), **kw)
            kw["partitions"] = spec0.partitions
        spec = resolve_spec(q, k, v, **kw)
        score_mod, block_mask = flex.flex_mods(spec, n, n, dev, with_q_blocks=False)
        kernel = {}

        def direct():
            return kernel["fn"](q, k, v, score_mod=score_mod, block_mask=block_mask, scale=spec.scale,
                                return_lse=True)

        def via_backend():
            return flex.flex_attention_spec(q, k, v, spec)

        def via_api():
            return poslsh.attention(q, k, v, backend=backend, return_lse=True, **kw)

        with torch.no_grad():
            with stub_kernel(q, v.shape[-1]):
                kernel["fn"] = flex._flex_fn(dev)
                host = [per_call_us(f, args.calls) for f in (direct, via_backend, via_api)]
            print(f"{method:8} {host[0]:10.1f} {host[1]:11.1f} {host[2]:8.1f}")
            if args.real:
                kernel["fn"] = flex._flex_fn(dev)
                if dev.type == "cuda":
                    from poslsh_lab.experiments.metrics import gpu_time

                    real = [gpu_time(f, 25, 100)[0] * 1e3 for f in (direct, via_backend, via_api)]
                else:
                    real = [per_call_us(f, 1, 3) for f in (direct, via_backend, via_api)]  # eager: slow, noisy
                print(f"{'  real':8} {real[0]:10.1f} {real[1]:11.1f} {real[2]:8.1f}   "
                      f"(api / direct = {real[2] / real[0]:.3f})")


if __name__ == "__main__":
    main()
