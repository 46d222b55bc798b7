"""The backward kernels (every method), FlashAttention-2 style.

P is recomputed from the forward's LSE; delta = rowsum(dO * O). One program per key tile computes
dK, dV over the queries whose weight on the tile is non-zero (looping over the query heads of its KV
group, so grouped KV needs no atomics); one program per query tile computes dQ over its keys. Both
walk the same stretches as the forward (``jit``): membership is symmetric, so a key tile's queries
come from the same ranges, clipped by causality the other way (queries >= the tile's first key).

Weights per element: ALiBi (exact, window, hybrid's near field) as -m |i - j| added to the scaled
base-2 logits; LSH as the count r c_ij multiplying exp2(s - lse - log2 r).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import BOTH, EXACT, HYBRID, LEFT, PLAIN, RIGHT, WINDOW, as_pos, edge_split, fdiff, load_tile, \
    lsh_counts, method_ranges, near_field, query_tile, stretches


@triton.jit
def _bwd_delta_kernel(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                      H, Nq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                      HAS_DLSE: tl.constexpr):
    """delta [B, H, Nq] (fp32, contiguous) = rowsum(dO * O) - dLSE for BLOCK_R rows of one (batch, head) per
    program: dO and O read once in their dtype (torch's ``(do.float() * o.float()).sum(-1)`` writes and
    rereads two fp32 copies, ~7x the bytes). DLSE: fp32 [B, H, Nq] contiguous, read when HAS_DLSE."""
    n_rt = tl.cdiv(Nq, BLOCK_R)
    bh = tl.program_id(0) // n_rt
    first = (tl.program_id(0) % n_rt) * BLOCK_R
    b = bh // H
    h = bh % H
    rows = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    o_tile = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + first.to(tl.int64) * stride_on
    do_tile = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + first.to(tl.int64) * stride_don
    o = load_tile(o_tile, stride_on, rows, offs_d, first, Nq, HEAD_DIM, True).to(tl.float32)
    do = load_tile(do_tile, stride_don, rows, offs_d, first, Nq, HEAD_DIM, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    offs = bh.to(tl.int64) * Nq + first + rows
    ok = first + rows < Nq
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + offs, mask=ok, other=0.0)
    tl.store(DELTA + offs, delta, mask=ok)


@triton.jit
def _weights(sT, q_pos, k_pos, k_pos_c, q_pos_c, lse2, keep, hR, W, U, S, E, Nk, log2_r, slope2, wh, wr,
             METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
             BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, FDIV: tl.constexpr, KEYS_ARE_ROWS: tl.constexpr):
    """P (as the forward normalised it) for scaled base-2 logits ``sT``; keys index dim 0 when
    KEYS_ARE_ROWS (dK/dV kernel: sT is [keys, queries]) and dim 1 otherwise (dQ kernel).

    ``lse2`` is the forward's LSE in base 2 along the query dim, ``keep`` the key padding mask along
    the key dim (unused without HAS_KPM)."""
    if KEYS_ARE_ROWS:
        qp = q_pos[None, :]
        kp = k_pos[:, None]
        l2 = lse2[None, :]
    else:
        qp = q_pos[:, None]
        kp = k_pos[None, :]
        l2 = lse2[:, None]
    if METHOD == EXACT or METHOD == WINDOW:
        diff = fdiff(qp, kp, FDIV)  # i - j
        x = sT - slope2 * tl.abs(diff) - l2
        # one compare per element for the edge the tile crosses (jit.PLAIN ... BOTH): i - j <= wl on the left,
        # i - j >= -wr on the right (causal: >= 0); keys past Nk (not causal) go with the right edge
        right = 0.0 if CAUSAL else -wr.to(tl.float32)
        if METHOD == WINDOW and BOUNDARY == BOTH:
            x = tl.where((diff <= wh.to(tl.float32)) & (diff >= right), x, float("-inf"))
        elif METHOD == WINDOW and BOUNDARY == LEFT:
            x = tl.where(diff <= wh.to(tl.float32), x, float("-inf"))
        elif (CAUSAL or METHOD == WINDOW) and BOUNDARY >= RIGHT:
            x = tl.where(diff >= right, x, float("-inf"))
        if not CAUSAL and BOUNDARY >= RIGHT:
            x = tl.where(kp < Nk, x, float("-inf"))
        if HAS_KPM:
            if KEYS_ARE_ROWS:
                x = tl.where(keep[:, None], x, float("-inf"))
            else:
                x = tl.where(keep[None, :], x, float("-inf"))
        p = tl.math.exp2(x)
    else:
        if METHOD == HYBRID:
            near, sT = near_field(sT, qp - kp, slope2, wh)
        if HAS_KPM:
            if KEYS_ARE_ROWS:
                sT = tl.where(keep[:, None], sT, float("-inf"))
            else:
                sT = tl.where(keep[None, :], sT, float("-inf"))
        if BOUNDARY:
            # Padded rows and columns need no mask: their q, dO (or k, v) are zero, so they add nothing,
            # and their dK, dV or dQ rows are not stored.
            if KEYS_ARE_ROWS:
                cnt = lsh_counts(k_pos_c, q_pos_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, False, FDIV)
            else:
                cnt = lsh_counts(q_pos_c, k_pos_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, True, FDIV)
            hit = cnt > 0
            if METHOD == HYBRID:
                hit = hit | near
                cnt = tl.where(near, R * 1.0, cnt)
            if CAUSAL:
                hit = hit & (as_pos(kp, FDIV) <= as_pos(qp, FDIV))
            p = tl.where(hit, tl.math.exp2(sT - (l2 + log2_r)) * cnt, 0.0)
        else:
            p = tl.math.exp2(sT - l2)
    return p


@triton.jit
def _dkdv_stretch(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                  start, stop, k_pos, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale, log2_r, slope2, wh, wr,
                  METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                  BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, PREC: tl.constexpr, FDIV: tl.constexpr, b, h, TMA: tl.constexpr):
    """dK, dV of a key tile over the query tiles [start, stop). TMA: ``q_base``, ``do_base`` are tensor
    descriptors of Q, dO [B, H, Nq, D] (tiles [1, 1, BLOCK_M, BLOCK_D], zero past Nq and D) read at (b, h)."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)
    if not TMA:
        q_tile = q_base + start.to(tl.int64) * stride_qn  # 64-bit tile pointers (see forward._fwd_stretch)
        do_tile = do_base + start.to(tl.int64) * stride_don
    for m0 in range(start, stop, BLOCK_M):
        offs_m = m0 + rows
        if TMA:
            q = q_base.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_D)
            do = do_base.load([b, h, m0, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = load_tile(q_tile, stride_qn, rows, offs_d, m0, Nq, HEAD_DIM, BOUNDARY)
            do = load_tile(do_tile, stride_don, rows, offs_d, m0, Nq, HEAD_DIM, BOUNDARY)
            q_tile += BLOCK_M * stride_qn
            do_tile += BLOCK_M * stride_don
        if BOUNDARY:
            lse2 = tl.load(lse_base + offs_m, mask=offs_m < Nq, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m, mask=offs_m < Nq, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        q_pos = offs_m + q_offset
        pT = _weights(sT, q_pos, k_pos, k_pos_c, tl.minimum(q_pos, Nk - 1), lse2, keep, hR, W, U, S, E, Nk,
                      log2_r, slope2, wh, wr, METHOD, R, CUT, CAUSAL, BOUNDARY, HAS_KPM, FDIV, True)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, W, U, S, E, ORDER, SLOPE2, WIN, WIN_R,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, stride_kpmb,
                     B, H, Hkv, Nq, Nk, q_offset, group, qk_scale, log2_r, scale,
                     METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr, FDIV: tl.constexpr, HAS_KPM: tl.constexpr, TMA: tl.constexpr = False):
    """dK, dV of one key tile; the KV heads in ORDER, then batch, then tiles. TMA: Q and DO are tensor descriptors (``_dkdv_stretch``),
    their stride arguments unread."""
    n_kt = tl.cdiv(Nk, BLOCK_N)
    rest = tl.program_id(0) // n_kt
    tile = tl.program_id(0) % n_kt
    b = rest % B
    hk = tl.sum(tl.load(ORDER + rest // B + tl.arange(0, 1)), 0)

    n0 = tile * BLOCK_N
    rows = tl.arange(0, BLOCK_N)
    offs_n = n0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    k_pos_c = tl.minimum(offs_n, Nk - 1)
    pa = n0
    pb = tl.minimum(n0 + BLOCK_N, Nk) - 1
    kv_mask = (offs_n[:, None] < Nk) & (offs_d[None, :] < HEAD_DIM)
    n64 = n0.to(tl.int64)
    k_tile = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + n64 * stride_kn
    v_tile = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + n64 * stride_vn
    k = tl.load(k_tile + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_tile + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    keep = offs_n < Nk
    if HAS_KPM:
        keep = tl.load(KPM + b.to(tl.int64) * stride_kpmb + offs_n, mask=offs_n < Nk, other=0) != 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for g in range(group):
        h = hk * group + g
        hR = h * R
        # The queries of a key tile: the band with its sides swapped (WIN_R as the left widths).
        lo, hi, in_lo, in_hi, slope2, wr, wh = method_ranges(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN_R, WIN, Nk,
                                                             METHOD, R, CUT, FDIV)
        if CAUSAL:  # queries at or after the tile's keys
            lo = tl.maximum(lo, pa)
            in_lo = tl.maximum(in_lo, pb)
        # positions -> query rows
        a, e1, bnd, c, s3, d = stretches(tl.maximum(lo - q_offset, 0), tl.minimum(hi - q_offset, Nq),
                                         tl.maximum(in_lo - q_offset, 0), tl.minimum(in_hi - q_offset, Nq), BLOCK_M)
        bh = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        if TMA:
            q_base, do_base = Q, DO
        else:
            q_base = Q + bh
            do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * H + h).to(tl.int64) * Nq
        delta_base = DELTA + (b * H + h).to(tl.int64) * Nq
        # Both boundary stretches test both edges: a fourth loop (one edge each, as the forward's) made ptxas
        # serialize this kernel's wgmma (40 WARPGROUP syncs per iteration at 255 registers, bench/sass_report.py)
        dk, dv = _dkdv_stretch(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn,
                               stride_don, a, e1, offs_n, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale,
                               log2_r, slope2, wh, wr, METHOD, R, CUT, CAUSAL, BOTH, HAS_KPM, BLOCK_M, BLOCK_D,
                               HEAD_DIM, PREC, FDIV, b, h, TMA)
        dk, dv = _dkdv_stretch(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn,
                               stride_don, bnd, c, offs_n, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale,
                               log2_r, slope2, wh, wr, METHOD, R, CUT, CAUSAL, PLAIN, HAS_KPM, BLOCK_M, BLOCK_D,
                               HEAD_DIM, PREC, FDIV, b, h, TMA)
        dk, dv = _dkdv_stretch(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base, stride_qn,
                               stride_don, s3, d, offs_n, k_pos_c, hR, W, U, S, E, Nq, Nk, q_offset, qk_scale,
                               log2_r, slope2, wh, wr, METHOD, R, CUT, CAUSAL, BOTH, HAS_KPM, BLOCK_M, BLOCK_D,
                               HEAD_DIM, PREC, FDIV, b, h, TMA)

    dk = dk * scale
    dk_tile = DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + n64 * stride_dkn
    dv_tile = DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + n64 * stride_dvn
    tl.store(dk_tile + rows[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_tile + rows[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, start, stop,
                q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr,
                METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr, PREC: tl.constexpr, FDIV: tl.constexpr, b, hk, TMA: tl.constexpr):
    """dQ of a query tile over the key tiles [start, stop). TMA: ``k_base``, ``v_base`` are tensor descriptors
    of K, V (as the forward's, ``forward._fwd_stretch``) read at (b, hk)."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    if not TMA:
        k_tile = k_base + start.to(tl.int64) * stride_kn
        v_tile = v_base + start.to(tl.int64) * stride_vn
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + rows
        if TMA:
            k = k_base.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_base.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = load_tile(k_tile, stride_kn, rows, offs_d, n0, Nk, HEAD_DIM, BOUNDARY >= RIGHT)
            v = load_tile(v_tile, stride_vn, rows, offs_d, n0, Nk, HEAD_DIM, BOUNDARY >= RIGHT)
            k_tile += BLOCK_N * stride_kn
            v_tile += BLOCK_N * stride_vn
        keep = offs_n < Nk
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Nk, other=0) != 0
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = _weights(s, q_pos, offs_n, tl.minimum(offs_n, Nk - 1), q_pos_c, lse2, keep, hR, W, U, S, E, Nk, log2_r,
                     slope2, wh, wr, METHOD, R, CUT, CAUSAL, BOUNDARY, HAS_KPM, FDIV, False)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, O, DLSE, DQ, KPM, W, U, S, E, ORDER, SLOPE2, WIN, WIN_R,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   stride_ob, stride_oh, stride_on, stride_dqb, stride_dqh, stride_dqn, stride_kpmb,
                   B, H, Nq, Nk, q_offset, group, qk_scale, log2_r, scale,
                   METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr, FDIV: tl.constexpr, HAS_KPM: tl.constexpr, DELTA_HERE: tl.constexpr,
                   HAS_DLSE: tl.constexpr, TMA: tl.constexpr = False):
    """dQ of one query tile. DELTA [B, H, Nq] fp32 is read, or with DELTA_HERE computed here from the tile's
    dO and O (rowsum(dO * O), less DLSE [B, H, Nq] fp32 with HAS_DLSE) and stored for the dK/dV kernel,
    launched after this one: the tile's dO is loaded anyway, so the delta costs one O tile, not a kernel
    that reads dO and O again. TMA: K and V are tensor descriptors (``_dq_stretch``), their stride arguments
    unread."""
    b, h, m0, offs_m, q_pos, q_pos_c, pa, pb = query_tile(tl.program_id(0), ORDER, B, Nq, Nk, q_offset, BLOCK_M)
    hk = h // group
    hR = h * R
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)
    row_ok = offs_m < Nq
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    m64 = m0.to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m64 * stride_qn
                + rows[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + m64 * stride_don
                 + rows[:, None] * stride_don + offs_d[None, :], mask=q_mask, other=0.0)
    lse2 = tl.load(LSE + (b * H + h).to(tl.int64) * Nq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    rows_bh = (b * H + h).to(tl.int64) * Nq + offs_m
    if DELTA_HERE:
        o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m64 * stride_on
                    + rows[:, None] * stride_on + offs_d[None, :], mask=q_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            delta = delta - tl.load(DLSE + rows_bh, mask=row_ok, other=0.0)
        tl.store(DELTA + rows_bh, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + rows_bh, mask=row_ok, other=0.0)
    if TMA:
        k_base, v_base = K, V
    else:
        k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kpm_base = KPM + b.to(tl.int64) * stride_kpmb

    lo, hi, in_lo, in_hi, slope2, wh, wr = method_ranges(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN, WIN_R, Nk, METHOD,
                                                         R, CUT, FDIV)
    if CAUSAL:
        hi = tl.minimum(hi, pb + 1)
        in_hi = tl.minimum(in_hi, pa + 1)
    a, e1, bnd, c, s3, d = stretches(lo, hi, in_lo, in_hi, BLOCK_N)

    first_stop = edge_split(a, e1, bnd, c, METHOD)  # as the forward: left edge, both, plain, right edge
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if METHOD == WINDOW:  # (exact's keys start at 0 = its plain tiles' start: no left edge, an empty stretch)
        dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, a, first_stop,
                         q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr,
                         METHOD, R, CUT, CAUSAL, LEFT, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV, b,
                         hk, TMA)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, first_stop, e1,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr,
                     METHOD, R, CUT, CAUSAL, BOTH, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV, b,
                     hk, TMA)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, bnd, c,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr,
                     METHOD, R, CUT, CAUSAL, PLAIN, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV, b,
                     hk, TMA)
    dq = _dq_stretch(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, s3, d,
                     q_pos, q_pos_c, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr,
                     METHOD, R, CUT, CAUSAL, RIGHT, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV, b,
                     hk, TMA)
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + m64 * stride_dqn
             + rows[:, None] * stride_dqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)
