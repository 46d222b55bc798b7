"""``AttentionPlan`` on the Triton kernels, through Triton's interpreter on the CPU (TRITON_INTERPRET=1, set
before the kernels are imported, as tests/test_triton_interpret.py does): the length-free device arrays
serve a growing cache without being rebuilt, decode calls split their key range by the method's reach,
and every step equals the float64 reference."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from interpreted_triton import load_interpreted  # noqa: E402

from poslsh.attention.plan import AttentionPlan  # noqa: E402
from tolerances import rel_err  # noqa: E402
from test_plan import SLOPES, make, reference  # noqa: E402


launch = load_interpreted()
METHODS = ["exact", "window:0.05", "lsh:3", "hybrid:3:grid:iid:0.3", "lsh:2:cut"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_decode_steps_reuse_the_device_arrays(method, causal):
    """Nq = 1 against 31..34 keys (2^5 +- 1), grouped KV, fp32: each step the reference's; the grid and
    band plans are built once (the cut scheme's block bounds are per length)."""
    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, causal=causal, backend="triton")
    q_all, k_all, v_all = make(1, 4, 2, 34, 34, 16, torch.float32, seed=1)
    built = []  # the plans themselves: a freed plan's id() can be reused by the next one
    for nk in range(31, 35):
        q, k, v = q_all[:, :, nk - 1:nk], k_all[:, :, :nk], v_all[:, :, :nk]
        out, lse = plan(q, k, v, return_lse=True)
        ref, ref_lse = reference(plan, q, k, v)
        assert rel_err(out, ref) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5, nk
        assert plan._tplan is not None  # the Triton path ran
        built.append(plan._tplan)
    assert len({id(p) for p in built}) == (4 if plan.method.scheme == "cut" and plan.method.random else 1)


@pytest.mark.parametrize("method", ["window:0.05", "lsh:3", "hybrid:3:grid:iid:0.3"])
def test_chunk_with_padding_and_fp16(method):
    """Nq = 5 rows at an offset inside 65 keys, a padding mask, fp16 (the interpreter's bf16 is broken)."""
    plan = AttentionPlan(method, num_heads=4, slopes=SLOPES, backend="triton")
    q, k, v = make(2, 4, 4, 5, 65, 16, torch.float16, seed=2)
    kpm = torch.ones(2, 65, dtype=torch.bool)
    kpm[1, 20:50] = False
    out = plan(q, k, v, q_offset=40, key_padding_mask=kpm)
    ref = reference(plan, q, k, v, q_offset=40, key_padding_mask=kpm)[0]
    assert out.dtype == torch.float16 and rel_err(out, ref) <= 2e-3


def test_split_schedule_sized_by_reach():
    """The decode split is sized by the keys a query reaches, not by the cache: a window of a few keys
    on a long cache runs one split, exact attention on it several."""
    q, k, v = make(1, 2, 2, 1, 300, 16, torch.float32, seed=3)
    for method, one in (("window:0.05", True), ("exact", False)):
        plan = AttentionPlan(method, num_heads=2, slopes=[1.0, 0.5], backend="triton")
        plan(q, k, v)
        cfg = launch.default_config(plan.method.method, torch.float32, 16, "cpu", True)
        splits, _ = launch._splits(plan._tplan, 1, 2, 1, 300, cfg, q.device)
        assert (splits == 1) == one, (method, splits)


@pytest.mark.parametrize("method", ["lsh:3", "lsh:2:cut", "hybrid:3:grid:iid:0.3"])
def test_evicted_cache_key_start(method):
    """Decoding into an evicted cache (key 0 at position key_start) on the kernels: the grid's offsets
    shifted on the device, the cut bounds built for the window; as the reference."""
    from poslsh.layer_partitions import LayerPartitions
    from test_plan import dispatch, reference_attention

    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, backend="triton", seed=2)
    q, k, v = make(1, 4, 2, 1, 40, 16, torch.float32, seed=4)
    spec = plan.method
    for start in (0, 9, 23):
        out = plan(q, k, v, key_start=start)
        parts = LayerPartitions(plan.slopes, spec.samples, spec.scheme, 2, 0).window(start, 40)
        widths = None if plan.widths is None else [min(w, 39) for w in plan.widths]
        qd, kd, vd = (t.double() for t in (q, k, v))
        ref = reference_attention(qd, kd, vd, dispatch.resolve_spec(qd, kd, vd, method=spec.method, slopes=plan.slopes,
                                                                   partitions=parts, widths=widths))[0]
        assert plan._tplan is not None and rel_err(out, ref) <= 1e-5, start
