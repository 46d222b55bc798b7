"""FlexAttention backend ("flex"): exact ALiBi, the per-head window, the positional-LSH estimator and the
hybrid of the last two.

Each method is a ``score_mod`` (the weight as an additive log term) plus a ``BlockMask`` built
directly from per-query-block key ranges (never ``create_block_mask``, which evaluates the mask over
all Nq x Nk positions):

* exact:  score - m_h (p - j)  (|p - j| bidirectional); causal blocks below the diagonal are "full";
* window: the same score, keys |p - j| <= w_h only; blocks entirely inside the band are "full";
* lsh:    score + log(c_pj), c_pj = #{t : p, j share a block}/r from the grid scalars (W, U) or the
  per-position block bounds (cut scheme); key blocks in the union of the query block's blocks are
  visited, those inside every block of every row are "full" (no mask_mod evaluation);
* hybrid: score - m_h |p - j| for |p - j| <= w_h, score + log(c_pj) beyond (ALiBi slopes only); key
  blocks in the union of the band's and the blocks' ranges are visited, the band's "full" blocks
  (every pair near) stay full.

For every (head, query block) the kept key blocks are one interval [lo, hi) with a "full" sub-interval
[flo, fhi); both ends are non-decreasing in the query block, so the transposed (key block -> query
blocks) structure that the backward pass needs is computed by ``searchsorted`` instead of through a
dense [query blocks x key blocks] matrix.

On CUDA the call goes through ``torch.compile(flex_attention)``; on the CPU flex_attention runs in
eager mode (unfused, O(Nq Nk) memory: for tests only).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .core import EMPTY_LSE, AttentionSpec

__all__ = ["flex_attention_spec", "flex_mods", "supports_flex", "lsh_block_ranges", "range_block_mask", "flex_available",
           "normalize_grid"]

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex_available = True
except ImportError:  # pragma: no cover - torch without FlexAttention
    flex_available = False

DEFAULT_BLOCK = 128
_compiled: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    """Compiled flex_attention on CUDA (compiled once; recompiles per shape/method are allowed), eager on CPU."""
    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
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
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def normalize_grid(widths: Tensor, offsets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Grid (W, U) int [H, r] -> int32 [H, r] giving the same blocks on positions 0..n-1.

    A width above n has at most one boundary inside [0, n), at c = W - U; it is re-expressed with
    width n (offset n - c, or 0 when c >= n), so that p + U fits in int32 (slope-0 heads store
    W = 2^62).
    """
    w = widths.to(torch.int64)
    u = offsets.to(torch.int64)
    big = w > n
    c = w - u
    u2 = torch.where(c >= n, torch.zeros_like(u), n - c)
    w = torch.where(big, torch.full_like(w, n), w)
    u = torch.where(big, u2, u)
    return w.to(torch.int32).contiguous(), u.to(torch.int32).contiguous()


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
    """A BlockMask from key *position* ranges per (head, query block).

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
    lo_b = torch.div(lo, block, rounding_mode="floor").clamp(0, nkb)
    hi_b = (-torch.div(-hi, block, rounding_mode="floor")).clamp(0, nkb)
    hi_b = torch.maximum(hi_b, lo_b)
    if all_partial:
        flo_b = fhi_b = hi_b
    else:
        flo_b = (-torch.div(-flo, block, rounding_mode="floor"))
        fhi_b = torch.div(fhi, block, rounding_mode="floor")
        # A key block past nk is ragged: leave it partial.
        fhi_b = torch.minimum(fhi_b, torch.full_like(fhi_b, nk // block))
        flo_b = torch.minimum(torch.maximum(flo_b, lo_b), hi_b)
        fhi_b = torch.minimum(torch.maximum(fhi_b, flo_b), hi_b)
    kv = _pieces(lo_b, flo_b, fhi_b, hi_b, nkb)
    if not with_q_blocks:
        return BlockMask(seq_lengths=(nq, nk), kv_num_blocks=kv[0], kv_indices=kv[1], full_kv_num_blocks=kv[2],
                         full_kv_indices=kv[3], q_num_blocks=None, q_indices=None, full_q_num_blocks=None,
                         full_q_indices=None, BLOCK_SIZE=(block, block), mask_mod=mask_mod)
    # Transpose: query blocks whose interval holds key block c form an interval as well.
    c = torch.arange(nkb, device=lo.device).expand(lo.shape[0], nkb).contiguous()
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


def lsh_block_ranges(spec: AttentionSpec, nq: int, nk: int, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per (head, query block): union [lo, hi) and intersection [flo, fhi) of the rows' blocks, as
    key positions (int64 [H, nqb]), causal clipping included."""
    parts = spec.partitions
    dev = parts.device
    first = torch.arange(0, nq, block, device=dev) + spec.q_offset
    last = torch.clamp(first + block - 1, max=spec.q_offset + nq - 1)
    if parts.scheme == "grid":
        w = parts.widths.to(dev)[..., None]
        u = parts.offsets.to(dev)[..., None]
        sa = torch.div(first + u, w, rounding_mode="floor") * w - u
        sb = torch.div(last + u, w, rounding_mode="floor") * w - u
        lo = sa.clamp(min=0).amin(1)
        in_lo = sb.clamp(min=0).amax(1)
        hi = (sb + w).clamp(max=nk).amax(1)
        in_hi = (sa + w).clamp(max=nk).amin(1)
    else:
        s, e = parts.block_bounds()
        lo = s[..., first].amin(1)
        in_lo = s[..., last].amax(1)
        hi = e[..., last].amax(1)
        in_hi = e[..., first].amin(1)
    if spec.causal:
        hi = torch.minimum(hi, last + 1)
        in_hi = torch.minimum(in_hi, first + 1)
    return lo, hi, in_lo, in_hi


# --------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------


def _mods(spec: AttentionSpec, device: torch.device, nq: int, nk: int):
    """(score_mod, mask_mod, ranges) for the spec's method; ranges = (lo, hi, flo, fhi) [H or 1, nqb]."""
    qoff = spec.q_offset
    causal = spec.causal
    kpm = spec.key_padding_mask
    slopes = spec.slopes.to(device=device, dtype=torch.float32)

    def pad_ok(b, kv_idx):
        return kpm[b, kv_idx] if kpm is not None else True

    if spec.method in ("exact", "window"):
        def score_mod(score, b, h, q_idx, kv_idx):
            d = (q_idx + qoff - kv_idx).to(torch.float32)
            return score - slopes[h] * (d if causal else d.abs())

        if spec.method == "window":
            win = spec.window.to(device)

            def mask_mod(b, h, q_idx, kv_idx):
                d = q_idx + qoff - kv_idx
                keep = (d.abs() <= win[h]) & (d >= 0) if causal else (d.abs() <= win[h])
                return keep & pad_ok(b, kv_idx)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                keep = (q_idx + qoff >= kv_idx) if causal else (q_idx >= 0)
                return keep & pad_ok(b, kv_idx)
        return score_mod, mask_mod

    parts = spec.partitions
    r = parts.num_samples
    log_r = math.log(r)
    win = spec.window.to(device) if spec.method == "hybrid" else None
    if parts.scheme == "grid":
        W, U = normalize_grid(parts.widths.to(device), parts.offsets.to(device), nk)

        def count(h, p, j):
            c = None
            for t in range(r):
                w, u = W[h, t], U[h, t]
                s = ((p + u) // w) * w - u
                hit = (j >= s) if causal else ((j >= s) & (j < s + w))
                c = hit.to(torch.float32) if c is None else c + hit.to(torch.float32)
            return c
    else:
        S, E = (x.to(device=device, dtype=torch.int32) for x in parts.block_bounds())

        def count(h, p, j):
            c = None
            for t in range(r):
                hit = (j >= S[h, t, p]) if causal else ((j >= S[h, t, p]) & (j < E[h, t, p]))
                c = hit.to(torch.float32) if c is None else c + hit.to(torch.float32)
            return c

    if spec.method == "lsh":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.log(count(h, q_idx + qoff, kv_idx)) - log_r

        def mask_mod(b, h, q_idx, kv_idx):
            p = q_idx + qoff
            keep = count(h, p, kv_idx) > 0
            if causal:
                keep = keep & (kv_idx <= p)
            return keep & pad_ok(b, kv_idx)
    else:  # hybrid: exact ALiBi weights in the band |p - j| <= w_h, collision means beyond
        def score_mod(score, b, h, q_idx, kv_idx):
            d = (q_idx + qoff - kv_idx).abs()
            far = torch.log(count(h, q_idx + qoff, kv_idx)) - log_r
            return score + torch.where(d <= win[h], -slopes[h] * d.to(torch.float32), far)

        def mask_mod(b, h, q_idx, kv_idx):
            p = q_idx + qoff
            keep = ((p - kv_idx).abs() <= win[h]) | (count(h, p, kv_idx) > 0)
            if causal:
                keep = keep & (kv_idx <= p)
            return keep & pad_ok(b, kv_idx)

    return score_mod, mask_mod


def _ranges(spec: AttentionSpec, nq: int, nk: int, block: int, device: torch.device):
    first = torch.arange(0, nq, block, device=device) + spec.q_offset
    last = torch.clamp(first + block - 1, max=spec.q_offset + nq - 1)
    if spec.method == "lsh":
        return lsh_block_ranges(spec, nq, nk, block)
    if spec.method == "hybrid":  # keys: union of the blocks' and the band's; full: the band's
        lo, hi, _, _ = lsh_block_ranges(spec, nq, nk, block)
        blo, bhi, bflo, bfhi = _band_ranges(spec.window.to(device), first, last, spec.causal, nk)
        return torch.minimum(lo, blo), torch.maximum(hi, bhi), bflo, bfhi
    if spec.method == "exact":
        lo = torch.zeros_like(first)
        if spec.causal:
            return lo[None], (last + 1)[None], lo[None], (first + 1)[None]
        n = torch.full_like(first, nk)
        return lo[None], n[None], lo[None], n[None]
    return _band_ranges(spec.window.to(device), first, last, spec.causal, nk)


def _band_ranges(window: Tensor, first: Tensor, last: Tensor, causal: bool, nk: int):
    """Keys of the band |p - j| <= w_h for query blocks [first, last]: all [lo, hi), every row's
    [flo, fhi); int64 [H, nqb]."""
    w = window[:, None]
    lo = (first - w).clamp(min=0)
    flo = last - w
    if causal:
        return lo, (last + 1).expand_as(lo), flo, (first + 1).expand_as(lo)
    return lo, (last + w + 1).clamp(max=nk), flo, (first + w + 1).clamp(max=nk)


def flex_mods(spec: AttentionSpec, nq: int, nk: int, device: torch.device, block: int = DEFAULT_BLOCK,
              with_q_blocks: bool = True) -> tuple[Callable, "BlockMask"]:
    """(score_mod, block_mask) for ``spec``: build once per length and reuse across layers/calls."""
    score_mod, mask_mod = _mods(spec, device, nq, nk)
    lo, hi, flo, fhi = _ranges(spec, nq, nk, block, device)
    bm = range_block_mask(lo, hi, flo, fhi, nq, nk, mask_mod, block,
                          all_partial=spec.key_padding_mask is not None, with_q_blocks=with_q_blocks)
    return score_mod, bm


def flex_attention_spec(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, block: int = DEFAULT_BLOCK,
                        mods: tuple[Callable, "BlockMask"] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``spec`` (exact / window / lsh / hybrid) through FlexAttention: (out [B, H, Nq, D],
    lse [B, H, Nq] fp32).

    ``mods`` = ``flex_mods(spec, ...)`` reuses a prebuilt score_mod and block mask."""
    nq, nk = q.shape[2], k.shape[2]
    if mods is None:
        need_q = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        mods = flex_mods(spec, nq, nk, q.device, block, with_q_blocks=need_q)
    score_mod, bm = mods
    fn = _flex_fn(q.device)
    # q, k, v already carry the compute dtype, so autocast (e.g. a bf16 model evaluation) has nothing to do
    # here; switched off, because autocast around compiled flex_attention has been fragile across torch
    # versions (mixed-dtype validation, the higher-order op's autocast dispatch).
    with warnings.catch_warnings(), torch.autocast(q.device.type, enabled=False):
        warnings.simplefilter("ignore")
        out, lse = fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=spec.scale,
                      enable_gqa=q.shape[1] != k.shape[1], return_lse=True)
    lse = lse.float()
    # Rows that see no key (all padded): flex gives lse = -inf; the library's convention is EMPTY_LSE.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, EMPTY_LSE), lse)
    return out, lse


def supports_flex(q: Tensor, spec: AttentionSpec) -> bool:
    """CUDA only (compiled FlexAttention); fp16/bf16/fp32; D >= 16.

    On the CPU flex_attention runs eagerly and materialises all Nq x Nk scores, slower than the
    "fused" backend, so it is never chosen there; tests call ``flex_attention_spec`` directly."""
    if not flex_available or q.device.type != "cuda":
        return False
    if spec.method not in ("exact", "window", "lsh", "hybrid") or getattr(spec, "kernels", None) is not None:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return q.shape[-1] >= 16


def _register() -> None:
    try:
        from .dispatch import register_backend
    except ImportError:  # pragma: no cover
        return
    # Below the Triton kernel, above the torch backends: the fallback for shapes Triton does not cover.
    register_backend("flex", flex_attention_spec, supports_flex, priority=50,
                     methods=("exact", "window", "lsh", "hybrid"))


if flex_available:
    _register()
