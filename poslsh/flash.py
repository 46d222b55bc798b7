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
  poslsh's own convention. Nq > Nk too: the first Nq - Nk queries then sit before the first key;
  causal, they see no key and give output 0 (LSE -inf).
* ``window_size=(left, right)``: query at position p sees keys p - left <= j <= p + right, -1 meaning
  unbounded; ``causal=True`` means right = 0. Either side may be an int, H ints (per-head windows,
  poslsh's extension) or an integer tensor; the pair itself a tuple, list or 2-element tensor.
* ``deterministic`` is accepted and has no effect: poslsh's backward passes use no atomics.

What poslsh adds, as keyword-only arguments:

* ``return_lse=True``: also return the log-sum-exp [B, H, Nq] float32 (varlen: [H, total_q]),
  FlashAttention's ``softmax_lse``, -inf for a row that sees no key (FlashAttention 3 writes -inf
  there; FlashAttention 2's kernels write +inf);
* ``method`` "exact" (default), "window" (per-head widths from the slopes and ``window_eps``),
  "lsh" or "hybrid" (positional LSH with ``samples``, ``scheme``, ``sampling``, ``hybrid_eps``,
  ``partitions``, ``generator``), and ``backend``, as ``poslsh.attention`` takes them.

Refused with an error naming the argument: ``dropout_p > 0``, ``softcap != 0``,
``return_attn_probs=True`` and (varlen) ``block_table``.

How: one ``poslsh.attention`` call on the transposed tensors per group of batch rows with equal
slopes, ``window_size`` passed through (``poslsh.attention`` reads it with FlashAttention's meaning).
With Nq > Nk the keys are left-padded to Nq positions with masked keys (``key_padding_mask``): the
distances, hence the bias and the window, are unchanged, so the result is exact; it costs a copy of
k and v at Nq positions and the masked path in the kernels (Triton and Flex test the padding mask
on every key tile), and the kernels visit the padded keys' tiles a row's range reaches (causal exact:
up to (Nq / Nk)^2 the work of the Nk real keys).

``flash_attn_varlen_func`` takes packed sequences (``cu_seqlens_q``/``cu_seqlens_k``) and aligns
every sequence bottom-right on its own keys, as FlashAttention does; for a right-padded batch that is
"the queries follow the last *valid* key", whereas ``poslsh.attention(..., key_padding_mask=...)``
keeps query i at Nk - Nq + i whatever the padding (see its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention.core import EMPTY_LSE
from .attention.public import attention
from .checks import as_bool
from .method import method_rule

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _refuse_unsupported(dropout_p: float, softcap: float, return_attn_probs: bool) -> None:
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p={dropout_p!r}: poslsh applies no attention dropout; pass dropout_p=0.0")
    if softcap != 0:
        raise NotImplementedError(f"softcap={softcap!r}: logit soft-capping is not supported by poslsh; pass softcap=0.0")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs=True: poslsh never forms the attention probabilities; "
                                  "pass return_lse=True for the log-sum-exp")


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


def _slopes(alibi_slopes, method: str, b: int, h: int) -> Tensor:
    """[B, H] float64 CPU slopes (zeros without ALiBi: plain softmax attention)."""
    if alibi_slopes is None:
        if not method_rule(method).all_exact:
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


def _keys_from_first_query(k: Tensor, v: Tensor, nq: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """[B, Nk, Hkv, *] keys and values, left-padded with Nq - Nk masked positions when Nq > Nk, and the
    [B, max(Nq, Nk)] key padding mask (None without padding): query i then sits at padded position i
    and every distance i + Nk - Nq - j is kept."""
    pad = nq - k.shape[1]
    if pad <= 0:
        return k, v, None
    k, v = (torch.cat([t.new_zeros(t.shape[0], pad, *t.shape[2:]), t], 1) for t in (k, v))
    keep = torch.arange(nq, device=k.device) >= pad
    return k, v, keep.expand(k.shape[0], nq)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *, return_lse: bool = False,
                    method: str = "exact", samples: int | None = None, scheme: str | None = None,
                    sampling: str | None = None, window_eps: float | None = None, hybrid_eps: float | None = None,
                    partitions=None,
                    generator: torch.Generator | None = None, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """FlashAttention-2's ``flash_attn_func`` computed by ``poslsh.attention`` (see the module docstring).

    Args:
        q: [B, Nq, H, D]; k: [B, Nk, Hkv, D]; v: [B, Nk, Hkv, Dv]; H divisible by Hkv.
        softmax_scale: multiplier of q . k; default 1/sqrt(D).
        causal: query i (at key position Nk - Nq + i) sees keys j <= Nk - Nq + i.
        window_size: (left, right), -1 unbounded; either side may be H sizes (per-head windows).
        alibi_slopes: [H] or [B, H], >= 0, bias -slope * |i + Nk - Nq - j|; None: no bias.
        return_lse: also return the LSE (see Returns).
        method, samples, scheme, sampling, window_eps, hybrid_eps, partitions, generator, backend: as in
            ``poslsh.attention`` (None: its default); "window" takes its widths from the slopes and
            ``window_eps`` and cannot be combined with a cutting ``window_size``, nor can "lsh" and
            "hybrid". With Nq > Nk, partitions cover the Nq positions of the left-padded keys.

    Returns:
        out [B, Nq, H, Dv], contiguous, q's dtype and device; with ``return_lse`` (out, lse [B, H, Nq]
        float32, float64 for float64 inputs; -inf where a row sees no key).
    """
    _refuse_unsupported(dropout_p, softcap, return_attn_probs)
    causal, return_lse = as_bool(causal, "causal"), as_bool(return_lse, "return_lse")  # ("yes" was true)
    _check_layout(q, k, v)
    b, nq, h, _ = q.shape
    slopes = _slopes(alibi_slopes, method, b, h)
    if partitions is not None and nq > k.shape[1] and partitions.n != nq:
        raise ValueError(f"partitions must cover the Nq={nq} positions of the keys left-padded to the queries "
                         f"(Nq > Nk={k.shape[1]}), got n={partitions.n}")
    k, v, keep = _keys_from_first_query(k, v, nq)
    options = dict(method=method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                   hybrid_eps=hybrid_eps, partitions=partitions, generator=generator, backend=backend,
                   is_causal=causal, scale=softmax_scale, window_size=window_size, return_lse=True)
    groups, inverse = torch.unique(slopes, dim=0, return_inverse=True)
    outs, lses, order = [], [], []
    for g in range(groups.shape[0]):
        rows = (inverse == g).nonzero().flatten()
        idx = rows.to(q.device)
        qt, kt, vt = (t.index_select(0, idx).transpose(1, 2) for t in (q, k, v)) if groups.shape[0] > 1 else \
            (t.transpose(1, 2) for t in (q, k, v))
        mask = None if keep is None else keep[:rows.numel()]
        out, lse = attention(qt, kt, vt, slopes=groups[g], key_padding_mask=mask, **options)
        outs.append(out)
        lses.append(lse)
        order.append(rows)
    if len(outs) > 1:
        back = torch.cat(order).argsort().to(q.device)
        outs, lses = [torch.cat(outs).index_select(0, back)], [torch.cat(lses).index_select(0, back)]
    out = outs[0].transpose(1, 2).contiguous()
    if not return_lse:
        return out
    return out, lses[0].masked_fill(lses[0] <= EMPTY_LSE / 2, -math.inf)  # FlashAttention's empty row


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, *, return_lse: bool = False,
                           **poslsh_options) -> Tensor | tuple[Tensor, Tensor]:
    """FlashAttention-2's ``flash_attn_varlen_func``: packed sequences, each aligned bottom-right on its keys.

    Args:
        q: [total_q, H, D]; k: [total_k, Hkv, D]; v: [total_k, Hkv, Dv].
        cu_seqlens_q, cu_seqlens_k: int [B + 1], 0 first, non-decreasing: sequence b is
            q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]] and its keys likewise (any lengths, Nq_b > Nk_b too).
        max_seqlen_q, max_seqlen_k: at least the longest sequence (checked).
        alibi_slopes: [H] or [B, H]. Other arguments and the keyword-only poslsh options (except
            ``partitions``: each sequence draws its own) as in ``flash_attn_func``.

    Returns:
        [total_q, H, Dv]; with ``return_lse`` (out, lse [H, total_q], FlashAttention's varlen layout).
        One ``flash_attn_func`` call per sequence.
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
    outs, lses = [], []
    for i in range(batch):
        if cq[i + 1] == cq[i]:
            outs.append(q.new_zeros(0, q.shape[1], v.shape[2]))
            lses.append(torch.zeros(q.shape[1], 0, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                                    device=q.device))
            continue
        row = slopes[i] if isinstance(slopes, Tensor) and slopes.ndim == 2 else slopes
        out, lse = flash_attn_func(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]], v[None, ck[i]:ck[i + 1]],
                                   softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                   alibi_slopes=row, deterministic=deterministic, return_lse=True, **poslsh_options)
        outs.append(out[0])
        lses.append(lse[0])
    out = torch.cat(outs)
    return (out, torch.cat(lses, 1)) if return_lse else out
