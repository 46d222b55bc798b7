"""Every torch backend held to an independent float64 oracle: dense softmax with multiplicative
ALiBi / truncated / B-hat weights (the library computes additive log-weights; the oracle does not)."""

from __future__ import annotations

import math

import pytest
import torch

import poslsh
from poslsh import alibi_kernel, sample_partitions
from poslsh.attention import EMPTY_LSE, window_sizes
from poslsh.attention.fused import tiled as tiled_mod
from poslsh.attention.split import backend as split_mod

# Several heads with different slopes, one of them 0 (no decay: a single block / plain attention).
SLOPES = torch.tensor([0.9, 0.3, 0.08, 0.0], dtype=torch.float64)
TORCH_BACKENDS = ("reference", "fused", "split")


def make_qkv(b=2, h=4, hkv=2, nq=21, nk=29, d=5, dv=None, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64) * scale
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64) * scale
    v = torch.randn(b, hkv, nk, dv or d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding(b, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(b, nk, generator=g) > 0.3
    kpm[:, -1] = True  # the last query always sees itself, so no row is empty here
    return kpm


def oracle(q, k, v, weight, scale=None, kpm=None):
    """float64 softmax with multiplicative weights: out_i = sum_j W_ij e^{s_ij} v_j / sum_j W_ij e^{s_ij}.

    weight: [H, Nq, Nk] >= 0 (rows of the kernel for the query positions). Returns (out, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # the oracle may materialise
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    w = weight[None].expand_as(s).clone()
    if kpm is not None:
        w = w * kpm[:, None, None, :].double()
    shift = s.amax(-1, keepdim=True)
    a = w * torch.exp(s - shift)
    den = a.sum(-1, keepdim=True)
    empty = den == 0  # no key at all: the library's convention is output 0, lse EMPTY_LSE
    out = torch.where(empty, 0.0, (a @ v) / den)
    return out, torch.where(empty, EMPTY_LSE, torch.log(den) + shift).squeeze(-1)


def kernel_rows(slopes, nq, nk, causal, window=None):
    """Rows nk-nq..nk-1 of e^{-m|i-j|} per head, zero where truncated or j > i: [H, Nq, Nk]."""
    w = torch.stack([alibi_kernel(nk, float(m), causal=causal) for m in slopes])[:, nk - nq:]
    if window is not None:
        i = torch.arange(nk - nq, nk)[:, None]
        j = torch.arange(nk)[None, :]
        w = w * ((i - j).abs()[None] <= window[:, None, None])
    return w


def bhat_rows(parts, nq, causal):
    """Rows of the empirical mean of the dense masks for the query positions: [H, Nq, Nk]."""
    bhat = parts.dense_masks().double().mean(1)[:, parts.n - nq:]
    if causal:
        bhat = torch.tril(bhat, diagonal=parts.n - nq)
    return bhat


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("nq", [29, 21, 1])
def test_exact_matches_dense_alibi(backend, causal, dtype, tol, nq):
    q, k, v = make_qkv(nq=nq, dtype=dtype)
    kpm = padding(2, 29)
    out, lse = poslsh.attention(q, k, v, slopes=SLOPES, causal=causal, method="exact", key_padding_mask=kpm,
                                return_lse=True, backend=backend)
    ref_out, ref_lse = oracle(q, k, v, kernel_rows(SLOPES, nq, 29, causal), kpm=kpm)
    assert out.dtype == dtype and out.shape == (2, 4, nq, 5)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("causal", [True, False])
def test_window_matches_truncated_alibi(backend, causal):
    q, k, v = make_qkv(nq=23, nk=40)
    kpm = padding(2, 40)
    eps = 0.05  # w = ceil(ln 20 / m): 4, 10, 38, 39 (capped) — truncation active for most heads
    out, lse = poslsh.attention(q, k, v, slopes=SLOPES, causal=causal, method="window", window_eps=eps,
                                key_padding_mask=kpm, return_lse=True, backend=backend)
    w = window_sizes(SLOPES, eps, 40)
    assert w.tolist() == [4, 10, 38, 39]
    ref_out, ref_lse = oracle(q, k, v, kernel_rows(SLOPES, 23, 40, causal, window=w), kpm=kpm)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-11, rtol=0)


def test_window_sizes_at_the_extremes():
    """ceil(ln(1/eps) / m) capped at n - 1: slope 0 and a subnormal slope (ln(1/eps) / m overflows to
    inf) reach every key, a huge slope only the diagonal; n = 1 has no other key."""
    s = torch.tensor([0.0, 5e-324, 1e30, math.log(1000.0)], dtype=torch.float64)
    assert window_sizes(s, 1e-3, 100).tolist() == [99, 99, 1, 1]
    assert window_sizes(s, 1e-3, 1).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("scheme", ["grid", "cut"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq", [29, 12, 1])
def test_lsh_matches_dense_estimator(backend, scheme, causal, nq):
    q, k, v = make_qkv(nq=nq, dv=3)
    kpm = padding(2, 29)
    parts = sample_partitions(29, SLOPES, 6, scheme=scheme, generator=torch.Generator().manual_seed(3))
    out, lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm,
                                return_lse=True, backend=backend)
    ref_out, ref_lse = oracle(q, k, v, bhat_rows(parts, nq, causal), kpm=kpm)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-11, rtol=0)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@pytest.mark.parametrize("causal", [True, False])
def test_split_equals_fused_with_tiling(scheme, causal, monkeypatch):
    """Longer sequences and tiny tile budgets, so the fused engine uses many query tiles and split
    uses block chunks and row chunks (a block longer than one score tile)."""
    slopes = torch.tensor([0.5, 0.05, 0.01, 0.0], dtype=torch.float64)
    q, k, v = make_qkv(nq=300, nk=333, d=4, seed=5)
    kpm = padding(2, 333, seed=6)
    parts = sample_partitions(333, slopes, 5, scheme=scheme, generator=torch.Generator().manual_seed(7))
    base = poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm, backend="fused")
    monkeypatch.setattr(split_mod, "TILE_BUDGET", 2000)
    monkeypatch.setattr(tiled_mod, "TILE_BYTES", 16000)  # 2000 float64 scores per tile
    fused, fused_lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm,
                                        backend="fused", return_lse=True)
    split, split_lse = poslsh.attention(q, k, v, method="lsh", partitions=parts, causal=causal, key_padding_mask=kpm,
                                        backend="split", return_lse=True)
    torch.testing.assert_close(split, fused, atol=1e-12, rtol=0)
    torch.testing.assert_close(split_lse, fused_lse, atol=1e-11, rtol=0)
    torch.testing.assert_close(fused, base, atol=1e-12, rtol=0)
    ref_out, _ = oracle(q, k, v, bhat_rows(parts, 300, causal), kpm=kpm)
    torch.testing.assert_close(fused, ref_out, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend,method", [(b, m) for b in TORCH_BACKENDS for m in ("exact", "window", "lsh")
                                            if b != "split" or m == "lsh"])
def test_empty_rows_give_zero_and_finite_lse(backend, method):
    """A batch row with every key padded, and causal left padding (early queries see only padding)."""
    q, k, v = make_qkv(nq=17, nk=17)
    kpm = torch.ones(2, 17, dtype=torch.bool)
    kpm[0] = False
    kpm[1, :5] = False
    out, lse = poslsh.attention(q, k, v, slopes=SLOPES, method=method, key_padding_mask=kpm, return_lse=True,
                                backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out[0] == 0).all() and (lse[0] == EMPTY_LSE).all()
    assert (out[1, :, :5] == 0).all() and (lse[1, :, :5] == EMPTY_LSE).all()
    assert (lse[1, :, 5:] > EMPTY_LSE / 2).all()


def test_auto_picks_a_torch_backend_on_cpu():
    from poslsh.attention import dispatch

    q, k, v = make_qkv()
    for method in ("exact", "window", "lsh"):
        spec = dispatch.resolve_spec(q, k, v, method=method)
        assert dispatch.select_backend(q, spec).name == "fused"
    out = poslsh.attention(q, k, v, method="lsh", generator=torch.Generator().manual_seed(0))
    parts = sample_partitions(29, poslsh.alibi_slopes(4), 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="reference"),
                               atol=1e-12, rtol=0)


def test_registered_backend_is_used_by_auto():
    from poslsh.attention import dispatch

    calls = []

    def fake(q, k, v, spec):
        calls.append(spec.method)
        return dispatch.BACKENDS["reference"](q, k, v, spec)

    dispatch.register_backend("test-fake", fake, lambda q, spec: spec.method == "window", priority=1000)
    try:
        q, k, v = make_qkv()
        poslsh.attention(q, k, v, method="window")
        poslsh.attention(q, k, v, method="exact")
        assert calls == ["window"]
        with pytest.raises(ValueError, match="backend 'test-fake' does not support"):
            poslsh.attention(q, k, v, method="exact", backend="test-fake")
    finally:
        del dispatch.BACKENDS["test-fake"]


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_convergence_in_samples(scheme):
    """Averaged over seeds, the error against exact ALiBi at r = 256 is at most a third of that at
    r = 16 (1/sqrt(r) predicts a quarter)."""
    slopes = torch.tensor([0.4, 0.1, 0.03], dtype=torch.float64)
    errs = {16: [], 256: []}
    for seed in range(6):
        q, k, v = make_qkv(b=1, h=3, hkv=3, nq=48, nk=48, d=8, seed=seed)
        exact = poslsh.attention(q, k, v, slopes=slopes, method="exact", backend="fused")
        for r in errs:
            g = torch.Generator().manual_seed(1000 + seed)
            est = poslsh.attention(q, k, v, slopes=slopes, method="lsh", samples=r, scheme=scheme, generator=g, backend="fused")
            errs[r].append(float((est - exact).norm() / exact.norm()))
    e16, e256 = sum(errs[16]) / 6, sum(errs[256]) / 6
    assert e256 <= e16 / 3, (e16, e256)
