"""The "cudnn" backend (exact causal ALiBi through cuDNN's fused SDPA).

On any machine: what it serves (``refusal``: Press slopes only, causal, fp16/bf16, queries at key
positions 0.., right padding), that cuDNN's slope formula is poslsh's, the LSE-gradient rows, the
padding analysis, the dispatcher's reason on a refusal, and the whole backend (graphs, variant packs,
autograd, the LSE's gradient) against a float64 oracle with a CPU stand-in for the frontend
(``cudnn_fake``). On a GPU with nvidia-cudnn-frontend: the real library against the same oracle.
"""

from __future__ import annotations


import pytest
import torch

import poslsh
from poslsh.attention import BACKENDS, available_backends, dispatch, register_backend, resolve_spec
from poslsh.attention.cudnn import backend as cudnn_backend

from cudnn_fake import FakeCudnn, cudnn_alibi_slopes
from tolerances import low_precision_bound, rel_err

available_backends()  # loads the optional backends


def spec_for(q, k, v, **kw):
    return resolve_spec(q, k, v, **kw)


def qkv(b=1, h=4, hkv=None, nq=16, nk=None, d=16, dv=None, dtype=torch.bfloat16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, nk, d if dv is None else dv, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


# --------------------------------------------------------------------------------------------------
# What it serves (CPU-checkable)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 100])
def test_cudnn_slope_formula_is_press(h):
    """The frontend's get_alibi_slope (transcribed in cudnn_fake) gives poslsh.alibi_slopes(H) to float32
    rounding, powers of two and not (the extra heads take the odd slopes of the 2P schedule)."""
    ours = poslsh.alibi_slopes(h)
    theirs = cudnn_alibi_slopes(h).double()
    assert theirs.shape == ours.shape
    assert bool(((theirs - ours).abs() <= cudnn_backend.SLOPE_RTOL * ours).all()), (theirs, ours)


def test_slope_check_tells_schedules_apart():
    """The tolerance accepts float32-rounded Press slopes (BLOOM computes them in float32) and refuses
    the nearest other schedules: the power-of-two formula applied to 12 heads, slopes off by 1e-5."""
    q, k, v = qkv(h=12)
    press32 = poslsh.alibi_slopes(12).float()
    assert cudnn_backend.refusal(q, spec_for(q, k, v, slopes=press32)) is None
    naive = torch.tensor([2.0 ** (-8 * (i + 1) / 12) for i in range(12)])
    assert "Press slopes" in cudnn_backend.refusal(q, spec_for(q, k, v, slopes=naive))
    assert "Press slopes" in cudnn_backend.refusal(q, spec_for(q, k, v, slopes=poslsh.alibi_slopes(12) * (1 + 1e-5)))


def _refused(why, **over):
    kw = dict(h=4, nq=16)
    kw.update({k: over.pop(k) for k in list(over) if k in ("h", "hkv", "nq", "nk", "d", "dtype")})
    q, k, v = qkv(**kw)
    call = dict(causal=True)
    call.update(over)
    reason = cudnn_backend.refusal(q, spec_for(q, k, v, **call))
    assert reason is not None and why in reason, reason


def test_refusal_accepts_what_cudnn_computes():
    for kw in (dict(), dict(h=12, hkv=4), dict(h=8, hkv=1, nq=1, nk=1), dict(nq=33), dict(dtype=torch.float16),
               dict(nq=5, nk=17)):
        q, k, v = qkv(**kw)
        extra = dict(q_offset=0) if q.shape[2] < k.shape[2] else {}
        assert cudnn_backend.refusal(q, spec_for(q, k, v, causal=True, **extra)) is None, kw


def test_refusal_names_why():
    _refused("float16 or bfloat16", dtype=torch.float32)
    _refused("float16 or bfloat16", dtype=torch.float64)
    _refused("causal only", causal=False)
    _refused("Press slopes", slopes=[0.5, 0.25, 0.125, 0.0625])
    _refused("method must be 'exact'", method="window")
    _refused("q_offset", nq=5, nk=17)  # default q_offset = Nk - Nq: queries at the end (decoding)
    _refused("q_offset", nq=1, nk=64)
    _refused("require grad", slopes=poslsh.alibi_slopes(4).requires_grad_())
    _refused("scale", scale=-1.0)
    _refused("head dim", d=264)
    from poslsh.positional_kernels import power_law

    _refused("kernels", kernel=power_law(1.0))


def test_refusal_padding():
    q, k, v = qkv(b=3, nq=12)
    right = torch.ones(3, 12, dtype=torch.bool)
    right[0, 9:] = False
    right[2, 1:] = False
    assert cudnn_backend.refusal(q, spec_for(q, k, v, key_padding_mask=right)) is None
    left = torch.ones(3, 12, dtype=torch.bool)
    left[1, :3] = False
    assert "prefix" in cudnn_backend.refusal(q, spec_for(q, k, v, key_padding_mask=left))
    empty = right.clone()
    empty[1] = False
    assert "at least one key" in cudnn_backend.refusal(q, spec_for(q, k, v, key_padding_mask=empty))


def test_padding_lengths_cached_per_mask_version():
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    lengths, why = cudnn_backend.padding_lengths(mask)
    assert why is None and lengths.tolist() == [[[[10]]], [[[6]]]] and lengths.dtype == torch.int32
    assert cudnn_backend.padding_lengths(mask)[0] is lengths  # cached: no second host sync
    mask[0, 0] = False  # in place: a new version, analysed again
    assert "prefix" in cudnn_backend.padding_lengths(mask)[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lse_gradient_rows(dtype):
    """rowsum(dO2 * O2), summed in float32 as cuDNN does, is -dLSE to float32 accuracy for magnitudes the
    dtype's mantissa alone would round to 2^-8 or worse (1e-6 relative: float16's pieces of a tiny
    dLSE lose bits below its normal range); zero and signs kept."""
    dlse = torch.tensor([[[0.0, 1.0, -1.0, 1 / 3, -2 / 3 * 1e-6, 12345.678, -7e-4, 3.14159e3]]])
    like = torch.empty(1, 1, 8, 16, dtype=dtype)
    do2, o2 = cudnn_backend.lse_gradient_rows(dlse, like)
    assert do2.dtype == o2.dtype == dtype and do2.shape == o2.shape == like.shape
    got = (do2.float() * o2.float()).sum(-1)
    assert bool(((got + dlse).abs() <= 1e-6 * dlse.abs()).all()), (got, -dlse)
    assert bool((o2[..., 3:] == 0).all() and (do2[..., 3:] == 0).all())


def test_dispatcher_error_names_the_backends_reason():
    """A backend registered with ``explain`` has its reason in the refusal (the "cudnn" backend's reasons
    reach the user this way)."""
    register_backend("explained", lambda q, k, v, spec: None, lambda q, spec: False,
                     explain=lambda q, spec: "only on Tuesdays")
    try:
        q, k, v = qkv()
        with pytest.raises(ValueError, match="backend 'explained' does not support this call.*: only on Tuesdays"):
            poslsh.attention(q, k, v, backend="explained")
    finally:
        del BACKENDS["explained"]


def test_registered_only_with_a_usable_frontend():
    """Without nvidia-cudnn-frontend (or without cuDNN or CUDA) the module imports and registers nothing."""
    if cudnn_backend.cudnn_available() and torch.cuda.is_available():
        assert "cudnn" in BACKENDS and BACKENDS["cudnn"].methods == ("exact",)
    else:
        assert "cudnn" not in BACKENDS
        q, k, v = qkv()
        assert "nvidia-cudnn-frontend" in cudnn_backend.explain_cudnn(q, spec_for(q, k, v))


# --------------------------------------------------------------------------------------------------
# The backend with the CPU stand-in for the frontend
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake(monkeypatch):
    f = FakeCudnn()
    monkeypatch.setattr(cudnn_backend, "_cudnn", f)
    cudnn_backend.clear_cache()
    monkeypatch.setattr(cudnn_backend, "_handles", {})
    yield f
    cudnn_backend.clear_cache()


def oracle(q, k, v, kw):
    """float64 reference on the CPU, differentiable."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    kw = dict(kw)
    if kw.get("key_padding_mask") is not None:
        kw["key_padding_mask"] = kw["key_padding_mask"].cpu()
    out, lse = poslsh.attention(q, k, v, backend="reference", return_lse=True, **kw)
    return (q, k, v), out, lse  # differentiable: compare their .detach()


def check_against_oracle(run, q, k, v, kw, lse_grad=True, seed=1, grads=True):
    """run(q, k, v, spec) -> (out, lse); forward and (``grads``) q/k/v gradients of a loss through out and lse."""
    ins = [t.detach().requires_grad_(grads) for t in (q, k, v)]  # leaves with the given strides
    spec = resolve_spec(*ins, **kw)
    out, lse = run(*ins, spec)
    ref_ins, ref, ref_lse = oracle(q, k, v, kw)
    bound = low_precision_bound(ref.detach(), q.dtype)
    assert out.dtype == q.dtype and out.shape == ref.shape and lse.dtype == torch.float32
    err = rel_err(out.detach().cpu(), ref.detach())
    assert err <= bound, (err, bound)
    lse_err = float(((lse.detach().double().cpu() - ref_lse.detach()).abs() / ref_lse.detach().abs().clamp(min=1)).max())
    assert lse_err <= 1e-5, lse_err  # float32 accumulation, as the conformance suite holds every backend
    if not grads:
        return
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(q.dtype).double()
    dl = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64) if lse_grad else None

    def loss(o, l_):
        total = (o.double() * do.to(o.device)).sum()
        return total + (l_.double() * dl.to(l_.device)).sum() if dl is not None else total

    got = torch.autograd.grad(loss(out, lse), ins)
    want = torch.autograd.grad(loss(ref, ref_lse), ref_ins)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        err, lim = rel_err(a.cpu(), b), 2 * low_precision_bound(b, q.dtype)
        assert err <= lim, (name, err, lim)


FAKE_CASES = {  # (qkv kwargs, call kwargs)
    "H8": (dict(h=8, nq=40), {}),
    "H12 non-power-of-two": (dict(h=12, nq=33), {}),
    "H20 GQA": (dict(h=20, hkv=5, nq=24), {}),
    "MQA odd length": (dict(h=6, hkv=1, nq=17), {}),
    "Nq < Nk at q_offset 0": (dict(h=4, nq=9, nk=31), dict(q_offset=0)),
    "Nq = 1 of 1": (dict(h=4, nq=1), {}),
    "D 12, Dv 20 (zero-padded)": (dict(h=4, nq=16, d=12, dv=20), {}),
    "float16": (dict(h=4, nq=16, dtype=torch.float16), {}),
    "scale 0.3": (dict(h=4, nq=16), dict(scale=0.3)),
}


@pytest.mark.parametrize("name", FAKE_CASES)
def test_backend_with_stand_in_matches_oracle(fake, name):
    shape, call = FAKE_CASES[name]
    q, k, v = qkv(**shape)
    check_against_oracle(cudnn_backend.cudnn_attention, q, k, v, dict(causal=True, **call))


def test_backend_with_stand_in_padding_and_strided_inputs(fake):
    """Right padding through per-row lengths; q, k, v in the [B, N, H, D] memory layout (strides reach
    the graph as they are, checked by the stand-in against the declared ones)."""
    b, n, h, d = 3, 21, 4, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 13:] = False
    mask[2, 1:] = False
    check_against_oracle(cudnn_backend.cudnn_attention, q, k, v, dict(causal=True, key_padding_mask=mask))


def test_backend_with_stand_in_packed_qkv(fake):
    """q, k, v slices of one packed [B, N, 3, H, D] tensor (strided, not dense): outputs and gradients
    get the layouts the graphs declare (the stand-in checks every bound tensor's strides)."""
    g = torch.Generator().manual_seed(5)
    packed = torch.randn(2, 19, 3, 4, 16, generator=g).to(torch.bfloat16)
    q, k, v = (packed[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and cudnn_backend._ready(q) is q
    check_against_oracle(cudnn_backend.cudnn_attention, q, k, v, dict(causal=True))


def test_stand_in_graphs_are_cached(fake):
    q, k, v = qkv(h=4, nq=16)
    spec = resolve_spec(q, k, v)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    for _ in range(3):
        out, lse = cudnn_backend.cudnn_attention(*ins, spec)
        (out.float().sum() + lse.sum()).backward()
    assert fake.builds == ["fwd", "bwd"]  # one forward graph, one backward graph (both backward calls share it)
    fake.refuse = "not supported"
    cudnn_backend.clear_cache()
    with pytest.raises(RuntimeError, match="cuDNN refused the forward graph: not supported"):
        cudnn_backend.cudnn_attention(q, k, v, spec)


def test_probe_refuses_shapes_cudnn_refuses(fake):
    """supports asks cuDNN to build the graphs for the query's shape (the backward one only for a
    training call), once per shape; a refusal is cached and named."""
    q, k, v = qkv(h=4, nq=16)
    spec = resolve_spec(q, k, v)
    probe = cudnn_backend.probe_error  # device -1: the stand-in's
    assert probe(q, spec, -1) is None and fake.builds == ["fwd"]
    assert probe(q.requires_grad_(), spec, -1) is None and fake.builds == ["fwd", "bwd"]
    assert probe(q, spec, -1) is None and fake.builds == ["fwd", "bwd"]  # cached
    fake.refuse = "hidden_dim too large"
    q2 = q.detach()[..., :8]
    assert "cuDNN refused the forward graph: hidden_dim too large" in probe(q2, spec, -1)
    assert "cuDNN refused" in probe(q2, spec, -1) and fake.builds == ["fwd", "bwd"]  # the refusal cached


def test_auto_builds_a_shape_only_once_its_calls_paid_for_the_build(fake):
    """``ready_for_auto``'s rule: a shape without graphs is ready once the estimated work of its calls
    reaches one build (AUTO_BUILD_AFTER_S), a built shape at once, and the count is per shape."""
    q, k, v = qkv(h=4, nq=16)
    spec = resolve_spec(q, k, v)
    sig = cudnn_backend._probe_signature(q, spec, -1)
    third = cudnn_backend.AUTO_BUILD_AFTER_S * 0.4
    assert [cudnn_backend._built_or_paid_for(sig, third) for _ in range(3)] == [False, False, True]
    other = cudnn_backend._probe_signature(qkv(h=4, nq=17)[0], spec, -1)
    assert not cudnn_backend._built_or_paid_for(other, third)  # its own count
    assert cudnn_backend.probe_error(qkv(h=4, nq=17)[0], spec, -1) is None  # built (e.g. by a named call)
    assert cudnn_backend._built_or_paid_for(other, 0.0) and fake.builds == ["fwd"]


def test_a_refused_backward_leaves_the_forward_served(fake):
    """cuDNN refusing a shape's backward graph (one query row on the H100) refuses training calls of that
    shape, and only those: a later forward call of the same query shape (the probe's key; any key count)
    is still served."""
    q, k, v = qkv(h=4, nq=1, nk=9)
    spec = resolve_spec(q, k, v, q_offset=0)
    probe = cudnn_backend.probe_error
    fake.refuse_backward = "s_q = s_kv = 1 is not supported."
    assert "cuDNN refused the backward graph" in probe(q.clone().requires_grad_(), spec, -1)
    assert probe(q, spec, -1) is None
    check_against_oracle(cudnn_backend.cudnn_attention, q, k, v, dict(causal=True, q_offset=0), grads=False)


def test_stand_in_lse_only_and_out_only_gradients(fake):
    """A loss on the LSE alone (no output gradient) and on the output alone."""
    q, k, v = qkv(h=4, nq=12)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_ins, ref, ref_lse = oracle(q, k, v, {})
    out, lse = cudnn_backend.cudnn_attention(*ins, resolve_spec(*ins))
    for ours, theirs in ((lse.sum(), ref_lse.sum()), (out.float().square().sum(), ref.square().sum())):
        got = torch.autograd.grad(ours, ins, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(theirs, ref_ins, retain_graph=True, allow_unused=True)
        for a, b_ in zip(got, want):
            if b_ is None or float(b_.abs().max()) == 0:
                assert a is None or float(a.abs().max()) == 0
                continue
            assert rel_err(a, b_) <= 2 * low_precision_bound(b_, q.dtype)


# --------------------------------------------------------------------------------------------------
# The real library (GPU)
# --------------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and "cudnn" in BACKENDS),
                               reason="CUDA and nvidia-cudnn-frontend with cuDNN 9 (pip install poslsh[cudnn])")

GPU_CASES = {
    "H8": (dict(h=8, nq=300), {}),
    "H12": (dict(h=12, nq=257), {}),
    "H16 GQA": (dict(h=16, hkv=4, nq=129), {}),
    "H32": (dict(h=32, nq=200), {}),
    "H6 MQA D64": (dict(h=6, hkv=1, nq=77, d=64), {}),
    "Nq 1": (dict(h=8, nq=1, nk=77), dict(q_offset=0)),  # forward only: no backward graph for s_q = 1
    "Nq < Nk q_offset 0": (dict(h=8, nq=100, nk=333), dict(q_offset=0)),
    "float16 D128": (dict(h=8, nq=64, d=128, dtype=torch.float16), {}),
    "B2 padding": (dict(b=2, h=8, hkv=2, nq=190), "pad"),
}


@needs_gpu
def test_cudnn_refuses_one_token_training_and_auto_falls_back():
    """cuDNN builds no backward graph for one query row (s_q = 1; seen on an H100, 2026-12-06, with s_kv = 1
    and 77): a training call of one token is refused naming cuDNN's reason, and "auto" serves it with
    another backend."""
    q, k, v = qkv(device="cuda", d=64, h=8, nq=1, nk=1)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="cuDNN refused the backward graph"):
        poslsh.attention(q, k, v, backend="cudnn")
    poslsh.attention(q, k, v).float().sum().backward()
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


@needs_gpu
@pytest.mark.parametrize("name", GPU_CASES)
def test_cudnn_on_gpu_matches_oracle(name):
    shape, call = GPU_CASES[name]
    q, k, v = qkv(device="cuda", **{"d": 64, **shape})
    kw = dict(causal=True)
    if call == "pad":
        mask = torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device="cuda")
        mask[1, 123:] = False
        kw["key_padding_mask"] = mask
    else:
        kw.update(call)
    spec = resolve_spec(q, k, v, **kw)
    assert BACKENDS["cudnn"].accepts(q, spec), cudnn_backend.explain_cudnn(q, spec)
    run = lambda q_, k_, v_, spec_: poslsh.attention(q_, k_, v_, backend="cudnn", return_lse=True, **kw)  # noqa: E731
    one_row = q.shape[2] == 1  # cuDNN builds no backward graph for s_q = 1: forward here, refusal above
    check_against_oracle(run, q, k, v, kw, grads=not one_row)


@needs_gpu
def test_cudnn_on_gpu_refuses_with_reason():
    q, k, v = qkv(device="cuda", h=8, nq=64)
    for kw, why in ((dict(slopes=poslsh.alibi_slopes(8) * 1.5), "Press slopes"), (dict(causal=False), "causal only")):
        with pytest.raises(ValueError, match=f"backend 'cudnn' does not support this call.*{why}"):
            poslsh.attention(q, k, v, backend="cudnn", **kw)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        poslsh.attention(q.float(), k.float(), v.float(), backend="cudnn")


@needs_gpu
def test_auto_on_gpu_does_not_build_a_graph_for_a_new_shape():
    """Where the speed table ranks cuDNN first (long causal calls), "auto" at a shape without graphs runs
    another backend and builds nothing (a graph costs 50-80 ms on an H100: every new prompt length would
    pay it); once the shape's graphs exist (a call named "cudnn", or enough work at the shape), "auto"
    takes cuDNN."""
    from poslsh.attention.speed import measured_order

    q, k, v = qkv(device="cuda", h=32, nq=16384 + 8, d=128)
    spec = resolve_spec(q, k, v)
    if (measured_order(q.device, "exact", q.shape[2], q.shape[2]) or [None])[0] != "cudnn":
        pytest.skip("the shipped speed table does not rank cuDNN first on this GPU at 16K")
    cudnn_backend.clear_cache()
    assert dispatch.select_backend(q, spec, "auto", False).name != "cudnn"
    assert not cudnn_backend._graph_cache  # nothing built
    poslsh.attention(q, k, v, backend="cudnn")
    assert dispatch.select_backend(q, spec, "auto", False).name == "cudnn"
