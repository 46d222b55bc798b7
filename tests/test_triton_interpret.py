"""The Triton kernels (every method, forward and backward) run through Triton's interpreter on the CPU
(TRITON_INTERPRET=1), held to the float64 reference backend.

The environment variable must be set before the kernels are decorated, so it is set here before
poslsh's Triton package is imported (and its modules are reloaded if something imported them
earlier). The interpreter runs the kernels with 16 x 16 tiles, so these small sizes still exercise
several query and key tiles, boundary tiles, plain tiles and ragged ends.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from interpreted_triton import load_interpreted  # noqa: E402

from poslsh import alibi_slopes, attention, sample_partitions  # noqa: E402
from poslsh.attention import EMPTY_LSE, resolve_spec  # noqa: E402
from poslsh.attention.ranges import computed_tiles  # noqa: E402
from poslsh.attention.reference import reference_attention  # noqa: E402


launch = load_interpreted()
triton_attention = launch.triton_attention


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


def test_kernels_really_interpreted():
    from poslsh.attention.triton import backward, forward

    for k in (forward._fwd_kernel, forward._merge_splits, backward._bwd_dkdv_kernel, backward._bwd_dq_kernel):
        assert type(k).__name__ == "InterpretedFunction"


def rel(a, b):
    """||a - b|| / ||b||. A reference that is exactly 0 (dq when a query sees a single key: the softmax
    is constant) is compared absolutely instead (max |a| <= 1e-4 passes the 1e-5 bound)."""
    a, b = a.detach().double(), b.detach().double()
    if float(b.norm()) == 0.0:
        return float(a.abs().max()) * 1e-1
    return float((a - b).norm() / b.norm())


SLOPES = [0.8, 0.3, 0.1, 0.02]
# Window half-widths for "window" and the hybrid's near field: the diagonal only, inside one 16-wide
# tile, across tiles (30 = 14 mod 16 puts the band's edges off the tile edges), wider than any n here.
WIDTHS = [0, 5, 30, 200]


def run(method, causal, B, H, Hkv, Nq, Nk, D, *, r=3, scheme="grid", slopes=None, widths=None, kpm=None,
        config=None, backward=True, seed=0, dtype=torch.float32, tol=1e-5, layout=None):
    """The kernels against the float64 reference on one case: out, lse and (backward) dq, dk, dv."""
    torch.manual_seed(seed)
    slopes = torch.tensor(SLOPES[:H] if slopes is None else slopes, dtype=torch.float64)
    q = torch.randn(B, H, Nq, D, dtype=dtype)
    k, v = (torch.randn(B, Hkv, Nk, D, dtype=dtype) for _ in range(2))
    if layout is not None:
        q, k, v = layout(q), layout(k), layout(v)
    q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
    spec = resolve_spec(q, k, v, slopes=slopes, causal=causal, method=method, samples=r, scheme=scheme,
                        generator=torch.Generator().manual_seed(seed), key_padding_mask=kpm, window_eps=0.1)
    if method in ("window", "hybrid"):
        w = torch.tensor((WIDTHS if widths is None else widths)[:H], dtype=torch.int64)
        spec = dataclasses.replace(spec, window=w)
    out, lse = triton_attention(q, k, v, spec, config)
    assert out.shape == (B, H, Nq, D) and out.dtype == dtype and lse.dtype == torch.float32
    qd, kd, vd = (t.detach().double().contiguous().requires_grad_(backward) for t in (q, k, v))
    ro, rl = reference_attention(qd, kd, vd, spec)
    assert rel(out, ro) <= tol, ("out", rel(out, ro))
    assert rel(lse, rl) <= tol, ("lse", rel(lse, rl))
    if backward:
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref_grads = torch.autograd.grad(ro, (qd, kd, vd), do.double())
        for name, a, b in zip("qkv", grads, ref_grads):
            assert rel(a, b) <= tol, (name, rel(a, b))
    return spec, out, lse


METHODS = ["exact", "window", "lsh", "hybrid"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_grouped_kv_odd_length(method, causal):
    """2^5 + 1 positions, 4 heads over 2 KV heads, four different slopes and widths."""
    run(method, causal, 1, 4, 2, 33, 33, 16)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [True, False])
def test_fewer_queries_than_keys_batch_two(method, causal):
    """Queries are the last Nq of Nk positions (chunked prefill); two batch rows; D = 32."""
    run(method, causal, 2, 2, 2, 17, 40, 32)


@pytest.mark.parametrize("method,causal,scheme", [("lsh", True, "cut"), ("hybrid", False, "cut"),
                                                  ("window", True, "grid"), ("exact", False, "grid")])
def test_multi_query_head_dim_not_power_of_two(method, causal, scheme):
    """One KV head for three query heads (H not 2^k), D = 24 (padded to 32 inside), 2^5 - 1 positions."""
    run(method, causal, 1, 3, 1, 31, 31, 24, scheme=scheme)


@pytest.mark.parametrize("method", METHODS)
def test_key_padding(method):
    """Left-padded row 0 (its first 20 keys masked: causal rows 0..19 see no key) and random holes
    in row 1: masked keys get no weight, rows without a key give 0 and EMPTY_LSE, gradients match."""
    torch.manual_seed(1)
    kpm = torch.rand(2, 37) > 0.3
    kpm[0, :20] = False
    kpm[1, -3:] = False  # right padding too
    spec, out, lse = run(method, True, 2, 2, 1, 37, 37, 16, kpm=kpm)
    assert bool((out[0, :, :20] == 0).all()) and bool((lse[0, :, :20] == EMPTY_LSE).all())
    run(method, False, 2, 2, 2, 30, 37, 16, kpm=kpm)


@pytest.mark.parametrize("method", METHODS)
def test_decoding_split_keys(method):
    """One query (and three) against a long cache: the key range split over several programs and
    merged by LSE, forced and chosen automatically, with padding."""
    run(method, True, 1, 4, 2, 1, 150, 16, config={"splits": 4}, backward=False)
    run(method, True, 1, 2, 2, 3, 90, 16, config={"splits": 3}, backward=False, kpm=torch.rand(1, 90) > 0.2)
    run(method, False, 1, 2, 1, 2, 70, 16, backward=False)  # automatic split choice


@pytest.mark.parametrize("method", ["window", "lsh", "hybrid"])
def test_integer_position_path(method):
    """Sequences of 2^23 positions or more compare positions as integers (float32 would round them)."""
    run(method, True, 1, 4, 2, 33, 40, 16, config={"float_positions": False})
    run(method, False, 1, 2, 2, 20, 33, 16, config={"float_positions": False}, backward=False)


@pytest.mark.parametrize("method", METHODS)
def test_lengths_one_and_two(method):
    run(method, True, 1, 2, 2, 1, 1, 16)
    run(method, False, 1, 2, 1, 2, 2, 16, backward=False)


def test_slope_zero_and_unbounded_blocks():
    """A slope-0 head (one block, W = 2^62; exact weights 1 everywhere) beside small slopes: plain tiles."""
    for method in METHODS:
        run(method, True, 1, 3, 3, 48, 48, 16, r=1, slopes=[0.0, 1e-3, 0.02], widths=[47, 20, 3])


def test_float16_forward():
    for method in ("exact", "lsh"):
        run(method, True, 1, 2, 2, 24, 24, 16, dtype=torch.float16, backward=False, tol=5e-3)


def test_offsets_past_2_31_elements():
    """A strided view whose rows lie 2^24 elements apart (as a [B, N, H, D] view of a long sequence
    puts them H x D apart): position x stride passes 2^31 at position 128, where 32-bit offsets
    wrapped and read the wrong rows (or crashed). Only the touched rows are ever written (pages of
    the 10 GiB virtual buffer stay unmapped), forward and backward, against the float64 reference.
    (The stride fits 32 bits, so the kernel gets it as an int32 and only the products overflow.)"""
    n, d, stride = 160, 16, 2**24
    store = torch.empty(n * stride + d, dtype=torch.float32)

    def spread(x):  # [1, 1, n, d] -> the same values in rows 2^20 elements apart
        view = store.as_strided((1, 1, n, d), (0, 0, stride, 1))
        view.copy_(x)
        return view

    for method in ("window", "lsh"):
        # one tensor at a time lives in the strided store: q, k and v are the same view here
        torch.manual_seed(0)
        x = torch.randn(1, 1, n, d)
        view = spread(x).requires_grad_(True)
        slopes = torch.tensor([0.3], dtype=torch.float64)
        spec = resolve_spec(view, view, view, slopes=slopes, method=method, samples=2, window_eps=0.1,
                            generator=torch.Generator().manual_seed(0))
        out, lse = triton_attention(view, view, view, spec)
        xd = x.double().requires_grad_(True)
        ro, rl = reference_attention(xd, xd, xd, spec)
        assert rel(out, ro) <= 1e-5 and rel(lse, rl) <= 1e-5, method
        do = torch.randn_like(out)
        (g,) = torch.autograd.grad(out, (view,), do)
        (rg,) = torch.autograd.grad(ro, (xd,), do.double())
        assert rel(g, rg) <= 1e-5, (method, rel(g, rg))


def test_reference_is_sensitive():
    """The tolerances above would catch a kernel that used different blocks: moving one sample's
    offset by one position moves the reference far beyond 1e-5."""
    torch.manual_seed(2)
    parts = sample_partitions(33, alibi_slopes(2), 2, generator=torch.Generator().manual_seed(2))
    w, u = parts.widths.clone(), parts.offsets.clone()
    u[0, 0] = (u[0, 0] + 1) % w[0, 0]
    moved = type(parts)(parts.n, parts.slopes, "grid", widths=w, offsets=u)
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    out, _ = triton_attention(q, k, v, resolve_spec(q, k, v, method="lsh", partitions=parts))
    ro, _ = reference_attention(q.double(), k.double(), v.double(),
                                resolve_spec(q.double(), k.double(), v.double(), method="lsh", partitions=moved))
    assert rel(out, ro) > 1e-4


def test_dispatch_every_method_trains():
    """poslsh.attention(..., backend="triton") runs the kernels for every method, agrees with the
    reference backend, and back-propagates."""
    torch.manual_seed(3)
    parts = sample_partitions(21, alibi_slopes(4), 3, generator=torch.Generator().manual_seed(3))
    for method in METHODS:
        q = torch.randn(1, 4, 21, 16, requires_grad=True)
        k = torch.randn(1, 2, 21, 16, requires_grad=True)
        v = torch.randn(1, 2, 21, 16, requires_grad=True)
        kw = dict(method=method, return_lse=True, hybrid_eps=0.3, window_eps=0.05,
                  partitions=parts if method in ("lsh", "hybrid") else None)
        out, lse = attention(q, k, v, backend="triton", **kw)
        ref, ref_lse = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5, method
        out.sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_general_kernel_partitions_and_refusals():
    """LSH partitions drawn for a non-ALiBi kernel have the same weights (collision counts): the kernel
    computes them; exact, window and hybrid with a general kernel are refused (their bias is e^{-m|i-j|})."""
    from poslsh.attention.dispatch import BACKENDS
    from poslsh.positional_kernels import power_law

    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 26, 16) for _ in range(3))
    g = torch.Generator().manual_seed(4)
    out, lse = attention(q, k, v, method="lsh", kernel=power_law(0.7), samples=3, generator=g, backend="triton",
                         causal=False, return_lse=True)
    g = torch.Generator().manual_seed(4)
    ref, ref_lse = attention(q.double(), k.double(), v.double(), method="lsh", kernel=power_law(0.7), samples=3,
                             generator=g, backend="reference", causal=False, return_lse=True)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    for method in ("exact", "window", "hybrid"):
        spec = resolve_spec(q, k, v, method=method, kernel=power_law(0.7), samples=2)
        assert not BACKENDS["triton"].accepts(q, spec), method
    assert BACKENDS["triton"].accepts(q, resolve_spec(q, k, v, method="exact"))


@pytest.mark.parametrize("causal", [True, False])
def test_plain_tiles_where_predicted(causal):
    """``ranges.computed_tiles`` mirrors the kernel's ranges: exact and window have plain tiles (every pair
    kept, no per-element test), the hybrid's near field adds plain tiles where plain LSH (r = 4, narrow
    blocks) has none; edges on and off the tile grid (w = 46, 30 = 14 mod 16, 47). The results are
    exact against the reference (``run``), so a plain tile that should have been tested would show.
    The hybrid's backward here bidirectionally (both edges of each band; its causal backward is held to
    the reference in test_variants, test_key_padding and test_grouped_kv_odd_length)."""
    slopes, widths = [0.5, 0.25, 0.1], [46, 30, 47]
    spec, _, _ = run("hybrid", causal, 1, 3, 3, 100, 100, 16, r=4, slopes=slopes, widths=widths, backward=not causal)
    lsh = dataclasses.replace(spec, method="lsh", window=None)
    assert computed_tiles(lsh, 100, 100, 16, 16)["interior"] == 0
    tiles = computed_tiles(spec, 100, 100, 16, 16)
    assert tiles["interior"] >= 10 and tiles["boundary"] > 0
    spec, _, _ = run("window", causal, 1, 3, 3, 100, 100, 16, slopes=slopes, widths=widths, backward=False)
    assert computed_tiles(spec, 100, 100, 16, 16)["interior"] >= 10
    spec, _, _ = run("exact", causal, 1, 1, 1, 100, 100, 16, slopes=[0.1], backward=False)
    tiles = computed_tiles(spec, 100, 100, 16, 16)
    assert tiles["boundary"] == 7 and tiles["interior"] == (21 if causal else 42)


@pytest.mark.parametrize("method,config", [(m, None) for m in METHODS] + [("window", {"delta": "kernel"}),
                                                                         ("lsh", {"delta": "dq"})])
def test_lse_gradient(method, config):
    """The LSE is differentiable (merges of partial results by LSE, ring and split forms, need it): the
    gradients of out . dO + lse . dL match the reference's, padding included (and with the delta kernel or
    the dQ kernel's delta, which subtract dL themselves)."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(3))
    kpm = torch.rand(1, 30) > 0.2
    spec = resolve_spec(q, k, v, method=method, slopes=[0.3, 0.05], samples=2, key_padding_mask=kpm, window_eps=0.1,
                        generator=torch.Generator().manual_seed(7))
    out, lse = triton_attention(q, k, v, spec, config)
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ro, rl = reference_attention(qd, kd, vd, spec)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    live = rl > -1e29  # rows that see a key (EMPTY_LSE rows have no gradient)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl * live).sum(), (q, k, v))
    ref = torch.autograd.grad((ro * do.double()).sum() + (rl * dl.double() * live).sum(), (qd, kd, vd))
    for name, a, b in zip("qkv", grads, ref):
        assert rel(a, b) <= 1e-5, (name, rel(a, b))


# The candidate variants of bench/kernel_sweep.py (issue 23), off by default: each is a config key. "wide"
# splits the heads at work 10 (window widths 30, 200 -> capped 40 vs 0, 5; LSH mean block widths 14, 39 vs
# 3, 7 here), so both launches run, each with its own tiles (maxnreg: a launch option the interpreter ignores;
# here it routes the forward through the grouped launch, as on the GPU).
VARIANTS = {
    "delta_kernel": {"delta": "kernel"},
    "delta_dq": {"delta": "dq"},
    "wide": {"maxnreg": 128, "wide": {"min_work": 10, "BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 2, "BWD_BLOCK_M": 32,
                                      "BWD_BLOCK_N": 16, "DQ_BLOCK_M": 32, "DQ_BLOCK_N": 32, "maxnreg": 168}},
    # K and V by tensor descriptors (TMA), the wide heads' launch with its own key tiles (another descriptor; exact:
    # every head is wide)
    "tma": {"tma": True, "wide": {"min_work": 10, "BLOCK_N": 32}},
    # the backward's loop tiles by descriptors: dK/dV's queries, dQ's keys
    "bwd_tma": {"bwd_tma": True, "wide": {"min_work": 10, "BWD_BLOCK_M": 32, "DQ_BLOCK_N": 32}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_variants(method, variant):
    """Each variant against the reference: GQA, odd lengths, Nq < Nk (causal); padding, two batch rows,
    MQA (bidirectional)."""
    cfg = VARIANTS[variant]
    spec, _, _ = run(method, True, 1, 4, 2, 33, 40, 16, config=cfg)
    if "wide" in cfg:  # a kernel whose keys the wide entry sets ran two launches (exact: every head is wide: one)
        plan = launch.plan_for(spec, 40, torch.device("cpu"))
        for group, reads in ((0, launch.FWD_KEYS), (2, launch.DKDV_KEYS), (0, launch.DQ_KEYS)):
            expect = 2 if method != "exact" and set(cfg["wide"]) & reads else 1
            assert len(launch.head_groups(plan, cfg, group, reads)) == expect, (group, sorted(reads))
        if cfg.get("tma"):  # the launches read K and V through descriptors, one block shape per head group
            recipes = list(plan.recipes.values())
            assert recipes and {tuple(g[2]) for g in recipes[-1].groups} == (
                {(1, 1, 32, 16)} if method == "exact" else {(1, 1, 16, 16), (1, 1, 32, 16)})
    run(method, False, 2, 2, 1, 21, 21, 16, config=cfg, kpm=torch.rand(2, 21) > 0.2)


def test_unknown_config_keys_are_refused_before_any_work():
    """A config key the kernels do not read (a deleted variant such as session 16's ``lazy``, or a misspelling)
    is an error naming it, not an option silently ignored; every key the shipped table uses is accepted."""
    q = k = v = torch.randn(1, 2, 8, 16)
    spec = resolve_spec(q, k, v, method="window", slopes=[0.5, 0.1], window_eps=0.1)
    with pytest.raises(ValueError, match=r"config: unknown keys \['lazy'\]"):
        triton_attention(q, k, v, spec, {"lazy": True})
    with pytest.raises(ValueError, match=r"config\['wide'\]: unknown keys \['bwd_fused'\]"):
        triton_attention(q, k, v, spec, {"wide": {"min_work": 4, "bwd_fused": True}})
    for wide in (True, {"BLOCK_N": 64}):  # not a dict (a TypeError traceback before), no threshold
        with pytest.raises(ValueError, match=r"config\['wide'\] must be a dict with 'min_work'"):
            triton_attention(q, k, v, spec, {"wide": wide})
    for key, cfg in launch._TUNED.items():
        launch._check_config(cfg)  # raises on a key the table holds and the check does not know


def test_tma_needs_aligned_strides():
    """The copy engine reads 16-byte aligned rows only: fp16 rows of 12 (24 bytes) go by pointers, and the
    result is the same function either way."""
    q, k = torch.randn(1, 2, 8, 16, dtype=torch.float16), torch.randn(1, 2, 8, 12, dtype=torch.float16)
    assert launch.tma_ready(q) and not launch.tma_ready(k) and not launch.tma_ready(q[..., 1:])
    run("window", True, 1, 2, 2, 20, 20, 12, config={"tma": True}, backward=False, dtype=torch.float16, tol=2e-3)


@pytest.mark.parametrize("method", METHODS)
def test_tma_split_keys(method):
    """Descriptor loads in the split-key forward (few query rows against many keys, merged by the last split)."""
    run(method, True, 1, 4, 2, 3, 70, 16, config={"tma": True, "splits": 3}, backward=False)


def test_head_groups_partition():
    """``head_groups``: every head in exactly one launch, wide heads (work >= min_work) with the wide entry's
    keys over the config's, each launch in decreasing work; KV heads by their widest query head."""
    torch.manual_seed(0)
    q = torch.randn(1, 6, 20, 16)
    spec = resolve_spec(q, q, q, method="window", slopes=[0.1] * 6, window_eps=0.1)
    spec = dataclasses.replace(spec, window=torch.tensor([3, 50, 7, 90, 1, 12]))
    plan = launch.plan_for(spec, 20, torch.device("cpu"))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, wide={"min_work": 10, "BLOCK_N": 64})
    (wide_order, wide_cfg), (narrow_order, narrow_cfg) = launch.head_groups(plan, cfg)
    assert wide_order.tolist() == [3, 1, 5] and narrow_order.tolist() == [2, 0, 4]
    assert wide_cfg == dict(BLOCK_M=16, BLOCK_N=64) and narrow_cfg == dict(BLOCK_M=16, BLOCK_N=16)
    # KV heads of (3, 50), (7, 90), (1, 12): all wide at 10 (no empty narrow launch), split at 60
    assert [o.tolist() for o, _ in launch.head_groups(plan, cfg, 2)] == [[1, 0, 2]]
    assert [o.tolist() for o, _ in launch.head_groups(plan, dict(cfg, wide={"min_work": 60}), 2)] == [[1], [0, 2]]
    assert launch.head_groups(plan, dict(BLOCK_M=16))[0][0] is plan.order
    # a wide entry of forward tiles only leaves the backward's kernels one launch each, every head in work order
    assert [o.tolist() for o, c in launch.head_groups(plan, cfg, 2, launch.DKDV_KEYS)] == [plan.kv_order(2).tolist()]
    (order, one_cfg), = launch.head_groups(plan, cfg, reads=launch.DQ_KEYS)
    assert order is plan.order and one_cfg is cfg
    assert len(launch.head_groups(plan, cfg, reads=launch.FWD_KEYS)) == 2
    with pytest.raises(ValueError, match="min_work"):
        launch.head_groups(plan, dict(cfg, wide={"BLOCK_N": 64}))


def test_split_tickets_are_zero_between_calls():
    """Each split query tile's last program merges and zeroes its ticket: repeated calls through one
    cached recipe (the tickets it holds) give the same output as the first and as no split, and leave
    every ticket at 0 (a ticket left at 1 would make the next call's merge wait for a split that never
    comes: its output never written)."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float16) for n in (1, 150, 150))
    spec = resolve_spec(q, k, v, slopes=torch.tensor([0.3, 0.05]), method="window", window_eps=1e-3, q_offset=149)
    plain, plain_lse = triton_attention(q, k, v, spec, config={"splits": 1})
    outs = [triton_attention(q, k, v, spec, config={"splits": 4}) for _ in range(3)]
    recipes = [r for r in launch.plan_for(spec, 150, q.device).recipes.values() if r.tickets is not None]
    assert recipes and all(int(r.tickets.abs().sum()) == 0 for r in recipes)
    for out, lse in outs:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
        assert rel(out, plain) < 1e-3 and rel(lse, plain_lse) < 1e-5


IMPORT_AS_VERSION = """
import sys, warnings
import triton
triton.__version__ = sys.argv[1]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        import poslsh.attention.triton
        print("imported")
    except ImportError as err:
        print("ImportError:", err)
print("warned:", [str(w.message) for w in caught if "poslsh's Triton kernels" in str(w.message)])
"""


@pytest.mark.parametrize("version, imported, warned", [("3.5.1", False, False), ("3.6.0", True, False),
                                                         ("3.9.0", True, False), ("3.10.0", True, True)])
def test_the_backend_names_the_triton_releases_it_is_tested_with(version, imported, warned):
    """Below the tested releases (``TESTED_TRITON``) the package refuses to import, naming the version to install
    (the dispatcher then leaves the backend off and says why); above them it warns. Before: triton 3.3 failed
    on a missing module, which the dispatcher took for an absent triton, without a word; 3.4 and 3.5 imported
    (untested on a GPU; their interpreter fails in ``compat.patch_interpreter``)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", IMPORT_AS_VERSION, version], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    if imported:
        assert "imported" in out.splitlines()[0], out
    else:
        assert f"need triton >=3.6,<3.10, found {version} (pip install 'triton>=3.6,<3.10')" in out, out
    assert (f"tested with triton >=3.6,<3.10; found {version}" in out) == warned, out
