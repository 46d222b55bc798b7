"""Device helpers shared by the forward and backward kernels: which keys a tile of queries visits
(and which queries a tile of keys), block bounds of the positional-LSH samples, collision counts,
and the ALiBi bias.

Every method is "softmax over keys with positional weights w_ij"; for a tile of consecutive positions
[pa, pb] the keys with w > 0 form one interval [lo, hi), and inside it a sub-interval [in_lo, in_hi)
where every row of the tile sees every key with a weight that needs no per-element test ("plain"
tiles). The kernels walk the key tiles of [lo, hi) in three stretches (boundary, plain, boundary).

* exact:  w = e^{-m |i - j|} on every pair: [lo, hi) = [0, Nk), plain everywhere (before causality);
* window: the band i - w_h <= j <= i + r_h (r_h = w_h unless the right side differs):
  [pa - w, pb + r], plain [pb - w, pa + r];
* lsh:    w = r c_ij (collision counts): the union and the intersection of the rows' blocks;
* hybrid: the band's exact weights plus the blocks' counts beyond it.

Membership is symmetric (j is in i's block iff i is in j's; the band with its sides swapped), so the
same ranges serve a tile of keys looking for its queries (the dK/dV kernel passes the right widths
as the left ones); only causality clips differently (a query tile keeps keys <= pb, a key tile keeps
queries >= pa).

Positions are compared as float32 when every position is exact there (FDIV: positions < 2^23);
integer compares of positions derived from the loop index cost two instructions each (LLVM widens
the index to 64 bits) and run on Hopper's half-width INT32 pipe.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...method import METHOD_RULES

# Compile options of every launch. Fused multiply-adds: the tile configs and the machine-code budgets
# (tests/test_triton_sass.py) assume them; Triton 3.9 warns that its default turns them off in 3.10.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)

# Methods, as the kernels' METHOD constexpr: the ids of poslsh.method's table (launch passes rule.kernel_id).
EXACT = tl.constexpr(METHOD_RULES["exact"].kernel_id)
WINDOW = tl.constexpr(METHOD_RULES["window"].kernel_id)
LSH = tl.constexpr(METHOD_RULES["lsh"].kernel_id)
HYBRID = tl.constexpr(METHOD_RULES["hybrid"].kernel_id)

# Which edges of a query's band i - wl <= j <= i + wr a stretch's tiles cross (the stretch kernels' BOUNDARY), so
# which tests their elements need (ALiBi; LSH and hybrid test every element of a tile that is not PLAIN). RIGHT is
# the right edge, the diagonal when causal, and keys past Nk (``edge_split``).
PLAIN = tl.constexpr(0)
LEFT = tl.constexpr(1)
RIGHT = tl.constexpr(2)
BOTH = tl.constexpr(3)


@triton.jit
def head_scalar(PTR, h):
    """PTR[h] as a scalar (one-element loads reduced: the interpreter's scalar loads have shape (1,))."""
    return tl.sum(tl.load(PTR + h + tl.arange(0, 1)), 0)


@triton.jit
def block_bounds(pos, hR, t, W, U, S, E, Nk, CUT: tl.constexpr, FDIV: tl.constexpr = False):
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
def lsh_ranges(pa, pb, hR, W, U, S, E, Nk, R: tl.constexpr, CUT: tl.constexpr, FDIV: tl.constexpr):
    """For a tile of positions [pa, pb] (inclusive): union [lo, hi) of its blocks and the
    intersection [in_lo, in_hi) of all of them (positions sharing a block with every row)."""
    lo = Nk
    hi = 0
    in_lo = 0
    in_hi = Nk
    va = pa + tl.arange(0, 1)
    vb = pb + tl.arange(0, 1)
    for t in tl.static_range(R):
        sa, ea = block_bounds(va, hR, t, W, U, S, E, Nk, CUT, FDIV)
        sb, eb = block_bounds(vb, hR, t, W, U, S, E, Nk, CUT, FDIV)
        lo = tl.minimum(lo, tl.min(sa, 0))
        hi = tl.maximum(hi, tl.max(eb, 0))
        in_lo = tl.maximum(in_lo, tl.max(sb, 0))
        in_hi = tl.minimum(in_hi, tl.min(ea, 0))
    return lo, hi, in_lo, in_hi


@triton.jit
def band_ranges(pa, pb, wl, wr, Nk):
    """The band i - wl <= j <= i + wr for a tile [pa, pb]: all of it [lo, hi), and [in_lo, in_hi)
    inside every row's band (empty when the tile is wider than the band)."""
    return (tl.maximum(pa - wl, 0), tl.minimum(pb + wr + 1, Nk),
            tl.maximum(pb - wl, 0), tl.minimum(pa + wr + 1, Nk))


@triton.jit
def join_plain(in_lo, in_hi, near_lo, near_hi):
    """Union of two plain intervals that share the tile's middle when both are non-empty (the
    blocks' intersection and the near band both contain [pb, pa] clipped): one interval."""
    both = in_lo < in_hi
    near = near_lo < near_hi
    return (tl.where(near, tl.where(both, tl.minimum(in_lo, near_lo), near_lo), in_lo),
            tl.where(near, tl.where(both, tl.maximum(in_hi, near_hi), near_hi), in_hi))


@triton.jit
def method_ranges(pa, pb, h, hR, W, U, S, E, SLOPE2, WIN, WIN_R, Nk, METHOD: tl.constexpr, R: tl.constexpr,
                  CUT: tl.constexpr, FDIV: tl.constexpr):
    """(lo, hi, in_lo, in_hi) of a tile of positions [pa, pb] before causal clipping, and head h's
    slope * log2(e) and the band's left and right widths WIN[h], WIN_R[h] (0 where the method has
    none; equal for hybrid's near field)."""
    slope2 = 0.0
    wh = 0
    wr = 0
    if METHOD != LSH:
        slope2 = head_scalar(SLOPE2, h)
        wh = head_scalar(WIN, h)
        wr = head_scalar(WIN_R, h)
    if METHOD == EXACT:
        zero = pa * 0  # int32 scalars, like the other branches' results
        lo, hi, in_lo, in_hi = zero, zero + Nk, zero, zero + Nk
    elif METHOD == WINDOW:
        lo, hi, in_lo, in_hi = band_ranges(pa, pb, wh, wr, Nk)
    else:
        lo, hi, in_lo, in_hi = lsh_ranges(pa, pb, hR, W, U, S, E, Nk, R, CUT, FDIV)
        if METHOD == HYBRID:  # the near field joins the union, and its every-row part the plain tiles
            blo, bhi, bin_lo, bin_hi = band_ranges(pa, pb, wh, wr, Nk)
            lo = tl.minimum(lo, blo)
            hi = tl.maximum(hi, bhi)
            in_lo, in_hi = join_plain(in_lo, in_hi, bin_lo, bin_hi)
    return lo, hi, in_lo, in_hi, slope2, wh, wr


@triton.jit
def stretches(lo, hi, in_lo, in_hi, BLOCK: tl.constexpr):
    """Tile-aligned stretches of [lo, hi): boundary [a, e1), plain [bnd, c), boundary [s3, d).

    Without plain tiles one boundary stretch covers [a, d): one software pipeline, not two short ones."""
    a = (lo // BLOCK) * BLOCK
    d = tl.maximum(tl.cdiv(hi, BLOCK) * BLOCK, a)
    bnd = tl.minimum(tl.maximum(tl.cdiv(in_lo, BLOCK) * BLOCK, a), d)
    c = tl.maximum(bnd, tl.minimum((in_hi // BLOCK) * BLOCK, d))
    e1 = tl.where(c > bnd, bnd, d)
    s3 = tl.where(c > bnd, c, d)
    return a, e1, bnd, c, s3, d


@triton.jit
def edge_split(a, e1, bnd, c, METHOD: tl.constexpr):
    """The first boundary stretch [a, e1) of ``stretches`` as [a, first_stop), whose tiles cross one edge of the
    band, and [first_stop, e1), which cross both. With plain tiles after it (c > bnd), the first stretch's keys
    lie left of every row's right edge (they precede the plain ones), so it crosses only the left edge, and the
    last stretch only the right one. Without plain tiles, or for LSH (no such order of its blocks), the first
    stretch crosses both. (The dK/dV kernel keeps both edges in its boundary stretches: ``backward``.)"""
    first_stop = a
    if METHOD == EXACT or METHOD == WINDOW:
        first_stop = tl.where(c > bnd, e1, a)
    return first_stop


@triton.jit
def as_pos(x, FDIV: tl.constexpr):
    """Positions for comparisons: float32 when exact (FDIV), else the integers themselves."""
    if FDIV:
        x = x.to(tl.float32)
    return x


@triton.jit
def lsh_counts(rows_pos, cols_pos, hR, W, U, S, E, Nk, R: tl.constexpr, CUT: tl.constexpr,
               CAUSAL: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr, FDIV: tl.constexpr):
    """Collision counts r c_ij (0..r) between query and key positions as a float32 tile.

    ``rows_pos`` indexes dim 0 and ``cols_pos`` dim 1; the query side is dim 0 when
    ROWS_ARE_QUERIES, else dim 1. Positions must already be clipped to [0, Nk).

    The LSH kernels' hot spot (r compares per element of every boundary tile): with FDIV, positions
    and block bounds are compared as floats and counted in float32, so compare-and-add runs on the
    FP32 pipe and the count needs no conversion before it weights p."""
    if ROWS_ARE_QUERIES:
        qpos = rows_pos
        kpos = cols_pos
    else:
        qpos = cols_pos
        kpos = rows_pos
    kpos = as_pos(kpos, FDIV)
    cnt = tl.zeros([rows_pos.shape[0], cols_pos.shape[0]], dtype=tl.float32)
    for t in tl.static_range(R):
        s, e = block_bounds(qpos, hR, t, W, U, S, E, Nk, CUT, FDIV)
        s = as_pos(s, FDIV)
        e = as_pos(e, FDIV)
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
def near_field(qk, diff, slope2, wh):
    """Hybrid near field: pairs with |i - j| <= w_h (``diff`` = i - j) get the exact ALiBi weight,
    added to the logits as -slope2 |i - j| (``slope2``: m_h log2(e) in the units of ``qk``); the
    caller then gives them the weight of a full collision, r, instead of the count. Returns (near, qk)."""
    dist = tl.abs(diff)
    near = dist <= wh
    qk = tl.where(near, qk - slope2 * dist.to(tl.float32), qk)
    return near, qk


@triton.jit
def fdiff(a, b, FDIV: tl.constexpr):
    """a - b as float32 for integer position vectors broadcast against each other (a [M, 1], b [1, N]):
    converted before the subtraction when positions are exact in float32 (one FADD per element), after
    it otherwise (exact differences; the conversion then costs one I2F per element)."""
    if FDIV:
        return a.to(tl.float32) - b.to(tl.float32)
    return (a - b).to(tl.float32)


@triton.jit
def query_tile(pid, ORDER, B, Nq, Nk, q_offset, BLOCK_M: tl.constexpr):
    """Program ``pid`` of a query-tile grid (heads in ``ORDER``, most work first; then batch; then tiles):
    batch b, head h, rows offs_m [BLOCK_M], their key positions (and clipped to [0, Nk)), and the first
    and last real positions pa, pb."""
    n_mt = tl.cdiv(Nq, BLOCK_M)
    rest = pid // n_mt
    tile = pid % n_mt
    h = head_scalar(ORDER, rest // B)
    m0 = tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_pos = offs_m + q_offset
    pa = m0 + q_offset
    pb = tl.minimum(m0 + BLOCK_M, Nq) - 1 + q_offset
    return rest % B, h, m0, offs_m, q_pos, tl.minimum(q_pos, Nk - 1), pa, pb


@triton.jit
def load_tile(tile, stride, rows, offs_d, first, limit, HEAD_DIM: tl.constexpr, BOUNDARY: tl.constexpr):
    """Rows first + rows of a [*, HEAD_DIM] matrix as a [len(rows), BLOCK_D] tile, zero past HEAD_DIM
    and (BOUNDARY) past row ``limit``. ``tile`` points at row ``first``: 64-bit tile pointers advanced per
    tile, 32-bit offsets inside it (position x stride may pass 2^31 elements, a tile x stride does not)."""
    mask = offs_d[None, :] < HEAD_DIM
    if BOUNDARY:
        mask = mask & ((first + rows)[:, None] < limit)
    return tl.load(tile + rows[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)
