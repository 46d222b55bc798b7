"""Fused positional-LSH attention in Triton: forward, backward, and an autograd.Function.

The estimator (../shared/DESIGN.md) in one pass: for query position i and key position j,

    score_ij = scale * q_i . k_j + log c_ij,   c_ij = #{t : i and j share a block in sample t} / r,

with c_ij = 0 excluded, and causal additionally j <= i. Queries are the last Nq key positions
(position of query row i is i + q_offset, q_offset = Nk - Nq).

Blocks of sample t (head h) are given either by the grid scheme, two int32 scalars (W, U) per head
and sample (block of position p is floor((p + U) / W)), or per position as precomputed block
bounds ``start``/``end`` [H, r, Nk] (cut scheme; ``Partitions.block_bounds()``). One kernel serves
both: only the way s_t(p), e_t(p) are obtained differs.

Per (batch, head, query tile of BLOCK_M rows) the kernel walks the key tiles in the union of the
tile's blocks over the r samples, in three stretches:

* left boundary tiles: counts c_ij evaluated per element (r comparisons; causal needs only the
  starts s_t(i), since e_t(i) > i >= j);
* interior tiles: inside every sample's block for every row of the tile (and, causal, below the
  diagonal), so c_ij = 1 and the tile is plain attention (no per-element work);
* right boundary tiles (the causal diagonal, or the block ends when bidirectional).

Tiles outside the union are never touched. Online softmax in base 2, fp32 accumulation, LSE out.
The weights enter multiplicatively as raw counts, p_ij = (r c_ij) * exp(s_ij - m_i), so no log or
division is evaluated per element (the common factor r cancels in the output and is taken out of
the LSE). Programs are ordered so that heads with the widest blocks (the most work) start first.

Backward is FlashAttention-2 style: recompute P from the LSE; delta = rowsum(dO * O); one kernel
per key tile for dK, dV (looping over the query heads of its KV group, so grouped KV needs no
atomics) over the queries whose blocks reach the tile (membership is symmetric: j is in i's
block iff i is in j's block), and one kernel per query tile for dQ.

Method "hybrid" (``HYBRID: tl.constexpr``; the LSH kernels compile exactly as without it): pairs with
|i - j| <= w_h get the exact ALiBi weight e^{-m_h |i - j|}, added to the logits as -m_h |i - j|, and
c_ij only beyond, so a pair in the near field is kept even when no sample puts it in i's block. Each
tile's range is the union of the blocks and the near field [i - w_h, i] (causal) or
[i - w_h, i + w_h]; interior tiles stay plain except for the near-field term (c_ij = 1 there), and so do tiles within
w_h of every row (their weights are exact whatever the counts): the near field costs a window's
work, not r compares per element. The slope and w_h come per head (``SLOPE2``, ``WIN``); general
positional kernels are not supported.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from .flex import normalize_grid

import triton
import triton.language as tl

__all__ = ["lsh_attention_triton", "lsh_attention_triton_fn", "LSHTritonAttention", "triton_backend",
           "supports_triton", "default_config", "tile_counts"]

LOG2E = 1.4426950408889634


def _interpreter_compat() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(ndarray)``, which
    NumPy >= 2.4 refuses for its shape-(1,) scalars (loop bounds fail with "only 0-dimensional
    arrays can be converted"). Patch that one conversion; only when TRITON_INTERPRET is set."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_poslsh_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._poslsh_patched = True
    interp._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_compat()


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bounds(pos, hR, t, W, U, S, E, Nk, CUT: tl.constexpr, FDIV: tl.constexpr = False):
    """Block [s, e) of sample t containing position(s) ``pos`` (clipped to [0, Nk))."""
    if CUT:
        base = (hR + t).to(tl.int64) * Nk
        s = tl.load(S + base + pos)
        e = tl.load(E + base + pos)
    else:
        w = tl.load(W + hR + t)
        u = tl.load(U + hR + t)
        x = pos + u
        if FDIV:
            # floor(x / w) through the float reciprocal (x < 2^24 is exact in fp32, so the float
            # quotient is off by at most one), then one integer correction: ~8 instructions
            # instead of a ~30-instruction integer division.
            qi = tl.floor(x.to(tl.float32) * (1.0 / w.to(tl.float32))).to(tl.int32)
            rem = x - qi * w
            qi = qi + (rem >= w).to(tl.int32) - (rem < 0).to(tl.int32)
        else:
            qi = x // w
        s0 = qi * w - u
        s = tl.maximum(s0, 0)
        e = tl.minimum(s0 + w, Nk)
    return s, e


@triton.jit
def _ranges(pa, pb, hR, W, U, S, E, Nk, R: tl.constexpr, CUT: tl.constexpr, FDIV: tl.constexpr):
    """For a tile of positions [pa, pb] (inclusive): union [lo, hi) of its blocks and the
    intersection [in_lo, in_hi) of all of them (positions sharing a block with every row)."""
    lo = Nk
    hi = 0
    in_lo = 0
    in_hi = Nk
    # One-element vectors reduced to scalars: the interpreter loads scalars as shape (1,).
    va = pa + tl.arange(0, 1)
    vb = pb + tl.arange(0, 1)
    for t in tl.static_range(R):
        sa, ea = _bounds(va, hR, t, W, U, S, E, Nk, CUT, FDIV)
        sb, eb = _bounds(vb, hR, t, W, U, S, E, Nk, CUT, FDIV)
        lo = tl.minimum(lo, tl.min(sa, 0))
        hi = tl.maximum(hi, tl.max(eb, 0))
        in_lo = tl.maximum(in_lo, tl.max(sb, 0))
        in_hi = tl.minimum(in_hi, tl.min(ea, 0))
    return lo, hi, in_lo, in_hi


@triton.jit
def _pos(x, FDIV: tl.constexpr):
    """Positions for comparisons: float32 when exact (FDIV). Integer compares of positions derived from
    the loop index cost two instructions each (LLVM widens the index to 64 bits); float, one."""
    if FDIV:
        x = x.to(tl.float32)
    return x


@triton.jit
def _counts(rows_pos, cols_pos, hR, W, U, S, E, Nk, R: tl.constexpr, CUT: tl.constexpr,
            CAUSAL: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr, FDIV: tl.constexpr):
    """Collision counts r c_ij (0..r) between query and key positions as a float32 tile.

    ``rows_pos`` indexes dim 0 and ``cols_pos`` dim 1; the query side is dim 0 when
    ROWS_ARE_QUERIES, else dim 1. Positions must already be clipped to [0, Nk).

    This is the kernel's hot spot (r compares per element of every boundary tile). With FDIV
    (positions < 2^23, exact in float32) positions and block bounds are compared as floats and
    counted in float32: compare-and-add then runs on the FP32 pipe, twice as wide as the INT32
    pipe on Hopper, and the count needs no conversion before it weights p."""
    if ROWS_ARE_QUERIES:
        qpos = rows_pos
        kpos = cols_pos
    else:
        qpos = cols_pos
        kpos = rows_pos
    kpos = _pos(kpos, FDIV)
    cnt = tl.zeros([rows_pos.shape[0], cols_pos.shape[0]], dtype=tl.float32)
    for t in tl.static_range(R):
        s, e = _bounds(qpos, hR, t, W, U, S, E, Nk, CUT, FDIV)
        s = _pos(s, FDIV)
        e = _pos(e, FDIV)
        if ROWS_ARE_QUERIES:
            kk = kpos[None, :]
            s = s[:, None]
            e = e[:, None]
        else:
            kk = kpos[:, None]
            s = s[None, :]
            e = e[None, :]
        if CAUSAL:  # e > query position >= key position: only the start matters
            hit = kk >= s
        else:
            hit = (kk >= s) & (kk < e)
        cnt = tl.where(hit, cnt + 1.0, cnt)
    return cnt


@triton.jit
def _head_near(SLOPE2, WIN, h):
    """Hybrid: head h's slope times log2(e) and near-field half-width w_h, as scalars."""
    one = tl.arange(0, 1)  # one-element loads reduced to scalars (the interpreter's scalars are (1,))
    return tl.sum(tl.load(SLOPE2 + h + one), 0), tl.sum(tl.load(WIN + h + one), 0)


@triton.jit
def _plain_range(in_lo, in_hi, pa, pb, wh, Nk, HYBRID: tl.constexpr):
    """Positions [in_lo, in_hi) whose tiles need no per-element counts, for a tile of positions
    [pa, pb] on the other side: the intersection of the tile's blocks over the samples (c_ij = 1),
    and with HYBRID also the keys within w_h of every row, [pb - w_h, pa + w_h] (their weight is
    the exact e^{-m |i - j|} whatever the counts; the near-field term is added per element).
    When both are non-empty they share the tile's middle, so their union is one interval."""
    if HYBRID:
        near_lo = tl.maximum(pb - wh, 0)
        near_hi = tl.minimum(pa + wh + 1, Nk)
        both = in_lo < in_hi
        in_lo, in_hi = (tl.where(near_lo < near_hi, tl.where(both, tl.minimum(in_lo, near_lo), near_lo), in_lo),
                        tl.where(near_lo < near_hi, tl.where(both, tl.maximum(in_hi, near_hi), near_hi), in_hi))
    return in_lo, in_hi


@triton.jit
def _near_field(qk, diff, slope2, wh):
    """Hybrid near field: pairs with |i - j| <= w_h (``diff`` = i - j) get the exact ALiBi weight,
    added to the logits as -slope2 |i - j| (``slope2``: m_h log2(e) in the units of ``qk``); the
    caller then gives them the weight of a full collision, r, instead of the count (interior
    tiles: r everywhere already). Returns (near, qk)."""
    dist = tl.abs(diff)
    near = dist <= wh
    qk = tl.where(near, qk - slope2 * dist.to(tl.float32), qk)
    return near, qk


@triton.jit
def _query_tile(pid, ORDER, B, Nq, Nk, q_offset, BLOCK_M: tl.constexpr):
    """Program ``pid`` of a query-tile grid (heads in ``ORDER``, widest first; then batch; then tiles):
    batch b, head h, rows offs_m [BLOCK_M], their key positions (and clipped to [0, Nk)), and the
    first and last real positions pa, pb."""
    n_mt = tl.cdiv(Nq, BLOCK_M)
    rest = pid // n_mt
    h = tl.sum(tl.load(ORDER + rest // B + tl.arange(0, 1)), 0)
    m0 = (pid % n_mt) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_pos = offs_m + q_offset
    pa = m0 + q_offset
    pb = tl.minimum(m0 + BLOCK_M, Nq) - 1 + q_offset
    return rest % B, h, offs_m, q_pos, tl.minimum(q_pos, Nk - 1), pa, pb


@triton.jit
def _key_stretches(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN, Nk, R: tl.constexpr, CUT: tl.constexpr,
                   CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, FDIV: tl.constexpr, HYBRID: tl.constexpr):
    """The key tiles a query tile of positions [pa, pb] visits (forward and dQ), as three stretches:
    boundary [a, e1), plain [bnd, c), boundary [s3, d); and head h's hybrid slope2, w_h (0 unless HYBRID).

    Without plain tiles (the usual case for LSH with r >= 2) one boundary stretch covers [a, d): one
    software pipeline instead of two short ones."""
    lo, hi, in_lo, in_hi = _ranges(pa, pb, hR, W, U, S, E, Nk, R, CUT, FDIV)
    slope2 = 0.0
    wh = 0
    if HYBRID:  # add the near field [pa - w_h, pb + w_h] to the union of the blocks
        slope2, wh = _head_near(SLOPE2, WIN, h)
        lo = tl.minimum(lo, tl.maximum(pa - wh, 0))
        hi = tl.maximum(hi, tl.minimum(pb + wh + 1, Nk))
    in_lo, in_hi = _plain_range(in_lo, in_hi, pa, pb, wh, Nk, HYBRID)
    if CAUSAL:
        hi = tl.minimum(hi, pb + 1)
        in_hi = tl.minimum(in_hi, pa + 1)
    a = (lo // BLOCK_N) * BLOCK_N
    d = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    bnd = tl.minimum(tl.maximum(tl.cdiv(in_lo, BLOCK_N) * BLOCK_N, a), d)
    c = tl.maximum(bnd, tl.minimum((in_hi // BLOCK_N) * BLOCK_N, d))
    e1 = tl.where(c > bnd, bnd, d)
    s3 = tl.where(c > bnd, c, d)
    return a, e1, bnd, c, s3, d, slope2, wh


@triton.jit
def _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, stop,
                 q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope_raw, wh,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                 R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                 PREC: tl.constexpr, FDIV: tl.constexpr, HYBRID: tl.constexpr):
    """Online softmax over key tiles [start, stop) with weights r c_ij: the raw count on boundary
    tiles, r (as +log2 r in the exponent) on plain tiles. The common factor r cancels in the output
    and is taken out of the LSE by the caller. ``m_i`` is the running max of the scaled base-2
    logits; the scale enters in the exponent's FMA (masking and the max work on raw q.k)."""
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = offs_d[None, :] < HEAD_DIM
        if BOUNDARY:
            kv_mask = kv_mask & (offs_n[:, None] < Nk)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HYBRID:
            near, qk = _near_field(qk, q_pos[:, None] - offs_n[None, :], slope_raw, wh)
        if BOUNDARY:
            cols_c = tl.minimum(offs_n, Nk - 1)
            cnt = _counts(q_pos_c, cols_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, True, FDIV)
            hit = cnt > 0
            if HYBRID:
                hit = hit | near
            if CAUSAL:  # key <= query position < Nk for every real row
                hit = hit & (_pos(offs_n, FDIV)[None, :] <= _pos(q_pos, FDIV)[:, None])
            else:
                hit = hit & (offs_n[None, :] < Nk)
            qk = tl.where(hit, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            if HYBRID:
                cnt = tl.where(near, R * 1.0, cnt)
            p = p * cnt
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - (m_new - log2_r)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, W, U, S, E, ORDER, SLOPE2, WIN,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                B, H, Nq, Nk, q_offset, group, qk_scale, log2_r,
                R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                FDIV: tl.constexpr, HYBRID: tl.constexpr):
    b, h, offs_m, q_pos, q_pos_c, pa, pb = _query_tile(tl.program_id(0), ORDER, B, Nq, Nk, q_offset, BLOCK_M)
    hk = h // group
    hR = h * R
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    q_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)

    a, e1, bnd, c, s3, d, slope2, wh = _key_stretches(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN, Nk, R, CUT,
                                                      CAUSAL, BLOCK_N, FDIV, HYBRID)
    slope_raw = slope2 / qk_scale  # the near-field slope in units of raw q.k (the forward scales late)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, a, e1,
                                 q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope_raw, wh,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV, HYBRID)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, bnd, c,
                                 q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope_raw, wh,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, False, PREC, FDIV, HYBRID)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, s3, d,
                                 q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope_raw, wh,
                                 BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV, HYBRID)

    out = acc / l_i[:, None]
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    # l_i sums r c_ij e^{...}: take the factor r out of the LSE.
    lse = (m_i + tl.math.log2(l_i) - log2_r) * 0.6931471805599453
    tl.store(LSE + (b * H + h).to(tl.int64) * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _dkdv_stretch(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                  start, stop, k_pos, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale, log2_r, slope2, wh,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                  R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                  PREC: tl.constexpr, FDIV: tl.constexpr, HYBRID: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        ld_mask = offs_d[None, :] < HEAD_DIM
        if BOUNDARY:
            ld_mask = ld_mask & (offs_m[:, None] < Nq)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=ld_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_don + offs_d[None, :], mask=ld_mask, other=0.0)
        if BOUNDARY:
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < Nq, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=offs_m < Nq, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        if HYBRID:
            near, qkT = _near_field(qkT, (offs_m + q_offset)[None, :] - k_pos[:, None], slope2, wh)
        if BOUNDARY:
            # P = (count / r) e^{s - lse}. Padded rows and columns need no mask: their q, dO (or k, v)
            # are zero, so they add nothing, and their dK, dV rows are not stored.
            q_pos = offs_m + q_offset
            q_pos_c = tl.minimum(q_pos, Nk - 1)
            cnt = _counts(k_pos_c, q_pos_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, False, FDIV)
            hit = cnt > 0
            if HYBRID:
                hit = hit | near
                cnt = tl.where(near, R * 1.0, cnt)
            if CAUSAL:
                hit = hit & (_pos(k_pos, FDIV)[:, None] <= _pos(q_pos, FDIV)[None, :])
            pT = tl.where(hit, tl.math.exp2(qkT - (lse2 + log2_r)[None, :]) * cnt, 0.0)
        else:
            pT = tl.math.exp2(qkT - lse2[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, W, U, S, E, ORDER, SLOPE2, WIN,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     B, H, Hkv, Nq, Nk, q_offset, group, qk_scale, log2_r, scale,
                     R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                     FDIV: tl.constexpr, HYBRID: tl.constexpr):
    pid = tl.program_id(0)
    n_nt = tl.cdiv(Nk, BLOCK_N)
    tile = pid % n_nt
    rest = pid // n_nt
    b = rest % B
    hk = tl.sum(tl.load(ORDER + rest // B + tl.arange(0, 1)), 0)

    n0 = tile * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = offs_n
    k_pos_c = tl.minimum(offs_n, Nk - 1)
    pa = n0
    pb = tl.minimum(n0 + BLOCK_N, Nk) - 1
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(group):
        h = hk * group + g
        hR = h * R
        lo, hi, in_lo, in_hi = _ranges(pa, pb, hR, W, U, S, E, Nk, R, CUT, FDIV)
        slope2 = 0.0  # slope * log2(e) and w_h: used only when HYBRID
        wh = 0
        if HYBRID:  # add the queries whose near field reaches the tile: [pa - w_h, pb + w_h]
            slope2, wh = _head_near(SLOPE2, WIN, h)
            lo = tl.minimum(lo, pa - wh)
            hi = tl.maximum(hi, pb + wh + 1)
        in_lo, in_hi = _plain_range(in_lo, in_hi, pa, pb, wh, Nk, HYBRID)
        if CAUSAL:
            lo = tl.maximum(lo, pa)
            in_lo = tl.maximum(in_lo, pb)
        # positions -> query rows
        ilo = tl.maximum(lo - q_offset, 0)
        ihi = tl.minimum(hi - q_offset, Nq)
        a = (ilo // BLOCK_M) * BLOCK_M
        d = tl.maximum(tl.cdiv(ihi, BLOCK_M) * BLOCK_M, a)
        bnd = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(in_lo - q_offset, 0), BLOCK_M) * BLOCK_M, a), d)
        ih = (tl.minimum(in_hi - q_offset, Nq) // BLOCK_M) * BLOCK_M
        c = tl.maximum(bnd, tl.minimum(ih, d))
        e1 = tl.where(c > bnd, bnd, d)
        s3 = tl.where(c > bnd, c, d)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Nq
        delta_base = DELTA + (b * H + h).to(tl.int64) * Nq
        dk, dv = _dkdv_stretch(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                               a, e1, k_pos, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale, log2_r,
                               slope2, wh, BLOCK_M, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV,
                               HYBRID)
        dk, dv = _dkdv_stretch(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                               bnd, c, k_pos, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale, log2_r,
                               slope2, wh, BLOCK_M, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, False, PREC, FDIV,
                               HYBRID)
        dk, dv = _dkdv_stretch(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                               s3, d, k_pos, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale, log2_r,
                               slope2, wh, BLOCK_M, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV,
                               HYBRID)

    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start, stop,
                q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                PREC: tl.constexpr, FDIV: tl.constexpr, HYBRID: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = offs_d[None, :] < HEAD_DIM
        if BOUNDARY:
            kv_mask = kv_mask & (offs_n[:, None] < Nk)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if HYBRID:
            near, qk = _near_field(qk, q_pos[:, None] - offs_n[None, :], slope2, wh)
        if BOUNDARY:  # padded key columns are zero in k and v: they add nothing to dQ
            cols_c = tl.minimum(offs_n, Nk - 1)
            cnt = _counts(q_pos_c, cols_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, True, FDIV)
            hit = cnt > 0
            if HYBRID:
                hit = hit | near
                cnt = tl.where(near, R * 1.0, cnt)
            if CAUSAL:
                hit = hit & (_pos(offs_n, FDIV)[None, :] <= _pos(q_pos, FDIV)[:, None])
            p = tl.where(hit, tl.math.exp2(qk - (lse2 + log2_r)[:, None]) * cnt, 0.0)
        else:
            p = tl.math.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, W, U, S, E, ORDER, SLOPE2, WIN,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   stride_dqb, stride_dqh, stride_dqn,
                   B, H, Nq, Nk, q_offset, group, qk_scale, log2_r, scale,
                   R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                   FDIV: tl.constexpr, HYBRID: tl.constexpr):
    b, h, offs_m, q_pos, q_pos_c, pa, pb = _query_tile(tl.program_id(0), ORDER, B, Nq, Nk, q_offset, BLOCK_M)
    hk = h // group
    hR = h * R
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + (b * H + h).to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * H + h).to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    a, e1, bnd, c, s3, d, slope2, wh = _key_stretches(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN, Nk, R, CUT,
                                                      CAUSAL, BLOCK_N, FDIV, HYBRID)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, a, e1,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh,
                     BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV, HYBRID)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, bnd, c,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh,
                     BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, False, PREC, FDIV, HYBRID)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, s3, d,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh,
                     BLOCK_N, BLOCK_D, HEAD_DIM, R, CUT, CAUSAL, True, PREC, FDIV, HYBRID)
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------


def default_config(dtype: torch.dtype, head_dim: int, device_type: str = "cuda") -> dict[str, int]:
    """Tile sizes and launch parameters (tuned on an H200, see bench/NOTES.md)."""
    if device_type != "cuda":  # the interpreter: small tiles give many boundary/interior cases
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1,
                    BWD_BLOCK_M=16, BWD_BLOCK_N=16, bwd_num_warps=4, bwd_num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2,
                    BWD_BLOCK_M=32, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)
    # 16-bit, measured on an H200 at n = 256K, r = 8, D = 128 (kernel v3 sweep, bench/NOTES.md): the
    # per-element work dominates, so 16-key tiles, which compute the fewest pairs past the block
    # edges, are fastest forward (3 stages); the backward prefers 64 x 32.
    return dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=3,
                BWD_BLOCK_M=64, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)


def _interpreting() -> bool:
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


def tile_counts(partitions: Any, nq: int, causal: bool, block_m: int, block_n: int,
                q_offset: int | None = None, window: Tensor | None = None) -> dict[str, int]:
    """Key tiles the forward kernel visits, summed over heads and query tiles (batch 1).

    Mirrors ``_fwd_kernel``'s ranges; used for the FLOP count of the benchmark's floor. ``window``
    (int [H]): the hybrid's near-field half-widths, which widen the ranges.

    Returns:
        {"boundary": tiles with per-element counts, "interior": plain tiles (inside every block, or
         with ``window`` within w_h of every row),
         "pairs": (boundary + interior) * block_m * block_n}.
    """
    n = partitions.n
    qoff = n - nq if q_offset is None else q_offset
    dev = partitions.device
    m0 = torch.arange(0, nq, block_m, device=dev)
    pa = m0 + qoff
    pb = torch.clamp(m0 + block_m, max=nq) - 1 + qoff
    if partitions.scheme == "grid":
        w, u = (x.to(torch.int64)[..., None] for x in normalize_grid(partitions.widths, partitions.offsets, n))
        sa = torch.div(pa + u, w, rounding_mode="floor") * w - u
        sb = torch.div(pb + u, w, rounding_mode="floor") * w - u
        lo, in_lo = sa.clamp(min=0).amin(1), sb.clamp(min=0).amax(1)
        hi, in_hi = (sb + w).clamp(max=n).amax(1), (sa + w).clamp(max=n).amin(1)
    else:
        s, e = partitions.block_bounds()
        lo, in_lo = s[..., pa].amin(1), s[..., pb].amax(1)
        hi, in_hi = e[..., pb].amax(1), e[..., pa].amin(1)
    if window is not None:  # hybrid: the near field widens the range and joins the plain tiles
        wh = window.to(device=dev, dtype=torch.int64)[:, None]
        lo = torch.minimum(lo, (pa - wh).clamp(min=0))
        hi = torch.maximum(hi, (pb + wh + 1).clamp(max=n))
        near_lo, near_hi = (pb - wh).clamp(min=0), (pa + wh + 1).clamp(max=n)
        near, both = near_lo < near_hi, in_lo < in_hi
        in_lo = torch.where(near, torch.where(both, torch.minimum(in_lo, near_lo), near_lo), in_lo)
        in_hi = torch.where(near, torch.where(both, torch.maximum(in_hi, near_hi), near_hi), in_hi)
    if causal:
        hi = torch.minimum(hi, pb + 1)
        in_hi = torch.minimum(in_hi, pa + 1)
    bn = block_n
    a = torch.div(lo, bn, rounding_mode="floor") * bn
    d = -torch.div(-hi, bn, rounding_mode="floor") * bn
    bnd = torch.minimum(torch.maximum(-torch.div(-in_lo, bn, rounding_mode="floor") * bn, a), d)
    c = torch.maximum(bnd, torch.minimum(torch.div(in_hi, bn, rounding_mode="floor") * bn, d))
    interior = int(((c - bnd) // bn).sum())
    boundary = int(((bnd - a) // bn).sum() + ((d - c) // bn).sum())
    return {"boundary": boundary, "interior": interior, "pairs": (boundary + interior) * block_m * block_n}


class _Layout:
    """What the kernels need to know about the blocks: grid scalars or per-position bounds."""

    def __init__(self, widths: Tensor | None, offsets: Tensor | None, starts: Tensor | None,
                 ends: Tensor | None, n: int, num_heads: int, device: torch.device,
                 slopes: Tensor | None = None, window: Tensor | None = None):
        if starts is not None:
            assert ends is not None
            self.cut = True
            self.S = starts.to(device=device, dtype=torch.int32).contiguous()
            self.E = ends.to(device=device, dtype=torch.int32).contiguous()
            if self.S.shape[0] != num_heads or self.S.shape[-1] != n or self.S.shape != self.E.shape:
                raise ValueError(f"block bounds must be [H={num_heads}, r, n={n}], got {tuple(self.S.shape)}")
            self.r = self.S.shape[1]
            self.W = self.U = torch.zeros(1, dtype=torch.int32, device=device)
            # work per head ~ mean block size
            work = (self.E - self.S).float().mean(dim=(1, 2))
        else:
            assert widths is not None and offsets is not None
            self.cut = False
            if widths.shape[0] != num_heads or widths.shape != offsets.shape:
                raise ValueError(f"widths/offsets must be [H={num_heads}, r], got {tuple(widths.shape)}")
            self.W, self.U = normalize_grid(widths.to(device), offsets.to(device), n)
            self.r = self.W.shape[1]
            self.S = self.E = torch.zeros(1, dtype=torch.int32, device=device)
            work = self.W.float().mean(dim=1)
        # Hybrid (both given): exact ALiBi weights for |i - j| <= window[h]; slopes pre-multiplied by
        # log2(e) for the base-2 logits. None (LSH) compiles the kernels without the near field.
        self.hybrid = window is not None
        if (slopes is None) != (window is None):
            raise ValueError("the hybrid near field needs both slopes and window (or neither)")
        self.slope2 = self.win = None
        if self.hybrid:
            if slopes.shape != (num_heads,) or window.shape != (num_heads,):
                raise ValueError(f"slopes and window must be [H={num_heads}], got {tuple(slopes.shape)}, "
                                 f"{tuple(window.shape)}")
            if not bool(torch.isfinite(slopes).all()) or bool((slopes < 0).any()) or bool((window < 0).any()):
                raise ValueError("slopes must be finite and >= 0, window >= 0")
            self.slope2 = (slopes.to(device=device, dtype=torch.float64) * LOG2E).to(torch.float32).contiguous()
            self.win = window.to(device=device, dtype=torch.int64).clamp(max=n).to(torch.int32).contiguous()
            work = torch.maximum(work, self.win.float().to(work.device))  # the near field is visited too
        self.order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
        self.work = work

    def kv_order(self, group: int) -> Tensor:
        w = self.work.reshape(-1, group).sum(1)
        return torch.argsort(w, descending=True, stable=True).to(torch.int32)


def _float_positions(nk: int, cfg: dict[str, Any]) -> bool:
    """Positions and block bounds as float32 (block starts by reciprocal, compares on the FP32 pipe)
    when every position + offset < 2^24 is exact; ``config={"float_positions": False}`` forces the
    integer path, which longer sequences take (tests run it at small sizes)."""
    return 2 * nk < 2**24 and bool(cfg.get("float_positions", True))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _fwd(q: Tensor, k: Tensor, v: Tensor, lay: _Layout, causal: bool, scale: float, q_offset: int,
         cfg: dict[str, int]) -> tuple[Tensor, Tensor]:
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    bm = cfg["BLOCK_M"]
    _fwd_kernel[(triton.cdiv(Nq, bm) * B * H,)](
        q, k, v, o, lse, lay.W, lay.U, lay.S, lay.E, lay.order, lay.slope2, lay.win,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        B, H, Nq, Nk, q_offset, H // Hkv, scale * LOG2E, math.log2(lay.r),
        R=lay.r, CUT=lay.cut, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], PREC=_prec(q.dtype), FDIV=_float_positions(Nk, cfg),
        HYBRID=lay.hybrid, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return o, lse


def _bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, lay: _Layout, causal: bool,
         scale: float, q_offset: int, cfg: dict[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    do = do.contiguous() if do.stride(-1) != 1 else do
    delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, H, Nq]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    bm, bn = cfg["BWD_BLOCK_M"], cfg["BWD_BLOCK_N"]
    bd = max(16, triton.next_power_of_2(D))
    common = dict(R=lay.r, CUT=lay.cut, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn,
                  PREC=_prec(q.dtype), FDIV=_float_positions(Nk, cfg), HYBRID=lay.hybrid,
                  num_warps=cfg["bwd_num_warps"], num_stages=cfg["bwd_num_stages"])
    _bwd_dkdv_kernel[(triton.cdiv(Nk, bn) * B * Hkv,)](
        q, k, v, do, lse, delta, dk, dv, lay.W, lay.U, lay.S, lay.E, lay.kv_order(group), lay.slope2, lay.win,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        B, H, Hkv, Nq, Nk, q_offset, group, scale * LOG2E, math.log2(lay.r), scale, **common)
    _bwd_dq_kernel[(triton.cdiv(Nq, bm) * B * H,)](
        q, k, v, do, lse, delta, dq, lay.W, lay.U, lay.S, lay.E, lay.order, lay.slope2, lay.win,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        B, H, Nq, Nk, q_offset, group, scale * LOG2E, math.log2(lay.r), scale, **common)
    return dq, dk, dv


def _last_contig(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class LSHTritonAttention(torch.autograd.Function):
    """autograd.Function over the Triton kernels: forward returns (out, lse); lse is not differentiable."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, lay: _Layout, causal: bool, scale: float,
                q_offset: int, cfg: dict[str, int]) -> tuple[Tensor, Tensor]:
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        o, lse = _fwd(q, k, v, lay, causal, scale, q_offset, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.lay, ctx.causal, ctx.scale, ctx.q_offset, ctx.cfg = lay, causal, scale, q_offset, cfg
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: Tensor, dlse: Tensor | None):  # noqa: ARG004 - lse is non-differentiable
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(do, q, k, v, o, lse, ctx.lay, ctx.causal, ctx.scale, ctx.q_offset, ctx.cfg)
        return dq, dk, dv, None, None, None, None, None


def lsh_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    widths: Tensor | None = None,
    offsets: Tensor | None = None,
    *,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | None = None,
    config: dict[str, int] | None = None,
    slopes: Tensor | None = None,
    window: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Positional-LSH attention (fused estimator) with the Triton kernel; differentiable in q, k, v.

    Args:
        q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] with H % Hkv == 0 (query head h uses kv head
            h // (H // Hkv)); float16, bfloat16 or float32, all the same dtype.
        widths, offsets: grid scheme, int [H, r] (``Partitions.widths/offsets``), or
        starts, ends: per-position block bounds int [H, r, Nk] (``Partitions.block_bounds()``,
            any scheme).
        causal: also require key position <= query position.
        scale: logit scale, default 1/sqrt(D).
        q_offset: key position of query row 0, default Nk - Nq.
        config: override tile sizes (see ``default_config``).
        slopes, window: the hybrid estimator (method "hybrid"), both [H] or both None: pairs with
            |i - j| <= window[h] get the exact ALiBi weight exp(-slopes[h] |i - j|) instead of c_ij.

    Returns:
        (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] float32, natural log of
        sum_j c_ij exp(scale q_i . k_j), c_ij the method's weight).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or H % k.shape[1] != 0:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if not (math.isfinite(scale) and scale > 0):
        # the kernel takes the row max on unscaled q.k and scales it afterwards
        raise ValueError(f"scale must be finite and > 0 for the Triton kernel, got {scale}")
    if q_offset is None:
        q_offset = Nk - Nq
    if q_offset < 0 or q_offset + Nq > Nk:
        raise ValueError(f"queries at positions {q_offset}..{q_offset + Nq - 1} exceed Nk = {Nk}")
    lay = _Layout(widths, offsets, starts, ends, Nk, H, q.device, slopes, window)
    cfg = dict(default_config(q.dtype, D, q.device.type))
    if config:
        cfg.update(config)
    if Nq == 0 or Nk == 0:
        return q.new_zeros(B, H, Nq, v.shape[-1]), q.new_zeros(B, H, Nq, dtype=torch.float32)
    return LSHTritonAttention.apply(q, k, v, lay, bool(causal), float(scale), int(q_offset), cfg)


def lsh_attention_triton_fn(q: Tensor, k: Tensor, v: Tensor, partitions: Any, *, causal: bool = True,
                            scale: float | None = None, q_offset: int | None = None,
                            config: dict[str, int] | None = None, slopes: Tensor | None = None,
                            window: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same as ``lsh_attention_triton`` taking a ``Partitions`` (grid: scalars; cut: block bounds)."""
    near = dict(causal=causal, scale=scale, q_offset=q_offset, config=config, slopes=slopes, window=window)
    if partitions.scheme == "grid":
        return lsh_attention_triton(q, k, v, partitions.widths, partitions.offsets, **near)
    s, e = partitions.block_bounds()
    return lsh_attention_triton(q, k, v, starts=s, ends=e, **near)


# --------------------------------------------------------------------------------------------------
# Backend registration (poslsh.attention(..., backend="triton"))
# --------------------------------------------------------------------------------------------------


def triton_backend(q: Tensor, k: Tensor, v: Tensor, spec: Any) -> tuple[Tensor, Tensor]:
    """``fn(q, k, v, spec)`` for the dispatcher: method "lsh" or "hybrid" (ALiBi slopes, near-field
    half-widths ``spec.window``) with the spec's partitions."""
    kw = dict(causal=spec.causal, scale=spec.scale, q_offset=spec.q_offset)
    if spec.method == "hybrid":
        kw.update(slopes=spec.slopes, window=spec.window)
    d, dv = q.shape[-1], v.shape[-1]
    if dv != d:  # one head dim in the kernel: zero-pad (q.k unchanged) and slice the output
        m = max(d, dv)
        pad = lambda x: torch.nn.functional.pad(x, (0, m - x.shape[-1]))  # noqa: E731
        out, lse = lsh_attention_triton_fn(pad(q), pad(k), pad(v), spec.partitions, **kw)
        return out[..., :dv], lse
    return lsh_attention_triton_fn(q, k, v, spec.partitions, **kw)


def supports_triton(q: Tensor, spec: Any) -> bool:
    """lsh (any kernel's partitions) or hybrid (ALiBi slopes only: the near field is e^{-m|i-j|}), no key
    padding mask, fp16/bf16/fp32 on CUDA (or anywhere under TRITON_INTERPRET=1), head dims 16..256."""
    if spec.method not in ("lsh", "hybrid") or spec.key_padding_mask is not None or spec.partitions is None:
        return False
    if spec.method == "hybrid" and (getattr(spec, "kernels", None) is not None or spec.window is None):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.device.type != "cuda" and not _interpreting():
        return False
    if spec.scale is not None and not (math.isfinite(spec.scale) and spec.scale > 0):
        return False
    return 16 <= q.shape[-1] <= 256 and spec.partitions.n < 2**30


def _register() -> None:
    from .dispatch import register_backend

    # The estimator's weights are collision counts, whatever kernel the partitions were drawn for,
    # so the kernel also serves general positional kernels (method "lsh"; "hybrid" only with ALiBi
    # slopes, which supports_triton checks: its near field is e^{-m|i-j|}). Under TRITON_INTERPRET=1
    # the kernel runs on the CPU only to be tested: it then ranks below every torch backend, so
    # "auto" never routes CPU work through the (slow) interpreter; backend="triton" still reaches it.
    register_backend("triton", triton_backend, supports_triton, priority=-10 if _interpreting() else 100,
                     methods=("lsh", "hybrid"), kernels=True)


_register()
