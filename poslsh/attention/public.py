"""``poslsh.attention``, the public call: SDPA's layout and keyword names in, the resolved call to a backend out.

One thin layer over the dispatcher (``dispatch``: validation, resolution into an ``AttentionSpec``, the
backend registry) and the plans (``plan``: resolutions reused across calls): it refuses other libraries'
keywords by name, warns on FlashAttention's layout, runs a call resolved before on its ``AttentionPlan``
(constant host work per decode step) and resolves the others with ``resolve_spec``. Kept apart from
``dispatch`` so the imports point one way: public -> plan -> dispatch.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from ..checks import as_bool
from ..hashing import Partitions, check_given_partitions
from ..method import MethodSpec, method_options
from .dispatch import check_backend_name, resolve_spec, select_backend
from .public_plans import public_call, remember_public_call
from .split.primitives import resolve_primitive

__all__ = ["attention", "attention_with_widths", "LayoutWarning", "FOREIGN_KEYWORDS"]


class LayoutWarning(UserWarning):
    """q, k, v look like FlashAttention's [B, N, H, D] layout rather than poslsh's [B, H, N, D]."""


# Another library's keyword -> what to pass to poslsh.attention instead (a TypeError says so).
FOREIGN_KEYWORDS = {
    "softmax_scale": "scale= (FlashAttention's softmax_scale)",
    "attn_mask": "key_padding_mask= (bool [B, Nk], True = keep); arbitrary additive or boolean masks are not "
                 "supported",
    "dropout_p": "nothing: poslsh.attention applies no dropout (it is meant for inference and for training "
                 "without attention dropout)",
    "alibi_slopes": "slopes= ([H]; or poslsh.flash_attn_func for FlashAttention's [B, N, H, D] layout and "
                    "[B, H] slopes)",
}


def _check_keywords(unsupported: dict) -> None:
    for name in unsupported:
        if name in FOREIGN_KEYWORDS:
            raise TypeError(f"poslsh.attention has no argument {name!r}: use {FOREIGN_KEYWORDS[name]}")
        raise TypeError(f"poslsh.attention() got an unexpected keyword argument {name!r}")


def _warn_if_flash_layout(q: Tensor, k: Tensor) -> None:
    """Warn when k has at least twice as many "heads" as "positions" and 8..256 positions: what
    FlashAttention's [B, N, H, D] tensors look like when read as [B, H, N, D] (N read as heads, a head
    count read as the length). Decoding (Nq = 1, long Nk) never triggers it; a short prompt on a model
    with many KV heads can: filter ``LayoutWarning`` then."""
    if isinstance(k, Tensor) and k.ndim == 4 and 8 <= k.shape[2] <= 256 and k.shape[1] >= 2 * k.shape[2]:
        warnings.warn(f"poslsh.attention takes [B, heads, N, D] (SDPA's layout); k {tuple(k.shape)} has "
                      f"{k.shape[1]} heads and {k.shape[2]} positions. If the tensors are [B, N, heads, D] "
                      "(FlashAttention's layout), pass q.transpose(1, 2) etc. or call poslsh.flash_attn_func.",
                      LayoutWarning, stacklevel=3)


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, slopes: Tensor | list[float] | None = None, is_causal: bool | None = None,
    method: str | MethodSpec = "exact", samples: int | None = None, scheme: str | None = None,
    partitions: Partitions | None = None, generator: torch.Generator | None = None, window_eps: float | None = None,
    scale: float | None = None, key_padding_mask: Tensor | None = None, return_lse: bool = False,
    backend: str = "auto", sampling: str | None = None, hybrid_eps: float | None = None, kernel=None, primitive=None,
    causal: bool | None = None,
    q_offset: int | None = None, window_size=None, **unsupported,
) -> Tensor | tuple[Tensor, Tensor]:
    """ALiBi attention: exact, truncated to a per-head window, or estimated by positional LSH.

    SDPA's layout and keyword names (``is_causal``, ``scale``); FlashAttention's layout and keywords
    are ``poslsh.flash_attn_func``. Another library's keyword (``softmax_scale``, ``attn_mask``,
    ``dropout_p``, ``alibi_slopes``) raises a TypeError naming the argument to use; ``window_size`` is
    FlashAttention's, with its meaning.

    Args:
        q: [B, H, Nq, D] queries; row i sits at key position q_offset + i (so Nq = 1 is decoding).
        k: [B, Hkv, Nk, D] keys, H divisible by Hkv (grouped / multi-query KV).
        v: [B, Hkv, Nk, Dv] values. q, k, v share dtype (fp16, bf16, fp32, fp64) and device.
        slopes: ALiBi slopes [H], >= 0; default ``alibi_slopes(H)`` (or the partitions' slopes).
        is_causal: keys j <= p only; otherwise the bias -m |p - j| is two-sided. Default True
            (unlike SDPA's False: ALiBi models are decoders). ``causal`` is the same argument under
            poslsh's older name; pass one of the two.
        method: "exact" (the default: no approximation unless asked); "window" (weights kept for
            |p - j| <= ceil(ln(1/window_eps)/m_h)); "lsh" (weights c_pj = fraction of the r samples in
            which p and j share a block); "hybrid" (exact for |p - j| <= w_h, c_pj beyond). Or a
            ``poslsh.MethodSpec`` or its text ("window:1e-3", "lsh:8:grid:qmc", "hybrid:8:grid:iid:0.1"),
            which holds samples, scheme, sampling, window_eps and hybrid_eps (then none is given beside).
        samples: r, for "lsh"/"hybrid" when ``partitions`` is None (default 8).
        scheme: "grid" (default) or "cut", for "lsh"/"hybrid" when ``partitions`` is None.
        partitions: ``Partitions`` over the Nk key positions with H heads (shared across the batch),
            for method "lsh" or "hybrid"; they decide r and the scheme (``samples`` or ``scheme``
            given beside them must agree).
        generator: CPU generator for sampling partitions.
        window_eps: truncation level for "window" (default 1e-3).
        scale: multiplier of q . k; default 1/sqrt(D).
        key_padding_mask: bool [B, Nk], True = keep. Padding removes keys but does not move the
            queries: row i stays at position Nk - Nq + i, so with right-padded keys and Nq < Nk the
            queries sit after the padding. FlashAttention's varlen functions put a sequence's queries
            at the end of its *valid* keys instead: for that alignment pass the packed sequences to
            ``poslsh.flash_attn_varlen_func`` (or left-pad, where both conventions agree).
        return_lse: also return the log-sum-exp of the weighted scores.
        sampling: "iid" (default), "stratified" or "qmc": joint law of the r sampled partitions of a
            head (each keeps its exact law; grid only), for "lsh"/"hybrid" when ``partitions`` is None.
        hybrid_eps: for method "hybrid" (default 1e-2; exact weights for |p - j| <= w_h, LSH collision means
            beyond: unbiased for the kernel): target RMS relative error of a row's total weight from
            the LSH far field, which sets w_h (``window.hybrid_widths``).
        kernel: a ``poslsh.positional_kernels.Kernel`` (all heads) or one per head, instead of ALiBi slopes:
            weights f(|p - j|) for exact/window/hybrid, partitions drawn for f for lsh/hybrid.
            Torch backends only (fused, reference; split for lsh).
        backend: "auto" or a name in ``available_backends()``.
        primitive: backend "split" only: the attention it runs inside the blocks, "sdpa", "flex",
            "torch" or a callable ``fn(q, k, v, causal) -> (out, lse)`` (``poslsh.attention.split.primitives``);
            None picks "sdpa" on CUDA for fp16/bf16, else "torch".
        q_offset: key position of query row 0, in [0, Nk - Nq]; default Nk - Nq (the queries are the
            last Nq keys). Smaller values place the queries inside the keys, with keys on both sides
            (a sequence shard with its halo, ``poslsh.distributed``).
        window_size: FlashAttention's (left, right): position p sees keys p - left <= j <= p + right,
            -1 unbounded on that side; each side an int, H ints or an integer tensor (per-head
            windows). The exact ALiBi weights inside, none outside (method "exact", the default,
            becomes "window" with these widths; no other method takes it). As in FlashAttention a
            window whose right sides are all 0 is causal and ``is_causal=True`` sets right = 0; left
            unset, ``is_causal`` defaults to False here (the window decides), as FlashAttention's
            ``causal`` does.

    Returns:
        out [B, H, Nq, Dv] in q's dtype, or (out, lse) with lse [B, H, Nq] float32 (float64 for
        float64 inputs): the natural-log LSE of scale * q.k + log W, W the method's weight
        (e^{-m|p-j|} for exact/window, c_pj for lsh). A row that sees no key (all padded) gives
        out 0 and lse ``EMPTY_LSE`` = -1e30.

    Warns:
        ``LayoutWarning`` when k looks like [B, N, H, D] (at least twice as many heads as positions,
        8 to 256 positions).
    """
    _check_keywords(unsupported)
    if return_lse is not True and return_lse is not False:
        return_lse = as_bool(return_lse, "return_lse")  # (a string was taken as true before)
    if is_causal is not None and causal is not None:
        raise TypeError("pass is_causal (SDPA's name) or causal (its alias), not both")
    if is_causal is None and causal is None:  # window_size decides (right = 0: causal), as in FlashAttention
        causal = window_size is None
    else:
        causal = causal if is_causal is None else is_causal
    check_given_partitions(partitions, samples, scheme)
    _warn_if_flash_layout(q, k)
    check_backend_name(backend)  # before any partition is sampled
    pending = None
    if kernel is None and primitive is None and generator is None and window_size is None:
        # (window_size makes the method a cut window, which the plans' key does not hold.)
        # A call resolved before with the same arguments runs on that resolution (``public_plans``:
        # constant host work per decode step); a first call is validated and resolved below.
        done, pending = public_call(q, k, v, method_args=(method, samples, scheme, sampling, window_eps, hybrid_eps),
                                    slopes=slopes, partitions=partitions, causal=causal, scale=scale,
                                    key_padding_mask=key_padding_mask, q_offset=q_offset, return_lse=return_lse,
                                    backend=backend)
        if done is not None:
            return done
    options = method_options(method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                             hybrid_eps=hybrid_eps)
    spec = resolve_spec(q, k, v, slopes=slopes, causal=causal, partitions=partitions, generator=generator, scale=scale,
                        key_padding_mask=key_padding_mask, kernel=kernel, q_offset=q_offset,
                        window_size=window_size, **options)
    if primitive is not None:
        if backend != "split":
            raise ValueError(f"primitive= is an option of backend='split', got backend={backend!r}")
        spec = dataclasses.replace(spec, primitive=resolve_primitive(primitive))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or spec.slopes.requires_grad)
    out, lse = select_backend(q, spec, backend, grad)(q, k, v, spec)
    if pending is not None:
        remember_public_call(pending, spec, k, options, backend)
    return (out, lse) if return_lse else out


def attention_with_widths(q: Tensor, k: Tensor, v: Tensor, widths, *, method: str = "window",
                          backend: str = "auto", **kwargs) -> Tensor:
    """``attention`` with given per-head half-widths for "window" (or the near field of "hybrid")
    instead of the ones ``window_eps`` (``hybrid_eps``) would give: ``flash_attn_func``'s
    ``window_size``, and the transformers patch, whose hybrid widths must not depend on the length.

    Args:
        widths: H ints >= 0 (capped at Nk - 1); other arguments as ``resolve_spec`` takes them.

    Returns:
        out [B, H, Nq, Dv].
    """
    spec = resolve_spec(q, k, v, method=method, widths=widths, **kwargs)
    return select_backend(q, spec, backend)(q, k, v, spec)[0]


