"""The forward kernel (every method) and the merge of split-key partial results.

One program per (query tile of BLOCK_M rows, batch, head) walks the key tiles of its range (``jit``)
in stretches: boundary tiles test every element (causality, the band, collision counts), plain tiles
none. For ALiBi a boundary stretch tests only the band edge its tiles cross (left of the plain tiles
the left edge, right of them the diagonal or right edge): one compare per element, not three. Online
softmax in base 2, fp32 accumulation, LSE out. K and V come by pointers or (TMA) tensor descriptors.

ALiBi (exact, window) enters in the row frame of the tile's first position pa: for j <= i,
scale q.k - m (i - j) = [scale q.k + m (j - pa)] - m (i - pa), and the bracket is one FMA per element
with a per-column vector; the per-row term is a constant of the row, so it leaves the softmax and is
subtracted from the LSE at the end. Bidirectional tiles add -2 m (j - i)+ for keys right of the row.
The frame keeps logits near the diagonal small (|m (i - pa)| <= m BLOCK_M), so fp32 keeps them exact.

LSH and hybrid weights enter multiplicatively as raw counts, p_ij = (r c_ij) exp(s_ij - m_i), so no
log or division is evaluated per element (r cancels in the output and leaves through the LSE).

Decoding (few query rows against a long cache) splits each program's key range over the programs of
grid axis 1: each writes a normalised partial output and LSE, then takes a ticket, and the last of a
query tile's programs to finish merges the tile's partials (``_merge_splits``): one launch per call,
where a second kernel for the merge cost a launch's host time (~35 us on an H100's host, session 7).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import BOTH, EXACT, HYBRID, LEFT, PLAIN, RIGHT, WINDOW, as_pos, edge_split, load_tile, lsh_counts, \
    method_ranges, near_field, query_tile, stretches

EMPTY_LSE = tl.constexpr(-1.0e30)  # the library's lse of a row that sees no key (core.EMPTY_LSE)


@triton.jit
def _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, start, stop,
                 q_pos, q_pos_c, pa, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr, b, hk,
                 METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                 BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr, PREC: tl.constexpr, FDIV: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over the key tiles [start, stop). ``m_i`` is the running max of the base-2
    logits (ALiBi: in the row frame of pa; LSH: of the scaled q.k, the scale entering in the exp2 FMA).
    BOUNDARY: the band edges these tiles cross (PLAIN, LEFT, RIGHT, BOTH), so the tests each element needs
    (ALiBi; LSH and hybrid test every element of a non-PLAIN tile); keys past Nk are masked from RIGHT on.
    TMA: ``k_base``, ``v_base`` are tensor descriptors of K, V [B, Hkv, Nk, D] (tiles [1, 1, BLOCK_N, BLOCK_D],
    zero past Nk and D) read at (b, hk); else pointers to row 0 of the (b, hk) matrix."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    rows_f = rows.to(tl.float32)
    # ALiBi's tests in the row frame, as floats: key j - pa against row i - pa, each a compare per element of two
    # broadcast vectors. A tile that tests lies within a tile and a band of pa, so both are small and exact.
    row_f = tl.arange(0, q_pos.shape[0]).to(tl.float32)  # i - pa
    wl_f = wh.to(tl.float32)
    wr_f = 0.0 if CAUSAL else wr.to(tl.float32)  # the right edge (causal: the diagonal; widths are >= 0)
    if not TMA:
        k_tile = k_base + start.to(tl.int64) * stride_kn
        v_tile = v_base + start.to(tl.int64) * stride_vn
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + rows
        if TMA:  # one thread's copy per tile, no per-thread addresses (the registers they held go to the loop)
            k = k_base.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
            v = v_base.load([b, hk, n0, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = load_tile(k_tile, stride_kn, rows, offs_d, n0, Nk, HEAD_DIM, BOUNDARY >= RIGHT)
            v = load_tile(v_tile, stride_vn, rows, offs_d, n0, Nk, HEAD_DIM, BOUNDARY >= RIGHT)
            k_tile += BLOCK_N * stride_kn
            v_tile += BLOCK_N * stride_vn
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Nk, other=0) != 0
        if METHOD == EXACT or METHOD == WINDOW:
            col_f = rows_f + (n0 - pa).to(tl.float32)  # j - pa
            bias = slope2 * col_f
            if not CAUSAL and BOUNDARY >= RIGHT:  # keys past Nk: one select per column, not per element
                bias = tl.where(offs_n < Nk, bias, float("-inf"))
            x = qk * qk_scale + bias[None, :]
            if not CAUSAL:
                x = x - (2.0 * slope2) * tl.maximum(col_f[None, :] - row_f[:, None], 0.0)
            # the band: i - wl <= j <= i + wr, as (j - pa) + wl >= i - pa and (j - pa) - wr <= i - pa
            if METHOD == WINDOW and BOUNDARY == BOTH:
                x = tl.where(((col_f + wl_f)[None, :] >= row_f[:, None]) & ((col_f - wr_f)[None, :] <= row_f[:, None]),
                             x, float("-inf"))
            elif METHOD == WINDOW and BOUNDARY == LEFT:
                x = tl.where((col_f + wl_f)[None, :] >= row_f[:, None], x, float("-inf"))
            elif (CAUSAL or METHOD == WINDOW) and BOUNDARY >= RIGHT:
                x = tl.where((col_f - wr_f)[None, :] <= row_f[:, None], x, float("-inf"))
            if HAS_KPM:
                x = tl.where(keep[None, :], x, float("-inf"))
            row_max = tl.max(x, 1)
        else:  # max on the raw q.k, scaled afterwards: the scale enters in the exp2 FMA below
            if METHOD == HYBRID:
                near, qk = near_field(qk, q_pos[:, None] - offs_n[None, :], slope2 / qk_scale, wh)
            if HAS_KPM:
                qk = tl.where(keep[None, :], qk, float("-inf"))
            if BOUNDARY:
                cols_c = tl.minimum(offs_n, Nk - 1)
                cnt = lsh_counts(q_pos_c, cols_c, hR, W, U, S, E, Nk, R, CUT, CAUSAL, True, FDIV)
                hit = cnt > 0
                if METHOD == HYBRID:
                    hit = hit | near
                    cnt = tl.where(near, R * 1.0, cnt)
                if CAUSAL:  # key <= query position < Nk for every real row
                    hit = hit & (as_pos(offs_n, FDIV)[None, :] <= as_pos(q_pos, FDIV)[:, None])
                else:
                    hit = hit & (offs_n[None, :] < Nk)
                qk = tl.where(hit, qk, float("-inf"))
            row_max = tl.max(qk, 1) * qk_scale
        m_new = tl.maximum(m_i, row_max)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
        if METHOD == EXACT or METHOD == WINDOW:
            p = tl.math.exp2(x - m_i[:, None])
        elif BOUNDARY:
            p = tl.math.exp2(qk * qk_scale - m_i[:, None]) * cnt
        else:
            p = tl.math.exp2(qk * qk_scale - (m_i - log2_r)[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = acc + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_i


@triton.jit
def _merge_splits(PO, PL, OUT, OUT_LSE, b, h, m0, offs_m, rows_m, offs_d, q_mask, B, H, Nq, stride_ps, stride_pb,
                  stride_ph, stride_pn, stride_outb, stride_outh, stride_outn, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One query tile's partials (fp32 PO [splits, B, H, Nq, BLOCK_D], PL [splits, B, H, Nq]) combined by
    softmax over their LSEs into OUT and OUT_LSE [B, H, Nq]: a row no split saw stays empty (output 0,
    lse EMPTY_LSE). The loads bypass L1 (.cg): other programs wrote these lines."""
    row_ok = offs_m < Nq
    m = tl.full([BLOCK_M], EMPTY_LSE, dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    po = PO + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + m0.to(tl.int64) * stride_pn \
        + rows_m[:, None] * stride_pn + offs_d[None, :]
    pl = PL + (b * H + h).to(tl.int64) * Nq + offs_m
    for _ in range(0, tl.num_programs(1)):
        lse = tl.load(pl, mask=row_ok, other=EMPTY_LSE, cache_modifier=".cg")
        o = tl.load(po, mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        po += stride_ps
        pl += B * H * Nq
        m_new = tl.maximum(m, lse)
        a = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * a[:, None] + o * w[:, None]
        den = den * a + w
        m = m_new
    out = acc / den[:, None]
    lse = tl.where(m <= EMPTY_LSE * 0.5, EMPTY_LSE, m + tl.log(den))
    out_base = OUT + b.to(tl.int64) * stride_outb + h.to(tl.int64) * stride_outh + m0.to(tl.int64) * stride_outn
    tl.store(out_base + rows_m[:, None] * stride_outn + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=q_mask)
    tl.store(OUT_LSE + (b * H + h).to(tl.int64) * Nq + offs_m, lse, mask=row_ok)


# A decoding step changes these every call (the cache grows by one key). Triton would specialise each on
# "== 1" and divisibility by 16 and compile a new variant whenever one changes class: stalls of a second in
# the middle of a user's generation. They only bound loops and masks (pointer offsets step by constexpr
# tiles), so the machine code is the same without (bench/sass_report.py: registers equal, +2% instructions
# outside the key loops).
DECODE_VARYING = ("Nk", "q_offset", "split_tiles")


@triton.jit(do_not_specialize=DECODE_VARYING)
def _fwd_kernel(Q, K, V, O, LSE, OUT, OUT_LSE, TICKETS, KPM, W, U, S, E, ORDER, SLOPE2, WIN, WIN_R,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_os, stride_ob, stride_oh, stride_on,
                stride_outb, stride_outh, stride_outn, stride_kpmb,
                B, H, Nq, Nk, q_offset, group, qk_scale, log2_r, split_tiles,
                METHOD: tl.constexpr, R: tl.constexpr, CUT: tl.constexpr, CAUSAL: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, FDIV: tl.constexpr, HAS_KPM: tl.constexpr, SPLIT: tl.constexpr,
                TMA: tl.constexpr = False):
    """O [B, H, Nq, D] and LSE [B, H, Nq] (fp32) receive each program's result: the output itself, or with
    SPLIT the split's partials (fp32 O [splits, B, H, Nq, BLOCK_D] at stride_os per split, LSE [splits, B,
    H, Nq]), merged into OUT (its strides stride_out*) and OUT_LSE [B, H, Nq] by the tile's last program.
    TICKETS (SPLIT): int32 [programs of axis 0], zero before the launch, and left zero after it.
    TMA: K and V are tensor descriptors (``_fwd_stretch``), their stride arguments unread."""
    b, h, m0, offs_m, q_pos, q_pos_c, pa, pb = query_tile(tl.program_id(0), ORDER, B, Nq, Nk, q_offset, BLOCK_M)
    hk = h // group
    hR = h * R
    offs_d = tl.arange(0, BLOCK_D)

    q_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qn
    rows_m = tl.arange(0, BLOCK_M)
    q = tl.load(q_base + rows_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
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
    left_stop = edge_split(a, e1, bnd, c, METHOD)  # [a, left_stop) crosses the left edge only, [.., e1) both
    both_start = left_stop
    if SPLIT:  # this program's share of the key range: split_tiles tiles from a + split * split_tiles
        ws = a + tl.program_id(1) * split_tiles * BLOCK_N
        we = ws + split_tiles * BLOCK_N
        a, left_stop = tl.maximum(a, ws), tl.minimum(left_stop, we)
        both_start, e1 = tl.maximum(both_start, ws), tl.minimum(e1, we)
        bnd, c = tl.maximum(bnd, ws), tl.minimum(c, we)
        s3, d = tl.maximum(s3, ws), tl.minimum(d, we)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if METHOD == WINDOW:  # (exact's keys start at 0 = its plain tiles' start: no left edge, an empty stretch)
        acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, a, left_stop,
                                     q_pos, q_pos_c, pa, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr, b, hk,
                                     METHOD, R, CUT, CAUSAL, LEFT, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV,
                                     TMA)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, both_start, e1,
                                 q_pos, q_pos_c, pa, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr, b, hk,
                                 METHOD, R, CUT, CAUSAL, BOTH, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV,
                                 TMA)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, bnd, c,
                                 q_pos, q_pos_c, pa, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr, b, hk,
                                 METHOD, R, CUT, CAUSAL, PLAIN, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV,
                                 TMA)
    acc, l_i, m_i = _fwd_stretch(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, s3, d,
                                 q_pos, q_pos_c, pa, hR, W, U, S, E, Nk, qk_scale, log2_r, slope2, wh, wr, b, hk,
                                 METHOD, R, CUT, CAUSAL, RIGHT, HAS_KPM, BLOCK_N, BLOCK_D, HEAD_DIM, PREC, FDIV,
                                 TMA)

    if METHOD == EXACT or METHOD == WINDOW:
        m_i = m_i - slope2 * (q_pos - pa).to(tl.float32)  # out of the row frame of pa
    else:
        m_i = m_i - log2_r  # l_i sums r c_ij e^{...}: take the factor r out of the LSE
    o_base = O + tl.program_id(1).to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob \
        + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_on
    lse_ptr = LSE + (tl.program_id(1) * B * H + b * H + h).to(tl.int64) * Nq + offs_m
    if HAS_KPM or SPLIT:  # a row may see no key: output 0, lse EMPTY_LSE
        seen = l_i != 0  # NaN (a NaN/inf key in the row) is not "no key": its lse stays NaN for LSE merges
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, EMPTY_LSE)
    else:
        out = acc / l_i[:, None]
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(o_base + rows_m[:, None] * stride_on + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr, lse, mask=offs_m < Nq)
    if SPLIT:
        # Every thread's stores come before the ticket, which releases them (acq_rel, GPU scope); the last
        # program's ticket acquires every other's, so its loads below see all partials.
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKETS + tl.program_id(0), 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            tl.store(TICKETS + tl.program_id(0), 0)  # every split has its ticket: zero for the next launch
            _merge_splits(O, LSE, OUT, OUT_LSE, b, h, m0, offs_m, rows_m, offs_d, q_mask, B, H, Nq, stride_os,
                          stride_ob, stride_oh, stride_on, stride_outb, stride_outh, stride_outn, BLOCK_M, BLOCK_D)
