"""method="hybrid": exact weights for |p - j| <= w_h, positional-LSH collision means beyond.

What must hold: the hybrid weights are unbiased for B (and a wrong near/far split is caught by the
same test), the fused backend equals the dense reference to 1e-12 in float64, gradients check,
backends that cannot run it refuse it, w_h follows the documented target, and at equal r the hybrid
is on average more accurate than plain LSH.
"""

from __future__ import annotations

import math

import pytest
import torch

import poslsh
from poslsh import alibi_kernel, sample_partitions
from poslsh.attention.core import AttentionSpec
from poslsh.attention.dispatch import BACKENDS, register_backend, resolve_spec, select_backend
from poslsh.attention.reference import dense_log_weights
from poslsh.attention.window import hybrid_widths
from poslsh.positional_kernels import kerple_log
from test_sampling_modes import chernoff_check

SLOPES = [0.1, 0.3, 1.0]


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


def _qkv(b=2, h=3, hkv=3, nq=37, nk=37, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, generator=g, dtype=dtype)
    return q, k, v


# ----------------------------------------------------------------------------- unbiased weights


def hybrid_weights(slopes: list[float], n: int, r: int, sets: int, width: torch.Tensor, sampling: str,
                   overlap: bool = False) -> torch.Tensor:
    """Mean over ``sets`` independent partition sets of the hybrid weight matrix: [H, n, n].

    ``overlap`` builds the WRONG split: LSH weights also counted at |p - j| = w (near and far
    fields overlap at the seam, so that diagonal gets B + B-hat)."""
    h = len(slopes)
    parts = sample_partitions(n, slopes * sets, r, sampling=sampling, generator=torch.Generator().manual_seed(3))
    spec = AttentionSpec(slopes=parts.slopes, causal=False, method="hybrid", scale=1.0, q_offset=0,
                         partitions=parts, window=width.repeat(sets))
    w = dense_log_weights(spec, n, n, torch.device("cpu")).exp()  # [H * sets, n, n]
    if overlap:
        d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
        seam = (d[None] == width.repeat(sets)[:, None, None])
        w = w + torch.where(seam, parts.mean_mask(), torch.zeros_like(w))
    return w.reshape(sets, h, n, n).mean(0)


@pytest.mark.parametrize("sampling,wrong", [("iid", False), ("qmc", False), ("iid", True)])
def test_hybrid_weights_are_unbiased(sampling, wrong):
    """Every entry of the hybrid weight matrix, averaged over 1500 independent sets (r = 4), equals
    B by the Chernoff check (family-wise false-alarm rate 1e-4); the overlapping split is rejected."""
    n, r, sets = 40, 4, 1500
    width = torch.tensor([5, 3, 1])
    mean = hybrid_weights(SLOPES, n, r, sets, width, sampling, overlap=wrong)
    target = torch.stack([alibi_kernel(n, m) for m in SLOPES])
    res = chernoff_check(mean.clamp(max=1.0), target, sets)
    if wrong:  # weights may exceed 1 at the seam: also check the raw mean directly
        res["ok"] = res["ok"] and bool((mean <= 1).all())
    assert res["ok"] == (not wrong), res


def test_near_field_is_exact_and_far_field_is_lsh():
    n, r = 30, 3
    parts = sample_partitions(n, SLOPES, r, generator=torch.Generator().manual_seed(0))
    width = torch.tensor([4, 2, 0])
    spec = AttentionSpec(slopes=parts.slopes, causal=False, method="hybrid", scale=1.0, q_offset=0,
                         partitions=parts, window=width)
    w = dense_log_weights(spec, n, n, torch.device("cpu")).exp()
    d = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs()
    near = d[None] <= width[:, None, None]
    b = torch.stack([alibi_kernel(n, m) for m in SLOPES])
    assert torch.equal(w[near], b[near])
    assert torch.equal(w[~near], parts.mean_mask()[~near])


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", ["plain", "padding", "decode", "gqa", "kernel", "cut"])
def test_fused_equals_reference(causal, case):
    kw = {}
    nq = 37
    hkv = 3
    if case == "decode":
        nq = 5
    if case == "gqa":
        hkv = 1
    q, k, v = _qkv(nq=nq, hkv=hkv)
    if case == "padding":
        pad = torch.ones(2, 37, dtype=torch.bool)
        pad[0, 30:] = False
        pad[1, :4] = False
        kw["key_padding_mask"] = pad
    if case == "kernel":
        kw["kernel"] = kerple_log(0.7, 0.5)
    else:
        kw["slopes"] = SLOPES
    if case == "cut":
        kw["scheme"] = "cut"
    common = dict(method="hybrid", causal=causal, samples=5, hybrid_eps=0.05, return_lse=True,
                  sampling="iid" if case == "cut" else "qmc", **kw)
    ref = poslsh.attention(q, k, v, backend="reference", generator=torch.Generator().manual_seed(1), **common)
    fused = poslsh.attention(q, k, v, backend="fused", generator=torch.Generator().manual_seed(1), **common)
    assert (ref[0] - fused[0]).abs().max() < 1e-12
    assert (ref[1] - fused[1]).abs().max() < 1e-12


def test_hybrid_is_neither_lsh_nor_window():
    """Guards against a backend silently computing another method: hybrid differs from both."""
    q, k, v = _qkv()
    parts = sample_partitions(37, SLOPES, 4, generator=torch.Generator().manual_seed(0))
    hyb = poslsh.attention(q, k, v, method="hybrid", partitions=parts, hybrid_eps=0.05)
    lsh = poslsh.attention(q, k, v, method="lsh", partitions=parts)
    assert (hyb - lsh).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_gradcheck(backend):
    q, k, v = _qkv(b=1, h=2, hkv=2, nq=9, nk=11, d=3)
    parts = sample_partitions(11, [0.2, 0.6], 3, generator=torch.Generator().manual_seed(0))
    for t in (q, k, v):
        t.requires_grad_(True)
    fn = lambda q, k, v: poslsh.attention(q, k, v, method="hybrid", partitions=parts, hybrid_eps=0.1,  # noqa: E731
                                          backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_split_and_unaware_backends_refuse_hybrid():
    q, k, v = _qkv()
    spec = resolve_spec(q, k, v, slopes=SLOPES, method="hybrid", samples=3)
    with pytest.raises(ValueError, match="does not support"):
        select_backend(q, spec, "split")
    # A backend registered without declaring "hybrid" is never chosen for it, even if its own
    # supports() says yes (triton and flex declare it; their own tests cover their hybrid paths).
    register_backend("always-yes", lambda q, k, v, s: None, lambda q, s: True, priority=10_000)
    try:
        assert select_backend(q, spec, "auto").name == "fused"
        with pytest.raises(ValueError, match="does not support"):
            select_backend(q, spec, "always-yes")
    finally:
        del BACKENDS["always-yes"]


def test_partitions_and_bad_eps():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="hybrid_eps"):
        poslsh.attention(q, k, v, slopes=SLOPES, method="hybrid", hybrid_eps=0.0)
    with pytest.raises(ValueError, match="partitions are only used"):
        poslsh.attention(q, k, v, method="window", partitions=sample_partitions(37, SLOPES, 2))


# ----------------------------------------------------------------------------- widths, accuracy


def test_hybrid_widths_match_the_closed_form():
    """For ALiBi and n >> 1/m: the smallest w with (q^{w+1}(1+q) - q^{2(w+1)}) / r <= eps^2."""
    n, r = 20_000, 8
    slopes = torch.tensor([0.5, 0.05, 0.01, 0.0])
    for eps in (0.1, 1e-2, 1e-3):
        got = hybrid_widths(slopes, eps, r, n)
        for h, m in enumerate(slopes.tolist()):
            if m == 0:
                assert got[h] == n - 1
                continue
            qq = math.exp(-m)
            var = lambda w: (qq ** (w + 1) * (1 + qq) - qq ** (2 * w + 2)) / r  # noqa: E731
            w = 0
            while var(w) > eps ** 2:
                w += 1
            assert abs(int(got[h]) - w) <= 1, (m, eps, int(got[h]), w)  # finite-n sums vs the limit
    assert bool((hybrid_widths(slopes[:3], 1e-3, r, n) >= hybrid_widths(slopes[:3], 1e-2, r, n)).all())


def test_hybrid_widths_of_long_caches_come_from_one_cached_entry():
    """Past TAIL_DECAYS / m keys the widths equal those computed over all n keys, and a decode loop (one
    more key per call) computes them once, not per call (before: one O(n) computation per new n, 0.1 s
    per call at 256K keys and H = 32, a hybrid decode step's whole host time)."""
    from poslsh.attention.window import TAIL_DECAYS, _hybrid_widths, _tail_widths

    slopes = poslsh.alibi_slopes(8)
    reach = math.ceil(TAIL_DECAYS / float(slopes.min()))
    for eps in (0.1, 1e-3, 1e-6):
        for n in (reach + 1, 3 * reach + 7):
            full = _hybrid_widths.__wrapped__(tuple(slopes.tolist()), False, eps, 8, n)
            assert hybrid_widths(slopes, eps, 8, n).tolist() == list(full), (eps, n)
    _hybrid_widths.cache_clear()
    _tail_widths.cache_clear()
    for n in range(2 * reach, 2 * reach + 6):
        hybrid_widths(slopes, 1e-3, 8, n)
    assert _hybrid_widths.cache_info().currsize == 1
    assert hybrid_widths(slopes, 1e-3, 8, 50).max() <= 49  # short caches: computed over their n, capped
    zero = torch.cat([slopes[:3], torch.zeros(1)])  # a slope-0 head reads every key: its width is n - 1
    assert hybrid_widths(zero, 1e-3, 8, 5 * reach)[-1] == 5 * reach - 1


def test_settled_widths_are_those_of_every_longer_cache():
    """``hybrid_widths_settle_past``: the tail's reach, past which the widths at n are those at 4n (and not
    before it), None with a slope-0 head; a decode loop's check computes no widths after the first."""
    from poslsh.attention.window import TAIL_DECAYS, _hybrid_widths, hybrid_widths_settle_past

    def hybrid_widths_settled(slopes, eps, samples, n):
        past = hybrid_widths_settle_past(slopes, eps, samples)
        return past is not None and n > past

    slopes = poslsh.alibi_slopes(8)
    reach = math.ceil(TAIL_DECAYS / float(slopes.min()))
    for eps in (0.1, 1e-3):
        for n in (50, reach - 1, reach, reach + 1, 2 * reach):
            settled = hybrid_widths_settled(slopes, eps, 8, n)
            assert settled == (n > reach), (eps, n)
            if settled:
                assert torch.equal(hybrid_widths(slopes, eps, 8, n), hybrid_widths(slopes, eps, 8, 4 * n))
    computed = _hybrid_widths.cache_info().misses
    assert all(hybrid_widths_settled(slopes, 1e-3, 8, n) for n in range(2 * reach, 2 * reach + 50))
    assert _hybrid_widths.cache_info().misses == computed
    assert not hybrid_widths_settled(torch.cat([slopes[:3], torch.zeros(1)]), 1e-3, 8, 5 * reach)


def test_hybrid_beats_lsh_at_equal_r():
    """Same partitions, 6 seeds, n = 128: the hybrid's mean relative output error is below LSH's."""
    n, r = 128, 4
    slopes = poslsh.alibi_slopes(4)
    errs = {"lsh": [], "hybrid": []}
    for seed in range(6):
        q, k, v = _qkv(b=1, h=4, hkv=4, nq=n, nk=n, d=16, seed=seed)
        exact = poslsh.attention(q, k, v, slopes=slopes, method="exact")
        parts = sample_partitions(n, slopes, r, generator=torch.Generator().manual_seed(100 + seed))
        for method in errs:
            est = poslsh.attention(q, k, v, method=method, partitions=parts, hybrid_eps=0.1)
            errs[method].append(float((est - exact).norm() / exact.norm()))
    mean = {m: sum(e) / len(e) for m, e in errs.items()}
    assert mean["hybrid"] < mean["lsh"], mean


def test_given_widths_skip_the_width_computation(monkeypatch):
    """Widths passed in (flash_attn_func's window_size, the transformers patch, a context-parallel shard)
    are used as given: the O(Nk) hybrid_widths is not run, which cost ~25 ms per decoding step at 32K
    keys when it was computed and then replaced."""
    from poslsh.attention import dispatch
    from poslsh.attention.public import attention_with_widths

    q, k, v = (torch.randn(1, 4, n, 8, dtype=torch.float64) for n in (3, 40, 40))
    slopes = poslsh.alibi_slopes(4).double()
    parts = sample_partitions(40, slopes, 4, generator=torch.Generator().manual_seed(0))
    widths = torch.tensor([0, 3, 9, 100])
    want = attention_with_widths(q, k, v, widths, method="hybrid", slopes=slopes, partitions=parts)

    def refuse(*args, **kwargs):
        raise AssertionError("hybrid_widths ran although the widths were given")

    monkeypatch.setattr(dispatch, "hybrid_widths", refuse)
    got = attention_with_widths(q, k, v, widths, method="hybrid", slopes=slopes, partitions=parts)
    assert torch.equal(got, want)
    assert resolve_spec(q, k, v, method="hybrid", slopes=slopes, partitions=parts, widths=widths).window.tolist() \
        == [0, 3, 9, 39]  # capped at Nk - 1
    with pytest.raises(ValueError, match="widths are for method 'window' or 'hybrid', got method='lsh'"):
        resolve_spec(q, k, v, method="lsh", slopes=slopes, partitions=parts, widths=widths)
