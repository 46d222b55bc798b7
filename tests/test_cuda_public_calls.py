"""On a GPU only: the public calls a user makes (``flash_attn_func``, ``flash_attn_varlen_func`` and
``poslsh.attention`` with ``backend="auto"``) on CUDA tensors, forward and backward, against a float64
oracle on the CPU; the CPU suite holds the same calls to the same oracle on CPU tensors.

Run alone (``python -m pytest -q tests/test_cuda_public_calls.py``): other test files set
TRITON_INTERPRET=1 when collected, which would make the Triton kernels interpreted here too.
"""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh import flash_attn_func, flash_attn_varlen_func
from poslsh_lab.experiments.metrics import relative_error

from test_flash import fa_reference
from tolerances import low_precision_bound

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA tensors (run on the GPU machine)")

H, HKV, D = 8, 2, 64
SLOPES = poslsh.alibi_slopes(H).double()


def bound(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32 runs IEEE dots (1e-5, as the kernels' own checks); bf16: 2x exact attention's own rounding
    of ``ref`` (a 2 % slope error is 4x that). Gradients get twice this: their kernels round P to bf16."""
    return 1e-5 if dtype == torch.float32 else low_precision_bound(ref, dtype)


CASES = {  # causal, window_size
    "causal exact": (True, (-1, -1)),
    "bidirectional exact": (False, (-1, -1)),
    "causal per-head windows": (True, ([3, 17, 64, 200, 1000, -1, 5, 0], 0)),
    "symmetric window": (False, (33, 33)),
}


def _inputs(b, nq, nk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, D, generator=g, dtype=torch.float64)
               for n, h in ((nq, H), (nk, HKV), (nk, HKV)))
    return tuple(t.to(dtype) for t in (q, k, v))  # rounded once: oracle and GPU see the same values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("nq,nk", [(257, 257), (100, 1025), (1, 513)])
def test_flash_attn_func_on_cuda(name, dtype, nq, nk):
    causal, window = CASES[name]
    q, k, v = _inputs(2, nq, nk, dtype)
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qc, kc, vc, causal=causal, window_size=window, alibi_slopes=SLOPES.cuda())
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == (2, nq, H, D)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = fa_reference(qd, kd, vd, causal=causal, window=window, slopes=SLOPES)
    assert relative_error(out.cpu(), ref) < bound(ref, dtype)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (qc, kc, vc), do.to(dtype).cuda())
    want = torch.autograd.grad(ref, (qd, kd, vd), do.to(dtype).double())
    for name_, a, b in zip("qkv", got, want):
        assert relative_error(a.cpu(), b) < 2 * bound(b, dtype), name_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_on_cuda(dtype):
    """Three packed sequences (one shorter than a tile, one of 2^k + 1) with per-sequence slopes."""
    lens_q, lens_k = [5, 129, 300], [5, 257, 300]
    slopes = torch.stack([SLOPES, SLOPES * 0.5, SLOPES * 2])
    parts = [_inputs(1, a, b, dtype, seed=i) for i, (a, b) in enumerate(zip(lens_q, lens_k))]
    q, k, v = (torch.cat([p[i][0] for p in parts]) for i in range(3))
    cu = lambda lens: torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()  # noqa: E731
    out = flash_attn_varlen_func(q.cuda(), k.cuda(), v.cuda(), cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                 causal=True, alibi_slopes=slopes.cuda())
    ref = torch.cat([fa_reference(*(t.double() for t in p), causal=True, slopes=slopes[i:i + 1])[0]
                     for i, p in enumerate(parts)])
    assert out.device.type == "cuda" and relative_error(out.cpu(), ref) < bound(ref, dtype)


@pytest.mark.parametrize("method", ["exact", "window", "lsh", "hybrid"])
def test_attention_auto_on_cuda_matches_reference(method):
    """``poslsh.attention`` in SDPA's layout, backend chosen by the dispatcher, bf16, grouped KV and a
    padding mask, against ``backend="reference"`` in float64 on the same partitions."""
    q, k, v = (t.transpose(1, 2) for t in _inputs(2, 300, 513, torch.bfloat16))
    mask = torch.ones(2, 513, dtype=torch.bool)
    mask[1, 400:] = False
    parts = (poslsh.sample_partitions(513, SLOPES, 8, generator=torch.Generator().manual_seed(3))
             if method in ("lsh", "hybrid") else None)
    kw = dict(slopes=SLOPES, is_causal=True, method=method, partitions=parts, window_eps=1e-3, hybrid_eps=1e-2)
    out = poslsh.attention(q.cuda(), k.cuda(), v.cuda(), key_padding_mask=mask.cuda(), **kw)
    ref = poslsh.attention(q.double(), k.double(), v.double(), key_padding_mask=mask, backend="reference", **kw)
    assert out.dtype == torch.bfloat16 and relative_error(out.cpu(), ref) < bound(ref, torch.bfloat16)


@pytest.mark.parametrize("method", ["exact", "window", "lsh"])
def test_split_decode_on_cuda_is_repeatable(method):
    """Decode steps (one query row, B = 2, H = 32, 8K-40K cached keys) split their keys over programs of
    which the last of each query tile merges the others' partials (``forward._merge_splits``, after a
    ticket): a merge that read a partial before its writer's stores were visible would give a different
    output now and then, and a ticket left non-zero would leave the next call's output unwritten. Fifty
    calls per length give bitwise the first's output, within the bf16 bound of a float64 oracle.
    (On an H100, session 10: exact and window passed; lsh's first version, against the dense reference,
    ran out of its time building that reference.)"""
    h, hkv, d = 32, 8, 128
    slopes = poslsh.alibi_slopes(h).double()
    g = torch.Generator().manual_seed(7)
    for nk in (8191, 20000) if method == "lsh" else (8191, 20000, 40000):  # lsh's oracle: 11 s at 20K keys
        q = torch.randn(2, h, 1, d, generator=g, dtype=torch.float64).to(torch.bfloat16)
        k, v = (torch.randn(2, hkv, nk, d, generator=g, dtype=torch.float64).to(torch.bfloat16) for _ in range(2))
        parts = (poslsh.sample_partitions(nk, slopes, 4, generator=torch.Generator().manual_seed(nk))
                 if method == "lsh" else None)
        kw = dict(slopes=slopes, is_causal=True, method=method, partitions=parts, window_eps=1e-3)
        qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
        first = poslsh.attention(qc, kc, vc, backend="triton", **kw)
        for _ in range(50):
            assert torch.equal(poslsh.attention(qc, kc, vc, backend="triton", **kw), first), (method, nk)
        # lsh's reference builds the [H, Nk, Nk] mean mask (410 GB at 40K keys): its oracle is the fused
        # backend's decoding row in float64, which the CPU suite holds to that reference
        oracle = "fused" if method == "lsh" else "reference"
        ref = poslsh.attention(q.double(), k.double(), v.double(), backend=oracle, **kw)
        assert relative_error(first.cpu(), ref) < bound(ref, torch.bfloat16), (method, nk)


@pytest.mark.parametrize("method", ["exact", "window", "lsh"])
def test_prebound_launches_equal_the_jit_on_cuda(method):
    """A plan's decode steps launch compiled kernels it keeps per ``launch._launch_key`` (pointer alignment
    of q, k, v and the mask, k/v strides): a key coarser than Triton's specialisation would run a kernel
    compiled for other alignments or strides. Steps on an aligned cache, a cache 2 bytes off 16-byte
    alignment, caches grown by concatenation (strides change with Nk), key counts crossing multiples of
    16 and a misaligned mask view: each output bitwise that of the same call through the JIT
    (``PREBOUND = False``), and within the bf16 bound of the float64 oracle."""
    from poslsh.attention.plan import AttentionPlan
    from poslsh.attention.triton import launch

    h, hkv, d, n = 8, 2, 64, 1200
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, h, 1, d, generator=g, dtype=torch.float64).to(torch.bfloat16)
    flat = torch.randn(2, hkv * n * d + 1, generator=g, dtype=torch.float64).to(torch.bfloat16)
    aligned, shifted = flat[:, :-1].view(2, 1, hkv, n, d), flat[:, 1:].view(2, 1, hkv, n, d)
    mask_flat = torch.ones(n + 1, dtype=torch.bool)
    mask_flat[1:40] = False
    steps = [(c, aligned[0][:, :, :c], aligned[1][:, :, :c], None) for c in (15, 16, 17, 31, 32, 33, 700, 1024)]
    steps += [(c, shifted[0][:, :, :c], shifted[1][:, :, :c], None) for c in (15, 16, 17, 700)]
    steps += [(c, aligned[0][:, :, :c].contiguous(), aligned[1][:, :, :c].contiguous(), None) for c in (40, 41, 48)]
    steps += [(c, aligned[0][:, :, :c], aligned[1][:, :, :c], mask_flat[1:c + 1][None]) for c in (64, 65, 1100)]
    plan = AttentionPlan(method, num_heads=h, num_kv_heads=hkv, slopes=SLOPES, backend="triton", device="cuda")
    for c, k, v, mask in steps:
        qc, kc, vc = q.cuda(), k.cuda(), v.cuda()
        mc = None if mask is None else mask.cuda()
        first = plan(qc, kc, vc, key_padding_mask=mc)
        again = plan(qc, kc, vc, key_padding_mask=mc)  # (the second call of a key: the kept kernel)
        launch.PREBOUND = False
        try:
            jit = plan(qc, kc, vc, key_padding_mask=mc)
        finally:
            launch.PREBOUND = True
        assert torch.equal(first, jit) and torch.equal(again, jit), (method, c)
        ref = poslsh.attention(q.double(), k.double(), v.double(), slopes=SLOPES, method=plan.method,
                               key_padding_mask=mask, partitions=plan._partitions(0, c), backend="reference")
        assert relative_error(jit.cpu(), ref) < bound(ref, torch.bfloat16), (method, c)
