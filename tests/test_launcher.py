"""The pre-bound Triton launches (``triton.launch.Launcher``): a launch reuses a compiled kernel only for
arguments that specialise alike, and on CUDA its results are the JIT's, bit for bit, as the specialisations
change (key counts 1, multiples of 16 and not, aligned and misaligned tensors), and the reference's."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before Triton's first import, as every CPU test module of the kernels
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

if torch.cuda.is_available():
    from poslsh.attention.triton import launch
else:  # the package loaded interpreted, as the other CPU test modules load it (test order must not matter)
    from interpreted_triton import load_interpreted

    launch = load_interpreted()
_specialization = launch._specialization


def test_specialization_separates_what_the_jit_specialises_on():
    """Ints: 1, multiples of 16, others, and int32 / int64 widths differ; floats never do; a tensor's
    dtype and 16-byte alignment do."""
    keys = [_specialization(x) for x in (1, 16, 17, 2**31 + 16, 2**64)]
    assert len(set(keys)) == 5
    assert _specialization(33) == _specialization(35) and _specialization(32) == _specialization(48)
    assert _specialization(0.5) == _specialization(3.0)
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, misaligned = buf[:32], buf[1:33]  # 2-byte offset
    assert _specialization(aligned) == _specialization(buf[8:40])  # 16 bytes further: aligned too
    assert _specialization(aligned) != _specialization(misaligned)
    assert _specialization(aligned) != _specialization(aligned.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton launches need a CUDA device")
@pytest.mark.parametrize("method", ["window:0.01", "lsh:4", "exact"])
def test_prebound_launches_equal_the_jit_and_the_reference(method):
    """A decode sequence with changing key counts (1, 15, 16, 17, 31, 32, 33, ...), then the same calls on
    tensors whose base is 2 bytes off 16-byte alignment: the pre-bound launches give the JIT's bits, and
    both agree with the float64 reference."""
    import poslsh
    from poslsh.attention.plan import AttentionPlan

    h, hkv, d = 4, 2, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    plan = AttentionPlan(method, num_heads=h, num_kv_heads=hkv, device="cuda", backend="triton")
    buf = torch.randn(3, 1, hkv, 300, d, generator=g, device="cuda", dtype=torch.float16)
    flat = torch.randn(1 * hkv * 300 * d + 1, generator=g, device="cuda", dtype=torch.float16)
    shifted = flat[1:].view(1, hkv, 300, d)  # misaligned base pointer
    q = torch.randn(1, h, 1, d, generator=g, device="cuda", dtype=torch.float16)
    for k_all, v_all in ((buf[0], buf[1]), (shifted, buf[2])):
        for nk in (1, 15, 16, 17, 31, 32, 33, 64, 257):
            k, v = k_all[:, :, :nk], v_all[:, :, :nk]
            launch.PREBOUND = True
            fast = plan(q, k, v, return_lse=True)
            fast2 = plan(q, k, v, return_lse=True)  # the second launch of a specialisation is pre-bound
            launch.PREBOUND = False
            try:
                slow = plan(q, k, v, return_lse=True)
            finally:
                launch.PREBOUND = True
            for a, b, c in zip(fast, fast2, slow):
                assert torch.equal(a, c) and torch.equal(b, c), (method, nk)
            ref = poslsh.attention(q.double(), k.double(), v.double(), method=plan.method, backend="reference",
                                   partitions=plan._partitions(0, nk))
            err = (fast[0].double() - ref).norm() / ref.norm()
            assert err < 2e-3, (method, nk, float(err))
