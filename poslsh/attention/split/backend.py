"""The "split" backend: the estimator as the paper states it, r passes of ordinary (positionally
unbiased) attention inside the blocks of each sampled partition, merged by softmax over the
per-pass log-sum-exps, on any attention primitive (``primitives``: PyTorch's flash kernel,
FlexAttention, plain torch, or a callable of your own).

For sample t, O_t(p) and L_t(p) are plain attention of query p over the keys of its block, and
O-hat(p) = sum_t softmax_t(L_t(p)) O_t(p). Since sum_t exp(L_t) = sum_j #{t : j in block_t(p)} a_pj,
this equals the fused one-pass form.

How the blocks reach a dense primitive ``prim(q, k, v, causal)`` (equal lengths, no mask):

* **runs** (grid scheme): all interior blocks of one (head, sample) have width W, so positions
  [a, a + nb W) of a head are a zero-copy strided view [B, nb, W, D] (strides: batch, W rows, row):
  one call per (head, sample) covers almost every query, without a gather.
* **gathered** blocks: the partial blocks at the sequence ends (grid) and every block of the cut
  scheme, copied into buckets of one padded length P (a power of two; at most 2x padding), one call
  per bucket over all heads and samples. No mask is needed: causal rows of a block padded at its
  end never see the padding (the padded rows are dropped), and a bidirectional block is its causal
  part (keys j <= p) merged with its strictly-anticausal part, which is a causal call on the block
  read backwards and shifted by one (keys j > p).
* **masked** blocks: blocks that hold a padded key (``key_padding_mask``) or that start before the
  first query (Nq < Nk) go to a masked attention in torch ops (only their query rows are computed,
  so decoding costs one row per block, not a block's square).

Every query row of a (head, sample) lies in exactly one block, so each of the H r "slots" has one
partial result per row: a run's output (used in place) or a row of the *rest* buffer (gathered and
masked blocks). The merge (``merge``) reads each slot once: in torch ops, or on CUDA one
Triton kernel that reads the run outputs in place through a table of their addresses.

A primitive with a document mask (``FlexPrimitive``) is used differently: one call per sample over
the whole sequence, the block-diagonal mask of that sample doing everything above.

Gradients: ``SplitAttention`` (autograd.Function) saves q, k, v and the merged (out, lse) only. The
backward hands each call the merged out and lse of its rows (``Primitive.backward``: the flash
kernel's own backward for "sdpa", autograd through a recomputed call otherwise) and accumulates
dq, dk, dv into full-size buffers through the same views and indices.

The bytes this form must move (r passes each reading q, k, v and writing an output, then a merge
reading the r outputs back: (5 r + 1) / 4 times the fused kernel's q, k, v in and o out) are
``split_bytes``; the benchmark divides them by the measured copy bandwidth.

Not supported: method "hybrid" (its near field needs exact ALiBi weights, i.e. a biased kernel,
which is what the split form exists to avoid; the fused, Triton and Flex backends run it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...hashing import Partitions
from ..core import EMPTY_LSE, AttentionSpec, compute_dtype, merge_partials, softmax_with_lse
from .primitives import Primitive, check_result, recompute_backward, resolve_primitive
from .merge import merge_slots

__all__ = ["split_attention", "supports_split", "SplitPlan", "plan_split", "split_bytes", "sample_partition"]

# Elements of one [B, blocks, rows, P] score tile of the masked path.
TILE_BUDGET = 1 << 22

# The merged lse handed to a backward for rows a call computes but does not keep (padding rows of
# a gathered bucket): exp(s - IGNORED_LSE) = 0, so such rows contribute nothing (their dout is 0 too).
IGNORED_LSE = 1e30


def _blocks_view(x: Tensor, head: int, start: int, nb: int, width: int) -> Tensor:
    """Positions [start, start + nb * width) of head ``head`` of x [B, Hx, N, D] as a zero-copy view
    [B, nb, width, D]."""
    s0, _, s2, s3 = x.stride()
    return x.as_strided((x.shape[0], nb, width, x.shape[3]), (s0, width * s2, s2, s3),
                        x.storage_offset() + head * x.stride(1) + start * s2)


def _next_pow2(x: Tensor) -> Tensor:
    return torch.where(x > 1, 2 ** torch.ceil(torch.log2(x.clamp(min=1).double())).long(), x.clamp(min=1))


# --------------------------------------------------------------------------------------------------
# The plan: which rows each call computes and where its results go
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Blocks [start + i W, start + (i + 1) W), i < nb, of query head h in sample t: one view call."""

    h: int
    t: int
    kvh: int
    start: int  # key position of the first row
    nb: int
    width: int

    @property
    def rows(self) -> int:
        return self.nb * self.width


@dataclass
class BlockSet:
    """Gathered blocks of one padded shape: one primitive (or masked) call.

    ``kind``: "causal" (row m sees keys 0..m, padded at the end), "reverse" (the strictly-anticausal
    part of bidirectional blocks, merged into rows already written) or "masked" (``allowed`` says
    which keys each row sees; the key padding mask is applied on top).
    Tensors (on q's device): h, kvh int64 [E]; q_row int64 [E, M] (query row of each computed row,
    clamped into range); k_pos int64 [E, P] (key position, clamped); dest int64 [E, M] (row of the
    rest buffer, -1 for rows that are computed but not kept); allowed bool [E, M, P] or None.
    """

    kind: str
    h: Tensor
    kvh: Tensor
    q_row: Tensor
    k_pos: Tensor
    dest: Tensor
    allowed: Tensor | None = None


@dataclass
class SplitPlan:
    """All calls of one split attention and the layout of their results.

    Slot (h, t) has one partial result per query row i: its run's rows [run_row[h, t],
    run_row[h, t] + run_len[h, t]) from the run's output, every other row from the rest buffer at
    ``rest_off[h, t] + (i if i < run_row else i - run_len)``.
    """

    heads: int
    samples: int
    nq: int
    runs: list[Run]
    sets: list[BlockSet]
    run_row: list[list[int]]
    run_len: list[list[int]]
    rest_off: list[list[int]]
    rest_rows: int
    document: bool = False

    @property
    def num_calls(self) -> int:
        return len(self.runs) + len(self.sets)


def sample_partition(parts: Partitions, t: int) -> Partitions:
    """Sample t of every head as a one-sample ``Partitions``."""
    if parts.scheme == "grid":
        return parts._derived(widths=parts.widths[:, t:t + 1], offsets=parts.offsets[:, t:t + 1])
    r = parts.num_samples
    ptr = parts.cut_pointers
    rows = [int(ptr[h * r + t]) for h in range(parts.num_heads)]
    ends = [int(ptr[h * r + t + 1]) for h in range(parts.num_heads)]
    cuts = torch.cat([parts.cut_positions[a:b] for a, b in zip(rows, ends)])
    counts = torch.tensor([b - a for a, b in zip(rows, ends)], dtype=torch.int64)
    pointers = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(ptr.device)
    return parts._derived(cut_positions=cuts, cut_pointers=pointers)


def _grid_blocks(parts: Partitions, nk: int, qo: int, dirty_pos: Tensor | None):
    """Grid scheme: per slot the run (first block id, end block id, width, offset) and the other
    query blocks as flat tensors (slot, start, end)."""
    from ..ranges import normalize_grid

    w, u = (x.to("cpu", torch.int64).reshape(-1) for x in normalize_grid(parts.widths, parts.offsets, nk))
    first = torch.div(qo + u, w, rounding_mode="floor")  # block of the first query
    last = torch.div(nk - 1 + u, w, rounding_mode="floor")
    b_lo = -torch.div(-(qo + u), w, rounding_mode="floor")  # full blocks made of queries only: [b_lo, b_hi)
    b_hi = torch.maximum(torch.div(nk + u, w, rounding_mode="floor"), b_lo)
    if dirty_pos is not None and dirty_pos.numel():
        b_lo, b_hi = _longest_clean_runs(b_lo, b_hi, w, u, dirty_pos)
    empty = b_hi <= b_lo
    b_lo = torch.where(empty, last + 1, b_lo)
    b_hi = torch.where(empty, last + 1, b_hi)
    n1, n2 = b_lo - first, last + 1 - b_hi  # rest blocks before and after the run
    slot = torch.repeat_interleave(torch.arange(w.numel()), n1 + n2)
    k = torch.arange(slot.numel()) - torch.repeat_interleave(torch.cumsum(n1 + n2, 0) - (n1 + n2), n1 + n2)
    ids = torch.where(k < n1[slot], first[slot] + k, b_hi[slot] + (k - n1[slot]))
    starts = (ids * w[slot] - u[slot]).clamp(min=0)
    ends = ((ids + 1) * w[slot] - u[slot]).clamp(max=nk)
    return (b_lo, b_hi, w, u), (slot, starts, ends)


def _longest_clean_runs(b_lo: Tensor, b_hi: Tensor, w: Tensor, u: Tensor, dirty_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Per slot, the longest stretch of blocks in [b_lo, b_hi) that holds no dirty position (a key
    padded in some batch row): the stretches lie between consecutive dirty positions."""
    lo, hi = b_lo.clone(), b_hi.clone()
    starts, ends = b_lo * w - u, b_hi * w - u
    i1, i2 = torch.searchsorted(dirty_pos, starts), torch.searchsorted(dirty_pos, ends)
    for s in range(w.numel()):
        if i2[s] == i1[s] or b_hi[s] <= b_lo[s]:
            continue  # no dirty position inside: keep the whole run
        pts = torch.cat([starts[s:s + 1] - 1, dirty_pos[i1[s]:i2[s]], ends[s:s + 1]])
        c0 = -torch.div(-(pts[:-1] + 1 + u[s]), w[s], rounding_mode="floor")  # first block after a dirty position
        c1 = torch.div(pts[1:] + u[s], w[s], rounding_mode="floor")  # block holding the next one
        j = int((c1 - c0).argmax())
        lo[s], hi[s] = c0[j], torch.maximum(c1[j], c0[j])
    return lo, hi


def _cut_blocks(parts: Partitions, nk: int, qo: int):
    """Cut scheme: every block holding a query, as flat tensors (slot, start, end)."""
    ptr = parts.cut_pointers.to("cpu")
    cuts = parts.cut_positions.to("cpu")
    nslots = ptr.numel() - 1
    counts = ptr.diff()
    slot_of_cut = torch.repeat_interleave(torch.arange(nslots), counts)
    slot = torch.cat([torch.arange(nslots), slot_of_cut])
    starts = torch.cat([torch.zeros(nslots, dtype=torch.int64), cuts])
    order = torch.argsort(slot * (nk + 1) + starts)
    slot, starts = slot[order], starts[order]
    ends = torch.cat([starts[1:], starts.new_full((1,), nk)])
    ends = torch.where(torch.cat([slot[1:] != slot[:-1], torch.tensor([True])]), nk, ends)
    keep = ends > qo
    return slot[keep], starts[keep], ends[keep]


def plan_split(spec: AttentionSpec, nq: int, nk: int, hkv: int, device: torch.device) -> SplitPlan:
    """Runs and block sets for ``spec`` (host-side index arithmetic; index tensors end on ``device``)."""
    parts = spec.partitions
    h_, r = parts.num_heads, parts.num_samples
    group = h_ // hkv
    qo = spec.q_offset
    kpm = spec.key_padding_mask
    dirty_pos = pad_prefix = None
    if kpm is not None:
        padded = ~kpm.to("cpu").all(0)  # a key padded in any batch row
        dirty_pos = padded.nonzero().flatten()
        pad_prefix = torch.cat([torch.zeros(1, dtype=torch.int64), padded.long().cumsum(0)])
    runs: list[Run] = []
    run_row = [[0] * r for _ in range(h_)]
    run_len = [[0] * r for _ in range(h_)]
    if parts.scheme == "grid":
        (b_lo, b_hi, w, u), (slot, starts, ends) = _grid_blocks(parts, nk, qo, dirty_pos)
        for s_, lo, hi, ww, uu in zip(range(w.numel()), b_lo.tolist(), b_hi.tolist(), w.tolist(), u.tolist()):
            if hi > lo:
                h, t = divmod(s_, r)
                start = lo * ww - uu
                runs.append(Run(h, t, h // group, start, hi - lo, ww))
                run_row[h][t], run_len[h][t] = start - qo, (hi - lo) * ww
    else:
        slot, starts, ends = _cut_blocks(parts, nk, qo)
    rest_off, off = [[0] * r for _ in range(h_)], 0
    for h in range(h_):
        for t in range(r):
            rest_off[h][t] = off
            off += nq - run_len[h][t]
    plan = SplitPlan(h_, r, nq, runs, [], run_row, run_len, rest_off, off)

    # Rest-buffer row of (slot, query row i), vectorised.
    flat = lambda x: torch.tensor([v for row in x for v in row], dtype=torch.int64)  # noqa: E731
    a_row, a_len, a_off = flat(run_row), flat(run_len), flat(rest_off)

    def dest_of(sl: Tensor, i: Tensor) -> Tensor:
        a, ln, o = a_row[sl][:, None], a_len[sl][:, None], a_off[sl][:, None]
        return o + torch.where(i < a, i, i - ln)

    masked = starts < qo
    if pad_prefix is not None:
        masked = masked | (pad_prefix[ends] - pad_prefix[starts] > 0)
    to_dev = lambda x: x.to(device)  # noqa: E731
    lengths = ends - starts
    sel = ~masked
    causal_len = lengths[sel]
    kinds = [("causal", causal_len, 0)]
    if not spec.causal:  # the strictly-anticausal part of each block: L - 1 rows
        kinds.append(("reverse", causal_len - 1, 1))
    for kind, rows, shift in kinds:
        sl, s0, ln = slot[sel], starts[sel], lengths[sel]
        size = _next_pow2(rows)
        for p in torch.unique(size[rows > 0]).tolist():
            m = (size == p) & (rows > 0)
            e_sl, e_s, e_ln = sl[m], s0[m], ln[m]
            ar = torch.arange(p)
            if kind == "causal":  # row m of the bucket is block row m; key b is block position b
                qpos = e_s[:, None] + ar
                kpos = qpos
            else:  # row a is block row L - 2 - a and sees keys b <= a, i.e. block positions L - 1 - b
                qpos = e_s[:, None] + e_ln[:, None] - 2 - ar
                kpos = e_s[:, None] + e_ln[:, None] - 1 - ar
            keep = ar[None, :] < (e_ln - shift)[:, None]
            dest = torch.where(keep, dest_of(e_sl, qpos - qo), -1)
            hh = torch.div(e_sl, r, rounding_mode="floor")
            plan.sets.append(BlockSet(kind, to_dev(hh), to_dev(hh // group), to_dev((qpos - qo).clamp(0, nq - 1)),
                                      to_dev(kpos.clamp(0, nk - 1)), to_dev(dest)))
    # Masked blocks: only their query rows, every key of the block (padding applied at run time).
    sl, s0, e0 = slot[masked], starts[masked], ends[masked]
    q0 = torch.clamp(s0, min=qo)
    nrows, lengths = e0 - q0, e0 - s0
    sizes = _next_pow2(lengths) * (1 << 32) + _next_pow2(nrows)
    for key in torch.unique(sizes).tolist():
        m = sizes == key
        p, mm = key >> 32, key & ((1 << 32) - 1)
        e_sl, e_s, e_q0, e_e = sl[m], s0[m], q0[m], e0[m]
        qpos = e_q0[:, None] + torch.arange(mm)
        kpos = e_s[:, None] + torch.arange(p)
        row_ok = qpos < e_e[:, None]
        allowed = row_ok[:, :, None] & (kpos < e_e[:, None])[:, None, :]
        if spec.causal:
            allowed = allowed & (kpos[:, None, :] <= qpos[:, :, None])
        dest = torch.where(row_ok, dest_of(e_sl, qpos - qo), -1)
        hh = torch.div(e_sl, r, rounding_mode="floor")
        plan.sets.append(BlockSet("masked", to_dev(hh), to_dev(hh // group), to_dev((qpos - qo).clamp(0, nq - 1)),
                                  to_dev(kpos.clamp(0, nk - 1)), to_dev(dest), to_dev(allowed)))
    # Reverse parts merge into rows the causal parts wrote: run them last.
    plan.sets.sort(key=lambda s: s.kind == "reverse")
    return plan


def document_plan(spec: AttentionSpec, nq: int, hkv: int) -> SplitPlan:
    """The plan of a document primitive: one call per sample, covering every head and row."""
    h_, r = spec.partitions.num_heads, spec.partitions.num_samples
    group = h_ // hkv
    runs = [Run(h, t, h // group, spec.q_offset, 1, nq) for h in range(h_) for t in range(r)]
    return SplitPlan(h_, r, nq, runs, [], [[0] * r for _ in range(h_)], [[nq] * r for _ in range(h_)],
                     [[0] * r for _ in range(h_)], 0, document=True)


# --------------------------------------------------------------------------------------------------
# Executing the calls
# --------------------------------------------------------------------------------------------------


def masked_attention(qb: Tensor, kb: Tensor, vb: Tensor, allowed: Tensor, kpm_k: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of gathered blocks with an explicit mask, in torch ops (compute dtype).

    Args:
        qb: [B, E, M, D]; kb: [B, E, P, D]; vb: [B, E, P, Dv] (scale already applied to qb).
        allowed: bool [E, M, P]; kpm_k: bool [B, E, P] (keys kept) or None.

    Returns:
        (out [B, E, M, Dv], lse [B, E, M]); rows with no allowed key get 0 and EMPTY_LSE. A padded
        key's value never reaches a row (a NaN in padding stays there).
    """
    b, e, mm, _ = qb.shape
    p = kb.shape[2]
    step = max(1, TILE_BUDGET // max(1, b * mm * p))
    outs, lses = [], []
    for e0 in range(0, e, step):
        sl = slice(e0, e0 + step)
        s = torch.matmul(qb[:, sl], kb[:, sl].transpose(-1, -2))
        ok = allowed[sl][None]
        if kpm_k is not None:
            ok = ok & kpm_k[:, sl, None, :]
        vt = vb[:, sl]
        if kpm_k is not None:  # a padded key's value is never weighed: zero it, so a NaN there gives 0 * 0, not 0 * NaN
            vt = vt.masked_fill(~kpm_k[:, sl, :, None], 0.0)
        o, lse = softmax_with_lse(s.masked_fill(~ok, float("-inf")), vt)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


class _Inputs:
    """q (scaled for the primitive's default 1/sqrt(D)), k, v and the spec, as the calls read them."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, prim: Primitive) -> None:
        self.q, self.k, self.v, self.spec, self.prim = q, k, v, spec, prim
        self.q_factor = spec.scale * math.sqrt(q.shape[-1])
        self.qs = q if abs(self.q_factor - 1.0) < 1e-12 else q * self.q_factor
        self.cdt = compute_dtype(q.dtype)

    def run_inputs(self, run: Run) -> tuple[Tensor, Tensor, Tensor]:
        spec = self.spec
        qv = _blocks_view(self.qs, run.h, run.start - spec.q_offset, run.nb, run.width)
        kv = _blocks_view(self.k, run.kvh, run.start, run.nb, run.width)
        vv = _blocks_view(self.v, run.kvh, run.start, run.nb, run.width)
        return qv, kv, vv

    def set_inputs(self, bs: BlockSet, q: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        q = self.qs if q is None else q
        qg = q[:, bs.h[:, None], bs.q_row]  # [B, E, M, D]
        kg = self.k[:, bs.kvh[:, None], bs.k_pos]
        vg = self.v[:, bs.kvh[:, None], bs.k_pos]
        return qg, kg, vg

    def masked_fn(self, bs: BlockSet):
        kpm = self.spec.key_padding_mask
        kpm_k = kpm[:, bs.k_pos] if kpm is not None else None
        scale = 1.0 / math.sqrt(self.q.shape[-1])
        return lambda qg, kg, vg: masked_attention(qg.to(self.cdt) * scale, kg.to(self.cdt), vg.to(self.cdt),
                                                   bs.allowed, kpm_k)

    def call_run(self, run: Run) -> tuple[Tensor, Tensor]:
        qv, kv, vv = self.run_inputs(run)
        return self._normalise(check_result(self.prim, self.prim(qv, kv, vv, self.spec.causal), qv, vv))

    def call_set(self, bs: BlockSet) -> tuple[Tensor, Tensor]:
        qg, kg, vg = self.set_inputs(bs)
        if bs.kind == "masked":
            return self._normalise(self.masked_fn(bs)(qg, kg, vg))
        return self._normalise(check_result(self.prim, self.prim(qg, kg, vg, True), qg, vg))

    def call_document(self, t: int) -> tuple[Tensor, Tensor]:
        spec_t = dataclasses.replace(self.spec, partitions=sample_partition(self.spec.partitions, t))
        return self._normalise(check_result(self.prim, self.prim.document(self.q, self.k, self.v, spec_t),
                                            self.q, self.v))

    def _normalise(self, res: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        o, lse = res
        return o.to(self.q.dtype), lse.to(self.cdt)


def _run_slices(plan: SplitPlan, run: Run) -> tuple[int, int]:
    return plan.run_row[run.h][run.t], plan.run_len[run.h][run.t]


def run_calls(inp: _Inputs, plan: SplitPlan):
    """Every call of the plan: (run outputs [(o [B, nb, W, Dv], lse [B, nb, W])] in plan.runs order,
    rest buffer (o [B, rest_rows, Dv], lse [B, rest_rows]))."""
    b, dv = inp.q.shape[0], inp.v.shape[-1]
    dev = inp.q.device
    if plan.document:
        run_out = [None] * len(plan.runs)
        per_sample = [inp.call_document(t) for t in range(plan.samples)]
        for i, run in enumerate(plan.runs):
            o, lse = per_sample[run.t]
            run_out[i] = (o[:, run.h, None], lse[:, run.h, None])
    else:
        run_out = [inp.call_run(run) for run in plan.runs]
    rest_o = torch.zeros(b, plan.rest_rows, dv, dtype=inp.q.dtype, device=dev)
    rest_l = torch.full((b, plan.rest_rows), EMPTY_LSE, dtype=inp.cdt, device=dev)
    for bs in plan.sets:
        o, lse = inp.call_set(bs)
        keep = bs.dest >= 0
        d = bs.dest[keep]
        if bs.kind == "reverse":  # a second partial for rows the causal parts wrote
            o_new, l_new = merge_partials([(rest_o[:, d].to(inp.cdt), rest_l[:, d]), (o[:, keep].to(inp.cdt), lse[:, keep])])
            rest_o[:, d], rest_l[:, d] = o_new.to(rest_o.dtype), l_new
        else:
            rest_o[:, d], rest_l[:, d] = o[:, keep], lse[:, keep]
    return run_out, (rest_o, rest_l)


# --------------------------------------------------------------------------------------------------
# Forward, backward, entry point
# --------------------------------------------------------------------------------------------------


def _forward(inp: _Inputs, plan: SplitPlan) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        run_out, rest = run_calls(inp, plan)
        return merge_slots(plan, run_out, rest, inp.q.shape[0], inp.v.shape[-1], inp.q.dtype)


def _backward(inp: _Inputs, plan: SplitPlan, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None):
    """(dq, dk, dv) of the merged attention (see module docstring)."""
    q, k, v, spec, prim = inp.q, inp.k, inp.v, inp.spec, inp.prim
    cdt = inp.cdt
    r = plan.samples
    # Z = r exp(lse): the normaliser of the merged softmax over every pass.
    lse_z = torch.where(lse <= EMPTY_LSE / 2, lse, lse + math.log(r)).to(cdt)
    dout = dout.to(q.dtype)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    if plan.document:
        for t in range(r):
            spec_t = dataclasses.replace(spec, partitions=sample_partition(spec.partitions, t))
            grads = recompute_backward(lambda a, b_, c: prim.document(a, b_, c, spec_t), (q, k, v), dout, out, lse_z,
                                       dlse, f"primitive {prim.name!r}")
            for acc, g in zip((dq, dk, dv), grads):
                if g is not None:
                    acc += g
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    for run in plan.runs:
        a, ln = _run_slices(plan, run)
        view = lambda x, h=run.h: _blocks_view(x, h, a, run.nb, run.width)  # noqa: E731
        rows = lambda x, h=run.h: x[:, h, a:a + ln].reshape(x.shape[0], run.nb, run.width)  # noqa: E731
        qv, kv, vv = inp.run_inputs(run)
        g = prim.backward(view(dout), qv, kv, vv, view(out), rows(lse_z), spec.causal,
                          None if dlse is None else rows(dlse))
        _blocks_view(dq, run.h, a, run.nb, run.width).add_(g[0])
        _blocks_view(dk, run.kvh, run.start, run.nb, run.width).add_(g[1])
        _blocks_view(dv, run.kvh, run.start, run.nb, run.width).add_(g[2])
    nq = q.shape[2]
    for bs in plan.sets:
        keep = (bs.dest >= 0)[None]
        hq = bs.h[:, None]
        qg, kg, vg = inp.set_inputs(bs)
        dout_g = torch.where(keep[..., None], dout[:, hq, bs.q_row], 0)
        out_g = torch.where(keep[..., None], out[:, hq, bs.q_row], 0)
        lse_g = torch.where(keep, lse_z[:, hq, bs.q_row], IGNORED_LSE)
        dlse_g = None if dlse is None else torch.where(keep, dlse[:, hq, bs.q_row], 0)
        if bs.kind == "masked":
            grads = recompute_backward(inp.masked_fn(bs), (qg, kg, vg), dout_g, out_g, lse_g, dlse_g, "masked path")
            grads = tuple(torch.zeros_like(x) if gg is None else gg for gg, x in zip(grads, (qg, kg, vg)))
        else:
            grads = prim.backward(dout_g, qg, kg, vg, out_g, lse_g, True, dlse_g)
        bq, e, mm, d = qg.shape
        dq.view(bq, -1, d).index_add_(1, (bs.h[:, None] * nq + bs.q_row).flatten(), grads[0].reshape(bq, e * mm, d).to(cdt))
        kidx = (bs.kvh[:, None] * k.shape[2] + bs.k_pos).flatten()
        dk.view(bq, -1, d).index_add_(1, kidx, grads[1].reshape(bq, -1, d).to(cdt))
        dv.view(bq, -1, v.shape[-1]).index_add_(1, kidx, grads[2].reshape(bq, -1, v.shape[-1]).to(cdt))
    if inp.qs is not q:
        dq = dq * inp.q_factor
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SplitAttention(torch.autograd.Function):
    """The split estimator with gradients in q, k, v (and through the returned lse)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, prim: Primitive, plan: SplitPlan):
        out, lse = _forward(_Inputs(q, k, v, spec, prim), plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.prim, ctx.plan = spec, prim, plan
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        inp = _Inputs(q, k, v, ctx.spec, ctx.prim)
        dq, dk, dv = _backward(inp, ctx.plan, out, lse, dout, dlse)
        return dq, dk, dv, None, None, None


def split_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """LSH attention as r block-local passes of ``spec.primitive`` (default: "sdpa" on CUDA for
    fp16/bf16, else "torch"), merged by their LSEs.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32, float64 for float64 inputs).
    """
    prim = resolve_primitive(spec.primitive, q)
    why = prim.supports(q)
    if why is not None:
        raise ValueError(why)
    hkv, nq, nk = k.shape[1], q.shape[2], k.shape[2]
    if callable(getattr(prim, "document", None)):  # one masked call per sample (FlexPrimitive)
        plan = document_plan(spec, nq, hkv)
    else:
        plan = plan_split(spec, nq, nk, hkv, q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return SplitAttention.apply(q, k, v, spec, prim, plan)
    return _forward(_Inputs(q, k, v, spec, prim), plan)


def supports_split(q: Tensor, spec: AttentionSpec) -> bool:
    """LSH only (exact and window have no blocks to split into; hybrid needs a biased near field), with
    the queries the last Nq keys (q_offset = Nk - Nq), which the block loop assumes."""
    return spec.rule.only_collisions and spec.q_offset + q.shape[2] == spec.partitions.n


def split_bytes(batch: int, heads: int, n: int, head_dim: int, samples: int, itemsize: int = 2,
                value_dim: int | None = None, lse_itemsize: int = 4) -> dict[str, float]:
    """Bytes any implementation of the split form must move, and the fused form for comparison.

    Split forward: r passes, each reading q, k, v of every query head (a kv head is read once per
    query head and pass that uses it) and writing o and lse; then a merge reading the r (o, lse) and
    writing (out, lse). Split backward: per pass, read q, k, v, out, dout, lse and write dq, dk, dv
    (the accumulation of the r passes' gradients is not counted: a lower bound). Fused forward:
    q, k, v read and out written once.

    Returns dict with "split_fwd", "split_fwd_bwd", "fused_fwd" in bytes.
    """
    dv = head_dim if value_dim is None else value_dim
    row = batch * heads * n
    qkv = row * (2 * head_dim + dv) * itemsize
    o, lse = row * dv * itemsize, row * lse_itemsize
    fwd = samples * (qkv + o + lse) + samples * (o + lse) + (o + lse)
    bwd = samples * (qkv + 2 * o + lse + row * (2 * head_dim + dv) * itemsize)
    return {"split_fwd": float(fwd), "split_fwd_bwd": float(fwd + bwd), "fused_fwd": float(qkv + o + lse)}
