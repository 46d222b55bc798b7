"""The halo plan of ``poslsh.distributed`` (pure integer arithmetic, no processes), held to brute force:
each query's reach against the dense positional weights, the interior/edge split against a scan of
every query, and the transfers against the keys every shard needs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import poslsh
from poslsh.attention import resolve_spec
from poslsh.attention.reference import dense_log_weights
from poslsh.attention.window import hybrid_widths, window_sizes
from poslsh.distributed.layout import even_lengths, rank_segments, shard_positions
from poslsh.distributed.plan import Reach, plan_halo, shard_bounds

N, H = 37, 4
SLOPES = torch.tensor([0.9, 0.3, 0.1, 0.02], dtype=torch.float64)
# One steep head: short blocks, so shard edges often fall on block edges (a plan that looks one
# position off is caught; with several heads the widest one hides it).
STEEP = torch.tensor([1.2], dtype=torch.float64)


def reach_of(method, scheme, causal, n=N, seed=0, slopes=SLOPES):
    parts = (poslsh.sample_partitions(n, slopes, 3, scheme=scheme, generator=torch.Generator().manual_seed(seed))
             if method in ("lsh", "hybrid") else None)
    window = (window_sizes(slopes, 0.05, n) if method == "window" else
              hybrid_widths(slopes, 0.3, 3, n) if method == "hybrid" else None)
    return Reach(n, causal, window, parts)


def dense_reach(reach, method, slopes=SLOPES):
    """log W [H, n, n] from the reference definition, with the same partitions and widths."""
    x = torch.zeros(1, slopes.numel(), reach.n, 1, dtype=torch.float64)
    spec = resolve_spec(x, x, x, slopes=slopes, causal=reach.causal, method="lsh" if method == "hybrid" else method,
                        partitions=reach.partitions, window_eps=0.05)
    spec = dataclasses.replace(spec, method=method, window=reach.window)
    return dense_log_weights(spec, reach.n, reach.n, torch.device("cpu")) > float("-inf")


CASES = [(m, s, c) for m, s in [("window", None), ("lsh", "grid"), ("lsh", "cut"), ("hybrid", "grid"), ("hybrid", "cut")]
         for c in (True, False)]


@pytest.mark.parametrize("slopes", [SLOPES, STEEP], ids=["4heads", "steep"])
@pytest.mark.parametrize("method,scheme,causal", CASES)
def test_reach_is_the_hull_of_the_nonzero_weights(method, scheme, causal, slopes):
    reach = reach_of(method, scheme or "grid", causal, slopes=slopes)
    nonzero = dense_reach(reach, method, slopes)  # [H, n, n]
    lo, hi = reach.bounds(list(range(N)))
    j = torch.arange(N)
    inside = (j >= lo[..., None]) & (j < hi[..., None])
    assert torch.equal(inside, nonzero)  # an interval, exactly the keys with weight > 0


@pytest.mark.parametrize("slopes", [SLOPES, STEEP], ids=["4heads", "steep"])
@pytest.mark.parametrize("method,scheme,causal", CASES)
def test_interior_and_segments_match_a_scan(method, scheme, causal, slopes):
    reach = reach_of(method, scheme or "grid", causal, slopes=slopes)
    lo, hi = reach.bounds(list(range(N)))
    for s, e in [(0, N), (0, 5), (5, 30), (30, N), (12, 13), (3, 36)] + [(i, i + 7) for i in range(1, 30, 3)]:
        ok = ((lo[:, s:e] >= s) & (hi[:, s:e] <= e)).all(0)
        a, b = reach.interior(s, e)
        expect = torch.zeros(e - s, dtype=torch.bool)
        expect[max(a - s, 0):max(b - s, 0)] = True
        assert torch.equal(ok, expect), (s, e, a, b)
        lengths = [m for m in (s, e - s, N - e) if m > 0]  # [s, e) is one of the shards
        segs = plan_halo(reach, lengths, int(s > 0), 1).segments
        assert segs[0].q0 == s and segs[-1].q1 == e and all(x.q1 == y.q0 for x, y in zip(segs, segs[1:]))
        for seg in segs:  # each segment's keys: exactly the hull of its queries' reaches
            assert seg.k0 == int(lo[:, seg.q0:seg.q1].min()) and seg.k1 == int(hi[:, seg.q0:seg.q1].max())
            assert seg.edge == (seg.k0 < s or seg.k1 > e)


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("method,scheme,causal", CASES)
def test_transfers_deliver_exactly_the_needed_keys(method, scheme, causal, uniform):
    reach = reach_of(method, scheme or "grid", causal)
    lo, hi = reach.bounds(list(range(N)))
    for lengths, hkv in [([10, 9, 9, 9], 2), ([1, 20, 2, 3, 11], 4), ([N], 1), ([3, 30, 4], 1)]:
        bounds = shard_bounds(lengths)
        plans = [plan_halo(reach, lengths, r, hkv, uniform) for r in range(len(lengths))]
        group = H // hkv
        for r, plan in enumerate(plans):
            s, e = bounds[r], bounds[r + 1]
            want_lo = lo[:, s].reshape(hkv, group).amin(1)
            want_hi = hi[:, e - 1].reshape(hkv, group).amax(1)
            if uniform:
                want_lo, want_hi = want_lo.clamp(max=int(want_lo.min())), want_hi.clamp(min=int(want_hi.max()))
            assert plan.need_lo == want_lo.tolist() and plan.need_hi == want_hi.tolist()
            for g in range(hkv):  # received slices tile the halo of every KV head exactly once
                got = sorted((a, b) for sl in plan.recv.values() for gg, a, b in sl if gg == g)
                expect = [x for x in ((plan.need_lo[g], s), (e, plan.need_hi[g])) if x[0] < x[1]]
                merged = []
                for a, b in got:
                    if merged and merged[-1][1] == a:
                        merged[-1] = (merged[-1][0], b)
                    else:
                        merged.append((a, b))
                assert merged == expect
            for c, sl in plan.send.items():  # what r sends to c is what c expects from r
                assert plans[c].recv[r] == sl
                assert all(s <= a < b <= e for _, a, b in sl)


def test_multi_hop_halo_reaches_past_the_neighbour():
    reach = reach_of("window", None, True)  # w = ceil(ln 20 / m): 4, 10, 30, 36 (capped)
    plan = plan_halo(reach, [5, 3, 2, 27], 3, 4)
    assert sorted(plan.recv) == [0, 1, 2]


def test_layouts():
    assert even_lengths(10, 4) == [3, 3, 2, 2]
    for n, world in [(10, 4), (37, 3), (8, 1)]:
        for layout in ("contiguous", "zigzag"):
            pos = torch.cat([shard_positions(n, world, r, layout) for r in range(world)])
            assert torch.equal(pos.sort().values, torch.arange(n))
    # zigzag: rank r holds chunks r and 2W - 1 - r of 2W near-equal chunks
    assert shard_positions(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert rank_segments([4, 4], "zigzag")[1] == [(2, 4, 0), (4, 6, 2)]
    with pytest.raises(ValueError, match=r"layout='zigzag' needs the shard lengths .* \[4, 4\]; got \[5, 3\]"):
        rank_segments([5, 3], "zigzag")
