"""``poslsh.distributed`` on 2 and 4 CPU processes (gloo), held to single-process ``poslsh.attention``.

One spawn per world size runs every case: each rank builds the same float64 sequence, takes its shard,
runs forward and backward (the loss uses the output and the LSE, so the LSE's gradient path is checked
too), and the gathered output, LSE and dq, dk, dv must equal the single-process result on the whole
sequence to 1e-12. Error cases check that every rank raises (none hangs) with a clear message.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import poslsh
from poslsh.distributed import context_parallel_attention, count_traffic, gather, shard
from poslsh.distributed.launch import run_local
from poslsh.distributed.plan import shard_bounds

TOL = 1e-12


def _inputs(n, h, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(2, hh, n, d, generator=g, dtype=torch.float64) for hh in (h, hkv, hkv)]
    do = torch.randn(2, h, n, d, generator=g, dtype=torch.float64)
    dl = torch.randn(2, h, n, generator=g, dtype=torch.float64)
    return x, do, dl


def _local(x, rank, world, lengths, layout):
    """This rank's part of x ([B, H, N, *], [B, H, N] or a [B, N] mask)."""
    dim = 1 if x.ndim == 2 else 2
    if lengths is None:
        return shard(x, rank, world, layout, dim=dim)
    return x.narrow(dim, shard_bounds(lengths)[rank], lengths[rank])


def _case(rank, world, group, method, causal, n, h=4, hkv=2, d=8, lengths=None, layout="contiguous", pad=0,
          **kw):
    """Max abs differences (out, lse, dq, dk, dv) to the single-process result, on every rank."""
    (q, k, v), do, dl = _inputs(n, h, hkv, d)
    slopes = poslsh.alibi_slopes(h) * 0.5  # steeper than Press at these tiny n: several shards per halo
    mask = None
    if pad:  # padding at the sequence end: the last `pad` keys of batch element 1
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n - pad:] = False
    if method in ("lsh", "hybrid") and "seed" not in kw:
        kw["partitions"] = poslsh.sample_partitions(n, slopes, 3, scheme=kw.pop("scheme", "grid"),
                                                    generator=torch.Generator().manual_seed(1))
    args = dict(method=method, causal=causal, slopes=slopes, window_eps=0.05, hybrid_eps=0.3, **kw)
    ql, kl, vl = (_local(t, rank, world, lengths, layout).requires_grad_() for t in (q, k, v))
    ml = None if mask is None else _local(mask, rank, world, lengths, layout)
    out, lse = context_parallel_attention(ql, kl, vl, group=group, layout=layout, key_padding_mask=ml,
                                          return_lse=True, **args)
    ((out * _local(do, rank, world, lengths, layout)).sum() + (lse * _local(dl, rank, world, lengths, layout)).sum()
     ).backward()
    got = [gather(t, group, layout) for t in (out.detach(), lse.detach(), ql.grad, kl.grad, vl.grad)]
    if "seed" in args:
        args["partitions"] = poslsh.sample_partitions(n, slopes, 8, generator=torch.Generator().manual_seed(args.pop("seed")))
    for key in ("halo", "backend"):
        args.pop(key, None)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ro, rl = poslsh.attention(qr, kr, vr, key_padding_mask=mask, return_lse=True, **args)
    ((ro * do).sum() + (rl * dl).sum()).backward()
    want = [ro, rl, qr.grad, kr.grad, vr.grad]
    return [float((a - b).abs().max()) for a, b in zip(got, want)]


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _worker(rank, world):
    """Every case on this world size; returns {name: errors or message} (the same keys on every rank)."""
    results = {}
    cases = {}
    for method, extra in [("window", {}), ("lsh", {}), ("lsh", {"scheme": "cut"}), ("hybrid", {}), ("exact", {})]:
        for causal in (True, False):
            name = f"{method}{'-cut' if extra else ''}-{'causal' if causal else 'bidir'}"
            cases[name] = dict(method=method, causal=causal, n=4 * world + 1, **extra)  # n % world != 0
    # Shards shorter than the halo (multi-hop), uneven lengths, multi-query KV, padding at the end.
    lengths = [1, 7, 3, 10][:world] if world == 4 else [3, 14]
    for method in ("window", "lsh", "hybrid", "exact"):
        cases[f"{method}-uneven-mqa-pad"] = dict(method=method, causal=method != "hybrid", n=sum(lengths),
                                                 lengths=lengths, hkv=1, pad=6)
    cases["window-long-gqa-pad-bidir"] = dict(method="window", causal=False, n=61, h=8, hkv=2, pad=9)
    cases["lsh-long-causal-halo-max"] = dict(method="lsh", causal=True, n=61, halo="max")
    cases["hybrid-seed"] = dict(method="hybrid", causal=True, n=29, seed=7)
    cases["exact-zigzag-causal"] = dict(method="exact", causal=True, n=23, layout="zigzag", pad=4)
    cases["exact-zigzag-bidir"] = dict(method="exact", causal=False, n=18, layout="zigzag")
    for name, case in cases.items():
        results[name] = _case(rank, world, None, **case)
    # Groups: each pair of ranks runs its own 2-way ring / halo; and world size 1 on a 1-rank group.
    pairs = [dist.new_group([r, r + 1]) for r in range(0, world, 2)]
    singles = [dist.new_group([r]) for r in range(world)]
    results["group-pairs-lsh"] = _case(dist.get_rank(pairs[rank // 2]), 2, pairs[rank // 2], "lsh", False, 11)
    results["group-single-exact"] = _case(0, 1, singles[rank], "exact", True, 9)
    results["group-single-window"] = _case(0, 1, singles[rank], "window", False, 9)
    results["group-single-zigzag"] = _case(0, 1, singles[rank], "exact", True, 9, layout="zigzag")  # off-diagonal
    # Errors: every rank must raise (the one small all-gather carries the reason), none may hang.
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    results["empty"] = _error(lambda: context_parallel_attention(
        q[:, :, :0] if rank == 1 else q, k[:, :, :0] if rank == 1 else k, v[:, :, :0] if rank == 1 else v,
        method="window"))
    results["seeds"] = _error(lambda: context_parallel_attention(q, k, v, method="lsh", seed=rank))
    gen = torch.Generator().manual_seed(3 if rank == world - 1 else 2)
    results["generators"] = _error(lambda: context_parallel_attention(q, k, v, method="hybrid", generator=gen))
    results["refused"] = _error(lambda: context_parallel_attention(q, k, v, method="window",
                                                                   window_eps=2.0 if rank == 0 else 0.1))
    results["mismatch"] = _error(lambda: context_parallel_attention(q, k, v, method="window",
                                                                    causal=rank % 2 == 0))
    results["ring-backend"] = _error(lambda: context_parallel_attention(q, k, v, method="exact", backend="split"))
    results["zigzag-window"] = _error(lambda: context_parallel_attention(q, k, v, method="window", layout="zigzag"))
    results["not-self"] = _error(lambda: context_parallel_attention(q[:, :, :3], k, v, method="window"))
    parts = poslsh.sample_partitions(5 * world, poslsh.alibi_slopes(2), 3, generator=torch.Generator().manual_seed(0))
    results["samples-beside-partitions"] = _error(lambda: context_parallel_attention(  # (ran with 3, silently)
        q, k, v, method="lsh", partitions=parts, samples=8))
    # Traffic: window halo bytes per rank do not grow with the sequence at a fixed halo (w = 10, 19 keys;
    # shards of 32 and 96 keys, so the halo is clipped by neither the shard nor the sequence).
    sent = []
    for n_local in (32, 96):
        qq, kk, vv = (torch.randn(1, 2, n_local, 4, dtype=torch.float64) for _ in range(3))
        with count_traffic() as t:
            context_parallel_attention(qq, kk, vv, method="window", causal=False, slopes=[0.5, 0.25],
                                       window_eps=0.01)
        sent.append(t.forward)
    results["traffic"] = sent
    return results


@pytest.fixture(scope="module", params=[2, 4])
def world_results(request):
    return request.param, run_local(_worker, request.param, timeout=300)


def test_every_case_matches_single_process(world_results):
    world, per_rank = world_results
    bad = {}
    for rank, res in enumerate(per_rank):
        for name, errs in res.items():
            if isinstance(errs, list) and name != "traffic" and not all(e < TOL for e in errs):
                bad[(rank, name)] = errs
    assert not bad, bad


def test_errors_are_raised_on_every_rank(world_results):
    world, per_rank = world_results
    expect = {
        "empty": r"ValueError: every rank must hold at least one position of the sequence; rank\(s\) \[1\] hold none",
        "seeds": r"ValueError: .*the LSH partitions differ between ranks",
        "generators": r"ValueError: .*the LSH partitions differ between ranks",
        "mismatch": r"ValueError: .*the ranks were called with different arguments",
        "ring-backend": r"ValueError: method='exact' \(a ring merging per-block LSEs, which needs their gradient\)",
        "zigzag-window": r"ValueError: layout='zigzag' balances the causal exact ring",
        "not-self": r"ValueError: q, k, v must hold the same positions of the sharded sequence",
        "samples-beside-partitions": r"ValueError: samples=8, but the partitions given hold 3 samples",
    }
    for rank, res in enumerate(per_rank):
        for name, pattern in expect.items():
            assert res[name] is not None and re.match(pattern, res[name]), (rank, name, res[name])
        refused = (r"ValueError: window_eps must be in \(0, 1\)" if rank == 0 else
                   r"ValueError: context_parallel_attention: the arguments of rank\(s\) \[0\] were refused")
        assert re.match(refused, res["refused"]), (rank, res["refused"])


def test_halo_traffic_is_independent_of_length(world_results):
    world, per_rank = world_results
    for rank, res in enumerate(per_rank):
        short, long = res["traffic"]
        assert short == long > 0, (rank, res["traffic"])


def _readme_example(rank, world):
    """The README's context-parallel snippet on this rank's shard, against one process on the whole."""
    import re as _re

    from poslsh_lab import readme

    snippet = [b for b in _re.findall(r"```python\n(.*?)```", (readme.ROOT / "README.md").read_text(), _re.S)
               if "context_parallel_attention" in b]
    assert len(snippet) == 1, "the README has one context-parallel example"
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(1, 8, 301, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    scope = dict(zip("qkv", (shard(t, rank, world) for t in whole)))
    exec(snippet[0], scope)
    ref = poslsh.attention(*whole, method="window", is_causal=True)
    return float((gather(scope["out"]) - ref).abs().max())


def test_readme_example_runs_on_two_processes():
    assert max(run_local(_readme_example, 2, timeout=300)) < TOL


def _method_as_spec(rank, world):
    """A MethodSpec or its text holds the options: the same result as the name with options beside."""
    g = torch.Generator().manual_seed(1)
    whole = [torch.randn(1, 4, 40, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (shard(t, rank, world) for t in whole)
    by_name = context_parallel_attention(q, k, v, method="hybrid", samples=3, sampling="qmc", hybrid_eps=0.3, seed=5)
    by_text = context_parallel_attention(q, k, v, method="hybrid:3:grid:qmc:0.3", seed=5)
    by_spec = context_parallel_attention(q, k, v, method=poslsh.parse_method("hybrid:3:grid:qmc:0.3"), seed=5)
    refused = _error(lambda: context_parallel_attention(q, k, v, method="lsh:4", samples=8))
    return torch.equal(by_name, by_text) and torch.equal(by_name, by_spec), refused


def test_method_given_as_a_spec_or_its_text():
    for same, refused in run_local(_method_as_spec, 2, timeout=300):
        assert same
        assert refused == "TypeError: method='lsh:4:grid' holds its options: give ['samples'] in it, not beside it"
