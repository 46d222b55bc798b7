"""The split backend's one-kernel merge (``triton/split_merge.py: merge_slots_triton``, used on CUDA) run
by Triton's interpreter on the CPU and held to its plain version, the torch merge (``split/merge.py:
merge_slots_torch``), on the same partial results: run outputs read in place through the pointer table
(strided views, several blocks per run, batch > 1), the rest buffer, empty rows, and the
one-run-per-slot layout of the document (Flex) plan.

TRITON_INTERPRET must be set before the kernel is decorated (on its first use), so it is set here at
import and the module reloaded (dropping a kernel decorated earlier in the session).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from poslsh.attention import resolve_spec  # noqa: E402
from poslsh.attention.split.backend import _Inputs, document_plan, plan_split, run_calls  # noqa: E402
from poslsh.attention.split.merge import merge_slots, merge_slots_torch  # noqa: E402
from poslsh.attention.split.primitives import resolve_primitive  # noqa: E402

triton_merge = importlib.reload(importlib.import_module("poslsh.attention.triton.split_merge"))


def test_kernel_really_interpreted():
    assert type(triton_merge._merge_kernel()).__name__ == "InterpretedFunction"


def partials(scheme, causal, document=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 40, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 40, 8, generator=g).to(dtype)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[0, :6] = False  # left padding: rows 0..2 of batch 0 see no key at all
    kpm[1, 30:35] = False
    spec = resolve_spec(q, k, v, method="lsh", slopes=[0.9, 0.3, 0.05, 0.0], samples=5, scheme=scheme, causal=causal,
                        key_padding_mask=kpm, generator=g)
    inp = _Inputs(q, k, v, spec, resolve_primitive("torch"))
    plan = document_plan(spec, 37, 2) if document else plan_split(spec, 37, 40, 2, q.device)
    if document:  # stand-in for the per-sample Flex calls: dense per-sample outputs of the right layout
        run_out = [(torch.randn(2, 1, 37, 8, generator=g).to(dtype), torch.randn(2, 1, 37, generator=g))
                   for _ in plan.runs]
        rest = (torch.zeros(2, 0, 8, dtype=dtype), torch.zeros(2, 0))
    else:
        run_out, rest = run_calls(inp, plan)
    return plan, run_out, rest


@pytest.mark.parametrize("scheme,causal", list(itertools.product(["grid", "cut"], [True, False])))
def test_triton_merge_equals_torch_merge(scheme, causal):
    plan, run_out, rest = partials(scheme, causal)
    assert scheme == "cut" or any(run.nb > 1 for run in plan.runs)
    want = merge_slots_torch(plan, run_out, rest, 2, 8, torch.float32)
    got = triton_merge.merge_slots_triton(plan, run_out, rest, 2, 8, torch.float32, block_i=16)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    if causal:  # rows 0..2 of batch 0 (positions 3..5) see only padded keys
        assert (got[1][0, :, :3] == -1e30).all() and (got[0][0, :, :3] == 0).all()


def test_triton_merge_document_layout_and_half_outputs():
    plan, run_out, rest = partials("grid", True, document=True)
    want = merge_slots_torch(plan, run_out, rest, 2, 8, torch.float32)
    got = triton_merge.merge_slots_triton(plan, run_out, rest, 2, 8, torch.float32, block_i=16)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    half = [(o.half(), lse) for o, lse in run_out]
    got16 = triton_merge.merge_slots_triton(plan, half, (rest[0].half(), rest[1]), 2, 8, torch.float16, block_i=16)
    torch.testing.assert_close(got16[0].float(), want[0], atol=2e-3, rtol=2e-3)


def test_triton_merge_offsets_past_2_31_elements():
    """out [2, 4, 37, 8] as a view whose head stride s is just under 2^30 elements: head 3 starts
    3 s > 2^31 elements after head 0, as heads 16..31 of out [1, 32, 2^20, 128] do (head stride
    2^27). In int32 that offset wrapped (on the H200, split attention at n = 2^20 died with an
    illegal memory access). Head 0 sits 2^32 - 3 s elements into the buffer, so the wrapped offset of
    head 3 lands inside it (a wrong value here, not a crash); of the 8 GiB of virtual memory only
    the written rows are touched."""
    plan, run_out, rest = partials("grid", True, dtype=torch.float16)
    want = merge_slots_torch(plan, run_out, rest, 2, 8, torch.float16)
    s = 2**30 - 2**20
    base = 2**32 - 3 * s
    store = torch.empty(base + 3 * s + 2 * 37 * 8, dtype=torch.float16)
    out = store.as_strided((2, 4, 37, 8), (37 * 8, s, 8, 1), base)
    out.fill_(math.nan)
    lse = torch.empty(2, 4, 37)
    triton_merge.merge_slots_into(plan, run_out, rest, out, lse, block_i=16)
    torch.testing.assert_close(out, want[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-6)


def test_merge_into_checks_its_buffers():
    plan, run_out, rest = partials("grid", True)
    out = torch.empty(2, 4, 37, 8)
    with pytest.raises(ValueError, match=r"lse \[B, H, Nq\] float32 with unit last strides"):
        triton_merge.merge_slots_into(plan, run_out, rest, out, torch.empty(2, 4, 37, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit last strides"):
        triton_merge.merge_slots_into(plan, run_out, rest, out.transpose(2, 3).contiguous().transpose(2, 3),
                                   torch.empty(2, 4, 37))


def test_merge_dispatch_uses_torch_on_cpu(monkeypatch):
    plan, run_out, rest = partials("grid", True)
    monkeypatch.setattr(triton_merge, "merge_slots_triton", lambda *a, **k: pytest.fail("triton merge on the CPU"))
    merge_slots(plan, run_out, rest, 2, 8, torch.float32)
