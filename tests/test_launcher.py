"""The pre-bound Triton launches (``triton.launch.Launcher``, ``ForwardRecipe``): a launch reuses a compiled
kernel only for arguments that specialise alike; a recipe cached from earlier calls launches what a recipe
built for the call does (``launch.PREBOUND = False``: the JIT path), on the CPU through the launch stubs
(``host_stub``); on CUDA (tests/test_cuda_public_calls.py) its outputs are the JIT's, bit for bit, as the specialisations change (key counts
1, multiples of 16 and not, aligned and misaligned tensors), and the reference's."""

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


def _int_key(x):
    return launch._launch_key((), (x,))


def _tensor_key(t):
    return launch._launch_key((t,), ())


def test_launch_key_separates_what_the_jit_specialises_on():
    """Ints: 1, multiples of 16, others, and int32 / int64 widths differ (0 from a non-multiple of 16 too:
    False == 0 in a tuple key); a tensor's 16-byte alignment does (its dtype is the recipe's)."""
    keys = [_int_key(x) for x in (0, 1, 16, 17, 2**31 + 16, 2**64, -1, -2)]
    assert len(set(keys)) == 8
    assert _int_key(33) == _int_key(35) and _int_key(32) == _int_key(48)
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, misaligned = buf[:32], buf[1:33]  # 2-byte offset
    assert _tensor_key(aligned) == _tensor_key(buf[8:40])  # 16 bytes further: aligned too
    assert _tensor_key(aligned) != _tensor_key(misaligned)


def _cache_steps(hkv, d, dtype, g):
    """(name, k, v) of decode steps: a growing cache (key counts 1, 15, 16, 17, 31, 32, 33, 64, 65, and 700,
    701, 1024, which split their keys), the same counts on a cache whose base is 2 bytes off 16-byte
    alignment, and caches grown by concatenation (new contiguous tensors each step: k's and v's strides
    change with Nk)."""
    counts = (1, 15, 16, 17, 31, 32, 33, 64, 65, 700, 701, 1024)
    n = counts[-1]
    buf = torch.randn(2, 1, hkv, n, d, generator=g).to(dtype)
    flat = torch.randn(2, hkv * n * d + 1, generator=g).to(dtype)
    shifted = flat[:, 1:].view(2, 1, hkv, n, d)  # misaligned base pointers
    steps = [("aligned", buf[0][:, :, :n], buf[1][:, :, :n]) for n in counts]
    steps += [("misaligned", shifted[0][:, :, :n], shifted[1][:, :, :n]) for n in counts]
    steps += [("concatenated", buf[0][:, :, :n].contiguous(), buf[1][:, :, :n].contiguous()) for n in (40, 41, 48)]
    return steps


def _launches(record, inputs):
    """The recorded launches as (kernel, grid, arguments then constexprs), tensors by what they are:
    an input or plan array by its address, a tensor allocated by the call (its address differs between
    calls) by its dtype, allocation size, offset in it and alignment."""
    known = {t.untyped_storage().data_ptr() for t in inputs}

    def norm(x):
        if not isinstance(x, torch.Tensor):
            return x
        if x.untyped_storage().data_ptr() in known:
            return "input", x.dtype, x.data_ptr()
        return "allocated", x.dtype, x.untyped_storage().nbytes(), x.storage_offset(), x.data_ptr() % 16

    out = []
    for entry in record:
        args = entry[3] + entry[4] if entry[0] == "jit" else entry[3]  # a compiled kernel takes both in one list
        out.append((entry[1], tuple(entry[2]), tuple(map(norm, args))))
    return out


@pytest.mark.parametrize("method", ["window:0.01", "lsh:4", "exact"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cached_recipes_launch_as_the_jit_path(method, dtype):
    """Each decode step (growing, misaligned and concatenated caches; Nk crossing multiples of 16; Nk = 1)
    through a plan whose recipes and compiled kernels were cached by the earlier steps launches exactly
    what the JIT path (``PREBOUND = False``: a recipe built for the call, every launch through the JIT)
    launches for it: kernels, grids, arguments (the key counts, offsets, strides, tiles per split, the
    plan's arrays, the allocated outputs' layout), constexprs. CUDA tiles and an H100's split schedule
    (the stubs), so the exact and window decodes of 700+ keys split them and merge."""
    from poslsh.attention.plan import AttentionPlan
    from poslsh_lab.host_stub import stub_launches

    h, hkv, d = 4, 2, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, h, 1, d, generator=g).to(dtype)
    record, kinds, kernels = [], [], set()
    with stub_launches(record=record):
        plan = AttentionPlan(method, num_heads=h, num_kv_heads=hkv, slopes=[0.5, 0.1, 0.05, 0.01], backend="triton")
        for name, k, v in _cache_steps(hkv, d, dtype, g):
            record.clear()
            plan(q, k, v)
            cached = list(record)
            kinds += [(name, k.shape[2], entry[0]) for entry in cached]
            record.clear()
            launch.PREBOUND = False
            try:
                plan(q, k, v)
            finally:
                launch.PREBOUND = True
            tplan = plan._tplan
            inputs = [q, k, v] + [getattr(tplan, f) for f in ("W", "U", "S", "E", "order", "slope2", "win", "win_r")]
            inputs += list(launch._UNREAD.values())
            assert all(entry[0] == "jit" for entry in record)
            assert _launches(cached, inputs) == _launches(record, inputs), (name, k.shape[2])
            assert len(cached) == 1, (name, k.shape[2])  # one launch: the split programs merge themselves
            kernels |= {(entry[1], entry[2][1] > 1) for entry in record}
    if not method.startswith("lsh"):  # the split path ran (its partials, tickets and outputs compared too)
        assert ("_fwd_kernel", True) in kernels
    # a launch whose varying arguments specialise as an earlier one's reuses its compiled kernel
    assert ("aligned", 33, "compiled") in kinds and ("aligned", 65, "compiled") in kinds
    assert ("misaligned", 1, "jit") in kinds  # k misaligned: never the aligned launch's kernel


def test_a_changed_call_shape_misses_the_cached_launch():
    """A launch is reused only for its call shape: another q stride, dtype, mask presence, position
    arithmetic, KV head count or scale builds its own recipe; a key count that divides by 16, a misaligned k, or the strides of a concatenated cache
    (head dim 24: Nk * 24 divides by 16 for even Nk only) go through the JIT first (their specialisation
    differs), and the next call like them reuses what it compiled."""
    from poslsh.attention.plan import AttentionPlan
    from poslsh_lab.host_stub import stub_launches

    g = torch.Generator().manual_seed(6)
    record = []
    slopes = [0.5, 0.1, 0.05, 0.01]
    q = torch.randn(1, 4, 1, 24, generator=g)
    kv = torch.randn(2, 1, 4, 80, 24, generator=g)
    with stub_launches(record=record):
        plan = AttentionPlan("window:0.01", num_heads=4, slopes=slopes, backend="triton")

        def kinds(q, k, v):
            record.clear()
            plan(q, k, v)
            return {entry[0] for entry in record}

        def cache(n):
            return kv[0][:, :, :n], kv[1][:, :, :n]

        assert kinds(q, *cache(34)) == {"jit"}
        assert kinds(q, *cache(36)) == {"compiled"}  # Nk, q_offset: neither 1 nor a multiple of 16, as before
        assert kinds(q, *cache(48)) == {"compiled"}  # Nk % 16 == 0: not specialised (forward.DECODE_VARYING)
        recipes = len(plan._tplan.recipes)
        # 1000 and 2^23 + 3 keys (never read by the stubs: one position, expanded), alike but for the
        # positions past float32's exact range, which take the integer path (a constexpr of the recipe's)
        one = torch.empty(1, 4, 1, 24)
        assert kinds(q, one.expand(1, 4, 1000, 24), one.expand(1, 4, 1000, 24)) == {"jit"}
        recipes = len(plan._tplan.recipes)
        assert kinds(q, one.expand(1, 4, 2**23 + 3, 24), one.expand(1, 4, 2**23 + 3, 24)) == {"jit"}
        assert len(plan._tplan.recipes) == recipes + 1
        assert all(entry[4][9] is False for entry in record if entry[1] == "_fwd_kernel")  # FDIV
        recipes += 1
        q_t = torch.randn(1, 1, 4, 24, generator=g).transpose(1, 2)  # other strides
        assert kinds(q_t, *cache(36)) == {"jit"} and len(plan._tplan.recipes) == recipes + 1
        assert kinds(q.half(), *(t.half() for t in cache(36))) == {"jit"} and len(plan._tplan.recipes) == recipes + 2
        record.clear()
        plan(q, *cache(36), key_padding_mask=torch.ones(1, 36, dtype=torch.bool))  # a mask: HAS_KPM
        assert {entry[0] for entry in record} == {"jit"} and len(plan._tplan.recipes) == recipes + 3
        flat = torch.randn(4 * 80 * 24 + 1, generator=g)[1:].view(1, 4, 80, 24)
        assert kinds(q, flat[:, :, :36], cache(36)[1]) == {"jit"}  # misaligned k
        assert kinds(q, *(t.contiguous() for t in cache(37))) == {"jit"}  # head stride 37 * 24: not a multiple of 16
        assert kinds(q, *(t.contiguous() for t in cache(39))) == {"compiled"}
        # triton_attention's plans are cached per spec (``plan_for``), whatever the KV heads: the recipe's
        # key holds them
        from poslsh.attention.dispatch import resolve_spec

        for hkv, kind in ((4, "jit"), (4, "compiled"), (2, "jit")):
            k, v = kv[0][:, :hkv, :36], kv[1][:, :hkv, :36]
            spec = resolve_spec(q, k, v, slopes=slopes, method="window", window_eps=0.01)
            record.clear()
            launch.triton_attention(q, k, v, spec)
            assert {entry[0] for entry in record} == {kind}, hkv
        for scale in (0.3, 0.7):  # the scale too (a float: the JIT does not specialise on it; the recipe holds it)
            spec = resolve_spec(q, k, v, slopes=slopes, method="window", window_eps=0.01, scale=scale)
            record.clear()
            launch.triton_attention(q, k, v, spec)
            assert [entry[3][40] for entry in record] == [scale * launch.LOG2E]  # qk_scale


def test_decoding_arguments_are_not_specialised():
    """A decoding step changes Nk, q_offset and the key tiles per split at every call. The forward kernel
    asks Triton not to specialise them (``forward.DECODE_VARYING``): otherwise a generation compiles a new
    variant whenever one changes class (== 1, divisible by 16), a stall of a second mid-generation
    (bench/specialize_check.py counts them on a GPU: 2 stalls per method before, none after for exact and
    window; LSH kept one step of 96 ms that compiled no forward variant: the grid plan's rebuild at 4097 keys
    or the merge's split count, which is now unspecialised as well). The names must stay the kernels'
    parameters."""
    for kernel, varying in ((launch._fwd_kernel, {"Nk", "q_offset", "split_tiles"}),):
        asked = getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
        assert set(asked or ()) == varying
        assert set(asked) <= set(kernel.arg_names)


def test_fitted_tiles_stay_within_the_limit():
    """``fit_shared_memory``: the tuned head dims keep their tiles on an H100; head dims up to 256 and a
    consumer card's 99 KB get tiles whose every kernel fits, in every dtype and method, the wide heads' launches
    included."""
    for method in ("exact", "window", "lsh", "hybrid"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (64, 96, 128, 160, 256):
                for limit in (launch.HOPPER_SHARED, 101376):
                    cfg = launch.default_config(method, dtype, d, "cuda", False, limit)
                    assert max(launch.shared_bytes(cfg, d, dtype).values()) <= limit, (method, dtype, d, limit, cfg)
                    if "wide" in cfg:  # the wide heads' own launches too (the window's 64-key tiles took 113 KB)
                        wide = launch.wide_config(cfg)
                        assert max(launch.shared_bytes(wide, d, dtype).values()) <= limit, (method, dtype, d, wide)
                    assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]) >= 16
        assert launch.default_config(method, torch.bfloat16, 128) == launch._cuda_config(method, torch.bfloat16, 128,
                                                                                         False)


def test_split_tickets_outlive_evicted_recipes():
    """The split forward's tickets belong to the plan, not to the recipe that first used them: a CUDA graph
    that captured a split launch writes them at every replay, so evicting that recipe (more call shapes
    than ``_RECIPES_PER_PLAN``) must not free them; launches of one grid size share them."""
    from poslsh.attention.plan import AttentionPlan
    from poslsh_lab.host_stub import stub_launches

    g = torch.Generator().manual_seed(9)
    k, v = (torch.randn(1, 4, 1000, 64, generator=g) for _ in range(2))
    record = []
    with stub_launches(record=record):
        plan = AttentionPlan("window:0.001", num_heads=4, slopes=[0.5, 0.1, 0.05, 0.001], backend="triton")
        plan(torch.randn(1, 4, 1, 64, generator=g), k, v)
        first = [entry[3][7] for entry in record if entry[1] == "_fwd_kernel" and entry[2][1] > 1]
        assert first, "the decode step split its keys"
        first_recipes = list(plan._tplan.recipes.values())
        for nq in range(2, 17):  # other call shapes (one recipe each), up to DECODE_ROWS query rows
            for mask in (None, torch.ones(1, 1000, dtype=torch.bool)):
                plan(torch.randn(1, 4, nq, 64, generator=g), k, v, key_padding_mask=mask)
        tplan = plan._tplan
        assert not any(r is f for r in tplan.recipes.values() for f in first_recipes)  # evicted
        assert any(t is first[0] for t in tplan.tickets.values())
        assert all(r.tickets is None or any(r.tickets is t for t in tplan.tickets.values())
                   for r in tplan.recipes.values())
        # the partials too: what the first split launch wrote into lies in a buffer the plan holds
        held = [b.data_ptr() for b in tplan.partials.values()]
        assert all(entry[3][3].untyped_storage().data_ptr() in held for entry in record
                   if entry[1] == "_fwd_kernel" and entry[2][1] > 1)


def test_every_launch_asks_for_fused_multiply_adds(monkeypatch):
    """Every kernel launch (forward, split-key forward, the backward's delta, dQ and dK/dV kernels) passes
    ``enable_fp_fusion=True``: Triton 3.9 warns that its default turns fused multiply-adds off in 3.10, and
    the tile configs and machine-code budgets were measured with them on."""
    from poslsh.attention import resolve_spec

    kernel_type = type(launch._fwd_kernel)  # the interpreter's function, or the JIT's on CUDA
    seen = []
    run = kernel_type.run

    def spy(self, *args, **kwargs):
        seen.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", spy)
    monkeypatch.setattr(launch, "PREBOUND", False)  # on CUDA too, every launch through the JIT (none from a cache)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g).half().to(device).requires_grad_() for _ in range(3))
    spec = resolve_spec(q, k, v, method="window", window_eps=1e-2)
    out, lse = launch.triton_attention(q, k, v, spec, config={"delta": "kernel"})
    out.float().sum().backward()
    launch.triton_attention(q[:, :, -1:].detach(), k.detach(), v.detach(), spec, config={"splits": 2})
    assert {name for name, _ in seen} == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    assert all(fusion is True for _, fusion in seen), seen
