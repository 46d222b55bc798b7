"""The q_offset cases shared by the interpreter test (test_distributed_local.py) and the GPU test
(test_distributed_cuda.py): queries inside the keys, as a shard of poslsh.distributed calls them.
Importing this sets no environment (the interpreter test sets TRITON_INTERPRET itself)."""

import torch

import poslsh

B, H, HKV, NK, D = 2, 4, 2, 41, 16
SLOPES = poslsh.alibi_slopes(H) * 0.3
# (q_offset, Nq): queries at the start, in the middle, at the end, a single row, all rows.
OFFSETS = [(0, 5), (3, 20), (17, 11), (40, 1), (0, NK), (9, 32)]
METHODS = [("exact", "grid"), ("window", "grid"), ("lsh", "grid"), ("lsh", "cut"), ("hybrid", "grid"),
           ("hybrid", "cut")]


def inputs(dtype):
    """q [B, H, NK, D], k and v [B, HKV, NK, D], fixed seed."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, NK, D, generator=g, dtype=dtype), torch.randn(B, HKV, NK, D, generator=g, dtype=dtype),
            torch.randn(B, HKV, NK, D, generator=g, dtype=dtype))


def method_kwargs(method, scheme, causal):
    """poslsh.attention's keyword arguments for one method (partitions sampled with a fixed seed)."""
    parts = (poslsh.sample_partitions(NK, SLOPES, 3, scheme=scheme, generator=torch.Generator().manual_seed(2))
             if method in ("lsh", "hybrid") else None)
    return dict(slopes=SLOPES, causal=causal, method=method, partitions=parts, window_eps=0.1, hybrid_eps=0.3)
