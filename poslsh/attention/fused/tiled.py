"""The one-pass tiled engine behind the "fused" backend: exact, window and LSH attention alike.

Every method is "softmax over keys with positional weights W_h[p, j]" where, for a tile of
consecutive query positions, the keys with W > 0 lie in one contiguous range (the whole prefix for
exact, a band for window, the union of the r blocks for LSH). A ``PositionRule`` says what that range
is for a tile and what log W is inside it; the engine loops over heads and query tiles, computes
the [B, T, C] scores of the tile against its key range, C keys at a time, and merges the chunks by
their log-sum-exps (online softmax, ``core.merge_partials``). T and C are chosen so that one score
tile is at most ``TILE_BYTES`` whatever Nq and Nk are (``tile_shape``): the key range of a tile is
the whole prefix for exact attention, so with Nq << Nk (chunked prefill, a prompt continued
against a cache) the key axis must be tiled too. Memory is O(TILE_BYTES) per step, plus what
autograd saves when gradients are needed.

Heads are looped over because their ranges differ by orders of magnitude (Press slopes span
2^-8 .. 2^-1/2): a common range would cost every head the widest head's work.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from ..core import AttentionSpec, attend, compute_dtype, has_nonfinite, merge_partials

__all__ = ["PositionRule", "tiled_attention", "tile_shape", "TILE_BYTES"]

# Bytes of one [B, T, C] score tile (and the bound on any one per-tile temporary); a handful live at once.
TILE_BYTES = 16 << 20


class PositionRule(Protocol):
    """Positional weights of one head, as seen by the tiled engine."""

    span: float  # typical number of keys one query needs (sets the tile size)
    row_bytes: int  # bytes of the rule's own per-query-row temporaries (0 if none), bounded with the tile

    def tile_ranges(self, firsts: Tensor, lasts: Tensor) -> tuple[list[int], list[int]]:
        """Key range [lo, hi) covering every key with W > 0 for each tile of query positions.

        Args:
            firsts, lasts: int64 [num_tiles], first and last key position of each query tile.
        """
        ...

    def log_weight(self, pos_q: Tensor, pos_k: Tensor, dtype: torch.dtype) -> Tensor:
        """log W for query positions pos_q [T] and key positions pos_k [L]: [T, L], -inf where W = 0
        (including j > p when causal)."""
        ...


MIN_TILE = 64  # query rows of the smallest tile


def tile_shape(span: float, batch: int, num_queries: int, row_bytes: int, dtype: torch.dtype) -> tuple[int, int]:
    """(T, C): query-tile length and key-chunk length for one head.

    T is about the rule's span (so a tile wastes at most ~2x the useful work), a power of two in
    [64, 1024] and at most Nq, shrunk until a square B x T x T tile and the rule's T rows of
    temporaries each fit ``TILE_BYTES``; C fills the budget: B * T * (C + 1) elements of ``dtype``
    (the +1 for the collision rule's step tensor).
    """
    budget = max(1, TILE_BYTES // dtype.itemsize)  # elements
    t = max(MIN_TILE, 1 << min(10, round(math.log2(max(span, 1.0)))))
    t = max(1, min(t, num_queries))
    while t > 1 and (batch * t * t > budget or t * row_bytes > TILE_BYTES):
        t //= 2
    return t, max(1, budget // (batch * t) - 1)


def position_dtype(n: int) -> torch.dtype:
    """Positions as int32 while they fit: a [T, C] position difference then takes a float32 score's bytes."""
    return torch.int32 if n < 2**31 else torch.int64


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, rules) -> tuple[Tensor, Tensor]:
    """Attention with per-head positional weights, one query tile and key chunk at a time.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].
        spec: the resolved call (scale, q_offset, key_padding_mask are used here).
        rules: one ``PositionRule`` per query head, in head order (an iterable: a rule is built
            only when its head is reached, so per-head state is never held for all heads at once).

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] in the compute dtype).
    """
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = h // hkv
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    # Upcasting whole tensors costs O(N * D), linear; it keeps fp16/bf16 logits of 1e4 finite.
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    careful = has_nonfinite(k, v)  # once per call: non-finite keys/values take attend's careful path
    kpm = spec.key_padding_mask
    dev, pdt = q.device, position_dtype(nk)
    outs, lses = [], []
    for head, rule in enumerate(rules):
        kv = head // group  # grouped KV: index the shared head, never repeat it
        # At most MIN_TILE query rows (decoding) make one tile whatever the span: not computed then.
        t, c = tile_shape(rule.span if nq > MIN_TILE else MIN_TILE, b, nq, rule.row_bytes, cdt)
        firsts = torch.arange(spec.q_offset, spec.q_offset + nq, t, device=dev)
        lasts = (firsts + t - 1).clamp(max=spec.q_offset + nq - 1)
        los, his = rule.tile_ranges(firsts, lasts)
        head_out, head_lse = [], []
        for i, (lo, hi) in enumerate(zip(los, his)):
            t0, t1 = i * t, min(nq, (i + 1) * t)
            pos_q = torch.arange(spec.q_offset + t0, spec.q_offset + t1, device=dev, dtype=pdt)

            def chunk(c0: int, c1: int) -> tuple[Tensor, Tensor]:  # keys [c0, c1) of this query tile
                pos_k = torch.arange(c0, c1, device=dev, dtype=pdt)
                keep = None if kpm is None else kpm[:, None, c0:c1]
                return attend(q[:, head, t0:t1], k[:, kv, c0:c1], v[:, kv, c0:c1], spec.scale,
                              rule.log_weight(pos_q, pos_k, cdt), keep, careful)

            if hi - lo <= c:
                o, lse = chunk(lo, hi)
            else:  # Nq << Nk or a very wide rule: online softmax over key chunks
                o, lse = merge_partials(chunk(c0, min(hi, c0 + c)) for c0 in range(lo, hi, c))
            head_out.append(o)
            head_lse.append(lse)
        outs.append(torch.cat(head_out, dim=1))
        lses.append(torch.cat(head_lse, dim=1))
    return torch.stack(outs, dim=1).to(out_dtype), torch.stack(lses, dim=1)
