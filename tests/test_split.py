"""The split backend (r block-local passes on a pluggable primitive, merged by their LSEs) held to the
dense float64 reference and to the fused backend: both schemes, causal and bidirectional, grouped KV,
Nq < Nk (decoding included), padding, odd and power-of-two-adjacent lengths, slope 0 (one block)
and steep slopes (blocks of 1-2), gradients (lse included), the primitive-plugging path and its errors.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import poslsh
from poslsh import sample_partitions
from poslsh.attention import resolve_spec
from poslsh.attention.split import primitives as prim_mod
from poslsh.attention.split.primitives import Primitive, torch_attention
from poslsh.attention.split import plan_split, split_bytes

# Steep (blocks of 1-2), medium, shallow and flat (one block over everything).
SLOPES = torch.tensor([5.0, 0.9, 0.08, 0.0], dtype=torch.float64)
PRIMS = ("torch", "sdpa")


def qkv(b=2, h=4, hkv=2, nq=21, nk=29, d=5, dv=3, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = (torch.randn(b, h, nq, d, generator=g, dtype=torch.float64),
          torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64),
          torch.randn(b, hkv, nk, dv, generator=g, dtype=torch.float64))
    return tuple(t.requires_grad_(grad) for t in ts)


def padding(b, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(b, nk, generator=g) > 0.3
    kpm[:, -1] = True
    return kpm


def compare(q, k, v, parts, causal, kpm=None, prim="torch", scale=None):
    """split against reference (float64 oracle) and fused: out and lse within 1e-12."""
    kw = dict(method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm, return_lse=True, scale=scale)
    ref, ref_lse = poslsh.attention(q, k, v, backend="reference", **kw)
    fused, fused_lse = poslsh.attention(q, k, v, backend="fused", **kw)
    out, lse = poslsh.attention(q, k, v, backend="split", primitive=prim, **kw)
    for want, want_lse in ((ref, ref_lse), (fused, fused_lse)):
        torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=1e-11, rtol=0)


@pytest.mark.parametrize("prim", PRIMS)
@pytest.mark.parametrize("scheme,causal", list(itertools.product(["grid", "cut"], [True, False])))
@pytest.mark.parametrize("nq,pad", [(29, False), (29, True), (21, False), (21, True), (1, True)])
def test_split_equals_reference_and_fused(prim, scheme, causal, nq, pad):
    """GQA (4 query heads on 2 KV heads), D != Dv, every slope kind, Nq = Nk / Nq < Nk / decoding."""
    q, k, v = qkv(nq=nq)
    parts = sample_partitions(29, SLOPES, 6, scheme=scheme, generator=torch.Generator().manual_seed(3))
    compare(q, k, v, parts, causal, padding(2, 29) if pad else None, prim)


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 63, 65])
@pytest.mark.parametrize("scheme,causal", list(itertools.product(["grid", "cut"], [True, False])))
def test_lengths_one_and_powers_of_two_plus_minus_one(n, scheme, causal):
    q, k, v = qkv(b=1, h=4, hkv=4, nq=n, nk=n, d=4, dv=4, seed=n)
    parts = sample_partitions(n, SLOPES, 5, scheme=scheme, generator=torch.Generator().manual_seed(n))
    compare(q, k, v, parts, causal, prim="sdpa" if n % 2 else "torch", scale=0.7)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_longer_sequence_left_and_right_padding_and_chunked_tiles(scheme, monkeypatch):
    """n = 300 (many blocks per head, runs of many blocks), contiguous left/right padding per batch row
    (the runs are trimmed around it) and tiny score-tile budgets (masked path and torch primitive
    process a few blocks / rows at a time)."""
    from poslsh.attention.split import backend as split_mod

    monkeypatch.setattr(split_mod, "TILE_BUDGET", 500)
    monkeypatch.setattr(prim_mod, "TORCH_TILE_BUDGET", 700)
    q, k, v = qkv(b=3, h=4, hkv=1, nq=280, nk=300, d=4, dv=4, seed=4)
    kpm = torch.ones(3, 300, dtype=torch.bool)
    kpm[0, :37] = False  # left padding
    kpm[1, 250:299] = False  # right padding (the last key stays, so no row of batch 1 is empty)
    slopes = torch.tensor([0.5, 0.05, 0.01, 0.0], dtype=torch.float64)
    parts = sample_partitions(300, slopes, 4, scheme=scheme, generator=torch.Generator().manual_seed(5))
    for causal, prim in itertools.product([True, False], PRIMS):
        compare(q, k, v, parts, causal, kpm, prim)
    # The runs skip the padded ends but keep the clean middle: most rows still go through views.
    spec = resolve_spec(q, k, v, method="lsh", partitions=parts, key_padding_mask=kpm)
    plan = plan_split(spec, 280, 300, 1, q.device)
    if scheme == "grid":
        assert sum(run.rows for run in plan.runs) > 0.4 * 280 * 16


def test_empty_rows_give_zero_and_empty_lse():
    from poslsh.attention import EMPTY_LSE

    q, k, v = qkv(nq=17, nk=17)
    kpm = torch.ones(2, 17, dtype=torch.bool)
    kpm[0] = False
    kpm[1, :5] = False
    for prim in PRIMS:
        out, lse = poslsh.attention(q, k, v, method="lsh", slopes=SLOPES, key_padding_mask=kpm, return_lse=True,
                                    backend="split",
                                    primitive=prim)
        assert torch.isfinite(out).all() and (out[0] == 0).all() and (lse[0] == EMPTY_LSE).all()
        assert (lse[1, :, :5] == EMPTY_LSE).all() and (lse[1, :, 5:] > EMPTY_LSE / 2).all()


@pytest.mark.parametrize("prim", PRIMS)
@pytest.mark.parametrize("scheme,causal", list(itertools.product(["grid", "cut"], [True, False])))
def test_gradients_equal_reference(prim, scheme, causal):
    """dq, dk, dv of a loss through out *and* lse, with padding, GQA, Nq < Nk and a non-default scale,
    equal the reference backend's autograd in float64."""
    q, k, v = qkv(nq=23, grad=True)
    kpm = padding(2, 29)
    parts = sample_partitions(29, SLOPES, 5, scheme=scheme, generator=torch.Generator().manual_seed(7))
    grads = []
    for backend in ("reference", "split"):
        kw = dict(primitive=prim) if backend == "split" else {}
        out, lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm,
                                    scale=0.6,
                                    return_lse=True, backend=backend, **kw)
        g = torch.Generator().manual_seed(8)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() \
            + (lse * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


@pytest.mark.parametrize("prim", PRIMS)
def test_gradcheck(prim):
    q, k, v = qkv(b=1, h=2, hkv=1, nq=7, nk=9, d=3, dv=3, grad=True)
    parts = sample_partitions(9, [0.7, 0.1], 3, generator=torch.Generator().manual_seed(1))
    for causal in (True, False):
        fn = lambda q, k, v: poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal,  # noqa: E731
                                              backend="split",
                                              primitive=prim, return_lse=True)
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_user_callable_is_called_once_per_width_group_not_per_block():
    """A counting wrapper around the torch primitive: same results, and the calls are the plan's:
    one per (head, sample) run of equal-width blocks plus one per padded-length bucket of edge
    blocks, however many blocks there are (doubling n does not add calls per block)."""
    calls = []

    def counting(q, k, v, causal):
        calls.append(tuple(q.shape))
        return torch_attention(q, k, v, causal)

    slopes = torch.tensor([0.3, 0.1, 0.05, 0.02], dtype=torch.float64)
    counts = {}
    for n in (400, 800):
        q, k, v = qkv(b=1, nq=n, nk=n, d=4, dv=4, seed=n)
        parts = sample_partitions(n, slopes, 4, generator=torch.Generator().manual_seed(0))
        calls.clear()
        out = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="split", primitive=counting)
        ref = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="fused")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        spec = resolve_spec(q, k, v, method="lsh", partitions=parts)
        plan = plan_split(spec, n, n, 2, q.device)
        assert len(calls) == plan.num_calls
        blocks = sum(run.nb for run in plan.runs)
        assert len(plan.runs) == 4 * 4 and blocks > 10 * len(plan.runs)  # many blocks per run call
        assert max(c[1] for c in calls) == max(run.nb for run in plan.runs)  # a run's blocks: one call
        counts[n] = len(calls)
    # Edge buckets are powers of two up to the widest block: the call count grows at most by a
    # few buckets when n doubles, never with the number of blocks (which doubles).
    assert counts[800] <= counts[400] + 3


def test_primitive_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"primitive must be one of \['flex', 'sdpa', 'torch'\]"):
        poslsh.attention(q, k, v, method="lsh", backend="split", primitive="flash3")
    with pytest.raises(TypeError, match="primitive must be a name in .* or a callable"):
        poslsh.attention(q, k, v, method="lsh", backend="split", primitive=42)
    with pytest.raises(ValueError, match="primitive= is an option of backend='split', got backend='fused'"):
        poslsh.attention(q, k, v, method="lsh", backend="fused", primitive="torch")
    bad_out = lambda q, k, v, c: (torch_attention(q, k, v, c)[0][..., :1], torch_attention(q, k, v, c)[1])  # noqa: E731
    with pytest.raises(ValueError, match=r"returned out of shape .* expected .*\[B', H', L, Dv\]"):
        poslsh.attention(q, k, v, method="lsh", backend="split", primitive=bad_out)
    bad_lse = lambda q, k, v, c: (torch_attention(q, k, v, c)[0], torch_attention(q, k, v, c)[1][..., None])  # noqa: E731
    with pytest.raises(ValueError, match=r"returned lse of shape .* expected"):
        poslsh.attention(q, k, v, method="lsh", backend="split", primitive=bad_lse)
    with pytest.raises(TypeError, match="must return a pair of tensors"):
        poslsh.attention(q, k, v, method="lsh", backend="split",
                         primitive=lambda q, k, v, c: torch_attention(q, k, v, c)[0])
    # An lse without gradient cannot be merged differentiably: a clear error at backward, not a wrong gradient.
    detached = lambda q, k, v, c: (lambda o, lse: (o, lse.detach()))(*torch_attention(q, k, v, c))  # noqa: E731
    qg, kg, vg = qkv(grad=True)
    out = poslsh.attention(qg, kg, vg, method="lsh", backend="split", primitive=detached)
    with pytest.raises(TypeError, match="lse carries no gradient"):
        out.sum().backward()
    with pytest.raises(ValueError, match="does not support this call"):
        poslsh.attention(q, k, v, method="hybrid", backend="split")


def test_primitive_subclass_with_its_own_backward_is_used():
    """A Primitive subclass's backward (here: the torch primitive's autograd recomputation, counted)
    is what the backward pass calls, once per forward call."""
    seen = []

    class Counted(Primitive):
        def backward(self, *args, **kw):
            seen.append(1)
            return super().backward(*args, **kw)

    q, k, v = qkv(grad=True)
    parts = sample_partitions(29, SLOPES, 3, generator=torch.Generator().manual_seed(2))
    prim = Counted(torch_attention, "counted")
    out = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="split", primitive=prim)
    out.sum().backward()
    spec = resolve_spec(q, k, v, method="lsh", partitions=parts)
    assert len(seen) == sum(s.kind != "masked" for s in plan_split(spec, 21, 29, 2, q.device).sets) \
        + len(plan_split(spec, 21, 29, 2, q.device).runs)


@pytest.mark.parametrize("scheme,causal", list(itertools.product(["grid", "cut"], [True, False])))
def test_flex_document_primitive_forward(scheme, causal):
    """FlexAttention with one document-masked call per sample (eager on the CPU; forward only: torch's
    FlexAttention has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(nq=21)
    parts = sample_partitions(29, SLOPES, 4, scheme=scheme, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compare(q, k, v, parts, causal, padding(2, 29), "flex")


def test_flex_as_a_block_primitive():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = qkv(b=2, h=3, hkv=3, nq=13, nk=13, d=4, dv=4)
    for causal in (True, False):
        got = prim_mod.FlexPrimitive()(q, k, v, causal)
        for a, b in zip(got, torch_attention(q, k, v, causal)):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_sdpa_backward_handles_the_lse_gradient_alone():
    """A loss through lse only (dout = 0): the SDPA primitive's second flash-backward call."""
    q, k, v = qkv(grad=True)
    parts = sample_partitions(29, SLOPES, 3, generator=torch.Generator().manual_seed(4))
    grads = []
    for backend, kw in (("reference", {}), ("split", {"primitive": "sdpa"})):
        _, lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, return_lse=True, backend=backend, **kw)
        grads.append(torch.autograd.grad(lse.sum(), (q, k, v), allow_unused=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, torch.zeros_like(b) if a is None else a, atol=1e-12, rtol=0)


def test_split_bytes_floor():
    """Without the lse, the split form moves (5 r + 1) / 4 times the bytes of the fused one (r passes
    of q, k, v read and o written, then r outputs read and one written)."""
    for r in (1, 8):
        b = split_bytes(1, 32, 1 << 18, 128, r, lse_itemsize=0)
        assert b["split_fwd"] / b["fused_fwd"] == pytest.approx((5 * r + 1) / 4, rel=1e-12)
        assert b["split_fwd_bwd"] > b["split_fwd"]


@pytest.mark.parametrize("name,limit", [("FLASH_GRID_LIMIT", 3), ("FLASH_OFFSET_LIMIT", 128 * 64)])
def test_flash_calls_are_chunked_to_the_limits(monkeypatch, name, limit):
    """The flash kernels put batch and heads in CUDA grid dims (<= 65535; a run of narrow blocks has
    more blocks than that at long n) and compute some offsets in 32 bits. With the grid limit lowered
    to 3, or the offset limit to one head's backward footprint (128 rows x 64 dims: one head per
    backward call), every SDPA call is split into chunks and the results (forward and gradients) are
    unchanged."""
    q, k, v = qkv(b=2, nq=29, grad=True)
    parts = sample_partitions(29, SLOPES, 3, generator=torch.Generator().manual_seed(6))
    chunked, calls = prim_mod._chunked, []

    def spy(fn, *tensors, head_dim=None):  # records the [batch, heads] of every flash call it makes
        def run(*chunk):
            calls[-1].append((tuple(chunk[0].shape[:2]), chunk[0].shape[2], head_dim))
            return fn(*chunk)
        return chunked(run, *tensors, head_dim=head_dim)

    monkeypatch.setattr(prim_mod, "_chunked", spy)
    results = []
    for lim in (getattr(prim_mod, name), limit):
        monkeypatch.setattr(prim_mod, name, lim)
        calls.append([])
        out, lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="split", primitive="sdpa",
                                    return_lse=True)
        results.append((out, lse, *torch.autograd.grad((out.sum() + lse.sum()), (q, k, v))))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-13, rtol=0)
    assert len(calls[1]) > len(calls[0])  # the lowered limit split the calls
    for (bh, length, head_dim) in calls[1]:
        if name == "FLASH_GRID_LIMIT":
            assert max(bh) <= limit
        else:  # every chunk's elements within the offset limit (rows to 128, backward head dims to 64)
            rows = -(-length // 128) * 128
            per_head = rows if head_dim is None else rows * (-(-head_dim // 64) * 64)
            assert bh[1] * per_head <= limit and bh[0] * rows <= limit


def test_a_block_past_the_32_bit_offset_limit_is_refused(monkeypatch):
    q, k, v = qkv(b=2, nq=29, grad=True)
    monkeypatch.setattr(prim_mod, "FLASH_OFFSET_LIMIT", 128 * 64 - 1)
    out = poslsh.attention(q, k, v, method="lsh", slopes=SLOPES, backend="split", primitive="sdpa")
    with pytest.raises(ValueError, match=r"one block of \d+ rows x head dim 5 passes the flash kernel's 32-bit"):
        out.sum().backward()


def _round_up(x, m):
    return -(-x // m) * m


@pytest.mark.parametrize("shape,head_dim", [
    ((1, 2**20, 1), None), ((1, 2**20, 1), 128),  # width-1 runs at n = 2^20: 2^20 blocks of one row
    ((8, 65535, 1), 256),  # batch 8: the lse's b H' L grows with the batch, dq's H' L D does not
    ((2, 4096, 8192), 128),  # a bucket of 4096 blocks of 8192 rows: its backward passes 2^31 in one call
    ((70000, 3, 5), None),  # a batch over the grid limit
])
def test_flash_chunks_keep_grid_dims_and_32_bit_offsets_in_range(shape, head_dim):
    """Each chunk of a flash call has batch and heads <= 65535 and keeps the offsets the flash
    kernels compute in int32 below 2^31 (B' H' L for the lse; H' L D for the backward's dq
    accumulator; L rounded up to 128, D to 64); the chunks tile the call in order. Zero-stride
    inputs, so nothing of that size is allocated."""
    calls = []

    def record(x):
        calls.append(tuple(x.shape))
        return (x[:, :, 0, 0].clone(),)

    b, h, length = shape
    x = torch.arange(b * h, dtype=torch.float64).reshape(b, h, 1, 1).expand(b, h, length, 1)
    (got,) = prim_mod._chunked(record, x, head_dim=head_dim)
    assert torch.equal(got, x[:, :, 0, 0])
    for cb, ch, cl, _ in calls:
        rows = _round_up(cl, 128)
        assert cb <= 65535 and ch <= 65535 and cb * ch * rows <= 2**31 - 1
        if head_dim is not None:
            assert ch * rows * _round_up(head_dim, 64) <= 2**31 - 1
    with pytest.raises(ValueError, match=r"one block of 33554432 rows x head dim 128 passes .* 32-bit offsets"):
        prim_mod.flash_chunks(1, 1, 2**25, 128)


def test_plan_at_one_million_positions_stays_in_range():
    """The plan of the H200 run that crashed (n = 2^20, H = 32, D = 128, r = 8, Press slopes): every
    index is int64 and inside its tensor, every run's view lies inside q (k, v), the rest buffer has
    one row per non-run row, and every flash call can be chunked within the limits (forward and
    backward). Host-side arithmetic only (no attention is run)."""
    n, h, d = 2**20, 32, 128
    parts = sample_partitions(n, poslsh.alibi_slopes(h), 8, generator=torch.Generator().manual_seed(0))
    x = torch.zeros((), dtype=torch.bfloat16).expand(1, h, n, d)  # no storage: only shapes are read
    spec = resolve_spec(x, x, x, method="lsh", partitions=parts)
    plan = plan_split(spec, n, n, h, torch.device("cpu"))
    assert plan.rest_rows == sum(n - plan.run_len[i][t] for i in range(h) for t in range(8))
    assert max(run.nb for run in plan.runs) > 65535  # width-1 runs: chunked calls
    for run in plan.runs:
        assert 0 <= run.start and run.start + run.rows <= n and run.nb * run.width == run.rows
        for head_dim in (None, d):
            prim_mod.flash_chunks(1, run.nb, run.width, head_dim)
    for bs in plan.sets:
        for t, hi in ((bs.h, h), (bs.kvh, h), (bs.q_row, n), (bs.k_pos, n), (bs.dest, plan.rest_rows)):
            assert t.dtype == torch.int64 and int(t.max()) < hi
        assert int(bs.dest.min()) >= -1
        for head_dim in (None, d):
            prim_mod.flash_chunks(1, bs.q_row.shape[0], bs.k_pos.shape[1], head_dim)


@pytest.mark.parametrize("prim", PRIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_values_at_padded_keys_stay_there(prim, causal, value):
    """Padded KV slots often hold garbage: a NaN/inf value (or key) at a padded key changes nothing
    (the output equals the one with those slots zeroed, all finite). Before the fix the masked path
    multiplied the padded key's zero probability by its value, poisoning the rows of its block."""
    q, k, v = qkv(b=2, nq=29, nk=29, d=4, dv=4)
    kpm = padding(2, 29)
    parts = sample_partitions(29, SLOPES, 4, generator=torch.Generator().manual_seed(2))
    kw = dict(method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm, backend="split", primitive=prim,
              return_lse=True)
    want = poslsh.attention(q, k, v, **kw)
    pad = ~kpm[:, None, :, None]
    bad_k, bad_v = k.masked_fill(pad, value), v.masked_fill(pad, value)
    got = poslsh.attention(q, bad_k, bad_v, **kw)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_torch_primitive_rows_of_minus_inf_scores_are_empty():
    """A row whose every score is -inf (a key at +-inf against a query of the opposite sign) is empty:
    out 0 and lse EMPTY_LSE, so the merge weighs it at 0 (it was 0 / 0 = NaN, which the merge spread
    to rows whose other samples are finite)."""
    from poslsh.attention import EMPTY_LSE

    q, k, v = (torch.randn(1, 1, 3, 8, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
               for i in range(3))
    k[0, 0, 0, 3] = float("inf")
    q[0, 0, :, 3] = -1.0  # every row's score on key 0 is -inf
    for causal in (True, False):
        out, lse = torch_attention(q, k, v, causal)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        if causal:  # row 0 sees key 0 only
            assert (out[0, 0, 0] == 0).all() and lse[0, 0, 0] == EMPTY_LSE
        ref_o, ref_l = torch_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], causal)  # key 0 weighs nothing
        torch.testing.assert_close(out[:, :, 1:], ref_o, atol=1e-12, rtol=0)
        torch.testing.assert_close(lse[:, :, 1:], ref_l, atol=1e-12, rtol=0)
