"""What every attention backend shares: the resolved call (``AttentionSpec``), the convention for
empty rows, and the one numerically safe softmax that returns its log-sum-exp.

Conventions (all backends, so their results can be compared and merged):

* Scores are computed in float32 for float16/bfloat16/float32 inputs and in float64 for float64
  inputs (``compute_dtype``); the output is cast back to q's dtype, the LSE is not.
* A row with no admissible key (every key it may see is padded out) returns output 0 and
  ``lse = EMPTY_LSE`` (-1e30): finite, so ``exp(lse)`` is 0 and differences of LSEs never form
  ``inf - inf``; merging by softmax over LSEs then gives such a partial result weight 0.
* A NaN or infinite key or value reaches exactly the rows whose weight on it is non-zero (as SDPA):
  the scores of excluded pairs are replaced, not added to (``-inf + NaN`` would stay NaN), and an
  excluded value is never multiplied by its zero probability (``0 * NaN`` is NaN). ``attend`` takes
  this careful path only when the call holds a non-finite key or value (``has_nonfinite``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..hashing import Partitions
from ..method import METHODS, MethodRule, method_rule  # poslsh.method describes a method, its options and weights

__all__ = ["AttentionSpec", "EMPTY_LSE", "METHODS", "compute_dtype", "softmax_with_lse", "merge_partials", "attend",
           "has_nonfinite"]

# The LSE of a row that sees no key. log(0) = -inf would be exact but turns into NaN as soon as a
# caller subtracts two of them; -1e30 is as good as -inf for every exp() and stays finite.
EMPTY_LSE = -1e30


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """One attention call after validation: everything a backend needs besides q, k, v.

    Attributes:
        slopes: ALiBi slopes, float64 CPU tensor [H] (one per query head); with ``kernels``, each
            head's ALiBi slope or NaN for a non-exponential kernel (so a backend that ignores
            ``kernels`` produces NaN rather than silently wrong numbers). For "exact" and "window" it
            may require grad (trainable slopes, attached to the caller's tensor): only backends
            registered with ``slope_grad=True`` accept such a call.
        causal: whether query position p may only see keys j <= p.
        method: "exact", "window", "lsh" or "hybrid" (exact weights for |p - j| <= window[h],
            the positional-LSH collision mean of ``partitions`` beyond); backends read what it means
            from ``rule`` (``poslsh.method.MethodRule``), never compare the name.
        scale: multiplier of q . k (1/sqrt(D) by default).
        q_offset: query row i sits at key position q_offset + i; 0 <= q_offset <= Nk - Nq (default
            Nk - Nq: the queries are the last Nq keys).
        partitions: for "lsh" and "hybrid", ``Partitions`` over the Nk key positions with H heads,
            on q's device.
        window: for "window", int64 CPU tensor [H] of half-widths w_h (keys with |p - j| <= w_h are
            kept; each at most Nk - 1, which keeps every key); for "hybrid" the near-field half-widths;
            for "exact" None (every key is kept).
        window_right: for a non-causal "window" whose right side differs (FlashAttention's
            ``window_size=(left, right)``), int64 CPU [H]: keys p - window[h] <= j <= p + window_right[h];
            None: the band is symmetric (every other method and every causal call).
        key_padding_mask: bool [B, Nk] on q's device (True = keep), or None.
        kernels: None for ALiBi, else H ``poslsh.positional_kernels.Kernel``: the positional weight is
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
    window_right: Tensor | None = None
    key_padding_mask: Tensor | None = None
    kernels: tuple | None = None
    primitive: object = None

    @property
    def num_heads(self) -> int:
        return self.slopes.numel()

    @property
    def rule(self) -> MethodRule:
        """What the method's weights are (``poslsh.method.MethodRule``): what backends read, never the name."""
        return method_rule(self.method)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax are accumulated in: float64 stays, everything else -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_nonfinite(*tensors: Tensor) -> bool:
    """Whether any of the tensors may hold a NaN or an infinity: one sum each, their total and one host
    sync, no temporary of the tensor's size. (A sum that overflows in the tensors' dtype sends a finite
    call down the careful path, which is exact too, only slower.)"""
    if not tensors:
        return False
    total = tensors[0].sum()  # a NaN or infinity anywhere makes the total non-finite
    for t in tensors[1:]:
        total = total + t.sum()
    return not math.isfinite(total.item())  # item(): one host read, cheaper than isfinite's operations


def last_dim_contiguous(x: Tensor) -> Tensor:
    """x itself when its last dim is contiguous (what the Triton kernels need), else a contiguous copy."""
    return x if x.stride()[-1] == 1 else x.contiguous()  # (stride() then index: faster than stride(-1))


def softmax_with_lse(scores: Tensor, v: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """softmax(scores) @ v and logsumexp(scores), safe for rows that are entirely -inf.

    Args:
        scores: [..., M, L] logits with -inf for excluded keys.
        v: [..., L, Dv] values (broadcastable batch dims), same dtype as scores.
        keep: optional bool, broadcastable to [..., M, L]: the pairs with non-zero weight. Pairs
            outside it are excluded whatever their score (a NaN score of an unseen key stays unseen),
            and a non-finite value reaches exactly the rows that keep it. None: scores are already
            -inf where excluded and every value is finite where excluded (the fast path).

    Returns:
        (out [..., M, Dv], lse [..., M]); an all -inf row gives out 0 and lse EMPTY_LSE.
    """
    if keep is None and not (torch.is_grad_enabled() and (scores.requires_grad or v.requires_grad)):
        # Without gradients (inference, decoding): three operations instead of a dozen. logsumexp gives
        # -inf for an all -inf row, clamped to EMPTY_LSE, so exp(-inf - EMPTY_LSE) = 0 gives output 0.
        # (With gradients the general path below: logsumexp's backward is NaN on such rows.)
        lse = torch.logsumexp(scores, -1, keepdim=True).clamp(min=EMPTY_LSE)
        return torch.matmul(torch.exp(scores - lse), v), lse.squeeze(-1)
    poisoned = None
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
        # A kept NaN or +inf score makes its row NaN (as SDPA). The row is computed as empty and set to
        # NaN afterwards, so its gradient is 0 rather than NaN: a NaN that autograd would otherwise
        # spread to every key through 0 * NaN in the backward of p @ v.
        poisoned = (scores.isnan() | (scores == math.inf)).any(-1, keepdim=True)
        scores = scores.masked_fill(poisoned, float("-inf"))
    # The max shift cancels in both results, so it carries no gradient; detaching it avoids
    # differentiating through amax (and NaN from -inf maxima).
    m = scores.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    den = p.sum(-1, keepdim=True)
    empty = den == 0
    den = torch.where(empty, torch.ones_like(den), den)
    bad = None if keep is None else ~torch.isfinite(v)
    if bad is None or not bool(bad.any()):
        out = torch.matmul(p, v) / den
    else:  # finite values through the matmul; the non-finite ones added back to the rows that keep them
        out = torch.matmul(p, v.masked_fill(bad, 0.0)) / den + _reached_nonfinite(keep, v)
    lse = torch.where(empty, torch.full_like(den, EMPTY_LSE), m + torch.log(den))
    if poisoned is not None:
        out, lse = out.masked_fill(poisoned, math.nan), lse.masked_fill(poisoned, math.nan)
    return out, lse.squeeze(-1)


def _reached_nonfinite(keep: Tensor, v: Tensor) -> Tensor:
    """What the non-finite values add to each row that keeps them: [..., M, Dv], 0 where none is kept,
    +-inf where only +inf (or only -inf) is kept, NaN where a NaN or both infinities are. Counted by a
    0/1 matmul, so an excluded NaN never meets a zero weight. (The inf's weight is taken as positive:
    a kept value of inf whose probability underflowed to 0 gives inf, not 0 * inf.)"""
    flags = torch.cat([v.isnan(), v == math.inf, v == -math.inf], -1).to(v.dtype)  # [..., L, 3 Dv]
    nan, pos, neg = (torch.matmul(keep.to(v.dtype), flags) > 0).chunk(3, -1)
    out = torch.zeros_like(pos, dtype=v.dtype)
    out = out.masked_fill(pos, math.inf).masked_fill(neg, -math.inf)
    return out.masked_fill(nan | (pos & neg), math.nan)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, log_weight: Tensor, key_keep: Tensor | None = None,
           careful: bool = False) -> tuple[Tensor, Tensor]:
    """softmax(scale q k^T + log_weight) v over the kept keys, and its LSE.

    Args:
        q: [..., M, D]; k: [..., L, D]; v: [..., L, Dv] (compute dtype, broadcastable batch dims).
        log_weight: broadcastable to [..., M, L]: log W, -inf where the weight is 0.
        key_keep: bool broadcastable to [..., M, L] (False = key padded out), or None.
        careful: the call holds a non-finite key or value (``has_nonfinite``, checked once per
            call by the caller): keep them to the rows that weigh them, forward and backward. A
            loss over the rows that do not see them gets the gradient it would get with the
            poisoned entries replaced by any finite number: non-finite keys are multiplied without
            a gradient (so an excluding row's dq stays finite) and poisoned rows pass back 0.

    Returns:
        (out [..., M, Dv], lse [..., M]) as ``softmax_with_lse``.
    """
    if not careful:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale + log_weight
        if key_keep is not None:
            s = s.masked_fill(~key_keep, float("-inf"))
        return softmax_with_lse(s, v)
    finite_k = torch.isfinite(k).all(-1, keepdim=True)  # [..., L, 1]
    s = torch.matmul(q, k.masked_fill(~finite_k, 0.0).transpose(-1, -2)) * scale
    s = torch.where(finite_k.transpose(-1, -2), s, torch.matmul(q.detach(), k.detach().transpose(-1, -2)) * scale)
    keep = torch.isfinite(log_weight)
    if key_keep is not None:
        keep = keep & key_keep
    return softmax_with_lse(s + log_weight, v, keep)


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
