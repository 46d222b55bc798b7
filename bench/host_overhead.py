"""Host time of ``resolve_spec`` per call (argument checks, slopes, widths, partitions), the part of a
``poslsh.attention`` call that runs in Python before any kernel: it matters for decoding, where the GPU
work of one token is ~100 us. Decode-shaped inputs (B = 1, H = 32, Nq = 1, Nk = 64K, D = 128, bf16)
on the CPU; the kernels are not run.

    python bench/host_overhead.py [--reps 500]
"""

from __future__ import annotations

import argparse
import time

import torch

import poslsh
from poslsh.attention import resolve_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(1)
    h, d, nk = 32, 128, 65536
    q = torch.randn(1, h, 1, d, dtype=torch.bfloat16)
    k = v = torch.randn(1, h, nk, d, dtype=torch.bfloat16)
    slopes = poslsh.alibi_slopes(h)
    parts = poslsh.sample_partitions(nk, slopes, 8, generator=torch.Generator().manual_seed(0))
    for method, kw in (("exact", {}), ("window", {}), ("lsh", {"partitions": parts}), ("hybrid", {"partitions": parts})):
        call = lambda: resolve_spec(q, k, v, slopes=slopes, method=method, **kw)  # noqa: E731
        for _ in range(20):
            call()
        start = time.perf_counter()
        for _ in range(args.reps):
            call()
        print(f"{method:7s} {(time.perf_counter() - start) / args.reps * 1e6:6.1f} us per resolve_spec")


if __name__ == "__main__":
    main()
