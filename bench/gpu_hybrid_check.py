"""A short H200 check of the hybrid paths added after the main benchmark: the Triton kernel's
hybrid forward/backward against the float64 reference on the GPU, the compiled Flex hybrid forward,
and the plain-LSH Triton forward time at 256K (which must match the committed benchmark).

    python3 bench/gpu_hybrid_check.py --out DIR      # writes DIR/gpu_hybrid_check.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from triton.testing import do_bench

import poslsh
from poslsh.experiments.common import save_results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    res: dict = {"checks": [], "timings": []}
    dev = "cuda"
    for causal in (True, False):
        g = torch.Generator().manual_seed(1)
        q = torch.randn(1, 8, 1500, 64, generator=g).to(dev).requires_grad_()
        k = torch.randn(1, 4, 1500, 64, generator=g).to(dev).requires_grad_()
        v = torch.randn(1, 4, 1500, 64, generator=g).to(dev).requires_grad_()
        slopes = poslsh.alibi_slopes(8)
        parts = poslsh.sample_partitions(1500, slopes, 8, generator=torch.Generator().manual_seed(2), device=dev)
        kw = dict(method="hybrid", partitions=parts, causal=causal, hybrid_eps=0.05)
        ref = poslsh.attention(*(t.double() for t in (q, k, v)), backend="reference", **kw)
        do = torch.randn_like(ref)
        gref = torch.autograd.grad(ref, (q, k, v), do)
        for backend in ("triton", "flex"):
            try:
                out = poslsh.attention(q, k, v, backend=backend, **kw)
                errs = [rel(out, ref)]
                if backend == "triton":
                    errs += [rel(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), do.float()), gref)]
                res["checks"].append({"backend": backend, "causal": causal, "dtype": "float32",
                                      "rel_err_out_then_grads": errs})
            except Exception as err:  # record, keep going
                res["checks"].append({"backend": backend, "causal": causal, "error": repr(err)[:300]})
            print(res["checks"][-1], flush=True)
    n, h, d = 262144, 32, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g).to(dev, torch.bfloat16) for _ in range(3))
    q = 2 * q
    parts = poslsh.sample_partitions(n, poslsh.alibi_slopes(h), 8, generator=torch.Generator().manual_seed(8),
                                     device=dev)
    for method, extra in (("lsh", {}), ("hybrid", {"hybrid_eps": 1e-2}), ("hybrid", {"hybrid_eps": 1e-3})):
        fn = lambda: poslsh.attention(q, k, v, method=method, partitions=parts, backend="triton", **extra)  # noqa: E731
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        res["timings"].append({"n": n, "method": method, "r": 8, **extra, "backend": "triton", "fwd_ms": ms})
        print(res["timings"][-1], flush=True)
    save_results(args.out / "gpu_hybrid_check.json", vars(args), res)


if __name__ == "__main__":
    main()
