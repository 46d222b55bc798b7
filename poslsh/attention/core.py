"""What every attention backend shares: the resolved call (``AttentionSpec``), the convention for
empty rows, and the one numerically safe softmax that returns its log-sum-exp.

Conventions (all backends, so their results can be compared and merged):

* Scores are computed in float32 for float16/bfloat16/float32 inputs and in float64 for float64
  inputs (``compute_dtype``); the output is cast back to q's dtype, the LSE is not.
* A row with no admissible key (every key it may see is padded out) returns output 0 and
  ``lse = EMPTY_LSE`` (-1e30): finite, so ``exp(lse)`` is 0 and differences of LSEs never form
  ``inf - inf``; merging by softmax over LSEs then gives such a partial result weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..hashing import Partitions

__all__ = ["AttentionSpec", "EMPTY_LSE", "METHODS", "compute_dtype", "softmax_with_lse", "merge_partials"]

METHODS = ("exact", "window", "lsh", "hybrid")

# The LSE of a row that sees no key. log(0) = -inf would be exact but turns into NaN as soon as a
# caller subtracts two of them; -1e30 is as good as -inf for every exp() and stays finite.
EMPTY_LSE = -1e30


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """One attention call after validation: everything a backend needs besides q, k, v.

    Attributes:
        slopes: ALiBi slopes, float64 CPU tensor [H] (one per query head); with ``kernels``, each
            head's ALiBi slope or NaN for a non-exponential kernel (so a backend that ignores
            ``kernels`` produces NaN rather than silently wrong numbers).
        causal: whether query position p may only see keys j <= p.
        method: "exact", "window", "lsh" or "hybrid" (exact weights for |p - j| <= window[h],
            the positional-LSH collision mean of ``partitions`` beyond).
        scale: multiplier of q . k (1/sqrt(D) by default).
        q_offset: Nk - Nq; query row i sits at key position q_offset + i.
        partitions: for "lsh" and "hybrid", ``Partitions`` over the Nk key positions with H heads,
            on q's device.
        window: for "window", int64 CPU tensor [H] of half-widths w_h (keys with |p - j| <= w_h are
            kept); for "hybrid" the near-field half-widths; for "exact" None (every key is kept).
        key_padding_mask: bool [B, Nk] on q's device (True = keep), or None.
        kernels: None for ALiBi, else H ``poslsh.kernels.Kernel``: the positional weight is
            f_h(|p - j|) instead of e^{-m_h |p - j|} (exact, window, hybrid near field; LSH through
            partitions drawn for these kernels).
        primitive: for the "split" backend, the block attention it runs: None (its default), a name
            in ``primitives.PRIMITIVES`` or a callable ``fn(q, k, v, causal) -> (out, lse)``.
    """

    slopes: Tensor
    causal: bool
    method: str
    scale: float
    q_offset: int
    partitions: Partitions | None = None
    window: Tensor | None = None
    key_padding_mask: Tensor | None = None
    kernels: tuple | None = None
    primitive: object = None

    @property
    def num_heads(self) -> int:
        return self.slopes.numel()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax are accumulated in: float64 stays, everything else -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(scores) @ v and logsumexp(scores), safe for rows that are entirely -inf.

    Args:
        scores: [..., M, L] logits with -inf for excluded keys.
        v: [..., L, Dv] values (broadcastable batch dims), same dtype as scores.

    Returns:
        (out [..., M, Dv], lse [..., M]); an all -inf row gives out 0 and lse EMPTY_LSE.
    """
    # The max shift cancels in both results, so it carries no gradient; detaching it avoids
    # differentiating through amax (and NaN from -inf maxima).
    m = scores.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    den = p.sum(-1, keepdim=True)
    empty = den == 0
    den = torch.where(empty, torch.ones_like(den), den)
    out = torch.matmul(p, v) / den
    lse = torch.where(empty, torch.full_like(den, EMPTY_LSE), m + torch.log(den))
    return out, lse.squeeze(-1)


def merge_partials(parts, num: int | None = None) -> tuple[Tensor, Tensor]:
    """Merge partial attention results by softmax over their LSEs, streaming (O(one part) memory).

    Each part (O_t [..., M, Dv], L_t [..., M]) is attention over a subset S_t of keys. The merge is
    attention over the multiset union: out = sum_t exp(L_t) O_t / sum_t exp(L_t) and
    lse = log(sum_t exp(L_t)) - log(num). With num = r this is the LSH estimator's LSE, the LSE of
    scores + log(c_ij) with c_ij the fraction of samples in which i and j collide.

    Args:
        parts: iterable of (out, lse) pairs, all of one shape.
        num: divide the summed weight by this (log(num) subtracted from lse); None = 1.

    Returns:
        (out [..., M, Dv], lse [..., M]); rows empty in every part give 0 and EMPTY_LSE.
    """
    it = iter(parts)
    num_acc, m = next(it)
    den = torch.ones_like(m)
    for o, lse in it:
        m_new = torch.maximum(m, lse)
        a, b = torch.exp(m - m_new), torch.exp(lse - m_new)
        num_acc = num_acc * a[..., None] + o * b[..., None]
        den = den * a + b
        m = m_new
    out = num_acc / den[..., None]
    lse = m + torch.log(den)
    if num is not None and num != 1:
        lse = lse - math.log(num)
    # Rows empty everywhere have m = EMPTY_LSE (their outputs are 0 already); keep the sentinel exact.
    lse = torch.where(m <= EMPTY_LSE / 2, torch.full_like(lse, EMPTY_LSE), lse)
    return out, lse
