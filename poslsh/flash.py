"""FlashAttention-2's interface to ``poslsh.attention``: switch by changing the import.

    from poslsh import flash_attn_func          # instead of: from flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)             # exact ALiBi
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, window_size=(w, 0))
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, method="window", window_eps=1e-3)

What carries over from FlashAttention (``flash_attn.flash_attn_interface``, version 2):

* Layout [B, N, H, D] for q and [B, N, Hkv, D] for k and v (H divisible by Hkv); the output is
  [B, Nq, H, Dv], contiguous, in q's dtype and on q's device. Any float dtype poslsh takes (fp16,
  bf16, fp32, fp64), CPU or CUDA; autograd through q, k, v.
* ``softmax_scale`` (default 1/sqrt(D)), ``causal``, ``alibi_slopes`` [H] or [B, H] (bias
  -slope * |i + Nk - Nq - j|; rows of a [B, H] tensor with equal slopes share one call), and
  FlashAttention's bottom-right alignment: query i of Nq sits at key position Nk - Nq + i, which is
  poslsh's own convention.
* ``window_size=(left, right)``: query at position p sees keys p - left <= j <= p + right, -1 meaning
  unbounded; ``causal=True`` means right = 0. poslsh's windows are causal or symmetric, so
  (left, 0), (w, w) and (-1, -1) are supported and an asymmetric two-sided window is refused.
* ``deterministic`` is accepted and has no effect: poslsh's backward passes use no atomics.

What poslsh adds, as keyword-only arguments:

* per-head windows: ``window_size=(lefts, 0)`` (or ``(lefts, lefts)``) with ``lefts`` a list or
  tensor of H sizes (-1 = unbounded for that head);
* ``method`` "exact" (default), "window" (per-head widths from the slopes and ``window_eps``),
  "lsh" or "hybrid" (positional LSH with ``samples``, ``scheme``, ``sampling``, ``hybrid_eps``,
  ``partitions``, ``generator``), and ``backend``, as ``poslsh.attention`` takes them.

Refused with an error naming the argument: ``dropout_p > 0``, ``softcap != 0``,
``return_attn_probs=True`` and (varlen) ``block_table``.

``flash_attn_varlen_func`` takes packed sequences (``cu_seqlens_q``/``cu_seqlens_k``) and aligns
every sequence bottom-right on its own keys, as FlashAttention does; for a right-padded batch that is
"the queries follow the last *valid* key", whereas ``poslsh.attention(..., key_padding_mask=...)``
keeps query i at Nk - Nq + i whatever the padding (see its docstring).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .attention.dispatch import attention, attention_with_widths

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _refuse_unsupported(dropout_p: float, softcap: float, return_attn_probs: bool) -> None:
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: poslsh applies no attention dropout; pass dropout_p=0.0")
    if softcap != 0:
        raise NotImplementedError(f"softcap={softcap!r}: logit soft-capping is not supported by poslsh; pass softcap=0.0")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True: poslsh never forms the attention probabilities; "
                                  "use poslsh.attention(..., return_lse=True) for the log-sum-exp")


def _check_layout(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t, what in (("q", q, "[B, Nq, H, D]"), ("k", k, "[B, Nk, Hkv, D]"), ("v", v, "[B, Nk, Hkv, Dv]")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D {what} (FlashAttention's layout), got shape {tuple(t.shape)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must share [B, Nk, Hkv], got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share the batch and head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads H={q.shape[2]} must be divisible by key/value heads Hkv={k.shape[2]} "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}: [B, N, heads, D])")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"q length Nq={q.shape[1]} must be <= key length Nk={k.shape[1]} (poslsh places query i "
                         "at key position Nk - Nq + i and has no queries before the first key)")


def _lefts(left, h: int) -> Tensor:
    """One window size per head, int64 [H]; -1 = unbounded."""
    if isinstance(left, Tensor):
        lefts = left.detach().to("cpu")
        if lefts.dtype.is_floating_point or lefts.dtype == torch.bool:
            raise TypeError(f"window_size sizes must be integers, got a {lefts.dtype} tensor")
        lefts = lefts.to(torch.int64).reshape(-1)
    elif isinstance(left, Sequence) and not isinstance(left, str):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in left):
            raise TypeError(f"window_size sizes must be ints, got {left!r}")
        lefts = torch.tensor(list(left), dtype=torch.int64)
    elif isinstance(left, int) and not isinstance(left, bool):
        lefts = torch.full((h,), left, dtype=torch.int64)
    else:
        raise TypeError(f"window_size entries must be an int or H ints (one per head), got {left!r}")
    if lefts.numel() != h:
        raise ValueError(f"window_size needs one size per query head ({h}), got {lefts.numel()}")
    if (lefts < -1).any():
        raise ValueError(f"window_size sizes must be >= 0 or -1 (unbounded), got {lefts.tolist()}")
    return lefts


def _window(window_size, causal: bool, h: int, nk: int) -> tuple[bool, Tensor | None]:
    """FlashAttention's (causal, window_size) -> poslsh's (causal, per-head half-widths [H] or None)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = (_lefts(w, h) for w in window_size)
    if causal or bool((right == 0).all()):
        causal = True  # FlashAttention: causal means right = 0
    elif not torch.equal(left, right):
        raise NotImplementedError(f"window_size=({window_size[0]}, {window_size[1]}) without causal: poslsh's "
                                  "windows are causal (right = 0) or symmetric (right = left)")
    if bool((left == -1).all()):
        return causal, None
    return causal, torch.where(left < 0, nk - 1, left.clamp(max=nk - 1))


def _slopes(alibi_slopes, method: str, b: int, h: int) -> Tensor:
    """[B, H] float64 CPU slopes (zeros without ALiBi: plain softmax attention)."""
    if alibi_slopes is None:
        if method != "exact":
            raise ValueError(f"method={method!r} approximates ALiBi attention: pass alibi_slopes "
                             "(e.g. poslsh.alibi_slopes(H))")
        return torch.zeros(b, h, dtype=torch.float64)
    if not isinstance(alibi_slopes, Tensor):
        alibi_slopes = torch.as_tensor(alibi_slopes, dtype=torch.float64)
    if alibi_slopes.requires_grad:  # FlashAttention has no slope gradients either; never detach silently
        raise ValueError("alibi_slopes must not require grad: flash_attn_func computes no slope gradients")
    s = alibi_slopes.detach().to("cpu", torch.float64)
    if tuple(s.shape) == (h,):
        return s.expand(b, h)
    if tuple(s.shape) == (b, h):
        return s
    raise ValueError(f"alibi_slopes must have shape [H] = ({h},) or [B, H] = ({b}, {h}), got {tuple(s.shape)}")


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *, method: str = "exact",
                    samples: int = 8, scheme: str = "grid", sampling: str = "iid", window_eps: float = 1e-3,
                    hybrid_eps: float = 1e-2, partitions=None, generator: torch.Generator | None = None,
                    backend: str = "auto") -> Tensor:
    """FlashAttention-2's ``flash_attn_func`` computed by ``poslsh.attention`` (see the module docstring).

    Args:
        q: [B, Nq, H, D]; k: [B, Nk, Hkv, D]; v: [B, Nk, Hkv, Dv]; Nq <= Nk, H divisible by Hkv.
        softmax_scale: multiplier of q . k; default 1/sqrt(D).
        causal: query i (at key position Nk - Nq + i) sees keys j <= Nk - Nq + i.
        window_size: (left, right), -1 unbounded; left may be H sizes (per-head windows).
        alibi_slopes: [H] or [B, H], >= 0, bias -slope * |i + Nk - Nq - j|; None: no bias.
        method, samples, scheme, sampling, window_eps, hybrid_eps, partitions, generator, backend: as in
            ``poslsh.attention``; "window" takes its widths from the slopes and ``window_eps`` and cannot
            be combined with ``window_size``, nor can "lsh" and "hybrid".

    Returns:
        [B, Nq, H, Dv], contiguous, q's dtype and device.
    """
    _refuse_unsupported(dropout_p, softcap, return_attn_probs)
    _check_layout(q, k, v)
    b, nq, h, _ = q.shape
    nk = k.shape[1]
    slopes = _slopes(alibi_slopes, method, b, h)
    is_causal, widths = _window(window_size, bool(causal), h, nk)
    if widths is not None and method != "exact":
        raise ValueError(f"window_size sets the window itself; method={method!r} cannot take one (use method='exact' "
                         "with window_size, or method='window' with window_eps)")
    if widths is not None and partitions is not None:
        raise ValueError("partitions are only used by method='lsh' or 'hybrid', which take no window_size")
    options = dict(method=method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                   hybrid_eps=hybrid_eps, partitions=partitions, generator=generator)
    groups, inverse = torch.unique(slopes, dim=0, return_inverse=True)
    outs, order = [], []
    for g in range(groups.shape[0]):
        rows = (inverse == g).nonzero().flatten()
        idx = rows.to(q.device)
        qt, kt, vt = (t.index_select(0, idx).transpose(1, 2) for t in (q, k, v)) if groups.shape[0] > 1 else \
            (t.transpose(1, 2) for t in (q, k, v))
        outs.append(_call(qt, kt, vt, groups[g], is_causal, softmax_scale, widths, backend, options))
        order.append(rows)
    out = outs[0] if len(outs) == 1 else torch.cat(outs).index_select(0, torch.cat(order).argsort().to(q.device))
    return out.transpose(1, 2).contiguous()


def _call(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, causal: bool, scale: float | None, widths: Tensor | None,
          backend: str, options: dict) -> Tensor:
    """One poslsh call on [B, H, N, D] tensors sharing ``slopes``; explicit ``widths`` run the "window"
    method with those half-widths."""
    if widths is None:
        return attention(q, k, v, slopes=slopes, is_causal=causal, scale=scale, backend=backend, **options)
    return attention_with_widths(q, k, v, widths, slopes=slopes, causal=causal, scale=scale, backend=backend)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, **poslsh_options) -> Tensor:
    """FlashAttention-2's ``flash_attn_varlen_func``: packed sequences, each aligned bottom-right on its keys.

    Args:
        q: [total_q, H, D]; k: [total_k, Hkv, D]; v: [total_k, Hkv, Dv].
        cu_seqlens_q, cu_seqlens_k: int [B + 1], 0 first, non-decreasing: sequence b is
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and its keys likewise; Nq_b <= Nk_b.
        max_seqlen_q, max_seqlen_k: at least the longest sequence (checked).
        alibi_slopes: [H] or [B, H]. Other arguments and the keyword-only poslsh options (except
            ``partitions``: each sequence draws its own) as in ``flash_attn_func``.

    Returns:
        [total_q, H, Dv]; one ``flash_attn_func`` call per sequence.
    """
    _refuse_unsupported(dropout_p, softcap, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("block_table (paged KV cache) is not supported by poslsh; pass block_table=None")
    if poslsh_options.get("partitions") is not None:
        raise ValueError("partitions cover one key length; varlen sequences draw their own (pass generator= to "
                         "fix them)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.ndim != 3:
            raise ValueError(f"{name} must be a 3-D [total, heads, D] tensor (packed sequences), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    bounds = []
    for name, cu, total, most in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                  ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, Tensor) or cu.ndim != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
            raise ValueError(f"{name} must be a 1-D integer tensor [B + 1], got {cu!r}")
        c = cu.detach().to("cpu", torch.int64)
        lengths = c.diff()
        if int(c[0]) != 0 or (lengths < 0).any() or int(c[-1]) != total:
            raise ValueError(f"{name} must start at 0, not decrease and end at the packed length {total}, "
                             f"got {c.tolist()}")
        if int(lengths.max()) > most:
            raise ValueError(f"max_seqlen_{name[-1]}={most} is below the longest sequence ({int(lengths.max())})")
        bounds.append(c.tolist())
    (cq, ck), batch = bounds, len(bounds[0]) - 1
    if len(ck) - 1 != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{batch} and {len(ck) - 1}")
    slopes = alibi_slopes
    if isinstance(slopes, Tensor) and slopes.ndim == 2 and slopes.shape[0] != batch:
        raise ValueError(f"alibi_slopes [B, H] must have one row per sequence ({batch}), got {tuple(slopes.shape)}")
    outs = []
    for i in range(batch):
        nq, nk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if nq == 0:
            outs.append(q.new_zeros(0, q.shape[1], v.shape[2]))
            continue
        if nq > nk:
            raise ValueError(f"sequence {i} has {nq} queries but {nk} keys: poslsh needs Nq <= Nk per sequence")
        row = slopes[i] if isinstance(slopes, Tensor) and slopes.ndim == 2 else slopes
        outs.append(flash_attn_func(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                    softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                    alibi_slopes=row, deterministic=deterministic, **poslsh_options)[0])
    return torch.cat(outs)
