"""Attention primitives for the "split" backend: plain (positionally unbiased) attention that also
returns its log-sum-exp, on any kernel.

The protocol is the one of SDPA's flash path: ``prim(q, k, v, causal) -> (out, lse)`` with q, k, v
[B', H', L, D] (k and v of the same length L as q; ``causal`` is top-left aligned, query row i sees
keys 0..i), scale 1/sqrt(D), out [B', H', L, Dv] and lse [B', H', L] the natural-log log-sum-exp of
each row's scores. The split backend calls it once per group of equal-length blocks, never per block.

Gradients. The split backend merges many calls; what each call must contribute is the gradient of
the *merged* attention restricted to its own (query, key) pairs. For a call whose rows have the
merged output ``out`` and merged log-normaliser ``lse`` (over every call that covers the row):

    P = exp(scale q.k - lse),  dS = P * (dout . v - dout . out + dlse),  dq = scale dS k, ...

which is exactly what a FlashAttention backward kernel computes when it is handed the merged out and
lse instead of its own (ring attention does the same). ``Primitive.backward`` has that signature:

* the default (any callable) recomputes the call with autograd and backpropagates its share of the
  merge, dO = w dout and dL = w (dout . (O - out) + dlse) with w = exp(L - lse); this needs the
  callable's lse to carry gradient;
* ``SDPAPrimitive`` hands the merged out/lse to the flash backward op directly: no recomputation,
  no differentiable lse needed.

Named primitives (``resolve_primitive``): "torch" (``torch_attention``: softmax in the compute dtype,
any device, float64, the reference), "sdpa" (PyTorch's flash kernel, CUDA fp16/bf16 and CPU), "flex"
(``FlexPrimitive``: FlexAttention with a document mask, one call per sample; see its docstring).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..core import EMPTY_LSE, compute_dtype

__all__ = ["Primitive", "SDPAPrimitive", "FlexPrimitive", "torch_attention", "resolve_primitive",
           "PRIMITIVES", "default_primitive", "recompute_backward", "flash_forward", "flash_backward",
           "flash_chunks", "check_result", "flex_document"]

# Elements of one [B', H', rows, L] score tile in ``torch_attention`` (rows are chunked beyond it):
# cache-sized on the CPU (2^18 was 1.8x faster than 2^24 at n = 8K, H = 8, r = 8, one thread), large
# on a GPU, where every chunk costs a few launches.
TORCH_TILE_BUDGET = 1 << 18
TORCH_TILE_BUDGET_CUDA = 1 << 26


def torch_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
    """Plain attention in torch ops: softmax of q.k / sqrt(D) in the compute dtype (float64 stays).

    Args:
        q, k: [B', H', L, D]; v: [B', H', L, Dv].
        causal: query row i sees keys 0..i.

    Returns:
        (out [B', H', L, Dv] in q's dtype, lse [B', H', L] in the compute dtype), differentiable in
        q, k, v (lse included); a row whose scores are all -inf (keys at infinity) gives out 0 and lse
        EMPTY_LSE. Rows are processed in chunks so the scores stay under ``TORCH_TILE_BUDGET``
        elements (``TORCH_TILE_BUDGET_CUDA`` on CUDA): one block may span the whole sequence.
    """
    cdt = compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    length = q.shape[2]
    per_row = max(1, q.shape[0] * q.shape[1] * length)
    step = max(1, (TORCH_TILE_BUDGET_CUDA if q.is_cuda else TORCH_TILE_BUDGET) // per_row)
    outs, lses = [], []
    for r0 in range(0, length, step):
        r1 = min(length, r0 + step)
        kend = r1 if causal else length
        s = torch.matmul(qc[:, :, r0:r1], kc[:, :, :kend].transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(r0, r1, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(kend, device=q.device)[None, :] > rows, float("-inf"))
        m = s.detach().amax(-1, keepdim=True)  # the shift cancels: no gradient through it
        m = m.masked_fill(m == float("-inf"), 0.0)  # a row of -inf scores (keys at inf): exp(-inf - 0) = 0
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        empty = den == 0  # such a row is empty (0, EMPTY_LSE), so the merge weighs it at 0 instead of 0/0 = NaN
        den = den.masked_fill(empty, 1.0)
        outs.append(torch.matmul(p, vc[:, :, :kend]) / den)
        lses.append((m + torch.log(den)).masked_fill(empty, EMPTY_LSE).squeeze(-1))
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def _as_float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def recompute_backward(fn: Callable[..., tuple[Tensor, Tensor]], inputs: tuple[Tensor, ...], dout: Tensor,
                       out: Tensor, lse: Tensor, dlse: Tensor | None, what: str) -> tuple[Tensor | None, ...]:
    """Gradient of the merged attention through one partial call, by recomputing it with autograd.

    ``fn(*inputs) -> (O, L)`` is a partial result of rows whose merged result is (out, lse):
    out = sum_c w_c O_c with w_c = exp(L_c - lse). Its share of the chain rule is dO = w dout and
    dL = w (dout . (O - out) + dlse). Returns the gradients of ``inputs`` (None where unused).
    """
    leaves = tuple(x.detach().requires_grad_(True) for x in inputs)
    with torch.enable_grad():
        o_c, l_c = fn(*leaves)
    if not l_c.requires_grad:
        raise TypeError(f"the {what}'s lse carries no gradient, so the split backend cannot backpropagate "
                        f"through the merge; return a differentiable lse or subclass Primitive and define "
                        f"backward(dout, q, k, v, out, lse, causal, dlse)")
    f = _as_float(lse).dtype
    w = torch.exp(l_c.detach().to(f) - lse.to(f))
    g = (dout.to(f) * (o_c.detach().to(f) - out.to(f))).sum(-1)
    if dlse is not None:
        g = g + dlse.to(f)
    grads = torch.autograd.grad((o_c, l_c), leaves, ((w[..., None] * dout.to(f)).to(o_c.dtype), (w * g).to(l_c.dtype)),
                                allow_unused=True)
    return grads


class Primitive:
    """An attention primitive for the split backend: ``prim(q, k, v, causal) -> (out, lse)`` (see the
    module docstring) and ``backward``, the gradient of a merged attention through one call.

    Wrap any callable with ``Primitive(fn)``; subclass and override ``backward`` when the kernel has a
    backward that takes out and lse (FlashAttention's does), to avoid recomputing the forward.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor, bool], tuple[Tensor, Tensor]] | None = None,
                 name: str | None = None) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"primitive must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(self).__name__)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
        return self.fn(q, k, v, causal)

    def supports(self, q: Tensor) -> str | None:
        """None if the primitive can run on tensors like q, else the reason it cannot."""
        return None

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                 dlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of a call whose rows have merged output ``out`` [B', H', L, Dv] and merged
        log-normaliser ``lse`` [B', H', L], given dL/d out = ``dout`` and dL/d lse = ``dlse``."""
        grads = recompute_backward(lambda a, b, c: self(a, b, c, causal), (q, k, v), dout, out, lse, dlse,
                                   f"primitive {self.name!r}")
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# --------------------------------------------------------------------------------------------------
# PyTorch's flash kernel (the SDPA flash path), through its aten ops
# --------------------------------------------------------------------------------------------------


def _flash_head_dim(q: Tensor, v: Tensor) -> int:
    """The common head dim the flash ops need: q, k, v of one size, a multiple of 8 on CUDA."""
    m = max(q.shape[-1], v.shape[-1])
    return -(-m // 8) * 8 if q.device.type == "cuda" else m


def _pad_last(x: Tensor, size: int) -> Tensor:
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


# CUDA grids are at most 65535 in y and z; the flash kernels put the batch and the heads there, and
# a run of narrow blocks is a "head" per block (n / W of them: 87K at n = 256K, W = 3).
FLASH_GRID_LIMIT = 65535
# The flash kernels compute some element offsets in 32-bit ints (FlashAttention-2's kernels, which
# PyTorch vendors): the lse's (b H' + h) L in the forward and backward (L rounded up to 128 rows in
# the backward), and the backward's dq accumulator's L H' D (D rounded up to 32 or 64). Calls are
# chunked so that B' H' L and H' L D stay below this (with L rounded to 128 and D to 64).
FLASH_OFFSET_LIMIT = 2**31 - 1


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_chunks(b: int, h: int, length: int, head_dim: int | None = None) -> tuple[int, int]:
    """Chunk sizes (batch, heads) for a flash call on [b, h, length, .] within ``FLASH_GRID_LIMIT``
    and ``FLASH_OFFSET_LIMIT``; ``head_dim`` (the padded one) for the backward, None for the forward.
    Raises ValueError if one (batch, head) alone passes the offset limit. The CPU op is chunked the
    same way (it has neither limit; the chunks only cost a copy), so the CPU tests run this path."""
    rows = _round_up(max(length, 1), 128)
    per_head = rows if head_dim is None else rows * _round_up(head_dim, 64)
    if per_head > FLASH_OFFSET_LIMIT:
        what = f"{length} rows" if head_dim is None else f"{length} rows x head dim {head_dim}"
        raise ValueError(f"primitive 'sdpa': one block of {what} passes the flash kernel's 32-bit offsets "
                         f"(at most {FLASH_OFFSET_LIMIT} elements, rows rounded up to 128 and head dims to 64); "
                         f"use shorter blocks or primitive='torch'")
    b_step = min(b, FLASH_GRID_LIMIT, FLASH_OFFSET_LIMIT // rows)
    h_step = min(h, FLASH_GRID_LIMIT, FLASH_OFFSET_LIMIT // (b_step * rows), FLASH_OFFSET_LIMIT // per_head)
    return b_step, h_step


def _chunked(fn, *tensors: Tensor, head_dim: int | None = None):
    """fn over chunks of dims 0 and 1 (``flash_chunks``), results concatenated back (a copy, only
    when there is more than one chunk)."""
    b, h, length = tensors[0].shape[:3]
    b_step, h_step = flash_chunks(b, h, length, head_dim)
    if b_step >= b and h_step >= h:
        return fn(*tensors)
    rows = []
    for b0 in range(0, b, b_step):
        cols = [fn(*(t[b0:b0 + b_step, h0:h0 + h_step] for t in tensors)) for h0 in range(0, h, h_step)]
        rows.append([torch.cat(parts, 1) for parts in zip(*cols)])
    return tuple(torch.cat(parts, 0) for parts in zip(*rows))


def flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """The flash kernel behind ``F.scaled_dot_product_attention``, returning its log-sum-exp.

    torch has no public API that returns the LSE of SDPA; the aten ops below are the ones its flash
    path calls (``_scaled_dot_product_flash_attention`` on CUDA, returning (out, logsumexp, ...);
    ``_scaled_dot_product_flash_attention_for_cpu`` on the CPU, returning (out, logsumexp)). This
    function and ``flash_backward`` are the only places that touch them. Head dims are zero-padded to
    a common size (q.k unchanged; the scale is passed explicitly) and the output sliced back.
    """
    dv = v.shape[-1]
    size = _flash_head_dim(q, v)

    def run(q, k, v):
        qp, kp, vp = _pad_last(q, size), _pad_last(k, size), _pad_last(v, size)
        if q.device.type == "cuda":
            res = torch.ops.aten._scaled_dot_product_flash_attention(qp, kp, vp, 0.0, causal, False, scale=scale)
        else:
            res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qp, kp, vp, 0.0, causal, scale=scale)
        return (res[0] if dv == size else res[0][..., :dv]), res[1]

    return _chunked(run, q, k, v)


def flash_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The flash backward op with a given (out, lse): dS = P (dout . v - dout . out), P = exp(s - lse)."""
    d, dv = q.shape[-1], v.shape[-1]
    size = _flash_head_dim(q, v)
    pad = lambda x: _pad_last(x, size)  # noqa: E731

    def run(dout, q, k, v, out, lse):
        lse = lse.contiguous()  # the kernels index lse as a dense [B', H', L] array
        if q.device.type == "cuda":
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                pad(dout), pad(q), pad(k), pad(v), pad(out), lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
                seed, offset, scale=scale)
        else:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                pad(dout), pad(q), pad(k), pad(v), pad(out), lse, 0.0, causal, scale=scale)
        return grads[0][..., :d], grads[1][..., :d], grads[2][..., :dv]

    return _chunked(run, dout, q, k, v, out, lse, head_dim=size)


class SDPAPrimitive(Primitive):
    """PyTorch's flash attention kernel (the SDPA flash path) with its LSE: CUDA (float16, bfloat16,
    head dim <= 256) and CPU (any float dtype). Its backward is the flash backward kernel handed the
    merged out and lse (no recomputation)."""

    def __init__(self) -> None:
        super().__init__(None, "sdpa")

    def supports(self, q: Tensor) -> str | None:
        if q.device.type == "cuda" and q.dtype not in (torch.float16, torch.bfloat16):
            return f"primitive 'sdpa' on CUDA is FlashAttention: float16 or bfloat16 only, got {q.dtype}"
        if q.device.type == "cuda" and q.shape[-1] > 256:
            return f"primitive 'sdpa' on CUDA supports head dims up to 256, got {q.shape[-1]}"
        if q.device.type not in ("cuda", "cpu"):
            return f"primitive 'sdpa' runs on CUDA or the CPU, not {q.device.type}"
        return None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
        return flash_forward(q, k, v, causal, 1.0 / math.sqrt(q.shape[-1]))

    def backward(self, dout, q, k, v, out, lse, causal, dlse=None):
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq, dk, dv = flash_backward(dout, q, k, v, out, lse, causal, scale)
        if dlse is not None:
            # The flash kernel has no input for dL/d lse, but its dS = P (dout' . v' - dout' . out') gives
            # P * dlse with v' = 0, dout' = dlse e_0 and out' = -e_0 (e_0 the first unit vector).
            do2 = torch.zeros_like(dout)
            do2[..., 0] = dlse.to(dout.dtype)
            o2 = torch.zeros_like(out)
            o2[..., 0] = -1
            dq2, dk2, _ = flash_backward(do2, q, k, torch.zeros_like(v), o2, lse, causal, scale)
            dq, dk = dq + dq2, dk + dk2
        return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# FlexAttention with a document mask
# --------------------------------------------------------------------------------------------------


class FlexPrimitive(Primitive):
    """FlexAttention without a score_mod: one call per *sample* over the whole [B, H, Nq, D] tensors,
    with a document mask (query p sees key j iff they share a block of that sample; causal, padding
    and Nq < Nk in the same mask) and a BlockMask built from the blocks' ranges.

    Unlike a dense kernel it needs neither views nor gathers, handles every block length in one
    launch (narrow blocks share 128-row tiles instead of each filling one) and compiles once per
    sequence length on CUDA (the mask reads the sample's (W, U) or block-start tables, so new
    partitions do not recompile). The split backend uses a primitive's ``document`` method, when it has
    one, instead of block calls; as a block primitive (``prim(q, k, v, causal)``) it runs plain
    flex_attention. CPU: eager (tests), forward only (torch's FlexAttention has no CPU backward).
    """

    def __init__(self) -> None:
        super().__init__(None, "flex")

    def supports(self, q: Tensor) -> str | None:
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return "primitive 'flex' needs torch.nn.attention.flex_attention"
        if q.dtype == torch.float64 and q.device.type == "cuda":
            return "primitive 'flex' on CUDA: float16, bfloat16 or float32"
        return None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> tuple[Tensor, Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask

        from ..flex.backend import _flex_fn

        length = q.shape[2]
        bm = create_block_mask(lambda b, h, i, j: j <= i, None, None, length, length, device=q.device) if causal else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, lse = _flex_fn(q.device)(q, k, v, block_mask=bm, return_lse=True)
        return out, lse.float() if q.dtype != torch.float64 else lse

    def document(self, q: Tensor, k: Tensor, v: Tensor, spec) -> tuple[Tensor, Tensor]:
        """Block-diagonal attention for ``spec``'s single-sample partitions: ``flex_document``."""
        return flex_document(q, k, v, spec)


def flex_document(q: Tensor, k: Tensor, v: Tensor, spec) -> tuple[Tensor, Tensor]:
    """FlexAttention over whole sequences with the block-diagonal mask of one sampled partition.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv].
        spec: an ``AttentionSpec`` whose partitions hold one sample (r = 1); its scale, causal,
            q_offset and key_padding_mask are used.

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32, float64 for float64 inputs); rows
        whose block keys are all padded get 0 and EMPTY_LSE.
    """
    from ..flex.backend import DEFAULT_BLOCK, _flex_fn, range_block_mask
    from ..ranges import key_ranges, normalize_grid

    parts = spec.partitions
    nq, nk = q.shape[2], k.shape[2]
    qoff, causal, kpm = spec.q_offset, spec.causal, spec.key_padding_mask
    if parts.scheme == "grid":
        w, u = (x[:, 0].contiguous() for x in normalize_grid(parts.widths.to(q.device), parts.offsets.to(q.device), nk))

        def bounds(h, p):
            s = ((p + u[h]) // w[h]) * w[h] - u[h]
            return s, s + w[h]
    else:
        starts, ends = (x[:, 0].to(device=q.device, dtype=torch.int32) for x in parts.block_bounds())

        def bounds(h, p):
            return starts[h, p], ends[h, p]

    def mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + qoff
        s, e = bounds(h, p)
        keep = (kv_idx >= s) & ((kv_idx <= p) if causal else (kv_idx < e))
        return keep & kpm[b, kv_idx] if kpm is not None else keep

    lo, hi, flo, fhi = key_ranges(spec, nq, nk, DEFAULT_BLOCK, q.device)
    need_q = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    bm = range_block_mask(lo, hi, flo, fhi, nq, nk, mask_mod, DEFAULT_BLOCK, all_partial=kpm is not None,
                          with_q_blocks=need_q)
    # Autocast off as in the flex backend; the eager CPU path warns that it is unfused (tests only).
    with warnings.catch_warnings(), torch.autocast(q.device.type, enabled=False):
        warnings.simplefilter("ignore")
        out, lse = _flex_fn(q.device)(q, k, v, block_mask=bm, scale=spec.scale, enable_gqa=q.shape[1] != k.shape[1],
                                      return_lse=True)
    lse = lse if q.dtype == torch.float64 else lse.float()
    return out, torch.where(torch.isneginf(lse), torch.full_like(lse, EMPTY_LSE), lse)


def default_primitive(q: Tensor) -> str:
    """"sdpa" on CUDA for float16/bfloat16 (the fastest dense kernel there), else "torch"."""
    return "sdpa" if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) else "torch"


PRIMITIVES: dict[str, Callable[[], Primitive]] = {
    "torch": lambda: Primitive(torch_attention, "torch"),
    "sdpa": SDPAPrimitive,
    "flex": FlexPrimitive,
}


def resolve_primitive(primitive, q: Tensor | None = None) -> Primitive:
    """A ``Primitive`` from a name in ``PRIMITIVES``, None (``default_primitive(q)``), a ``Primitive``,
    or any callable ``fn(q, k, v, causal) -> (out, lse)``."""
    if primitive is None:
        if q is None:
            raise ValueError("primitive=None needs q to pick the default")
        primitive = default_primitive(q)
    if isinstance(primitive, Primitive):
        return primitive
    if isinstance(primitive, str):
        if primitive not in PRIMITIVES:
            raise ValueError(f"primitive must be one of {sorted(PRIMITIVES)} or a callable "
                             f"fn(q, k, v, causal) -> (out, lse), got {primitive!r}")
        return PRIMITIVES[primitive]()
    if not callable(primitive):
        raise TypeError(f"primitive must be a name in {sorted(PRIMITIVES)} or a callable fn(q, k, v, causal) -> "
                        f"(out, lse), got {type(primitive).__name__}")
    return Primitive(primitive)


def check_result(prim: Primitive, res, q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The primitive's (out, lse) for inputs shaped like q [B', H', L, D], v [..., Dv], checked."""
    if not (isinstance(res, (tuple, list)) and len(res) == 2 and all(isinstance(x, Tensor) for x in res)):
        raise TypeError(f"primitive {prim.name!r} must return a pair of tensors (out, lse), got "
                        f"{type(res).__name__}{'' if not isinstance(res, (tuple, list)) else f' of length {len(res)}'}")
    out, lse = res
    want = (*q.shape[:3], v.shape[-1])
    if tuple(out.shape) != want:
        raise ValueError(f"primitive {prim.name!r} returned out of shape {tuple(out.shape)}, expected {want} "
                         f"(SDPA layout [B', H', L, Dv])")
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"primitive {prim.name!r} returned lse of shape {tuple(lse.shape)}, expected "
                         f"{tuple(q.shape[:3])} ([B', H', L], natural log)")
    if not (out.is_floating_point() and lse.is_floating_point()):
        raise TypeError(f"primitive {prim.name!r} must return floating-point out and lse, got {out.dtype}, {lse.dtype}")
    if out.device != q.device or lse.device != q.device:
        raise ValueError(f"primitive {prim.name!r} returned tensors on {out.device}/{lse.device}, expected {q.device}")
    return out, lse

