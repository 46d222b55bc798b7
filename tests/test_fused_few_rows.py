"""The fused backend's decoding path (``fused.few_rows_attention``: every head at once for at most
``DECODE_ROWS`` query rows) against the dense reference and the tiled engine it replaces there, for every
method, causal or not, grouped KV, padding, rows that see no key, and gradients; the no-gradient
branch of ``core.softmax_with_lse`` against its general branch; and ``AttentionPlan``'s decoding steps
(exact/window weights from a table, grid LSH's from ``fused.GridLastRow``) against the reference."""

from __future__ import annotations

import pytest
import torch

from poslsh.attention import EMPTY_LSE
from poslsh.attention.core import softmax_with_lse
from poslsh.attention.dispatch import resolve_spec
from poslsh.attention.core import AttentionSpec
from poslsh.attention.fused import GridLastRow, few_rows_attention, fused_attention, few_rows_log_weights
from poslsh.attention.reference import dense_log_weights, reference_attention
from poslsh.attention.speed import DECODE_ROWS
from poslsh.attention.fused.tiled import tiled_attention
from poslsh.attention.window import band_rules

CASES = [("exact", "grid", {}), ("window", "grid", {"window_eps": 0.05}), ("lsh", "grid", {"samples": 5}),
         ("lsh", "cut", {"samples": 3}), ("hybrid", "grid", {"samples": 4, "hybrid_eps": 0.2})]


def _inputs(b, h, hkv, nq, nk, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, 8, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, nk, 8, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, nk, 6, generator=g, dtype=dtype)
    return q, k, v


def _spec(q, k, v, method, scheme, opts, **kw):
    return resolve_spec(q, k, v, slopes=[0.5, 0.25, 0.1, 0.02], method=method, scheme=scheme,
                        generator=torch.Generator().manual_seed(3), **opts, **kw)


@pytest.mark.parametrize("method,scheme,opts", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hkv", [4, 2])
def test_few_rows_equal_reference(method, scheme, opts, causal, hkv):
    """Decode-shaped calls (1 and DECODE_ROWS rows, queries inside the keys and at their end, a padded
    key) give the reference's output and LSE in float64."""
    for nq, q_offset in ((1, None), (DECODE_ROWS, 7)):
        q, k, v = _inputs(2, 4, hkv, nq, 40)
        kpm = torch.ones(2, 40, dtype=torch.bool)
        kpm[1, 3] = False
        spec = _spec(q, k, v, method, scheme, opts, causal=causal, q_offset=q_offset, key_padding_mask=kpm)
        out, lse = few_rows_attention(q, k, v, spec)
        ref_out, ref_lse = reference_attention(q, k, v, spec)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(few_rows_log_weights(spec, nq, 40, q.device, torch.float64),
                                   dense_log_weights(spec, nq, 40, q.device))


def test_fused_takes_the_few_rows_path_for_decoding_only(monkeypatch):
    """fused_attention sends at most DECODE_ROWS rows to the decoding path (same result as the tiled
    engine it replaces there), more rows to the tiled engine."""
    from poslsh.attention.fused import backend as fused

    taken = []
    monkeypatch.setattr(fused, "few_rows_attention", lambda *a: taken.append(a) or few_rows_attention(*a))
    for nq in (1, DECODE_ROWS, DECODE_ROWS + 1):
        q, k, v = _inputs(1, 4, 4, nq, 50, dtype=torch.float32)
        spec = _spec(q, k, v, "window", "grid", {"window_eps": 0.05})
        out, lse = fused_attention(q, k, v, spec)
        tiled_out, tiled_lse = tiled_attention(q, k, v, spec, band_rules(spec, 50))
        torch.testing.assert_close(out, tiled_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, tiled_lse, rtol=1e-5, atol=1e-5)
    assert len(taken) == 2


@pytest.mark.parametrize("method,scheme,opts", CASES)
def test_few_rows_rows_without_keys_and_gradients(method, scheme, opts):
    """A row whose keys are all padded out gives 0 and EMPTY_LSE; gradients match the reference's."""
    q, k, v = _inputs(2, 4, 4, 3, 30)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[0] = False
    spec = _spec(q, k, v, method, scheme, opts, key_padding_mask=kpm)
    out, lse = few_rows_attention(q, k, v, spec)
    assert (out[0] == 0).all() and (lse[0] == EMPTY_LSE).all()
    grads = []
    for fn in (few_rows_attention, reference_attention):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        o, l_ = fn(qq, kk, vv, spec)
        (o[1].square().sum() + l_[1].sum()).backward()
        grads.append([x.grad for x in (qq, kk, vv)])
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_softmax_without_gradients_equals_the_general_branch():
    """The no-gradient branch (logsumexp) gives the general branch's output and LSE, rows that are all
    -inf included (output 0, EMPTY_LSE)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 5, 9, generator=g, dtype=torch.float64) * 4
    scores[0, 1] = float("-inf")
    scores[2, :, ::2] = float("-inf")
    v = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out, lse = softmax_with_lse(scores, v)
    general = softmax_with_lse(scores.clone().requires_grad_(), v)
    torch.testing.assert_close(out, general[0].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, general[1].detach(), rtol=1e-12, atol=1e-12)
    assert (out[0, 1] == 0).all() and lse[0, 1] == EMPTY_LSE


def test_few_rows_window_with_different_sides():
    """FlashAttention's window_size=(left, right), non-causal: the right side comes from window_right."""
    q, k, v = _inputs(1, 4, 4, 4, 30)
    spec = resolve_spec(q, k, v, causal=False, window_size=(5, 2), q_offset=10)
    assert spec.window_right is not None
    out, lse = few_rows_attention(q, k, v, spec)
    ref_out, ref_lse = reference_attention(q, k, v, spec)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method,opts", [("exact", {}), ("window", {"window_eps": 0.05})])
@pytest.mark.parametrize("hkv", [4, 2])
def test_plan_decoding_table_equals_reference(method, opts, hkv):
    """AttentionPlan's decoding weights (a view of its per-plan table, rebuilt as the cache outgrows it)
    give the reference backend's result at every step of a growing cache, with a padded key; the table
    grows a few times over 150 steps (twice the length each time), not at every step."""
    from poslsh import MethodSpec
    from poslsh.attention.plan import AttentionPlan

    q, k, v = _inputs(2, 4, hkv, 1, 200)
    kpm = torch.ones(2, 200, dtype=torch.bool)
    kpm[0, 5] = False
    slopes = [0.5, 0.25, 0.1, 0.02]
    plans = [AttentionPlan(MethodSpec(method, **opts), num_heads=4, num_kv_heads=hkv, slopes=slopes, backend=b)
             for b in ("fused", "reference")]
    tables = set()
    for nk in range(50, 200):
        out, ref = (plan(q, k[:, :, :nk], v[:, :, :nk], key_padding_mask=kpm[:, :nk], return_lse=True)
                    for plan in plans)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        tables.add(plans[0]._band_weights[(q.device, torch.float64)].shape[2])
    assert 2 <= len(tables) <= 4


@pytest.mark.parametrize("method,opts", [("exact", {}), ("window", {"window_eps": 0.05}), ("lsh", {"samples": 4}),
                                         ("hybrid", {"samples": 4, "hybrid_eps": 0.2})])
@pytest.mark.parametrize("hkv", [4, 2])
def test_plan_decoding_without_lse_equals_reference_and_keeps_nonfinite_keys_out(method, opts, hkv):
    """A decoding step without LSE or padding (``fused.last_row_attention``: three matrix operations with the
    step's weights, exact/window's from the plan's table) gives the reference's output in float64 and, for
    float32, within float32 rounding; a NaN key the window excludes for some heads (0 x NaN would spread it to
    them) leaves those heads' output as the reference gives it (the call falls back to the careful path)."""
    from poslsh import MethodSpec
    from poslsh.attention.plan import AttentionPlan

    slopes = [0.5, 0.25, 0.1, 0.02]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        q, k, v = _inputs(2, 4, hkv, 1, 120, dtype=dtype)
        plans = [AttentionPlan(MethodSpec(method, **opts), num_heads=4, num_kv_heads=hkv, slopes=slopes, backend=b)
                 for b in ("fused", "reference")]
        for nk in (30, 119, 120):
            out, ref = (plan(q, k[:, :, :nk], v[:, :, :nk]) for plan in plans)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    if method == "window":  # widths [6, 12, 30, 150]: key 80 of 120 is outside the first three heads' bands
        k = k.clone()
        k[:, :, 80] = float("nan")
        out, ref = (plan(q, k, v) for plan in plans)
        assert torch.isnan(ref[:, 3]).all() and not torch.isnan(ref[:, :3]).any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("slopes", [[1.0, 0.5, 0.25, 0.1], [0.7, 0.03, 0.0, 0.2]])
def test_grid_last_row_equals_reference(dtype, slopes):
    """``GridLastRow`` (a decoding step's LSH weights on grid partitions) gives the reference's log W (the
    log of the partitions' mean mask, ``dense_log_weights``) of the last of n keys, n = 1 and 2^k +- 1,
    from the sequence's first position and deep into it, heads of different slopes (slope 0: one block,
    an unbounded width); n below and above the widest block (a block that starts before the keys)."""
    from poslsh.layer_partitions import LayerPartitions

    layer = LayerPartitions(torch.tensor(slopes, dtype=torch.float64), 6, "grid", seed=2, layer=1)
    w, u = layer.get(1).widths, layer.get(1).offsets
    row = GridLastRow(w, u, dtype)
    sizes = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129)
    assert min(sizes) < row.widest and (row.widest >= 2**62 or max(sizes) >= row.widest)
    for n in sizes:
        for position in (n - 1, n + 4, 1000 + 3 * n):
            start = position - n + 1
            spec = AttentionSpec(slopes=layer.slopes, causal=True, method="lsh", scale=1.0, q_offset=n - 1,
                                 partitions=layer.window(start, n))
            got = row(position, n)
            assert got.shape == (4, 1, n) and got.dtype == dtype
            ref = dense_log_weights(spec, 1, n, torch.device("cpu")).to(dtype)
            torch.testing.assert_close(got, ref, rtol=1e-14 if dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("hkv", [4, 2])
def test_plan_lsh_decoding_on_grid_partitions_equals_reference(hkv, monkeypatch):
    """A decoding step of "lsh" on grid partitions takes its weights from ``GridLastRow`` (never from
    ``few_rows_log_weights``, here made to fail) and gives the reference backend's output at every step
    of a growing cache from Nk = 1 (keys beyond the widest block sliced off once the cache outgrows it),
    with and without an evicted prefix (``key_start``), in float64 and float32, with and without the LSE
    and a padded key."""
    from poslsh import MethodSpec
    from poslsh.attention import plan as plan_module
    from poslsh.attention.fused import backend as fused_backend
    from poslsh.attention.plan import AttentionPlan

    def refuse(*args, **kwargs):
        raise AssertionError("a grid LSH decoding step computed its weights with few_rows_log_weights")

    slopes = [1.0, 0.5, 0.25, 0.1]
    plans = [AttentionPlan(MethodSpec("lsh", samples=4), num_heads=4, num_kv_heads=hkv, slopes=slopes, seed=5,
                           backend=b) for b in ("fused", "reference")]
    assert plans[0].reach < 90  # the longest caches below are sliced to the band
    monkeypatch.setattr(plan_module, "few_rows_log_weights", refuse)
    monkeypatch.setattr(fused_backend, "few_rows_log_weights", refuse)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        q, k, v = _inputs(2, 4, hkv, 1, 100, dtype=dtype)
        kpm = torch.ones(2, 100, dtype=torch.bool)
        kpm[1, 0] = False
        for key_start in (0, 9, 4097):
            for nk in list(range(1, 40)) + [63, 64, 65, 99, 100]:
                call = dict(key_start=key_start)
                out, ref = (plan(q, k[:, :, :nk], v[:, :, :nk], **call) for plan in plans)
                torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
                if nk % 8 == 1:  # the paths with the LSE (few_rows_attention) and with padding
                    call.update(key_padding_mask=kpm[:, :nk], return_lse=True)
                    (out, lse), (ref, ref_lse) = (plan(q, k[:, :, :nk], v[:, :, :nk], **call) for plan in plans)
                    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
                    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)
