"""On a GPU only: the compiled CUDA backends with queries inside the keys (``q_offset``), the calls a
shard of ``poslsh.distributed`` makes, forward and backward against the float64 reference.

Run alone (``python -m pytest -q tests/test_distributed_cuda.py``): other test files set
TRITON_INTERPRET=1 when collected, which would make the Triton kernels interpreted here too.
"""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh.attention import available_backends, resolve_spec, select_backend

from q_offset_cases import METHODS, inputs as _inputs, method_kwargs as _kwargs

OFFSETS = [(3, 20), (17, 11), (40, 1)]  # a subset: every case compiles its own kernels on the GPU


def _run(backend, q, k, v, o, nq, kw):
    qs = q[:, :, o:o + nq]
    spec = resolve_spec(qs, k, v, q_offset=o, **kw)
    return select_backend(qs, spec, backend)(qs, k, v, spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA backends (run on the GPU machine)")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("method,scheme", METHODS)
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_q_offset_cuda_backends(backend, method, scheme, causal):
    """On a GPU: the compiled Triton kernels and FlexAttention with queries inside the keys, forward and
    backward, against the float64 reference (what poslsh.distributed's shard calls run on CUDA)."""
    if backend not in available_backends():
        pytest.skip(f"backend {backend} not available")
    q, k, v = (t.cuda().requires_grad_() for t in _inputs(torch.float32))
    kw = _kwargs(method, scheme, causal)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rl = poslsh.attention(qd, kd, vd, backend="reference", return_lse=True, **kw)
    for o, nq in OFFSETS:
        out, lse = _run(backend, q, k, v, o, nq, kw)
        assert (out.double() - ro[:, :, o:o + nq]).abs().max() < 1e-4, o
        assert (lse.double() - rl[:, :, o:o + nq]).abs().max() < 1e-4, o
        do = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), do)
        ref = torch.autograd.grad(ro[:, :, o:o + nq], (qd, kd, vd), do.double(), retain_graph=True)
        for a, b in zip(got, ref):
            assert (a.double() - b).abs().max() < 1e-4, o
