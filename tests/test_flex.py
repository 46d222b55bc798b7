"""The FlexAttention backend on the CPU.

FlexAttention has no CPU backward and, run eagerly on the CPU, ignores the BlockMask's sparsity
(it applies score_mod and mask_mod to all pairs). So these tests check (1) the score_mod/mask_mod
of every method against the float64 reference, forward, and (2) the block masks themselves: every
kept pair lies in a listed block, "full" blocks hold only kept pairs, and the transposed (key-block)
lists match the query-block lists. The compiled GPU path and its backward are checked on the H200
by bench/gpu_dev.py and poslsh bench (bench/NOTES.md).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("torch.nn.attention.flex_attention")

from poslsh import alibi_slopes  # noqa: E402
from poslsh.attention import EMPTY_LSE, resolve_spec  # noqa: E402
from poslsh.attention.flex.backend import (_mods, _ranges, flex_attention_spec, normalize_grid,  # noqa: E402
                                           range_block_mask, supports_flex)
from poslsh.attention.reference import dense_log_weights, reference_attention  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = [
    ("lsh", True, "grid"), ("lsh", False, "grid"), ("lsh", True, "cut"), ("lsh", False, "cut"),
    ("exact", True, None), ("exact", False, None), ("window", True, None), ("window", False, None),
    ("hybrid", True, "grid"), ("hybrid", False, "grid"), ("hybrid", True, "cut"), ("hybrid", False, "cut"),
]
# Hybrid: steep slopes (short blocks, so the band reaches beyond their union) and near-field
# half-widths set by hand so that both fields matter at these small n (hybrid_widths would make
# small-slope heads all exact): 0 (diagonal only), inside a block of 16, across blocks, wider than 32.
HYBRID_SLOPES = torch.tensor([0.9, 0.5, 0.2, 0.1], dtype=torch.float64)
HYBRID_WINDOW = torch.tensor([0, 5, 17, 40])


def with_hybrid_window(spec):
    return dataclasses.replace(spec, window=HYBRID_WINDOW) if spec.method == "hybrid" else spec


@pytest.mark.parametrize("method,causal,scheme", CASES)
def test_forward_matches_reference(method, causal, scheme):
    torch.manual_seed(0)
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 45, 70, 16
    q, k, v = torch.randn(B, H, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    slopes = HYBRID_SLOPES if method == "hybrid" else alibi_slopes(H) * 0.3
    spec = resolve_spec(q, k, v, slopes=slopes, causal=causal, method=method, samples=3, scheme=scheme or "grid",
                        window_eps=0.1, generator=torch.Generator().manual_seed(0))
    spec = with_hybrid_window(spec)
    out, lse = flex_attention_spec(q, k, v, spec, block=16)
    qd, kd, vd = q.double(), k.double(), v.double()
    spec64 = resolve_spec(qd, kd, vd, slopes=slopes, causal=causal, method=method, window_eps=0.1,
                          partitions=spec.partitions if method in ("lsh", "hybrid") else None)
    ro, rl = reference_attention(qd, kd, vd, with_hybrid_window(spec64))
    assert rel(out, ro) <= 1e-5 and rel(lse, rl) <= 1e-5


def test_key_padding_mask_and_empty_rows():
    torch.manual_seed(1)
    B, H, N, D = 2, 2, 24, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[0, :5] = False  # causal rows 0..4 of batch 0 see no key
    kpm[1, 10:] = False
    spec = resolve_spec(q, k, v, causal=True, method="lsh", samples=2, key_padding_mask=kpm,
                        generator=torch.Generator().manual_seed(1))
    out, lse = flex_attention_spec(q, k, v, spec, block=8)
    spec64 = resolve_spec(q.double(), k.double(), v.double(), causal=True, method="lsh",
                          partitions=spec.partitions, key_padding_mask=kpm)
    ro, rl = reference_attention(q.double(), k.double(), v.double(), spec64)
    assert torch.allclose(out.double(), ro, atol=1e-5)
    assert (lse[0, :, :5] == EMPTY_LSE).all()
    assert torch.allclose(lse.double()[rl > EMPTY_LSE / 2], rl[rl > EMPTY_LSE / 2], atol=1e-5)


def _dense(num: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    h, rows = num.shape[1], num.shape[2]
    out = torch.zeros(h, rows, cols, dtype=torch.int64)
    for a in range(h):
        for b in range(rows):
            for c in idx[0, a, b, :num[0, a, b]].tolist():
                out[a, b, c] += 1
    return out


@pytest.mark.parametrize("method,causal,scheme", CASES)
@pytest.mark.parametrize("block", [16, 32])
def test_block_mask_covers_exactly(method, causal, scheme, block):
    torch.manual_seed(2)
    H, Nq, Nk = 4, 100, 120
    q, k = torch.randn(1, H, Nq, 16), torch.randn(1, 2, Nk, 16)
    slopes = HYBRID_SLOPES if method == "hybrid" else alibi_slopes(H) * 0.1
    spec = resolve_spec(q, k, k, slopes=slopes, causal=causal, method=method, samples=4,
                        scheme=scheme or "grid", window_eps=1e-2, generator=torch.Generator().manual_seed(2))
    spec = with_hybrid_window(spec)
    _, mask_mod = _mods(spec, q.device, Nq, Nk)
    bm = range_block_mask(*_ranges(spec, Nq, Nk, block, q.device), Nq, Nk, mask_mod, block)
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    part = _dense(bm.kv_num_blocks, bm.kv_indices, nkb).expand(H, -1, -1)
    full = _dense(bm.full_kv_num_blocks, bm.full_kv_indices, nkb).expand(H, -1, -1)
    assert bm.kv_indices.shape[-1] == nkb  # Flex reads the mask's size from this width
    assert int((part + full).max()) <= 1  # a block is either partial or full
    kept = torch.zeros(H, nqb * block, nkb * block, dtype=torch.bool)
    kept[:, :Nq, :Nk] = torch.isfinite(dense_log_weights(spec, Nq, Nk, q.device)).expand(H, Nq, Nk)
    valid = torch.zeros(nqb * block, nkb * block, dtype=torch.bool)
    valid[:Nq, :Nk] = True
    blocks = kept.reshape(H, nqb, block, nkb, block)
    any_kept = blocks.any(4).any(2)
    all_kept = (blocks | ~valid.reshape(nqb, block, nkb, block)).all(4).all(2)
    assert ((part + full) > 0)[any_kept].all()  # no kept pair outside the listed blocks
    assert all_kept[full > 0].all()  # mask_mod may be skipped on full blocks
    # transposed lists (used by the backward pass) are the same sets
    qpart = _dense(bm.q_num_blocks, bm.q_indices, nqb).expand(H, -1, -1)
    qfull = _dense(bm.full_q_num_blocks, bm.full_q_indices, nqb).expand(H, -1, -1)
    assert torch.equal(qpart, part.transpose(1, 2)) and torch.equal(qfull, full.transpose(1, 2))


def test_normalize_grid_keeps_blocks():
    n = 50
    w = torch.tensor([[3, 60, 2**62, 75, 51]])
    u = torch.tensor([[1, 20, 0, 74, 50]])
    w2, u2 = normalize_grid(w, u, n)
    pos = torch.arange(n)
    ids = torch.div(pos + u[..., None], w[..., None], rounding_mode="floor")
    ids2 = torch.div(pos + u2.long()[..., None], w2.long()[..., None], rounding_mode="floor")
    same = (ids[..., :, None] == ids[..., None, :]) == (ids2[..., :, None] == ids2[..., None, :])
    assert same.all() and w2.dtype == torch.int32 and int(w2.max()) <= n


def test_not_chosen_on_cpu():
    q = torch.randn(1, 2, 8, 16)
    spec = resolve_spec(q, q, q, method="lsh", samples=2)
    assert not supports_flex(q, spec)


def test_hybrid_declared_and_kernels_refused():
    """Flex declares "hybrid" (ALiBi slopes); hybrid with general kernels is refused (checked before
    the device, so this holds on the CPU too)."""
    from poslsh.attention.dispatch import BACKENDS
    from poslsh.positional_kernels import power_law

    assert "hybrid" in BACKENDS["flex"].methods and not BACKENDS["flex"].kernels
    q = torch.randn(1, 2, 8, 16)
    assert not BACKENDS["flex"].accepts(q, resolve_spec(q, q, q, method="hybrid", kernel=power_law(0.7), samples=2))


def test_hybrid_mods_split_at_the_window():
    """score_mod and mask_mod hold the hybrid's weights at |p - j| = w_h (exact) and w_h + 1 (collision
    mean, or masked when no sample shares the block), against dense_log_weights."""
    torch.manual_seed(3)
    H, N = 4, 50
    q = torch.randn(1, H, N, 16)
    for causal in (True, False):
        spec = with_hybrid_window(resolve_spec(q, q, q, slopes=HYBRID_SLOPES, causal=causal, method="hybrid",
                                               samples=2, generator=torch.Generator().manual_seed(3)))
        score_mod, mask_mod = _mods(spec, q.device, N, N)
        logw = dense_log_weights(spec, N, N, q.device)  # [H, N, N], float64
        hh, ii, jj = (x.reshape(-1) for x in torch.meshgrid(torch.arange(H), torch.arange(N), torch.arange(N),
                                                            indexing="ij"))
        zero = torch.zeros(hh.shape)
        keep = mask_mod(0, hh, ii, jj).reshape(H, N, N)
        assert torch.equal(keep, torch.isfinite(logw))
        got = score_mod(zero, 0, hh, ii, jj).reshape(H, N, N).double()
        assert torch.allclose(got[keep], logw[keep], rtol=0, atol=1e-5)
        d = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs()
        seam = (d[None] == HYBRID_WINDOW[:, None, None] + 1) & keep
        assert seam.any()  # pairs just beyond the window, weighted by the collision mean


# --------------------------------------------------------------------------------------------------
# The composed mods and the cache of (score_mod, BlockMask)
# --------------------------------------------------------------------------------------------------

import importlib  # noqa: E402

flex_mod = importlib.import_module("poslsh.attention.flex.backend")  # poslsh.attention is also the function


@pytest.fixture
def fresh_cache():
    flex_mod.clear_cache()
    yield
    flex_mod.clear_cache()


def _lsh_spec(q, partitions=None, **kw):
    return resolve_spec(q, q, q, method="lsh", samples=3, partitions=partitions,
                        generator=torch.Generator().manual_seed(5), **kw)


def _check_against_reference(q, spec):
    out, lse = flex_attention_spec(q, q, q, spec, block=16)
    ref = dataclasses.replace(spec, key_padding_mask=spec.key_padding_mask)
    ro, rl = reference_attention(q.double(), q.double(), q.double(), ref)
    assert rel(out, ro) <= 1e-5


def test_cache_reuses_mods_for_equal_content(fresh_cache, monkeypatch):
    """A second spec with equal content (new slope tensors, the same partitions: a model's next layer)
    reuses the entry: no device copies, no new block mask; an entry with the transposed lists also
    serves a call without them."""
    q = torch.randn(1, 4, 40, 16)
    spec = _lsh_spec(q)
    built = []
    monkeypatch.setattr(flex_mod, "_device_tensors", lambda *a, _f=flex_mod._device_tensors: built.append(1) or _f(*a))
    mods = flex_mod.flex_mods(spec, 40, 40, q.device, 16, with_q_blocks=True)
    again = _lsh_spec(q, partitions=spec.partitions)
    assert again.slopes is not spec.slopes
    assert flex_mod.flex_mods(again, 40, 40, q.device, 16, with_q_blocks=True) is mods
    assert flex_mod.flex_mods(again, 40, 40, q.device, 16, with_q_blocks=False) is mods
    assert len(built) == 1
    # different content: other lengths, block, method options
    assert flex_mod.flex_mods(again, 40, 40, q.device, 8) is not mods
    assert flex_mod.flex_mods(dataclasses.replace(again, causal=False), 40, 40, q.device, 16) is not mods


def test_cache_never_returns_a_stale_mask(fresh_cache):
    """In-place changes of partitions, key padding mask, slopes or window, or other partitions, rebuild
    the entry; each result is checked against the reference of what the spec now says."""
    torch.manual_seed(6)
    q = torch.randn(2, 4, 40, 16)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    spec = _lsh_spec(q, key_padding_mask=kpm)
    _check_against_reference(q, spec)
    first = flex_mod.flex_mods(spec, 40, 40, q.device, 16, with_q_blocks=False)
    spec.partitions.widths.add_(3)  # in place: same tensor, new _version
    assert flex_mod.flex_mods(spec, 40, 40, q.device, 16, with_q_blocks=False) is not first
    _check_against_reference(q, spec)
    kpm[1, 20:] = False
    _check_against_reference(q, spec)
    kpm2 = kpm.clone()
    kpm2[0, 30:] = False  # another mask tensor
    _check_against_reference(q, dataclasses.replace(spec, key_padding_mask=kpm2))
    other = _lsh_spec(q, key_padding_mask=kpm, partitions=None)
    other = dataclasses.replace(other, partitions=sample_like(spec.partitions))
    _check_against_reference(q, other)
    # exact / window / hybrid: slopes and windows are keyed by value
    wspec = resolve_spec(q, q, q, method="window", slopes=alibi_slopes(4) * 0.3, window_eps=0.1)
    _check_against_reference(q, wspec)
    wspec.slopes.mul_(2.0)
    _check_against_reference(q, wspec)
    _check_against_reference(q, dataclasses.replace(wspec, window=wspec.window // 2))
    hspec = with_hybrid_window(resolve_spec(q, q, q, method="hybrid", slopes=HYBRID_SLOPES, samples=2,
                                            generator=torch.Generator().manual_seed(7)))
    _check_against_reference(q, hspec)
    hspec.window.sub_(1).clamp_(min=0)
    _check_against_reference(q, hspec)


def sample_like(parts):
    from poslsh import sample_partitions

    return sample_partitions(parts.n, parts.slopes, parts.num_samples, generator=torch.Generator().manual_seed(99))


def test_cache_is_bounded(fresh_cache, monkeypatch):
    q = torch.randn(1, 2, 24, 16)
    spec = resolve_spec(q, q, q, method="exact")
    monkeypatch.setattr(flex_mod, "CACHE_ENTRIES", 3)
    for n in range(4, 12):
        flex_mod.flex_mods(spec, n, n, q.device, 4)
    assert len(flex_mod._cache) == 3
    monkeypatch.setattr(flex_mod, "CACHE_BYTES", 1)  # every entry is over: only the newest stays
    flex_mod.flex_mods(spec, 20, 20, q.device, 4)
    assert len(flex_mod._cache) == 1
    assert flex_mod.flex_mods(spec, 20, 20, q.device, 4, cache=False) is not flex_mod.flex_mods(spec, 20, 20, q.device, 4)


def test_mods_compose_from_small_parts():
    """The method mods are the small ones combined: e.g. the hybrid's mask is band | collisions, & causal."""
    torch.manual_seed(8)
    H, N = 4, 30
    q = torch.randn(1, H, N, 16)
    spec = with_hybrid_window(resolve_spec(q, q, q, slopes=HYBRID_SLOPES, causal=True, method="hybrid", samples=2,
                                           generator=torch.Generator().manual_seed(8)))
    t = flex_mod._device_tensors(spec, q.device, N)
    counts = flex_mod.grid_counts(t["widths"], t["offsets"], 0, True)
    band, collide, causal = flex_mod.band_mask(t["window"], 0), flex_mod.collision_mask(counts), flex_mod.causal_mask(0)
    _, mask_mod = _mods(spec, q.device, N, N)
    b, hh, ii, jj = (x.reshape(-1) for x in torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(H),
                                                           torch.arange(N), torch.arange(N), indexing="ij"))
    assert torch.equal(mask_mod(b, hh, ii, jj), (band(b, hh, ii, jj) | collide(b, hh, ii, jj)) & causal(b, hh, ii, jj))
    kpm = torch.rand(1, N) > 0.3
    pad = flex_mod.padding_mask(kpm)
    _, mask_kpm = _mods(dataclasses.replace(spec, key_padding_mask=kpm), q.device, N, N)
    assert torch.equal(mask_kpm(b, hh, ii, jj), mask_mod(b, hh, ii, jj) & pad(b, hh, ii, jj))


def test_autocast_is_switched_off_inside():
    torch.manual_seed(9)
    q = torch.randn(1, 2, 20, 16)
    spec = resolve_spec(q, q, q, method="exact")
    plain, _ = flex_attention_spec(q, q, q, spec, block=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = flex_attention_spec(q, q, q, spec, block=8)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


@pytest.mark.parametrize("window_size", [(9, 2), (0, 13), ([3, 30, 0, 7], [5, 0, 11, 1])])
def test_asymmetric_window_matches_reference(window_size):
    """FlashAttention's window_size=(left, right) with left != right (non-causal), forward and the block
    mask's partial and full parts; the reference is the definition."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 45, 16), torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    slopes = alibi_slopes(4) * 0.3
    spec = resolve_spec(q, k, v, slopes=slopes, causal=False, window_size=window_size)
    assert spec.window_right is not None
    out, lse = flex_attention_spec(q, k, v, spec, block=16)
    qd, kd, vd = q.double(), k.double(), v.double()
    ro, rl = reference_attention(qd, kd, vd, resolve_spec(qd, kd, vd, slopes=slopes, causal=False,
                                                          window_size=window_size))
    assert rel(out, ro) <= 1e-5 and rel(lse, rl) <= 1e-5


def _captured(fn, seen=None):
    """Every value the closure of ``fn`` captures, through the mods it captures in turn."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    values = []
    for cell in fn.__closure__ or ():
        value = cell.cell_contents
        values.append(value)
        if callable(value) and getattr(value, "__closure__", None) is not None:
            values += _captured(value, seen)
    return values


@pytest.mark.parametrize("method,causal,scheme", CASES)
def test_mods_capture_no_python_float(method, causal, scheme):
    """torch 2.15's FlexAttention lifts a Python float captured by a score_mod to a symbolic float and
    then refuses it ("can only be of Tensor, int, SymInt"): LSH's log r, captured as a float, failed
    every LSH call with a nonzero q_offset there. The mods capture tensors, ints, bools and other mods."""
    q, k = torch.randn(1, 4, 30, 16), torch.randn(1, 4, 35, 16)
    spec = resolve_spec(q, k, k, slopes=alibi_slopes(4), causal=causal, method=method, samples=3,
                        scheme=scheme or "grid", q_offset=5, key_padding_mask=torch.rand(1, 35) > 0.2,
                        generator=torch.Generator().manual_seed(0))
    for mod in _mods(spec, q.device, 30, 35):
        floats = [v for v in _captured(mod) if isinstance(v, float)]
        assert not floats, (method, floats)
