"""The one-pass tiled engine behind the "fused" backend: exact, window and LSH attention alike.

Every method is "softmax over keys with positional weights W_h[p, j]" where, for a tile of
consecutive query positions, the keys with W > 0 lie in one contiguous range (the whole prefix for
exact, a band for window, the union of the r blocks for LSH). A ``PositionRule`` says what that range
is for a tile and what log W is inside it; the engine loops over heads and query tiles, computes
the [B, T, L] scores of the tile against its key range only, and applies the shared safe softmax.
Memory is O(B * T * L) per step (plus what autograd saves), never O(Nq * Nk) unless the rule's
range is the whole sequence (exact).

Heads are looped over because their ranges differ by orders of magnitude (Press slopes span
2^-8 .. 2^-1/2): a common range would cost every head the widest head's work.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from .core import AttentionSpec, compute_dtype, softmax_with_lse

__all__ = ["PositionRule", "tiled_attention", "tile_size"]

# Elements of one [B, T, L] score tile; a handful of such temporaries live at once (~100 MB in fp32).
TILE_BUDGET = 1 << 22


class PositionRule(Protocol):
    """Positional weights of one head, as seen by the tiled engine."""

    span: float  # typical number of keys one query needs (sets the tile size)

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


def tile_size(span: float, batch: int, max_len: int, budget: int = TILE_BUDGET) -> int:
    """Query-tile length: about the rule's span (so a tile wastes at most ~2x the useful work),
    a power of two in [64, 1024], shrunk until B * T * (T + span) fits ``budget``."""
    t = 1 << max(6, min(10, round(math.log2(max(span, 1.0)))))
    while t > 1 and batch * t * (t + min(span, max_len)) > budget:
        t //= 2
    return max(1, min(t, max_len))


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                    rules: list[PositionRule]) -> tuple[Tensor, Tensor]:
    """Attention with per-head positional weights, one query tile at a time.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].
        spec: the resolved call (scale, q_offset, key_padding_mask are used here).
        rules: one ``PositionRule`` per query head.

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] in the compute dtype).
    """
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = h // hkv
    out_dtype, cdt = q.dtype, compute_dtype(q.dtype)
    # Upcasting whole tensors costs O(N * D), linear; it keeps fp16/bf16 logits of 1e4 finite.
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    kpm = spec.key_padding_mask
    dev = q.device
    outs, lses = [], []
    for head in range(h):
        rule, kv = rules[head], head // group  # grouped KV: index the shared head, never repeat it
        t = tile_size(rule.span, b, nq)
        firsts = torch.arange(spec.q_offset, nk, t, device=dev)
        lasts = (firsts + t - 1).clamp(max=nk - 1)
        los, his = rule.tile_ranges(firsts, lasts)
        head_out, head_lse = [], []
        for i, (lo, hi) in enumerate(zip(los, his)):
            t0, t1 = i * t, min(nq, (i + 1) * t)
            pos_q = torch.arange(spec.q_offset + t0, spec.q_offset + t1, device=dev)
            pos_k = torch.arange(lo, hi, device=dev)
            s = torch.matmul(q[:, head, t0:t1], k[:, kv, lo:hi].transpose(-1, -2)) * spec.scale
            s = s + rule.log_weight(pos_q, pos_k, cdt)
            if kpm is not None:
                s = s.masked_fill(~kpm[:, None, lo:hi], float("-inf"))
            o, lse = softmax_with_lse(s, v[:, kv, lo:hi])
            head_out.append(o)
            head_lse.append(lse)
        outs.append(torch.cat(head_out, dim=1))
        lses.append(torch.cat(head_lse, dim=1))
    return torch.stack(outs, dim=1).to(out_dtype), torch.stack(lses, dim=1)
