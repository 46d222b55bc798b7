"""Calls under ``torch.inference_mode()``: tensors made there track no in-place version, so the caches that
recognise tensors by (id, version) (``poslsh.cache_keys``) must not read one; the calls then run uncached
and give what the same calls give outside inference mode."""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh.attention.public_plans import clear_public_plans

BACKENDS = ["fused", "flex", "triton"]


def _inputs():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 20, 16, generator=g, dtype=torch.float32)
    k, v = (torch.randn(1, 2, 20, 16, generator=g, dtype=torch.float32) for _ in range(2))
    kpm = torch.ones(1, 20, dtype=torch.bool)
    kpm[0, 3:6] = False
    return q, k, v, kpm


def _call(backend, q, k, v, kpm, parts, slopes):
    if backend == "flex":  # the Flex backend serves CUDA; its function (the split backend's primitive) any device
        from poslsh.attention.dispatch import resolve_spec
        from poslsh.attention.flex import flex_attention_spec

        spec = resolve_spec(q, k, v, method="lsh", partitions=parts, slopes=slopes, key_padding_mask=kpm)
        return flex_attention_spec(q, k, v, spec)[0]
    return poslsh.attention(q, k, v, method="lsh", partitions=parts, slopes=slopes, key_padding_mask=kpm,
                            backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_calls_equal_ordinary_calls(backend):
    """LSH with partitions, slopes and a padding mask all made under inference mode, twice (the second
    call would be a cache hit), on each backend that caches by tensor version: no error, and the result of
    the same call outside inference mode."""
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v, kpm = _inputs()
    slopes = poslsh.alibi_slopes(4)
    parts = poslsh.sample_partitions(20, slopes, 3, scheme="grid", generator=torch.Generator().manual_seed(1))
    want = _call(backend, q, k, v, kpm, parts, slopes).float()
    clear_public_plans()
    with torch.inference_mode():
        qi, ki, vi, kpmi = (t.clone() for t in (q, k, v, kpm))
        slopes_i = slopes.clone()
        parts_i = poslsh.sample_partitions(20, slopes_i, 3, scheme="grid", generator=torch.Generator().manual_seed(1))
        assert parts_i.widths.is_inference() and kpmi.is_inference()
        for _ in range(2):
            got = _call(backend, qi, ki, vi, kpmi, parts_i, slopes_i)
            assert torch.allclose(got.float(), want, atol=2e-3, rtol=2e-3)


def test_inference_mode_module_plan():
    """``ALiBiAttention`` built and run under inference mode (its slopes are then inference tensors)."""
    with torch.inference_mode():
        layer = poslsh.nn.ALiBiAttention(embed_dim=32, num_heads=4, method="window").eval()
        x = torch.randn(1, 10, 32)
        out = layer(x)
        assert out.shape == (1, 10, 32) and torch.isfinite(out).all()
