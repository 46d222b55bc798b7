"""Gradients, half precision with huge logits, awkward lengths and head dims, decoding."""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh import sample_partitions

SLOPES = torch.tensor([0.7, 0.2, 0.0, 0.05], dtype=torch.float64)
# (backend, method) pairs the torch backends run; split is LSH only.
CASES = [("reference", "exact"), ("fused", "exact"), ("reference", "window"), ("fused", "window"),
         ("reference", "lsh"), ("fused", "lsh"), ("split", "lsh")]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


def call(q, k, v, backend, method, scheme="grid", samples=4, seed=0, **kw):
    """attention() with partitions fixed by seed, so different backends see the same masks."""
    nk = k.shape[2]
    parts = None
    if method == "lsh":
        parts = sample_partitions(nk, SLOPES[: q.shape[1]], samples, scheme=scheme,
                                  generator=torch.Generator().manual_seed(seed), device=q.device)
    return poslsh.attention(q, k, v, slopes=SLOPES[: q.shape[1]], method=method, partitions=parts,
                            backend=backend, window_eps=0.1, **kw)


@pytest.mark.parametrize("backend,method,scheme", [(b, m, s) for b, m in CASES
                                                   for s in (("grid", "cut") if m == "lsh" else ("grid",))])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(backend, method, scheme, causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)  # grouped KV
    v = torch.randn(1, 1, 6, 2, dtype=torch.float64, generator=g, requires_grad=True)
    kpm = torch.tensor([[False, True, True, False, True, True]])
    parts = sample_partitions(6, SLOPES[:2], 3, scheme=scheme, generator=torch.Generator().manual_seed(4))

    def f(q, k, v):
        return poslsh.attention(q, k, v, slopes=SLOPES[:2], method=method, causal=causal, window_eps=0.1,
                                partitions=parts if method == "lsh" else None, key_padding_mask=kpm,
                                return_lse=True, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend,method", CASES)
def test_half_precision_huge_logits(device, dtype, backend, method):
    """Logits of magnitude ~1e4 (far beyond exp's range) stay finite and match float32."""
    g = torch.Generator().manual_seed(2)
    q = (torch.randn(2, 4, 33, 4, generator=g).sign() * 100).to(device, dtype)
    k = (torch.randn(2, 2, 33, 4, generator=g) * 100).to(device, dtype)  # q.k / 2 up to ~2e4
    v = torch.randn(2, 2, 33, 4, generator=g).to(device, dtype)
    kpm = torch.ones(2, 33, dtype=torch.bool, device=device)
    kpm[1, :3] = False
    out, lse = call(q, k, v, backend, method, key_padding_mask=kpm, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert lse.abs().max() > 1e3  # the logits really are huge
    ref = call(q.float(), k.float(), v.float(), backend, method, key_padding_mask=kpm)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 9, 31, 33, 65, 127, 129])
@pytest.mark.parametrize("d", [1, 3, 7])
def test_lengths_and_odd_head_dims(n, d):
    g = torch.Generator().manual_seed(n * 10 + d)
    q = torch.randn(1, 4, n, d, dtype=torch.float64, generator=g)
    k = torch.randn(1, 4, n, d, dtype=torch.float64, generator=g)
    v = torch.randn(1, 4, n, d + 2, dtype=torch.float64, generator=g)
    for method in ("exact", "window", "lsh"):
        for scheme in ("grid", "cut") if method == "lsh" else ("grid",):
            ref = call(q, k, v, "reference", method, scheme=scheme)
            for backend, m in CASES:
                if m == method and backend != "reference":
                    out = call(q, k, v, backend, method, scheme=scheme)
                    assert out.shape == (1, 4, n, d + 2)
                    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend,method", CASES)
@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_decoding_rows_equal_full_rows(backend, method, scheme):
    """KV-cache decoding: the last Nq rows of a full causal call equal a call with only those queries."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 40, 6, dtype=torch.float64, generator=g)
    k = torch.randn(2, 1, 40, 6, dtype=torch.float64, generator=g)  # multi-query KV
    v = torch.randn(2, 1, 40, 6, dtype=torch.float64, generator=g)
    full = call(q, k, v, backend, method, scheme=scheme)
    for nq in (1, 5):
        part = call(q[:, :, -nq:], k, v, backend, method, scheme=scheme)
        torch.testing.assert_close(part, full[:, :, -nq:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,method", CASES)
def test_output_follows_q(device, backend, method):
    q = torch.randn(1, 2, 9, 4, device=device)
    out, lse = call(q, q, q, backend, method, return_lse=True)
    assert out.device == q.device and out.dtype == q.dtype and lse.shape == (1, 2, 9)
