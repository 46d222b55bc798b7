"""The "flex_fa4" backend (FlexAttention's FlashAttention-4 kernels, ``poslsh/attention/flex/flash.py``).

On the CPU: the LSE's gradient (``LseGradient``, the term FlashAttention-4's backward lacks) against the
float64 reference's, with the reference as its kernel; the backend's forward through eager FlexAttention
(``kernel_options=None``: FlexAttention has no CPU backward) against the reference; the error naming
what is missing when FlashAttention-4 is not installed. On a GPU with ``flash-attn-4`` installed
(``bench/flex_fa4.sh``): forward and backward, through out and lse, against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

import poslsh
from poslsh.attention import resolve_spec
from poslsh.attention.flex.flash import LseGradient, explain_flex_fa4, fa4_installed, flex_fa4_attention
from poslsh.attention.reference import reference_attention
from poslsh_lab.experiments.metrics import relative_error

from tolerances import low_precision_bound

pytest.importorskip("torch.nn.attention.flex_attention")

H, HKV = 4, 2


def inputs(nq: int, nk: int, d: int, dv: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, H, nq, d, generator=g, dtype=dtype), torch.randn(2, HKV, nk, d, generator=g, dtype=dtype),
            torch.randn(2, HKV, nk, dv, generator=g, dtype=dtype))


def spec_of(q, k, v, method, causal, mask=None):
    return resolve_spec(q, k, v, slopes=poslsh.alibi_slopes(H) * 0.3, causal=causal, method=method, window_eps=0.05,
                        key_padding_mask=mask)


@pytest.mark.parametrize("method,causal", [("exact", True), ("exact", False), ("window", True)])
def test_lse_gradient_equals_the_references(method, causal):
    """out from the kernel (its own backward), lse detached and re-attached by LseGradient: the gradients of
    a loss through both equal those of the reference's (out, lse) (grouped KV, Nq < Nk, float64)."""
    q, k, v = (t.requires_grad_() for t in inputs(37, 70, 16, 16))
    spec = spec_of(q, k, v, method, causal)

    def attend(q_, k_, v_):
        return reference_attention(q_, k_, v_, spec)

    out, lse = attend(q, k, v)
    lse = LseGradient.apply(lse.detach(), q, k, attend, spec.scale)
    g, h = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * h).sum(), (q, k, v), retain_graph=True)
    ro, rl = reference_attention(q, k, v, spec)
    want = torch.autograd.grad((ro * g).sum() + (rl * h).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert relative_error(a, b) < 1e-12, name
    # and the LSE's share alone is not zero: without LseGradient the gradients differ
    plain = torch.autograd.grad((out * g).sum() + (lse.detach() * h).sum(), (q, k), allow_unused=True)
    assert relative_error(plain[0], want[0]) > 1e-3


def test_lse_gradient_only_where_asked():
    """No gradient of lse: LseGradient's backward makes no extra kernel call."""
    q, k, v = (t.requires_grad_() for t in inputs(8, 8, 16, 16))
    spec = spec_of(q, k, v, "exact", True)
    calls = []

    def attend(q_, k_, v_):
        calls.append(1)
        return reference_attention(q_, k_, v_, spec)

    out, lse = attend(q, k, v)
    lse = LseGradient.apply(lse.detach(), q, k, attend, spec.scale)
    out.sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("method,causal,nq,d,dv,padded", [
    ("exact", True, 45, 64, 64, False), ("exact", False, 70, 64, 64, True), ("window", True, 1, 64, 64, False),
    ("exact", True, 33, 64, 32, False),  # a smaller value dim, zero-padded
])
def test_forward_matches_reference_on_cpu(method, causal, nq, d, dv, padded):
    q, k, v = inputs(nq, 70, d, dv, torch.float32)
    mask = None
    if padded:
        mask = torch.ones(2, 70, dtype=torch.bool)
        mask[1, 50:] = False
    spec = spec_of(q, k, v, method, causal, mask)
    out, lse = flex_fa4_attention(q, k, v, spec, block=16, kernel_options=None)
    spec64 = spec_of(q.double(), k.double(), v.double(), method, causal, mask)
    ro, rl = reference_attention(q.double(), k.double(), v.double(), spec64)
    assert out.shape == ro.shape and relative_error(out, ro) < 1e-5 and relative_error(lse, rl) < 1e-5


def test_value_dim_past_the_kernels_is_refused():
    q, k, v = inputs(8, 8, 64, 160, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        flex_fa4_attention(q, k, v, spec_of(q, k, v, "exact", True), kernel_options=None)


@pytest.mark.skipif(fa4_installed(), reason="FlashAttention-4 is installed here")
def test_not_installed_is_named():
    """Without flash-attn-4 the backend is not registered (asking for it names the package to install and the
    registered backends), and its explanation names the package."""
    from poslsh.attention import available_backends

    q, k, v = inputs(8, 8, 16, 16, torch.float32)
    assert "flash-attn-4" in explain_flex_fa4(q, spec_of(q, k, v, "exact", True))
    assert "flex_fa4" not in available_backends()
    with pytest.raises(ValueError, match=r"backend 'flex_fa4' is not available here: needs FlashAttention-4 "
                                         r"\(pip install flash-attn-4\); use 'auto' or one of \["):
        poslsh.attention(q, k, v, backend="flex_fa4")


# --------------------------------------------------------------------------------------------------
# On a Hopper GPU with flash-attn-4 installed
# --------------------------------------------------------------------------------------------------

on_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and fa4_installed()
                                 and torch.cuda.get_device_capability()[0] >= 9),
                            reason="a Hopper+ GPU with flash-attn-4 installed (bench/flex_fa4.sh)")

GPU_CASES = {  # method, causal, nq, nk, d, gqa, dtype
    "causal exact d128": ("exact", True, 300, 300, 128, False, torch.bfloat16),
    "causal exact d128 fp16": ("exact", True, 300, 300, 128, False, torch.float16),
    "causal exact d64 gqa": ("exact", True, 300, 300, 64, True, torch.bfloat16),
    "bidirectional exact": ("exact", False, 257, 257, 128, False, torch.bfloat16),
    "exact nq < nk": ("exact", True, 129, 513, 128, False, torch.bfloat16),
    "causal window": ("window", True, 513, 513, 128, False, torch.bfloat16),
    "window gqa nq < nk": ("window", True, 100, 1025, 64, True, torch.bfloat16),
}


@on_fa4
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_flex_fa4_matches_reference_on_gpu(name):
    """Through ``poslsh.attention(backend="flex_fa4", return_lse=True)``: out, lse and the q, k, v gradients
    of a loss through both, against the float64 reference on the CPU."""
    method, causal, nq, nk, d, gqa, dtype = GPU_CASES[name]
    g = torch.Generator().manual_seed(1)
    hkv = HKV if gqa else H
    q, k, v = (torch.randn(2, h, n, d, generator=g).to(dtype) for h, n in ((H, nq), (hkv, nk), (hkv, nk)))
    kw = dict(slopes=poslsh.alibi_slopes(H).double() * 0.5, is_causal=causal, method=method, window_eps=1e-2,
              return_lse=True)
    xs = [t.cuda().requires_grad_() for t in (q, k, v)]
    out, lse = poslsh.attention(*xs, backend="flex_fa4", **kw)
    gout, glse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad((out.float() * gout.cuda()).sum() + (lse * glse.cuda()).sum(), xs)
    ys = [t.double().requires_grad_() for t in (q, k, v)]
    ro, rl = poslsh.attention(*ys, backend="reference", **kw)
    want = torch.autograd.grad((ro * gout.double()).sum() + (rl * glse.double()).sum(), ys)
    tol = low_precision_bound(ro, dtype)
    assert relative_error(out.cpu(), ro) < tol
    assert relative_error(lse.cpu(), rl) < 1e-3
    for n, a, b in zip("qkv", grads, want):
        assert relative_error(a.cpu(), b) < 4 * tol, n


@on_fa4
def test_registered_where_installed_and_refuses_padding_by_name():
    from poslsh.attention import available_backends

    assert "flex_fa4" in available_backends()
    q = torch.randn(1, H, 128, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 128, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match="padding"):
        poslsh.attention(q, q, q, is_causal=True, key_padding_mask=mask, backend="flex_fa4")


def test_lse_factor_undoes_torchs_ln2_and_refuses_other_scales(monkeypatch):
    """torch 2.11 returns FlashAttention-4's natural-log LSE times ln 2 (pytorch#181645): the factor measured
    on a call of known LSE (ln 256) undoes it; an LSE in neither unit is an error, not a silent answer."""
    import math

    from poslsh.attention.flex import flash

    for scale, want in ((1.0, 1.0), (math.log(2), 1 / math.log(2))):
        monkeypatch.setattr(flash, "_lse_factors", {})
        monkeypatch.setattr(flash, "_attend_fn", lambda device, s=scale: (
            lambda q, k, v, *rest: (v, torch.full(q.shape[:-1], math.log(256) * s))))
        assert flash.lse_factor(torch.device("cpu")) == pytest.approx(want)
    monkeypatch.setattr(flash, "_lse_factors", {})
    monkeypatch.setattr(flash, "_attend_fn", lambda device: (lambda q, k, v, *rest: (v, torch.full(q.shape[:-1], 2.0))))
    with pytest.raises(RuntimeError, match="neither natural log nor base 2"):
        flash.lse_factor(torch.device("cpu"))


def test_key_padding_is_refused_with_its_reason(monkeypatch):
    from poslsh.attention.flex import flash

    monkeypatch.setattr(flash, "fa4_installed", lambda: True)
    q, k, v = inputs(8, 8, 64, 64, torch.float32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    assert "padding" in explain_flex_fa4(q, spec_of(q, k, v, "exact", True, mask))


def test_this_torch_takes_the_flash_backend_option():
    """The registration's check reads FlexKernelOptions; on the pinned torch it must say yes (a rename there
    would silently unregister the backend on every GPU)."""
    from poslsh.attention.flex.flash import _torch_has_flash_backend

    assert _torch_has_flash_backend()


def test_two_sided_windows_are_refused_with_their_reason(monkeypatch):
    """Only what ran on a GPU is served: causal windows yes, two-sided ones not yet."""
    from poslsh.attention.flex import flash

    monkeypatch.setattr(flash, "fa4_installed", lambda: True)
    q, k, v = inputs(8, 8, 64, 64, torch.float32)
    assert "causal windows only" in explain_flex_fa4(q, spec_of(q, k, v, "window", False))
    assert "causal windows only" not in (explain_flex_fa4(q, spec_of(q, k, v, "window", True)) or "")


@pytest.mark.parametrize("method,gqa,dv", [("exact", True, 64), ("exact", False, 32), ("window", True, 32)])
def test_the_whole_wrapper_trains_like_the_reference(monkeypatch, method, gqa, dv):
    """flex_fa4_attention's own logic with gradients on the CPU: the kernel call replaced by the reference
    (which differentiates on the CPU, where FlexAttention does not), so grouped KV expanded for training,
    a smaller value dim padded, the LSE's factor and LseGradient are held to the reference's gradients of a
    loss through out and lse."""
    from poslsh.attention.flex import flash

    q, k, v = inputs(37, 70, 64, dv)
    if not gqa:
        k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    spec = spec_of(q, k, v, method, True)
    seen = []

    def kernel(q_, k_, v_, score_mod, block_mask, scale, enable_gqa, kernel_options):
        seen.append((q_.shape[1], k_.shape[1], v_.shape[-1], q_.requires_grad or k_.requires_grad))
        if score_mod is None:  # lse_factor's probe: all scores 0
            n = k_.shape[2]
            return v_, torch.full(q_.shape[:-1], math.log(n), dtype=torch.float64)
        out, lse = reference_attention(q_, k_, v_, spec)
        return out, lse.detach()

    monkeypatch.setattr(flash, "_attend_fn", lambda device: kernel)
    monkeypatch.setattr(flash, "_lse_factors", {})
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flex_fa4_attention(*xs, spec)
    g, h = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * g).sum() + (lse * h).sum(), xs)
    ys = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, rl = reference_attention(*ys, spec)
    want = torch.autograd.grad((ro * g).sum() + (rl * h).sum(), ys)
    assert out.shape == ro.shape and relative_error(out, ro) < 1e-12
    assert lse.dtype == torch.float32 and relative_error(lse, rl) < 1e-6  # the backends' LSE is float32
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and relative_error(a, b) < 1e-12, name
    # the kernel saw one k, v head per query head (training) and a padded value dim
    assert all(kv_heads == H and vdim == 64 for _, kv_heads, vdim, grad in seen[1:] if grad)
