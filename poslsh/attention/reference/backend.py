"""The dense reference backend: the definition of every method, O(Nq * Nk) memory, any dtype.

Row i (key position p = q_offset + i) of head h is softmax_j(scale * q_i . k_j + log W_h[p, j]) with

* exact:  W = e^{-m_h |p - j|}                     (ALiBi);
* window: W = e^{-m_h |p - j|} if -r_h <= p - j <= w_h, else 0 (truncated ALiBi; r_h = w_h unless
  ``spec.window_right`` gives the right side);
* lsh:    W = B-hat_h[p, j] = (1/r) sum_t [p and j share a block in sample t]  (``Partitions.mean_mask``);
* hybrid: W = e^{-m_h |p - j|} if |p - j| <= w_h, else B-hat_h[p, j];

(with ``spec.kernels``, f_h(|p - j|) replaces e^{-m_h |p - j|})

and W = 0 for j > p when causal or when key j is padded out; the sum runs over W > 0 only, so a
NaN or infinite key or value reaches exactly the rows that weigh it. Everything is built densely
so each fast backend can be held to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import AttentionSpec, attend, compute_dtype, has_nonfinite

__all__ = ["dense_attention", "dense_log_weights", "reference_attention", "supports_reference"]


def dense_log_weights(spec: AttentionSpec, nq: int, nk: int, device: torch.device) -> Tensor:
    """log W for every head, query row and key: float64 [H, Nq, Nk], -inf where W = 0.

    The key-padding mask is not included (it depends on the batch); ``reference_attention`` adds it.
    """
    pos_q = torch.arange(spec.q_offset, spec.q_offset + nq, device=device, dtype=torch.float64)
    pos_k = torch.arange(nk, device=device, dtype=torch.float64)
    diff = pos_q[:, None] - pos_k[None, :]  # p - j, [Nq, Nk]
    rule = spec.rule
    if rule.collisions:
        bhat = spec.partitions.to(device).mean_mask()[:, spec.q_offset:spec.q_offset + nq, :]  # [H, Nq, Nk]
        logw = torch.log(bhat)  # log 0 = -inf: pairs that never collide get no weight
    if rule.exact_band:
        if spec.kernels is None:
            exact = -spec.slopes.to(device)[:, None, None] * diff.abs()
        else:
            exact = torch.stack([kern.log_f(diff.abs()) for kern in spec.kernels])
        if not rule.bounded:
            logw = exact
        else:  # exact inside the band; outside B-hat (hybrid) or 0 (window)
            w = spec.window.to(device=device, dtype=torch.float64)[:, None, None]
            right = w if spec.window_right is None else spec.window_right.to(device, torch.float64)[:, None, None]
            outside = logw if rule.collisions else torch.full_like(exact, float("-inf"))
            logw = torch.where((diff > w) | (diff < -right), outside, exact)
    if spec.causal:
        logw = logw.masked_fill(diff < 0, float("-inf"))
    return logw


def reference_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Dense attention with the method's weights.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; H divisible by Hkv.

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] in the compute dtype).
    """
    return dense_attention(q, k, v, spec, dense_log_weights(spec, q.shape[2], k.shape[2], q.device))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """softmax_j(scale q_i . k_j + log_weights[h, i, j]) v over the kept keys, every head at once.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; H divisible by Hkv.
        spec: scale and key_padding_mask are read.
        log_weights: [H, Nq, Nk], -inf where the weight is 0 (any float dtype: cast to the compute dtype).

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] in the compute dtype).
    """
    b, h, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = h // hkv
    cdt, q_dtype = compute_dtype(q.dtype), q.dtype
    q, k, v, logw = (x if x.dtype == cdt else x.to(cdt) for x in (q, k, v, log_weights))  # no-op casts cost too
    kpm = spec.key_padding_mask
    if g == 1:  # no grouping: the plain [B, H, ...] layout, without the views below (fewer operations)
        keep = None if kpm is None else kpm[:, None, None, :]
        out, lse = attend(q, k, v, spec.scale, logw, keep, careful=has_nonfinite(k, v))
        return (out if out.dtype == q_dtype else out.to(q_dtype)), lse
    # Grouped KV: view the query heads as [Hkv, G] and broadcast K/V over G instead of repeating them.
    qg, kk, vv = q.reshape(b, hkv, g, nq, -1), k[:, :, None], v[:, :, None]
    keep = None if kpm is None else kpm[:, None, None, None, :]
    out, lse = attend(qg, kk, vv, spec.scale, logw.reshape(hkv, g, nq, nk), keep, careful=has_nonfinite(kk, vv))
    return out.reshape(b, h, nq, -1).to(q_dtype), lse.reshape(b, h, nq)  # from [B, Hkv, G, Nq, *]


def supports_reference(q: Tensor, spec: AttentionSpec) -> bool:
    """Every method, dtype and device; only the O(Nq * Nk) memory limits it."""
    return True
