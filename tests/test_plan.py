"""``AttentionPlan`` (poslsh.attention.plan) held to ``poslsh.attention(backend="reference")``: every method,
causal and not, dtypes, decoding and chunks, odd and 2^k +- 1 lengths, grouped KV, padding, a growing
cache reusing one plan; the slicing to the method's reach; the public call's reuse of plans; options a
method ignores; the speed table's training regime; the CUDA graph capture (CUDA only)."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch

import poslsh
from poslsh.attention import dispatch, public, public_plans, resolve_spec, speed
from poslsh.attention.dispatch import register_backend
from poslsh.attention.plan import AttentionPlan
from poslsh.attention.public_plans import clear_public_plans
from poslsh.attention.reference import reference_attention
from poslsh.layer_partitions import LayerPartitions
from poslsh.method import IgnoredOptionWarning
from tolerances import low_precision_bound, rel_err

# Slopes steep enough that the window and the blocks reach far fewer keys than the longer caches hold.
SLOPES = [1.0, 0.5, 0.3, 0.2]
METHODS = ["exact", "window:0.05", "lsh:3", "lsh:2:cut", "hybrid:3:grid:iid:0.3"]


def reference(plan: AttentionPlan, q, k, v, *, q_offset=None, key_padding_mask=None, seed=0, layer=0):
    """The plan's call through ``poslsh.attention(backend="reference")`` in float64: the same method,
    slopes, partitions (``LayerPartitions`` of (seed, layer) at this length) and widths."""
    spec, nk = plan.method, k.shape[2]
    kw = dict(slopes=plan.slopes, causal=plan.causal, backend="reference", q_offset=q_offset,
              key_padding_mask=key_padding_mask, return_lse=True)
    if spec.random:
        kw["partitions"] = LayerPartitions(plan.slopes, spec.samples, spec.scheme, seed, layer).get(nk)
    q, k, v = (t.detach().double() for t in (q, k, v))
    if spec.method == "hybrid":  # the plan's length-free near field, capped at Nk - 1
        kw.pop("return_lse"), kw.pop("backend")
        widths = [min(w, nk - 1) for w in plan.widths]
        return reference_attention(q, k, v, dispatch.resolve_spec(q, k, v, method="hybrid", widths=widths, **kw))
    return poslsh.attention(q, k, v, method=spec, **kw)


def bound(out64, dtype):
    return 1e-12 if dtype == torch.float64 else low_precision_bound(out64, dtype)


def make(b, h, hkv, nq, nk, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, nk, dv or d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 65), (1, 200), (5, 63), (33, 33), (3, 129)])
def test_plan_matches_reference(method, causal, nq, nk):
    """float64, grouped KV (4 heads over 2), Dv != D: out and lse as the reference's."""
    q, k, v = make(2, 4, 2, nq, nk, 8, torch.float64, dv=5)
    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, causal=causal)
    out, lse = plan(q, k, v, return_lse=True)
    ref, ref_lse = reference(plan, q, k, v)
    assert rel_err(out, ref) <= 1e-12 and rel_err(lse, ref_lse) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_plan_low_precision(method, dtype):
    """fp16, bf16, fp32 within 2x of exact attention's own rounding of the float64 result."""
    q, k, v = make(1, 4, 4, 2, 97, 16, dtype, seed=1)
    plan = AttentionPlan(method, num_heads=4, slopes=SLOPES)
    out = plan(q, k, v)
    ref = reference(plan, q, k, v)[0]
    assert out.dtype == dtype and rel_err(out, ref) <= bound(ref, dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_plan_padding_and_offset(method, causal):
    """A padding mask (a whole padded row in batch 1 for the causal decode) and queries inside the keys."""
    q, k, v = make(2, 4, 2, 3, 70, 8, torch.float64, seed=2)
    kpm = torch.ones(2, 70, dtype=torch.bool)
    kpm[0, 10:40] = False
    kpm[1, 30:] = False
    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, causal=causal)
    for q_offset in (None, 0, 31):
        out, lse = plan(q, k, v, key_padding_mask=kpm, q_offset=q_offset, return_lse=True)
        ref, ref_lse = reference(plan, q, k, v, key_padding_mask=kpm, q_offset=q_offset)
        assert rel_err(out, ref) <= 1e-12 and rel_err(lse, ref_lse) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_growing_cache_reuses_the_plan(method):
    """Decoding: one plan over a cache that grows by a token per step, each step the reference's; the
    backend is chosen once per length bucket."""
    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, seed=5, layer=2)
    q_all, k_all, v_all = make(1, 4, 2, 90, 90, 8, torch.float64, seed=3)
    for nk in range(64, 90):
        q, k, v = q_all[:, :, nk - 1:nk], k_all[:, :, :nk], v_all[:, :, :nk]
        out = plan(q, k, v)
        ref = reference(plan, q, k, v, seed=5, layer=2)[0]
        assert rel_err(out, ref) <= 1e-12, nk
    assert len(plan._backends) == 1  # 64..89 keys: one power-of-two bucket


def test_calls_read_only_the_reachable_keys():
    """Off the Triton path, k and v are cut to the keys the method reaches: a decode step on a long cache
    hands the backend O(reach) keys (the CPU cost of a window decode is that of its band)."""
    seen = []

    def spy(q, k, v, spec):
        seen.append(k.shape[2])
        return reference_attention(q, k, v, spec)

    register_backend("plan-spy", spy, priority=-1, methods=("exact", "window", "lsh", "hybrid"))
    try:
        q, k, v = make(1, 4, 4, 1, 5000, 8, torch.float64, seed=4)
        for method in ("window:0.05", "lsh:3", "hybrid:3:grid:iid:0.3", "exact"):
            plan = AttentionPlan(method, num_heads=4, slopes=SLOPES, backend="plan-spy")
            out = plan(q, k, v)
            expect = 5000 if plan.reach is None else plan.reach + 1
            assert seen[-1] == expect and rel_err(out, reference(plan, q, k, v)[0]) <= 1e-12, method
        assert plan.reach is None  # exact reads every key
    finally:
        dispatch.BACKENDS.pop("plan-spy")


def test_plan_arguments_checked_when_built_and_called():
    with pytest.raises(ValueError, match="num_heads=4 must be divisible by num_kv_heads=3"):
        AttentionPlan("exact", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="device must be a torch.device or its name .* got 'tpu'"):
        AttentionPlan("exact", num_heads=4, device="tpu")  # (torch's RuntimeError, naming no argument, before)
    with pytest.raises(ValueError, match="slopes must have one value per query head"):
        AttentionPlan("exact", num_heads=4, slopes=[0.5])
    with pytest.raises(ValueError, match="partitions are only used by method 'lsh' or 'hybrid'"):
        AttentionPlan("window", num_heads=4, partitions=LayerPartitions(torch.tensor(SLOPES, dtype=torch.float64),
                                                                         2, "grid", 0, 0))
    with pytest.raises(ValueError, match="slopes require grad"):
        AttentionPlan("exact", num_heads=1, slopes=torch.ones(1, requires_grad=True))
    plan = AttentionPlan("window", num_heads=4, num_kv_heads=2)
    q, k, v = make(1, 4, 2, 2, 9, 8, torch.float32)
    with pytest.raises(ValueError, match="this plan takes q with 4 heads and k, v with 2"):
        plan(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    with pytest.raises(TypeError, match="share one dtype"):
        plan(q, k.double(), v)
    with pytest.raises(ValueError, match=r"q_offset must be an int in \[0, Nk - Nq\] = \[0, 7\]"):
        plan(q, k, v, q_offset=8)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Nk\]"):
        plan(q, k, v, key_padding_mask=torch.ones(1, 8, dtype=torch.bool))


def test_nn_eval_uses_its_plan():
    """Eval-mode ALiBiAttention calls its plan (built once per device) and equals the same projections
    through poslsh.attention."""
    from poslsh.nn import ALiBiAttention

    torch.manual_seed(0)
    m = ALiBiAttention(16, 4, num_kv_heads=2, method="window", window_eps=0.05).double().eval()
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        plan = m.plan(x.device)
        assert m(x) is not None and m.plan(x.device) is plan
        b, n, _ = x.shape
        q = m.q_proj(x).view(b, n, 4, 4).transpose(1, 2)
        k = m.k_proj(x).view(b, n, 2, 4).transpose(1, 2)
        v = m.v_proj(x).view(b, n, 2, 4).transpose(1, 2)
        ref = poslsh.attention(q, k, v, method="window", window_eps=0.05, backend="reference")
        ref = m.out_proj(ref.transpose(1, 2).reshape(b, n, 16))
    assert rel_err(out, ref) <= 1e-12
    m.set_method("exact")
    assert m.plan(x.device) is not plan


def test_nn_under_torch_compile():
    """torch.compile(fullgraph=False) of an eval-mode module (graph breaks around the plan's call) gives
    the eager result."""
    from poslsh.nn import ALiBiAttention

    torch.manual_seed(1)
    m = ALiBiAttention(16, 4, method="lsh", samples=2, seed=1).eval()
    x = torch.randn(1, 20, 16)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=False, backend="eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# poslsh.attention's reuse of plans
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def count_resolutions(monkeypatch):
    clear_public_plans()
    calls = []
    real = dispatch.resolve_spec

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(public, "resolve_spec", counting)  # the public call's resolution
    yield calls, real
    clear_public_plans()


@pytest.mark.parametrize("method", ["exact", "window", "lsh"])
def test_public_decode_resolves_once(count_resolutions, method):
    """A repeated decode-shaped public call (growing cache, same arguments) is resolved on its first call
    only, and every step equals the reference's."""
    calls, resolve = count_resolutions
    slopes = torch.tensor(SLOPES, dtype=torch.float64)
    layer = LayerPartitions(slopes, 3, "grid", 0, 0)
    q_all, k_all, v_all = make(1, 4, 2, 50, 50, 8, torch.float64, seed=6)
    for nk in range(40, 50):
        q, k, v = q_all[:, :, nk - 1:nk], k_all[:, :, :nk], v_all[:, :, :nk]
        kw = dict(slopes=slopes, method=method)
        if method == "window":
            kw["window_eps"] = 0.05
        if method == "lsh":
            kw["partitions"] = layer.get(nk)  # new Partitions each step, the same grid tensors
        out = poslsh.attention(q, k, v, **kw)
        ref = reference_attention(q, k, v, resolve(q, k, v, **kw))[0]
        assert rel_err(out, ref) <= 1e-12
    assert len(calls) == 1


def test_public_reuse_never_stale(count_resolutions):
    """Slopes changed in place, a different list, a bad argument: resolved again (and refused with the
    dispatcher's own message), never served from the earlier plan."""
    slopes = torch.tensor(SLOPES, dtype=torch.float64)
    q, k, v = make(1, 4, 4, 1, 30, 8, torch.float64, seed=7)
    a = poslsh.attention(q, k, v, slopes=slopes, method="window", window_eps=0.05)
    slopes.mul_(0.5)
    b = poslsh.attention(q, k, v, slopes=slopes, method="window", window_eps=0.05)
    ref = poslsh.attention(q, k, v, slopes=slopes.clone(), method="window", window_eps=0.05, backend="reference")
    assert not torch.equal(a, b) and rel_err(b, ref) <= 1e-12
    lst = [0.1, 0.2, 0.3, 0.4]
    c = poslsh.attention(q, k, v, slopes=lst, method="exact")
    lst[0] = 0.9
    d = poslsh.attention(q, k, v, slopes=lst, method="exact")
    assert rel_err(d, poslsh.attention(q, k, v, slopes=lst, method="exact", backend="reference")) <= 1e-12
    assert not torch.equal(c, d)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Nk\]"):
        poslsh.attention(q, k, v, slopes=lst, method="exact", key_padding_mask=torch.ones(1, 3, dtype=torch.bool))


def test_public_reuse_random_sequence():
    """800 seeded calls that keep hitting the public call's plan cache (the same slopes tensor changed in
    place now and then, lists, default slopes, partitions reused, redrawn or changed in place, GQA, padding,
    query offsets), each held to the reference on a spec resolved afresh, in float64. Deterministic: no
    false alarms; a plan served stale (e.g. a key without the slopes' in-place version) fails it."""
    rng = random.Random(20261208)
    slopes = torch.tensor(SLOPES, dtype=torch.float64)
    drawn = {}
    for step in range(800):
        heads, kv_heads = rng.choice([(4, 4), (4, 2), (4, 1)])
        nk = rng.choice([1, 2, 5, 16, 17, 33, rng.randint(1, 70)])
        nq = rng.choice([1, 1, nk, rng.randint(1, nk)])
        method = rng.choice(["exact", "window", "lsh", "hybrid"])
        kw = dict(method=method, causal=rng.random() < 0.7)
        if rng.random() < 0.3:
            slopes.mul_(rng.choice([0.5, 2.0]))
            if float(slopes.max()) > 8 or float(slopes.min()) < 1e-3:
                slopes.copy_(torch.tensor(SLOPES))
        kind = rng.choice(["tensor", "list", "default"])
        if kind != "default":
            kw["slopes"] = slopes if kind == "tensor" else slopes.tolist()
        if method == "window":
            kw["window_eps"] = rng.choice([1e-3, 0.05, 0.3])
        if method == "hybrid":
            kw["hybrid_eps"] = rng.choice([0.5, 0.05])
        if method in ("lsh", "hybrid"):
            key = (nk, kind, tuple(slopes.tolist()))
            if key not in drawn or rng.random() < 0.2:
                drawn[key] = poslsh.sample_partitions(nk, kw.get("slopes", poslsh.alibi_slopes(heads)), 3,
                                                      generator=torch.Generator().manual_seed(rng.randint(0, 99)))
            elif rng.random() < 0.2:  # the same partitions moved in place (the blocks shift by one)
                drawn[key].offsets.copy_((drawn[key].offsets + 1) % drawn[key].widths)
            kw["partitions"] = drawn[key]
        if rng.random() < 0.2:
            mask = torch.rand(1, nk, generator=torch.Generator().manual_seed(step)) < 0.8
            mask[:, -1] = True
            kw["key_padding_mask"] = mask
        if kw["causal"] and nq < nk and rng.random() < 0.3:
            kw["q_offset"] = rng.randint(0, nk - nq)
        q, k, v = make(1, heads, kv_heads, nq, nk, 8, torch.float64, seed=step)
        out = poslsh.attention(q, k, v, **kw)
        ref = reference_attention(q, k, v, resolve_spec(q, k, v, **kw))[0]  # resolved afresh: no cache
        assert rel_err(out, ref) <= 1e-10, (step, {n: x for n, x in kw.items() if n != "partitions"})


def test_option_the_method_ignores_warns():
    """method="window", samples=8 ignored samples without a word before; now a warning names both."""
    q, k, v = make(1, 2, 2, 1, 8, 8, torch.float32)
    with pytest.warns(IgnoredOptionWarning, match=r"method='window' ignores samples \(its options: window_eps\)"):
        poslsh.attention(q, k, v, method="window", samples=8)
    with pytest.warns(IgnoredOptionWarning, match=r"method='exact' ignores window_eps, hybrid_eps"):
        poslsh.attention(q, k, v, method="exact", window_eps=0.1, hybrid_eps=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poslsh.attention(q, k, v, method="window", window_eps=0.1)
        poslsh.attention(q, k, v, method=poslsh.parse_method("lsh:2"))


# --------------------------------------------------------------------------------------------------
# The speed table: forward and forward + backward
# --------------------------------------------------------------------------------------------------


def test_speed_table_training_regime(monkeypatch):
    """A call that needs gradients takes the table's training entry ("prefill+backward"), falling back to
    the forward entry where the table has none."""
    table = {"GPU X": {"exact": {"prefill": {"4096": {"triton": 1.0, "flex": 1.1}},
                                 "prefill+backward": {"4096": {"triton": 3.3, "flex": 3.0}}},
                       "window": {"prefill": {"4096": {"triton": 1.0, "flex": 2.0}}}}}
    monkeypatch.setattr(speed, "_TABLE", json.loads(json.dumps(table)))
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU X")
    cuda = torch.device("cuda", 0)
    assert speed.measured_order(cuda, "exact", 4096, 4096) == ["triton", "flex"]
    assert speed.measured_order(cuda, "exact", 4096, 4096, grad=True) == ["flex", "triton"]
    assert speed.measured_order(cuda, "window", 4096, 4096, grad=True) == ["triton", "flex"]


# --------------------------------------------------------------------------------------------------
# CUDA graphs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("method", ["exact", "window", "lsh:8", "hybrid:8"])
def test_plan_call_captured_in_a_cuda_graph(method):
    """A decode call on the Triton kernels (static shapes) captured in a torch.cuda.CUDAGraph replays to
    the eager result, and follows new contents of its static inputs."""
    pytest.importorskip("triton")
    h, d, nk = 8, 64, 4099
    plan = AttentionPlan(method, num_heads=h, device="cuda", backend="triton")
    q, k, v = (t.cuda() for t in make(1, h, h, 1, nk, d, torch.bfloat16, seed=8))
    eager = plan(q, k, v)  # builds the plan's arrays and picks the backend
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = plan(q, k, v)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=0, atol=0)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(static_out, plan(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_evicted_cache_key_start(method):
    """A cache whose first positions were evicted (key 0 at sequence position key_start): the LSH
    partitions of those positions (LayerPartitions.window), ALiBi unchanged; as the reference."""
    plan = AttentionPlan(method, num_heads=4, num_kv_heads=2, slopes=SLOPES, seed=1, layer=3)
    q, k, v = make(1, 4, 2, 2, 70, 8, torch.float64, seed=9)
    spec = plan.method
    for start in (0, 5, 37):
        out = plan(q, k, v, key_start=start)
        kw = dict(slopes=plan.slopes, backend="reference")
        if spec.random:
            kw["partitions"] = LayerPartitions(plan.slopes, spec.samples, spec.scheme, 1, 3).window(start, 70)
        if spec.method == "hybrid":
            ref = reference_attention(q, k, v, dispatch.resolve_spec(
                q, k, v, method="hybrid", widths=[min(w, 69) for w in plan.widths], slopes=plan.slopes,
                partitions=kw["partitions"]))[0]
        else:
            ref = poslsh.attention(q, k, v, method=spec, **kw)
        assert rel_err(out, ref) <= 1e-12, start
    with pytest.raises(ValueError, match="key_start must be an int >= 0"):
        plan(q, k, v, key_start=-1)


def test_public_reuse_refuses_what_the_dispatcher_refuses(count_resolutions):
    """A plan cached by a float call never serves the same call on integer tensors: the dispatcher's
    TypeError comes (the plan served it, with no error, when the plan's checks skipped the dtype)."""
    q, k, v = make(1, 4, 4, 1, 30, 8, torch.float64, seed=9)
    poslsh.attention(q, k, v)
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        poslsh.attention(q.int(), k.int(), v.int())


def test_auto_passes_over_a_backend_not_ready_and_a_plan_asks_again():
    """A backend whose ``ready`` says no (cuDNN before a shape's calls paid for its graph) is passed over
    by "auto" and named in ``deferred``; a plan does not keep that choice, so it takes the backend once
    ready, and asks it again at every call (a new length in the bucket would need a new graph: H100,
    2026-12-07, 68-71 ms first calls at 8200 and 12000 keys while the plan kept cuDNN from 8192). Failed
    before ``Backend.ready``: the plan kept its first choice for the length bucket."""
    calls = {"ready": 0, "ran": 0}

    def ready(q, spec):
        calls["ready"] += 1
        return calls["ready"] >= 3

    def run(q, k, v, spec):
        calls["ran"] += 1
        return reference_attention(q, k, v, spec)

    register_backend("slow-to-build", run, priority=1000, methods=("exact",), ready=ready)
    try:
        q, k, v = make(1, 4, 4, 20, 20, 8, torch.float64, seed=5)  # above DECODE_ROWS: a prefill
        deferred = []
        spec = dispatch.resolve_spec(q, k, v, slopes=SLOPES)
        assert dispatch.select_backend(q, spec, "auto", False, deferred).name != "slow-to-build"
        assert deferred == ["slow-to-build"]
        assert dispatch.select_backend(q, spec, "slow-to-build").name == "slow-to-build"  # named: no question
        plan = AttentionPlan("exact", num_heads=4, slopes=SLOPES)
        want = reference(plan, q, k, v)[0]
        for ran in (0, 1, 2):  # ready's 2nd call (the plan's 1st) says no, its 3rd yes, and it is asked on
            assert rel_err(plan(q, k, v), want) <= 1e-12
            assert calls == {"ready": 2 + ran, "ran": ran}
    finally:
        dispatch.BACKENDS.pop("slow-to-build")
        clear_public_plans()


def test_given_partitions_decide_r():
    """A plan given partitions of r samples is the method with r samples, as ``poslsh.attention`` makes it:
    before, "hybrid" kept the method's default r = 8 for its near field while estimating with the
    partitions' r = 2 (a near field sized for 8 samples: narrower than eps needs for 2), and the plan and
    the public call disagreed on the same arguments."""
    from poslsh.attention.plan import HYBRID_WIDTH_N
    from poslsh.attention.window import hybrid_widths

    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    layer = LayerPartitions(slopes, 2, "grid", 0, 0)
    for method in ("lsh", "hybrid"):
        plan = AttentionPlan(method, num_heads=4, slopes=slopes, partitions=layer, backend="fused")
        assert plan.method.samples == 2, method
    assert plan.widths == hybrid_widths(slopes, 1e-2, 2, HYBRID_WIDTH_N).tolist()
    n = 1700  # past 80 / min(slope) keys: the public call's widths at n are the plan's
    q, k, v = make(1, 4, 4, 1, n, 8, torch.float64, seed=3)
    public = poslsh.attention(q, k, v, slopes=slopes, method="hybrid", partitions=layer.get(n), backend="fused")
    assert rel_err(plan(q, k, v), public) <= 1e-12


def test_public_hybrid_decode_resolves_once_its_near_field_settled(count_resolutions):
    """A hybrid decode-shaped public call is resolved at every step while its near field still follows Nk
    (below 283 keys here: widths [17, 34, 87, 175] from there on, as a plan holds them), then once, and
    held by a plan from there on (it cost ~700 us of host work per call on the GPU machine, session 10,
    against 70 for a plan); every step equals the call resolved afresh."""
    calls, resolve = count_resolutions
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    layer = LayerPartitions(slopes, 3, "grid", 0, 0)
    q_all, k_all, v_all = make(1, 4, 2, 302, 302, 8, torch.float64, seed=8)
    for nk in (200, 201, 300, 301, 302):
        q, k, v = q_all[:, :, nk - 1:nk], k_all[:, :, :nk], v_all[:, :, :nk]
        kw = dict(slopes=slopes, method="hybrid", partitions=layer.get(nk), backend="fused")
        out = poslsh.attention(q, k, v, **kw)
        spec = resolve(q, k, v, slopes=slopes, method="hybrid", partitions=layer.get(nk))
        assert rel_err(out, dispatch.select_backend(q, spec, "fused")(q, k, v, spec)[0]) <= 1e-12, nk
    assert len(calls) == 3  # 200, 201, then 300 (stored); 301 and 302 from the plan


def test_public_reuse_keyed_on_the_arguments_as_given(count_resolutions):
    """``poslsh.attention`` finds its plan from the arguments as given, before ``method_options`` (2.5 us
    a call): so a call that sets an option its method ignores is never held (its warning comes at every
    call), an argument equal to a stored one but of a rejected type (hybrid_eps=True after hybrid_eps=1)
    is refused, and a hybrid call at a length where its near field still follows Nk is resolved afresh
    after a plan was stored at a longer one."""
    calls, resolve = count_resolutions
    q, k, v = make(1, 2, 2, 1, 8, 8, torch.float64, seed=4)
    for _ in range(3):
        with pytest.warns(IgnoredOptionWarning, match="method='window' ignores samples"):
            poslsh.attention(q, k, v, method="window", samples=8)
    assert len(calls) == 3
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    layer = LayerPartitions(slopes, 3, "grid", 0, 0)
    q_all, k_all, v_all = make(1, 4, 2, 302, 302, 8, torch.float64, seed=8)
    calls.clear()
    for nk in (300, 301, 200, 201, 302):  # settled from 283 keys (the test above)
        q, k, v = q_all[:, :, nk - 1:nk], k_all[:, :, :nk], v_all[:, :, :nk]
        kw = dict(slopes=slopes, method="hybrid", partitions=layer.get(nk), hybrid_eps=0.01)
        out = poslsh.attention(q, k, v, backend="fused", **kw)
        spec = resolve(q, k, v, **kw)
        assert rel_err(out, dispatch.select_backend(q, spec, "fused")(q, k, v, spec)[0]) <= 1e-12, nk
    assert len(calls) == 3  # 300 (stored), then 200 and 201 afresh; 301 and 302 from the plan
    poslsh.attention(q, k, v, backend="fused", slopes=slopes, method="hybrid", partitions=layer.get(302),
                     hybrid_eps=1)
    assert len(calls) == 4 and len(public_plans._PUBLIC) == 2  # held
    with pytest.raises(TypeError, match="hybrid_eps must be a real number, got bool"):
        poslsh.attention(q, k, v, backend="fused", slopes=slopes, method="hybrid", partitions=layer.get(302),
                         hybrid_eps=True)


def test_a_new_backend_or_stubbed_launches_forget_the_public_plans(count_resolutions):
    """The registry and ``host_stub`` reach the public plans by their module's name (they sit a layer
    below it); a renamed module would leave stale plans choosing among the old backends, silently."""
    from poslsh_lab.host_stub import stub_launches

    def stubbed():
        with stub_launches():
            pass

    q, k, v = make(1, 4, 4, 1, 30, 8, torch.float64, seed=2)
    for forget in (lambda: register_backend("reference", dispatch.BACKENDS["reference"].fn, priority=0), stubbed):
        poslsh.attention(q, k, v, method="window", window_eps=0.05)
        assert len(public_plans._PUBLIC) == 1
        before = dict(dispatch.BACKENDS)
        try:
            forget()
        finally:
            dispatch.BACKENDS.clear()
            dispatch.BACKENDS.update(before)
        assert len(public_plans._PUBLIC) == 0


def test_layer_partitions_share_one_grid_whatever_the_device_is_called():
    """``poslsh.attention`` keys its plans by the grid tensors' identity: every length and every spelling
    of one device ("cpu", torch.device("cpu")) must give the same (W, U) objects, or each decode step
    would be resolved afresh."""
    layer = LayerPartitions(torch.tensor(SLOPES), 3, "grid", 0, 0)
    first = layer.get(40)
    for n, device in ((41, "cpu"), (42, torch.device("cpu")), (43, "cpu")):
        parts = layer.get(n, device)
        assert parts.widths is first.widths and parts.offsets is first.offsets, (n, device)


def test_plan_call_refuses_a_return_lse_that_is_not_a_bool():
    """``return_lse="no"`` was taken as true (a tuple came back where a tensor was asked for)."""
    q, k, v = make(1, 4, 2, 1, 9, 8, torch.float64, seed=1)
    plan = AttentionPlan("window", num_heads=4, num_kv_heads=2, slopes=SLOPES)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        plan(q, k, v, return_lse="no")
    assert isinstance(plan(q, k, v, return_lse=torch.tensor(False)), torch.Tensor)
