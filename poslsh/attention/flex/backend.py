"""FlexAttention backend ("flex"): exact ALiBi, the per-head window, the positional-LSH estimator and the
hybrid of the last two, each composed from small score and mask mods (as attention-gym does):

=========  =====================================================  ==================================
method     score_mod                                              mask_mod
=========  =====================================================  ==================================
exact      ``alibi_score``: score - m_h (p - j) (|p - j| two-sided)  (``causal_mask``)
window     ``alibi_score``                                        ``band_mask`` (& ``causal_mask``)
lsh        ``lsh_score``: score + log c_pj, c_pj from the counts  ``collision_mask`` (& causal)
hybrid     ``where_score(band_mask, alibi_score, lsh_score)``     ``band_mask | collision_mask`` (& causal)
=========  =====================================================  ==================================

with ``padding_mask`` and-ed in when a key padding mask is given; the collision counts
#{t : p, j share a block} come from the grid scalars (W, U) (``grid_counts``) or the per-position block
bounds (``cut_counts``). Query row i sits at key position p = q_offset + i.

The ``BlockMask`` is built directly from the per-query-block key ranges of ``poslsh.attention.ranges``
(never ``create_block_mask``, which evaluates the mask over all Nq x Nk positions): key blocks in the
range are visited, those in its full part (every row sees every key, weighted by score_mod alone) skip
mask_mod. Both ends of the ranges are non-decreasing in the query block, so the transposed (key block
-> query blocks) structure the backward pass needs is found by ``searchsorted``.

Mods and masks are cached (``flex_mods``): a model's layers and its decoding steps at one length reuse
them instead of rebuilding the block mask and copying slopes to the device on every call.

On CUDA the call goes through ``torch.compile(flex_attention)``; on the CPU flex_attention runs in
eager mode (unfused, O(Nq Nk) memory: for tests only).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from ...cache_keys import version_key
from ..core import EMPTY_LSE, AttentionSpec
from ..ranges import TileRanges, key_ranges, key_tiles, normalize_grid
from ..rent import BuildRent, call_seconds

__all__ = ["flex_attention_spec", "flex_mods", "supports_flex", "compile_ready", "range_block_mask", "flex_available",
           "alibi_score", "lsh_score", "where_score", "band_mask", "causal_mask", "padding_mask",
           "collision_mask", "grid_counts", "cut_counts", "clear_cache", "normalize_grid"]

try:
    from torch.nn.attention.flex_attention import BlockMask, and_masks, flex_attention, noop_mask, or_masks

    flex_available = True
except ImportError:  # pragma: no cover - torch without FlexAttention
    flex_available = False

DEFAULT_BLOCK = 128
_compiled: dict[Callable, Callable] = {}


def compiled_on(device: torch.device, fn: Callable) -> Callable:
    """``fn`` (flex_attention, or a function calling it) compiled on CUDA, once per function (recompiles per
    shape and method are allowed); ``fn`` itself elsewhere (FlexAttention runs eagerly on the CPU)."""
    if device.type != "cuda":
        return fn
    hit = _compiled.get(fn)
    if hit is None:
        import torch._dynamo

        # One compiled kernel per (shape, method, r): the default limit of 8 would silently fall
        # back to the eager O(n^2) path in a benchmark sweep.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 1024)
        # dynamic=False: a dynamic-shape recompile of the LSH score_mod (indexing the captured
        # (W, U) tables) failed in torch 2.11 with "unbacked_bindings"; static compiles are a few
        # seconds each.
        hit = _compiled[fn] = torch.compile(fn, dynamic=False)
    return hit


def _flex_fn(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA, eager on CPU (``compiled_on``)."""
    return compiled_on(device, flex_attention)


# --------------------------------------------------------------------------------------------------
# Mods. score_mod(score, b, h, q_idx, kv_idx) -> score; mask_mod and counts (b, h, q_idx, kv_idx).
# Captured tensors must already be on the device.
# --------------------------------------------------------------------------------------------------


def alibi_score(slopes: Tensor, q_offset: int, two_sided: bool) -> Callable:
    """score - m_h (p - j), or - m_h |p - j| when ``two_sided``; ``slopes`` float32 [H]."""
    def score_mod(score, b, h, q_idx, kv_idx):
        d = (q_idx + q_offset - kv_idx).to(torch.float32)
        return score - slopes[h] * (d.abs() if two_sided else d)

    return score_mod


def lsh_score(counts: Callable, samples: int, q_offset: int) -> Callable:
    """score + log(c_pj), c_pj = counts / r (the positional-LSH estimator's weight)."""
    # r stays an int: torch 2.15's FlexAttention lifts a captured Python float to a symbolic float
    # it then refuses as a score_mod input ("can only be of Tensor, int, SymInt"); ints it accepts.
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.log(counts(b, h, q_idx, kv_idx) / samples)

    return score_mod


def where_score(mask_mod: Callable, inside: Callable, outside: Callable) -> Callable:
    """``inside``'s score where ``mask_mod`` holds, ``outside``'s elsewhere (e.g. the hybrid's near field)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(mask_mod(b, h, q_idx, kv_idx), inside(score, b, h, q_idx, kv_idx),
                           outside(score, b, h, q_idx, kv_idx))

    return score_mod


def band_mask(window: Tensor, q_offset: int, right: Tensor | None = None) -> Callable:
    """|p - j| <= w_h, or p - w_h <= j <= p + right_h; ``window``, ``right`` int [H]."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx + q_offset - kv_idx).abs() <= window[h]

    def asymmetric(b, h, q_idx, kv_idx):
        d = q_idx + q_offset - kv_idx
        return (d <= window[h]) & (-d <= right[h])

    return mask_mod if right is None else asymmetric


def causal_mask(q_offset: int) -> Callable:
    """j <= p."""
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + q_offset

    return mask_mod


def padding_mask(key_padding_mask: Tensor) -> Callable:
    """Key j of batch b is kept; ``key_padding_mask`` bool [B, Nk] (True = keep)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx]

    return mask_mod


def collision_mask(counts: Callable) -> Callable:
    """Some sample puts p and j in one block (c_pj > 0)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return counts(b, h, q_idx, kv_idx) > 0

    return mask_mod


def grid_counts(widths: Tensor, offsets: Tensor, q_offset: int, causal: bool) -> Callable:
    """#{t : j in p's block} as float32, from grid scalars int32 [H, r] (``normalize_grid``). Causal
    counts only j >= s_t(p) (the block's end lies past p, so keys j <= p need no end test)."""
    samples = widths.shape[1]

    def counts(b, h, q_idx, kv_idx):
        p = q_idx + q_offset
        c = None
        for t in range(samples):
            w, u = widths[h, t], offsets[h, t]
            s = ((p + u) // w) * w - u
            hit = (kv_idx >= s) if causal else ((kv_idx >= s) & (kv_idx < s + w))
            c = hit.to(torch.float32) if c is None else c + hit.to(torch.float32)
        return c

    return counts


def cut_counts(starts: Tensor, ends: Tensor, q_offset: int, causal: bool) -> Callable:
    """As ``grid_counts`` from per-position block bounds int32 [H, r, Nk] (``Partitions.block_bounds()``)."""
    samples = starts.shape[1]

    def counts(b, h, q_idx, kv_idx):
        p = q_idx + q_offset
        c = None
        for t in range(samples):
            hit = (kv_idx >= starts[h, t, p]) if causal else ((kv_idx >= starts[h, t, p]) & (kv_idx < ends[h, t, p]))
            c = hit.to(torch.float32) if c is None else c + hit.to(torch.float32)
        return c

    return counts


def _plain_batch(mask_mod: Callable) -> Callable:
    """torch's and_masks / or_masks / noop_mask build on ``b.new_ones``; FlexAttention passes b as a
    tensor, a direct call may pass an int: accept both."""
    def wrapped(b, h, q_idx, kv_idx):
        return mask_mod(b if isinstance(b, Tensor) else torch.as_tensor(b, device=q_idx.device), h, q_idx, kv_idx)

    return wrapped


def _device_tensors(spec: AttentionSpec, device: torch.device, nk: int) -> dict[str, Tensor]:
    """What the mods capture, copied to ``device`` once (per cache entry, not per call)."""
    out, rule = {}, spec.rule
    if rule.exact_band:
        out["slopes"] = spec.slopes.to(device=device, dtype=torch.float32)
    if spec.window is not None and rule.bounded:
        out["window"] = spec.window.to(device)
    if spec.window_right is not None:
        out["window_right"] = spec.window_right.to(device)
    parts = spec.partitions
    if rule.collisions:
        if parts.scheme == "grid":
            out["widths"], out["offsets"] = normalize_grid(parts.widths.to(device), parts.offsets.to(device), nk)
        else:
            out["starts"], out["ends"] = (x.to(device=device, dtype=torch.int32) for x in parts.block_bounds())
    if spec.key_padding_mask is not None:
        out["key_padding_mask"] = spec.key_padding_mask.to(device)
    return out


def _compose(spec: AttentionSpec, t: dict[str, Tensor]) -> tuple[Callable, Callable]:
    """(score_mod, mask_mod) of the spec's method from the small mods above."""
    qoff, rule = spec.q_offset, spec.rule
    if rule.collisions:
        counts = (grid_counts(t["widths"], t["offsets"], qoff, spec.causal) if "widths" in t
                  else cut_counts(t["starts"], t["ends"], qoff, spec.causal))
        lsh = lsh_score(counts, spec.partitions.num_samples, qoff)
    if rule.all_exact:
        score_mod, masks = alibi_score(t["slopes"], qoff, two_sided=not spec.causal), []
    elif rule.band_only:
        score_mod, masks = alibi_score(t["slopes"], qoff, two_sided=not spec.causal), [band_mask(t["window"], qoff, t.get("window_right"))]
    elif rule.only_collisions:
        score_mod, masks = lsh, [collision_mask(counts)]
    else:  # hybrid: exact ALiBi weights in the band |p - j| <= w_h, collision means beyond
        near = band_mask(t["window"], qoff)
        score_mod = where_score(near, alibi_score(t["slopes"], qoff, two_sided=True), lsh)
        masks = [or_masks(near, collision_mask(counts))]
    if spec.causal:
        masks.append(causal_mask(qoff))
    if "key_padding_mask" in t:
        masks.append(padding_mask(t["key_padding_mask"]))
    if len(masks) == 1 and not rule.near_far:
        return score_mod, masks[0]
    return score_mod, _plain_batch(and_masks(*masks) if masks else noop_mask)


def _mods(spec: AttentionSpec, device: torch.device, nq: int, nk: int) -> tuple[Callable, Callable]:
    """(score_mod, mask_mod) for the spec's method, built fresh (``flex_mods`` caches them)."""
    return _compose(spec, _device_tensors(spec, device, nk))


_ranges = key_ranges  # (spec, nq, nk, block, device) -> TileRanges; the name tests/test_flex.py uses


# --------------------------------------------------------------------------------------------------
# Block masks from per-query-block ranges
# --------------------------------------------------------------------------------------------------


def _pieces(lo: Tensor, flo: Tensor, fhi: Tensor, hi: Tensor, num_cols: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Interval [lo, hi) with full sub-interval [flo, fhi) -> ordered (num, indices) for the
    partial part ([lo, flo) then [fhi, hi)) and the full part. Inputs int [H, rows]; outputs
    int32 [1, H, rows] and [1, H, rows, num_cols].

    The index tensors are as wide as there are column blocks (FlexAttention reads the block mask's
    size from that width), padded with zeros past each row's count.
    """
    lo, flo, fhi, hi = (x.to(torch.int32) for x in (lo, flo, fhi, hi))
    left = (flo - lo)[..., None]
    full = fhi - flo
    part = (flo - lo) + (hi - fhi)
    k = torch.arange(max(num_cols, 1), device=lo.device, dtype=torch.int32)
    pidx = torch.where(k < left, lo[..., None] + k, fhi[..., None] + (k - left))
    pidx = torch.where(k < part[..., None], pidx, 0)
    del left
    fidx = torch.where(k < full[..., None], flo[..., None] + k, 0)
    return part[None].contiguous(), pidx[None].contiguous(), full[None].contiguous(), fidx[None].contiguous()


def range_block_mask(lo: Tensor, hi: Tensor, flo: Tensor, fhi: Tensor, nq: int, nk: int,
                     mask_mod: Callable, block: int = DEFAULT_BLOCK, all_partial: bool = False,
                     with_q_blocks: bool = True) -> "BlockMask":
    """A BlockMask from key *position* ranges per (head, query block) (``ranges.key_ranges``).

    Args:
        lo, hi: int64 [H, nqb]: keys of query block b lie in [lo, hi) (positions).
        flo, fhi: int64 [H, nqb]: keys in [flo, fhi) are kept for every row of the block with
            weight given by score_mod alone (mask_mod is skipped there).
        nq, nk: query and key lengths; mask_mod: the exact per-element mask.
        all_partial: evaluate mask_mod everywhere (e.g. with a key padding mask).
        with_q_blocks: also build the transposed structure (needed by the backward pass only).
    All four bounds must be non-decreasing along the query-block axis.
    """
    nqb, nkb = -(-nq // block), -(-nk // block)
    lo, hi = lo.clamp(0, nk), hi.clamp(0, nk)
    if all_partial:  # an empty full part
        flo = fhi = hi
    # A key block past nk is ragged: fhi <= nk leaves it partial.
    lo_b, hi_b, flo_b, fhi_b = key_tiles(TileRanges(lo, hi, flo, fhi.clamp(max=nk)), block)
    kv = _pieces(lo_b, flo_b, fhi_b, hi_b, nkb)
    if not with_q_blocks:
        return BlockMask(seq_lengths=(nq, nk), kv_num_blocks=kv[0], kv_indices=kv[1], full_kv_num_blocks=kv[2],
                         full_kv_indices=kv[3], q_num_blocks=None, q_indices=None, full_q_num_blocks=None,
                         full_q_indices=None, BLOCK_SIZE=(block, block), mask_mod=mask_mod)
    # Transpose: query blocks whose interval holds key block c form an interval as well.
    c = torch.arange(nkb, device=lo.device).expand(lo_b.shape[0], nkb).contiguous()
    q_lo = torch.searchsorted(hi_b.contiguous(), c, right=True)
    q_hi = torch.searchsorted(lo_b.contiguous(), c, right=True)
    q_hi = torch.maximum(q_hi, q_lo)
    q_flo = torch.searchsorted(fhi_b.contiguous(), c, right=True)
    q_fhi = torch.searchsorted(flo_b.contiguous(), c, right=True)
    q_flo = torch.minimum(torch.maximum(q_flo, q_lo), q_hi)
    q_fhi = torch.minimum(torch.maximum(q_fhi, q_flo), q_hi)
    qs = _pieces(q_lo, q_flo, q_fhi, q_hi, nqb)
    return BlockMask(seq_lengths=(nq, nk), kv_num_blocks=kv[0], kv_indices=kv[1], full_kv_num_blocks=kv[2],
                     full_kv_indices=kv[3], q_num_blocks=qs[0], q_indices=qs[1], full_q_num_blocks=qs[2],
                     full_q_indices=qs[3], BLOCK_SIZE=(block, block), mask_mod=mask_mod)


# --------------------------------------------------------------------------------------------------
# The cache: (score_mod, BlockMask) per (spec content, shape, device, block)
# --------------------------------------------------------------------------------------------------

# Bounded twice: entries, and bytes of the tensors they hold (a 256K-token window mask with the
# transposed lists is ~2 GB); the newest entry is always kept.
CACHE_ENTRIES = 32
CACHE_BYTES = 4 << 30
_cache: OrderedDict[tuple, tuple[tuple, tuple[Callable, "BlockMask"], int]] = OrderedDict()


def clear_cache() -> None:
    """Drop every cached score_mod and block mask, and "auto"'s work count per compile key."""
    _cache.clear()
    _compile_rent.clear()


def _cache_key(spec: AttentionSpec, nq: int, nk: int, device: torch.device, block: int,
               with_q_blocks: bool) -> tuple[tuple, tuple]:
    """(key, held): the key from the spec's content (values of slopes and window, which are small CPU
    tensors) and its large tensors by identity and version (partitions, key padding mask: no copy, no
    device sync; ``cache_keys.version_key``, None for an inference tensor: then nothing is cached).
    ``held`` keeps those tensors alive with the entry, so their ids cannot be reused by other tensors
    while it exists. The scale is not part of it:
    it is passed to flex_attention, not captured by the mods."""
    parts = spec.partitions
    held = () if parts is None else tuple(x for x in (parts.widths, parts.offsets, parts.cut_positions,
                                                      parts.cut_pointers) if x is not None)
    if spec.key_padding_mask is not None:
        held += (spec.key_padding_mask,)
    key = (spec.method, spec.causal, spec.q_offset, nq, nk, device, block,
           tuple(spec.slopes.tolist()), None if spec.window is None else tuple(spec.window.tolist()),
           None if spec.window_right is None else tuple(spec.window_right.tolist()),
           None if parts is None else (parts.scheme, parts.n), tuple(version_key(x) for x in held),
           with_q_blocks)
    return key, held


def _nbytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, Tensor))


def flex_mods(spec: AttentionSpec, nq: int, nk: int, device: torch.device, block: int = DEFAULT_BLOCK,
              with_q_blocks: bool = True, cache: bool = True) -> tuple[Callable, "BlockMask"]:
    """(score_mod, block_mask) for ``spec`` at these lengths, cached (``cache=False``: built fresh).

    An entry built with the transposed lists (``with_q_blocks``) also serves calls without them."""
    device = torch.device(device)
    key, held = _cache_key(spec, nq, nk, device, block, with_q_blocks)
    cache = cache and None not in key[-2]  # a tensor without a version (inference mode): not cached
    if cache:
        for k in (key[:-1] + (True,), key) if not with_q_blocks else (key,):
            hit = _cache.get(k)
            if hit is not None:
                _cache.move_to_end(k)
                return hit[1]
    tensors = _device_tensors(spec, device, nk)
    score_mod, mask_mod = _compose(spec, tensors)
    lo, hi, flo, fhi = key_ranges(spec, nq, nk, block, device)
    bm = range_block_mask(lo, hi, flo, fhi, nq, nk, mask_mod, block,
                          all_partial=spec.key_padding_mask is not None, with_q_blocks=with_q_blocks)
    mods = (score_mod, bm)
    if cache:
        fields = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks,
                  bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
        _cache[key] = (held, mods, _nbytes(fields) + _nbytes(tensors.values()))
        total = sum(e[2] for e in _cache.values())
        while len(_cache) > 1 and (len(_cache) > CACHE_ENTRIES or total > CACHE_BYTES):
            total -= _cache.popitem(last=False)[1][2]
    return mods


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


def flex_attention_spec(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, block: int = DEFAULT_BLOCK,
                        mods: tuple[Callable, "BlockMask"] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``spec`` (exact / window / lsh / hybrid) through FlexAttention: (out [B, H, Nq, D],
    lse [B, H, Nq] fp32).

    ``mods`` = ``flex_mods(spec, ...)`` passes a prebuilt score_mod and block mask; by default they
    come from ``flex_mods``' cache."""
    nq, nk = q.shape[2], k.shape[2]
    if mods is None:
        need_q = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        mods = flex_mods(spec, nq, nk, q.device, block, with_q_blocks=need_q)
    score_mod, bm = mods
    device_type = q.device.type
    fn = _flex_fn(q.device)
    call = lambda: fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=spec.scale,  # noqa: E731
                      enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if torch.is_autocast_enabled(device_type):
            # q, k, v already carry the compute dtype, so autocast (e.g. a bf16 model evaluation) has
            # nothing to do here; switched off, because autocast around compiled flex_attention has been
            # fragile across torch versions (mixed-dtype validation, the higher-order op's autocast
            # dispatch). Entered only when on: the context costs ~5 us per call.
            with torch.autocast(device_type, enabled=False):
                out, lse = call()
        else:
            out, lse = call()
    lse = lse.float()
    if spec.key_padding_mask is not None:
        # Rows that see no key (all padded; no other row is empty): flex gives lse = -inf, the
        # library's convention is EMPTY_LSE.
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, EMPTY_LSE), lse)
    return out, lse


# "auto" and the compile per shape (``poslsh.attention.rent``): flex_attention is compiled for static
# shapes, 0.5-2 s per new shape for the Triton template and 1-8 s for FlashAttention-4's, so "auto" takes a
# compiled flex backend for a shape once its calls there have done about a second of work elsewhere
# (never in a decode loop, whose key count grows every step).
COMPILE_AFTER_S = 1.0
_compile_rent = BuildRent(COMPILE_AFTER_S)


def compile_ready(name: str, supports: Callable[[Tensor, AttentionSpec], bool]) -> Callable[[Tensor, AttentionSpec], bool]:
    """``Backend.ready`` of the compiled flex backend ``name``: True where it would refuse the call anyway
    (its cheap refusal decides), else whether the calls at this call's compile key (shapes, dtype, device,
    method, causality, query offset, padding, training) have done work worth a compile."""
    def ready(q: Tensor, spec: AttentionSpec) -> bool:
        if not supports(q, spec):
            return True
        training = torch.is_grad_enabled() and q.requires_grad
        key = (name, q.device, q.dtype, tuple(q.shape), spec.method, spec.causal, spec.q_offset,
               spec.key_padding_mask is not None, training)
        return _compile_rent.paid_for(key, call_seconds(q, spec, training))

    return ready


def supports_flex(q: Tensor, spec: AttentionSpec) -> bool:
    """CUDA only (compiled FlexAttention); fp16/bf16/fp32; D >= 16. (Methods and kernels are checked by
    the registry from the declared capabilities.)

    On the CPU flex_attention runs eagerly and materialises all Nq x Nk scores, slower than the
    "fused" backend, so it is never chosen there; tests call ``flex_attention_spec`` directly."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return q.shape[-1] >= 16


def _register() -> None:
    try:
        from ..registry import register_backend
    except ImportError:  # pragma: no cover
        return
    # Below the Triton kernel, above the torch backends: the fallback for shapes Triton does not cover.
    register_backend("flex", flex_attention_spec, supports_flex, priority=50,
                     methods=("exact", "window", "lsh", "hybrid"), ready=compile_ready("flex", supports_flex))


if flex_available:
    _register()
else:  # pragma: no cover - torch without FlexAttention
    from ..registry import mark_unavailable

    mark_unavailable("flex", "this torch has no FlexAttention (torch.nn.attention.flex_attention)")
