"""The "split" backend: the estimator as the paper states it, r passes of ordinary attention inside
the blocks of each sampled partition, merged by softmax over the per-sample log-sum-exps.

For sample t, O_t(p) and L_t(p) are plain (positionally unbiased) attention of query p over the keys
of its block, and O-hat(p) = sum_t softmax_t(L_t(p)) O_t(p) (``merge_partials``). Since
sum_t exp(L_t) = sum_j #{t : j in block_t(p)} a_pj, this equals the fused one-pass form.

Block-local attention is batched over blocks: each block becomes a row of a [num_blocks, P] index
tensor (P = padded block length) gathered from K, V and Q at once. For "grid" all interior blocks
have width W, so the index tensor is arange reshaped to [num_blocks, W] (at most three lengths:
first, interior, last); for "cut" blocks are bucketed by length rounded up to a power of two, so
padding wastes at most 2x. Blocks too long for one score tile are processed a few query rows at a
time, so memory stays bounded even when a block spans the whole sequence (slope 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import AttentionSpec, compute_dtype, merge_partials, softmax_with_lse

__all__ = ["sample_blocks", "block_attention", "split_attention", "supports_split"]

# Elements of one [B, blocks, rows, P] score tile.
TILE_BUDGET = 1 << 22


def sample_blocks(spec: AttentionSpec, head: int, sample: int, n: int) -> tuple[Tensor, Tensor]:
    """The blocks [start, end) of one head and sample that contain a query (end > q_offset).

    Returns:
        (starts, ends): int64 [num_blocks] on the partitions' device, in position order.
    """
    parts = spec.partitions
    if parts.scheme == "grid":
        w, u = int(parts.widths[head, sample]), int(parts.offsets[head, sample])
        first, last = (spec.q_offset + u) // w, (n - 1 + u) // w
        ids = torch.arange(first, last + 1, device=parts.device)
        return (ids * w - u).clamp(min=0), ((ids + 1) * w - u).clamp(max=n)
    row = head * parts.num_samples + sample
    ptr = parts.cut_pointers
    cuts = parts.cut_positions[int(ptr[row]):int(ptr[row + 1])]
    zero, end = cuts.new_zeros(1), cuts.new_full((1,), n)
    starts, ends = torch.cat([zero, cuts]), torch.cat([cuts, end])
    keep = ends > spec.q_offset
    return starts[keep], ends[keep]


def block_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, spec: AttentionSpec,
                    exact_lengths: bool) -> tuple[Tensor, Tensor]:
    """Ordinary attention of every query over the keys of its own block (one head, one sample).

    Args:
        q: [B, Nq, D]; k: [B, Nk, D]; v: [B, Nk, Dv] (compute dtype).
        starts, ends: int64 [num_blocks], contiguous blocks that together hold every query position.
        spec: scale, causal, q_offset and key_padding_mask are used.
        exact_lengths: bucket blocks by their exact length (grid) instead of the next power of two.

    Returns:
        (O [B, Nq, Dv], L [B, Nq]); a query whose block keys are all padded gets 0 and EMPTY_LSE.
    """
    b, nq, _ = q.shape
    nk = k.shape[1]
    kpm = spec.key_padding_mask
    lengths = ends - starts
    padded = lengths if exact_lengths else torch.where(
        lengths > 1, 2 ** torch.ceil(torch.log2(lengths.double())).long(), lengths)
    outs, lses, dests = [], [], []
    for size in torch.unique(padded).tolist():
        sel = padded == size
        st, en = starts[sel], ends[sel]
        if size * size * b <= TILE_BUDGET:
            nb_step, row_step = max(1, TILE_BUDGET // (b * size * size)), size
        else:
            nb_step, row_step = 1, max(1, TILE_BUDGET // (b * size))
        offs = torch.arange(size, device=q.device)
        for c0 in range(0, st.numel(), nb_step):
            s_c, e_c = st[c0:c0 + nb_step], en[c0:c0 + nb_step]
            idx = s_c[:, None] + offs  # [nb, P] key positions; for grid: arange(...).reshape(nb, W)
            kvalid = idx < e_c[:, None]
            idx_k = idx.clamp(max=nk - 1)
            rows_q = idx - spec.q_offset  # query row of each position, < 0 for keys before the queries
            nb = idx.shape[0]
            kb = k.index_select(1, idx_k.flatten()).view(b, nb, size, -1)
            vb = v.index_select(1, idx_k.flatten()).view(b, nb, size, -1)
            qb = q.index_select(1, rows_q.clamp(0, nq - 1).flatten()).view(b, nb, size, -1)
            key_ok = kvalid[None, :, None, :]  # [1, nb, 1, P]
            if kpm is not None:
                key_ok = key_ok & kpm[:, idx_k][:, :, None, :]
            # Rows before the first query are never needed (matters when Nq << Nk, e.g. decoding).
            first_row = int((spec.q_offset - s_c).clamp(min=0).min())
            for r0 in range(first_row - first_row % row_step, size, row_step):
                r1 = min(size, r0 + row_step)
                kend = r1 if spec.causal else size  # causal rows r0..r1-1 see block keys < r1 only
                s = torch.matmul(qb[:, :, r0:r1], kb[:, :, :kend].transpose(-1, -2)) * spec.scale
                ok = key_ok[..., :kend]
                if spec.causal:
                    ok = ok & (offs[None, :kend] <= offs[r0:r1, None])
                o, lse = softmax_with_lse(s.masked_fill(~ok, float("-inf")), vb[:, :, :kend])
                is_query = kvalid[:, r0:r1] & (rows_q[:, r0:r1] >= 0)  # [nb, R]
                outs.append(o[:, is_query])
                lses.append(lse[:, is_query])
                dests.append(rows_q[:, r0:r1][is_query])
    # Every query row lies in exactly one block: the destinations form a permutation of 0..Nq-1.
    order = torch.argsort(torch.cat(dests))
    out = torch.cat(outs, dim=1)[:, order]
    lse = torch.cat(lses, dim=1)[:, order]
    return out, lse


def split_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """LSH attention as r block-local passes per head, merged by their LSEs.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32, float64 for float64 inputs).
    """
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    r = spec.partitions.num_samples
    grid = spec.partitions.scheme == "grid"
    outs, lses = [], []
    for head in range(h):
        kv = head // (h // hkv)  # grouped KV: index the shared head, never repeat it
        passes = (block_attention(q[:, head], k[:, kv], v[:, kv], *sample_blocks(spec, head, t, nk), spec, grid)
                  for t in range(r))
        o, lse = merge_partials(passes, num=r)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs, dim=1).to(out_dtype), torch.stack(lses, dim=1)


def supports_split(q: Tensor, spec: AttentionSpec) -> bool:
    """LSH only (exact and window have no blocks to split into)."""
    return spec.method == "lsh"

