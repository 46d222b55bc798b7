"""The single-process pieces context parallelism stands on: queries inside the keys (``q_offset``) in
every backend, and ``Partitions.restrict`` (the global partitions seen on a shard).

A shard with its halo is a call whose queries have keys on both sides, so ``q_offset < Nk - Nq``.
Row i of attention depends only on query i, so each backend with an offset is held to the float64
reference on all Nk queries, sliced to the rows asked for.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

# The Triton test runs the kernels in Triton's interpreter; like test_triton_interpret.py this must be set
# before the kernels are decorated, i.e. before anything imports them.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import poslsh  # noqa: E402
from poslsh.attention import resolve_spec, select_backend  # noqa: E402
from poslsh.attention.reference import reference_attention  # noqa: E402

from q_offset_cases import B, D, H, METHODS, NK, OFFSETS, SLOPES, inputs as _inputs, method_kwargs as _kwargs  # noqa: E402


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


def _run(backend, q, k, v, o, nq, kw, fn=None):
    qs = q[:, :, o:o + nq].contiguous()
    spec = resolve_spec(qs, k, v, q_offset=o, **kw)
    return (fn or select_backend(qs, spec, backend))(qs, k, v, spec)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method,scheme", METHODS)
def test_q_offset_torch_backends_float64(method, scheme, causal):
    q, k, v = _inputs(torch.float64)
    kw = _kwargs(method, scheme, causal)
    ro, rl = poslsh.attention(q, k, v, backend="reference", return_lse=True, **kw)
    for backend in ("reference", "fused"):
        for o, nq in OFFSETS:
            out, lse = _run(backend, q, k, v, o, nq, kw)
            assert (out - ro[:, :, o:o + nq]).abs().max() < 1e-12, (backend, o, nq)
            assert (lse - rl[:, :, o:o + nq]).abs().max() < 1e-12, (backend, o, nq)
    # The public entry passes it through.
    out = poslsh.attention(q[:, :, 3:23], k, v, q_offset=3, **kw)
    assert (out - ro[:, :, 3:23]).abs().max() < 1e-12


def test_q_offset_backward_fused():
    q, k, v = (t.requires_grad_() for t in _inputs(torch.float64))
    kw = _kwargs("hybrid", "grid", False)
    do = torch.randn(B, H, 20, D, dtype=torch.float64)
    ref = torch.autograd.grad(poslsh.attention(q, k, v, backend="reference", **kw)[:, :, 9:29], (q, k, v), do)
    got = torch.autograd.grad(poslsh.attention(q[:, :, 9:29], k, v, q_offset=9, backend="fused", **kw), (q, k, v), do)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-12


def test_q_offset_errors_and_split_refusal():
    q, k, v = _inputs(torch.float32)
    for bad in (-1, NK - 4, 1.5, True):
        with pytest.raises(ValueError, match=r"q_offset must be an int in \[0, Nk - Nq\] = \[0, 36\]"):
            poslsh.attention(q[:, :, :5], k, v, method="exact", q_offset=bad)
    # split's block loop assumes the queries are the last Nq keys: refused, not a wrong answer.
    kw = _kwargs("lsh", "grid", True)
    with pytest.raises(ValueError, match=r"backend 'split' does not support this call"):
        poslsh.attention(q[:, :, :5], k, v, q_offset=0, backend="split", **kw)
    out = poslsh.attention(q[:, :, -5:], k, v, q_offset=NK - 5, backend="split", **kw)
    ref = poslsh.attention(q[:, :, -5:], k, v, backend="reference", **kw)
    assert (out - ref).abs().max() < 1e-5


def test_q_offset_flex_eager():
    """Flex (eager on the CPU, forward): in-range offsets for every method, and offsets outside
    [0, Nk - Nq] for exact ALiBi, which the exact ring of ``poslsh.distributed`` uses for blocks
    of keys that lie wholly before or after the queries."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from poslsh.attention.flex import flex_attention_spec

    q, k, v = _inputs(torch.float32)
    for method, scheme, causal in [("window", "grid", False), ("lsh", "cut", False), ("hybrid", "grid", True)]:
        kw = _kwargs(method, scheme, causal)
        ro = poslsh.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        for o, nq in OFFSETS[1:3]:
            out, _ = _run(None, q, k, v, o, nq, kw, fn=lambda *a: flex_attention_spec(*a, block=16))
            assert (out.double() - ro[:, :, o:o + nq]).abs().max() < 1e-5, (method, causal, o)
    for causal, delta, nq, nk in [(True, 100, 25, 12), (False, 40, 20, 30), (False, -25, 25, 20)]:
        qq, kk, vv = q[:, :, :nq], k[:, :, :nk], v[:, :, :nk]
        spec = dataclasses.replace(resolve_spec(qq[:, :, :min(nq, nk)], kk, vv, slopes=SLOPES, causal=causal,
                                                method="exact"), q_offset=delta)
        fo, fl = flex_attention_spec(qq.contiguous(), kk, vv, spec, block=16)
        ro, rl = reference_attention(qq.double(), kk.double(), vv.double(), spec)
        assert (fo.double() - ro).abs().max() < 1e-5 and ((fl.double() - rl).abs() <= 1e-5 * (1 + rl.abs())).all()


def test_q_offset_triton_interpreted():
    """The Triton kernels (every method; forward and backward) with queries inside the keys."""
    pytest.importorskip("triton")
    names = ["poslsh.attention.triton.jit", "poslsh.attention.triton.forward", "poslsh.attention.triton.backward",
             "poslsh.attention.triton.launch", "poslsh.attention.triton"]
    mods = [importlib.reload(sys.modules[n]) if n in sys.modules else importlib.import_module(n) for n in names]
    if type(mods[1]._fwd_kernel).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernels were compiled before TRITON_INTERPRET=1 was set")
    q, k, v = (t.requires_grad_() for t in _inputs(torch.float32))
    for method, scheme, causal in [("exact", "grid", False), ("window", "grid", True), ("lsh", "grid", False),
                                   ("hybrid", "cut", True)]:
        kw = _kwargs(method, scheme, causal)
        o, nq = 9, 20
        out, lse = _run("triton", q, k, v, o, nq, kw)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ro, rl = poslsh.attention(qd, kd, vd, backend="reference", return_lse=True, **kw)
        assert (out.double() - ro[:, :, o:o + nq]).abs().max() < 1e-5, method
        assert (lse.double() - rl[:, :, o:o + nq]).abs().max() < 1e-5, method
        do = torch.randn(B, H, nq, D)
        got = torch.autograd.grad(out, (q, k, v), do)
        ref = torch.autograd.grad(ro[:, :, o:o + nq], (qd, kd, vd), do.double())
        for a, b in zip(got, ref):
            assert (a.double() - b).abs().max() < 1e-5, method
    # Queries beyond the keys (a ring's off-diagonal block) are outside the kernels' range: refused, where
    # the causal kernel used to return a wrong answer (3 positions past Nk - Nq: 0.1 off the reference).
    spec = dataclasses.replace(resolve_spec(q[:, :, :20], k, v, slopes=SLOPES, method="exact"), q_offset=NK - 17)
    with pytest.raises(ValueError, match=r"the Triton kernels take q_offset in \[0, Nk - Nq\] = \[0, 21\], got 24"):
        mods[3].triton_attention(q[:, :, :20].detach(), k.detach(), v.detach(), spec)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_restrict_matches_block_ids(scheme):
    slopes = [0.3, 0.05, 0.0, 2.0]  # ordinary, wide blocks, one block (W unbounded), mostly single positions
    for n in (1, 2, 17, 33):
        parts = poslsh.sample_partitions(n, slopes, 3, scheme=scheme, generator=torch.Generator().manual_seed(n))
        ids = parts.block_ids()
        start, end = parts.block_bounds()
        for a in range(n):
            for b in range(a + 1, n + 1):
                sub = parts.restrict(a, b)
                assert sub.n == b - a and sub.scheme == scheme and sub.num_samples == 3
                assert torch.equal(sub.block_ids(), ids[..., a:b] - ids[..., a:a + 1]), (n, a, b)
                s, e = sub.block_bounds()
                assert torch.equal(s, (start[..., a:b] - a).clamp(min=0))
                assert torch.equal(e, (end[..., a:b] - a).clamp(max=b - a))
    with pytest.raises(ValueError, match=r"restrict needs ints 0 <= start < stop <= n = 33"):
        parts.restrict(5, 5)
    with pytest.raises(ValueError, match=r"restrict needs ints"):
        parts.restrict(0, 34)

