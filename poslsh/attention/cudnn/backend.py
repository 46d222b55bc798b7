"""cuDNN backend ("cudnn"): exact causal ALiBi through cuDNN's fused attention, where cuDNN computes
exactly what poslsh's exact method does.

cuDNN's SDPA graph (the ``nvidia-cudnn-frontend`` package, ``pip install poslsh[cudnn]``, over the
cuDNN library that PyTorch already loads) with ``use_alibi_mask=True`` adds m_h (j - i) to
scale * q_i . k_j, with row i and column j counted from the top-left corner, and accepts ALiBi only
with the top-left causal mask j <= i (``diagonal_band_right_bound=0``). The frontend derives the
slopes from the head count (``get_alibi_slope``: 2^(-8 (h + 1) / P) for the P = 2^floor(log2 H) first
heads, then 2^(-4 (2 t + 1) / P) for the remaining H - P: Press et al.'s schedule, which is
``poslsh.alibi_slopes(H)``, in float32). Its softmax statistics are max + log(sum exp(s - max)), the
natural-log LSE of the biased scores: poslsh's ``lse``. So the backend serves a call when

* the method is "exact" with ALiBi slopes equal to ``alibi_slopes(H)`` (to float32 rounding), not
  trainable, causal, with a finite positive scale;
* q, k, v are float16 or bfloat16 CUDA tensors and the queries sit at key positions 0 .. Nq - 1
  (q_offset = 0: Nq = Nk, or the first Nq of more keys): cuDNN aligns ALiBi and the causal diagonal
  top-left and refuses ALiBi with the bottom-right alignment that queries at the end (decoding,
  q_offset = Nk - Nq > 0) would need;
* a key padding mask, if any, keeps a prefix of each batch row's keys (right padding: cuDNN's padding
  mask takes per-row valid lengths), at least one key per row;
* cuDNN builds the forward and backward graphs for the query's shape (tried once per shape).

Grouped KV (H divisible by Hkv) is cuDNN's own. Head dims that are not a multiple of 8, or a value
dim unlike the query's, are zero-padded to one common multiple of 8 (q.k and the output unchanged).

Forward and backward run through one ``torch.autograd.Function``; both outputs are differentiable.
cuDNN's backward takes no gradient for its statistics: a gradient of the LSE, dLSE, adds P * dLSE to
dS = P (dP - delta). That term is computed by a second backward call whose values are zero (so
dP = 0) and whose output O2 and output gradient dO2 are built so that delta = rowsum(dO2 * O2) =
-dLSE to float32 accuracy (``lse_gradient_rows``): its dQ and dK are exactly the LSE's share.

"auto" takes it where the shipped speed table measured it fastest, and for a shape without built graphs
only once the calls at that shape have done work worth a build (``ready_for_auto``): a prompt of a
new length does not wait for a graph. Graphs are built once per (device, dtype, shapes, strides,
padding, scale) and kept in a bounded LRU cache; the workspace comes from PyTorch's allocator on the
current stream. Not capturable in a CUDA graph (the frontend copies the slopes into the workspace
from host memory on every call).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ...alibi import alibi_slopes
from ...cache_keys import version_key
from ..core import AttentionSpec
from ..rent import BuildRent, call_seconds

__all__ = ["cudnn_attention", "supports_cudnn", "explain_cudnn", "refusal", "probe_error", "cudnn_available", "padding_lengths",
           "lse_gradient_rows", "clear_cache", "MIN_BACKEND_VERSION"]

MIN_BACKEND_VERSION = 90000  # cuDNN 9: ALiBi, padding and GQA in the fused SDPA graph (tested on 9.19)
SLOPE_RTOL = 1e-6  # slopes equal to the Press slopes up to float32 rounding (cuDNN's are float32)
HEAD_ALIGN = 8  # cuDNN's SDPA takes head dims that are multiples of 8
MAX_HEAD_DIM = 256
GRAPH_CACHE_ENTRIES = 64
MASK_CACHE_ENTRIES = 8

# Graph tensor ids (the variant pack is keyed by them).
Q, K, V, O, STATS, SEQ_Q, SEQ_KV, DO, DQ, DK, DV = range(1, 12)


def _import_cudnn():
    """The frontend module, or None when it is absent or cannot reach a cuDNN library."""
    try:
        import cudnn  # the nvidia-cudnn-frontend package (absolute import: not this module)
    except Exception:  # absent, or its loader failed (it asserts one libcudnn in site-packages)
        return None
    try:
        if cudnn.backend_version() < MIN_BACKEND_VERSION:
            return None
    except Exception:  # no libcudnn in the process (e.g. a CPU-only torch)
        return None
    return cudnn


_cudnn: Any = None  # set by _register() when the frontend is usable; tests may substitute a stand-in


def cudnn_available() -> bool:
    """Whether the frontend imported and found cuDNN >= 9 (the backend is registered then, on CUDA)."""
    return _cudnn is not None


# --------------------------------------------------------------------------------------------------
# What the backend serves
# --------------------------------------------------------------------------------------------------

_mask_cache: OrderedDict[tuple, tuple[Tensor, Tensor | None, str | None]] = OrderedDict()


def padding_lengths(key_padding_mask: Tensor) -> tuple[Tensor | None, str | None]:
    """(lengths int32 [B, 1, 1, 1] on the mask's device, None) when every row of ``key_padding_mask``
    (bool [B, Nk], True = keep) keeps a non-empty prefix of its keys, else (None, why not).

    One host sync the first time a mask object is seen (per in-place version); cached."""
    key = version_key(key_padding_mask)
    hit = None if key is None else _mask_cache.get(key)
    if hit is not None and hit[0] is key_padding_mask:
        _mask_cache.move_to_end(key)
        return hit[1], hit[2]
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    prefix = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)[None, :] < lengths[:, None]
    ok_prefix, ok_nonempty = (bool(x) for x in torch.stack([(prefix == key_padding_mask).all(),
                                                            (lengths > 0).all()]).tolist())
    why = None
    if not ok_prefix:
        why = "the key padding mask must keep a prefix of each row's keys (right padding)"
    elif not ok_nonempty:
        why = "every batch row must keep at least one key"
    result = (lengths.reshape(-1, 1, 1, 1).contiguous() if why is None else None), why
    if key is None:  # an inference tensor: nothing to recognise it by later
        return result
    _mask_cache[key] = (key_padding_mask, *result)
    while len(_mask_cache) > MASK_CACHE_ENTRIES:
        _mask_cache.popitem(last=False)
    return result


def _is_press(slopes: Tensor) -> bool:
    press = alibi_slopes(slopes.numel())
    return bool(((slopes.detach() - press).abs() <= SLOPE_RTOL * press).all())


def refusal(q: Tensor, spec: AttentionSpec) -> str | None:
    """Why cuDNN would not compute this call as poslsh's exact ALiBi, or None when it would: every
    condition of the module docstring but the device, cuDNN's presence and its graph build (so it
    can be checked on the CPU)."""
    d = q.shape[3]
    if not spec.rule.all_exact or spec.kernels is not None:
        return f"method must be 'exact' with ALiBi slopes, got method={spec.method!r}" + (
            " with kernels" if spec.kernels is not None else "")
    if spec.slopes.requires_grad:
        return "cuDNN's slopes are fixed: slopes that require grad need another backend"
    if not spec.causal:
        return "cuDNN's ALiBi is causal only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype must be float16 or bfloat16, got {q.dtype}"
    if not _is_press(spec.slopes):
        return ("slopes must be the Press slopes of the head count (poslsh.alibi_slopes(H)), which cuDNN derives "
                "itself")
    if spec.q_offset != 0:
        return (f"the queries must sit at key positions 0 .. Nq - 1 (q_offset 0, e.g. Nq = Nk): cuDNN aligns "
                f"ALiBi's diagonal top-left, got q_offset={spec.q_offset}")
    if not (math.isfinite(spec.scale) and spec.scale > 0):
        return f"scale must be finite and positive, got {spec.scale}"
    if _padded_dim(d) > MAX_HEAD_DIM:
        return f"head dim must be at most {MAX_HEAD_DIM}, got {d}"
    if spec.key_padding_mask is not None:
        return padding_lengths(spec.key_padding_mask)[1]
    return None


def supports_cudnn(q: Tensor, spec: AttentionSpec) -> bool:
    """``refusal`` is None, q is a CUDA tensor, the frontend is usable and cuDNN builds the graphs for
    this query shape (multi-head K and V like q; tried once per shape and cached): the forward graph,
    and the backward one too when q requires grad (a training call; otherwise it is built, or found
    unsupported, at the first backward)."""
    return explain_cudnn(q, spec) is None


def explain_cudnn(q: Tensor, spec: AttentionSpec) -> str | None:
    """The reason ``supports_cudnn`` is False (the dispatcher's error names it), or None."""
    if _cudnn is None:
        return "the nvidia-cudnn-frontend package is not installed (pip install poslsh[cudnn]) or found no cuDNN 9"
    if q.device.type != "cuda":
        return f"cuDNN runs on CUDA tensors, got device {q.device}"
    return refusal(q, spec) or probe_error(q, spec, q.device.index)


def _probe_signature(q: Tensor, spec: AttentionSpec, device: int) -> _Signature:
    """The signature whose graphs stand for q's shape (K and V taken multi-head like q, all in
    [B, H, N, D] order)."""
    b, h, n, d = q.shape
    dp = _padded_dim(d)
    probe = _Layout((b, h, n, dp), (h * n * dp, n * dp, dp, 1))
    return _Signature(device, q.dtype, probe, probe, probe, probe, spec.key_padding_mask is not None,
                      float(spec.scale))


def probe_error(q: Tensor, spec: AttentionSpec, device: int) -> str | None:
    """Why cuDNN refuses to build the graphs for q's shape on ``device``, or None: the forward graph,
    and the backward one for a training call (q requires grad). Built once per shape (cached, a
    refusal too)."""
    sig = _probe_signature(q, spec, device)
    training = torch.is_grad_enabled() and q.requires_grad
    built = _graphs(sig, backward_stride=sig.q.stride if training else None)
    return built.error or (built.backward_error if training else None)


# "auto" and cuDNN's build per shape (``rent``): a graph build at a new length costs 52-78 ms on an H100
# (the process's first, with cuDNN's own start, 0.5-0.9 s: bench/results/first_call) and saves 10-20 % of a
# call's time (1.2x forward, 1.5x training), so "auto" builds for a shape once its calls have done about
# that much work.
AUTO_BUILD_AFTER_S = 0.1
_rent = BuildRent(AUTO_BUILD_AFTER_S)


def _built_or_paid_for(sig: _Signature, seconds: float) -> bool:
    """Whether ``sig``'s graphs are built, else add ``seconds`` of work at ``sig`` and say whether the work
    so far reaches one build."""
    return sig in _graph_cache or _rent.paid_for(sig, seconds)


def ready_for_auto(q: Tensor, spec: AttentionSpec) -> bool:
    """Whether "auto" may take cuDNN for this call now (``Backend.ready``): its graphs for q's shape are
    built, or the calls at that shape have done work worth a build. A call cuDNN would refuse anyway is
    left to ``supports_cudnn`` (True here, so its cheap refusal, not a build, decides)."""
    if _cudnn is None or q.device.type != "cuda" or refusal(q, spec) is not None:
        return True
    training = torch.is_grad_enabled() and q.requires_grad
    return _built_or_paid_for(_probe_signature(q, spec, q.device.index), call_seconds(q, spec, training))


# --------------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------------


def _padded_dim(d: int) -> int:
    return -(-d // HEAD_ALIGN) * HEAD_ALIGN


@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Signature:
    """Everything a built graph depends on."""
    device: int
    dtype: torch.dtype
    q: _Layout
    k: _Layout
    v: _Layout
    o: _Layout
    padded: bool
    scale: float


@dataclass
class _Built:
    """A signature's graphs: forward always, backward (per dO stride) on first need; or why cuDNN refused
    the forward (``error``: no call of the shape runs) or the backward (``backward_error``: forward calls
    still run; cuDNN 9.19 builds no backward for one query row)."""
    forward: Any = None
    backward: dict | None = None
    error: str | None = None
    backward_error: str | None = None


_graph_cache: OrderedDict[_Signature, _Built] = OrderedDict()
_handles: dict[int, Any] = {}


def clear_cache() -> None:
    """Drop every built graph, analysed padding mask and "auto"'s work count per shape."""
    _graph_cache.clear()
    _mask_cache.clear()
    _rent.clear()


def _layout(t: Tensor) -> _Layout:
    return _Layout(tuple(t.shape), tuple(t.stride()))


def _on(device: int):
    """The device's context for building and running its graphs (a no-op for the CPU stand-in, -1)."""
    return torch.cuda.device(device) if device >= 0 else contextlib.nullcontext()


def _handle(device: int):
    if device not in _handles:
        with _on(device):
            _handles[device] = _cudnn.create_handle()
    return _handles[device]


def _empty_as(t: Tensor) -> Tensor:
    """An uninitialised tensor with t's shape, dtype, device and strides (a graph's declared layout)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)


def _io_type(dtype: torch.dtype):
    return {torch.float16: _cudnn.data_type.HALF, torch.bfloat16: _cudnn.data_type.BFLOAT16}[dtype]


def _new_graph(sig: _Signature):
    return _cudnn.pygraph(io_data_type=_io_type(sig.dtype), intermediate_data_type=_cudnn.data_type.FLOAT,
                          compute_data_type=_cudnn.data_type.FLOAT, handle=_handle(sig.device))


def _masking(g, sig: _Signature) -> dict:
    """The SDPA arguments shared by forward and backward: ALiBi, top-left causal, right padding."""
    kw = dict(attn_scale=sig.scale, use_alibi_mask=True, diagonal_alignment=_cudnn.diagonal_alignment.TOP_LEFT,
              diagonal_band_right_bound=0)
    if sig.padded:
        b = sig.q.shape[0]
        kw.update(use_padding_mask=True,
                  seq_len_q=g.tensor(uid=SEQ_Q, name="seq_len_q", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1],
                                     data_type=_cudnn.data_type.INT32),
                  seq_len_kv=g.tensor(uid=SEQ_KV, name="seq_len_kv", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1],
                                      data_type=_cudnn.data_type.INT32))
    return kw


def _io(g, sig: _Signature, uid: int, name: str, layout: _Layout):
    return g.tensor(uid=uid, name=name, dim=list(layout.shape), stride=list(layout.stride),
                    data_type=_io_type(sig.dtype))


def _stats_layout(sig: _Signature) -> _Layout:
    b, h, n, _ = sig.q.shape
    return _Layout((b, h, n, 1), (h * n, n, 1, 1))


def _finish(g):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([_cudnn.heur_mode.A, _cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g


def _build_forward(sig: _Signature):
    g = _new_graph(sig)
    q, k, v = (_io(g, sig, uid, name, lay) for uid, name, lay in ((Q, "q", sig.q), (K, "k", sig.k), (V, "v", sig.v)))
    o, stats = g.sdpa(name="sdpa", q=q, k=k, v=v, generate_stats=True, **_masking(g, sig))
    o.set_uid(O).set_output(True).set_dim(list(sig.o.shape)).set_stride(list(sig.o.stride))
    st = _stats_layout(sig)
    stats.set_uid(STATS).set_output(True).set_data_type(_cudnn.data_type.FLOAT).set_dim(list(st.shape)) \
        .set_stride(list(st.stride))
    return _finish(g)


def _build_backward(sig: _Signature, do_stride: tuple[int, ...]):
    g = _new_graph(sig)
    q, k, v, o = (_io(g, sig, uid, name, lay)
                  for uid, name, lay in ((Q, "q", sig.q), (K, "k", sig.k), (V, "v", sig.v), (O, "o", sig.o)))
    do = _io(g, sig, DO, "dO", _Layout(sig.o.shape, do_stride))
    st = _stats_layout(sig)
    stats = g.tensor(uid=STATS, name="stats", dim=list(st.shape), stride=list(st.stride),
                     data_type=_cudnn.data_type.FLOAT)
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=q, k=k, v=v, o=o, dO=do, stats=stats, **_masking(g, sig))
    for t, uid, lay in ((dq, DQ, sig.q), (dk, DK, sig.k), (dv, DV, sig.v)):
        t.set_uid(uid).set_output(True).set_dim(list(lay.shape)).set_stride(list(lay.stride))
    return _finish(g)


def _graphs(sig: _Signature, backward_stride: tuple[int, ...] | None = None) -> _Built:
    """The cached graphs of ``sig`` (built on first use; a refusal is cached as ``error``), with the
    backward graph for dO of ``backward_stride`` built too when given."""
    with _on(sig.device):
        return _graphs_on_device(sig, backward_stride)


def _graphs_on_device(sig: _Signature, backward_stride: tuple[int, ...] | None) -> _Built:
    built = _graph_cache.get(sig)
    if built is None:
        built = _Built()
        try:
            built.forward = _build_forward(sig)
        except Exception as err:  # cudnnGraphNotSupportedError and other build failures: refuse the shape
            built.error = f"cuDNN refused the forward graph: {err}"
        _graph_cache[sig] = built
        while len(_graph_cache) > GRAPH_CACHE_ENTRIES:
            _graph_cache.popitem(last=False)
    else:
        _graph_cache.move_to_end(sig)
    if built.error is None and built.backward_error is None and backward_stride is not None:
        built.backward = built.backward or {}
        if backward_stride not in built.backward:
            try:
                built.backward[backward_stride] = _build_backward(sig, backward_stride)
            except Exception as err:
                built.backward_error = f"cuDNN refused the backward graph: {err}"
    return built


def _execute(graph, sig: _Signature, pack: dict[int, Tensor], device: torch.device) -> None:
    ws = torch.empty(max(int(graph.get_workspace_size()), 1), dtype=torch.uint8, device=device)
    handle = _handle(sig.device)
    with _on(sig.device):
        if device.type == "cuda":
            _cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        graph.execute(pack, ws, handle=handle)


def _checked(built: _Built, backward: bool = False) -> _Built:
    error = built.error or (built.backward_error if backward else None)
    if error is not None:
        raise RuntimeError(error)
    return built


# --------------------------------------------------------------------------------------------------
# Forward, backward, autograd
# --------------------------------------------------------------------------------------------------


def _pack(sig: _Signature, lengths: Tensor | None, **tensors: Tensor) -> dict[int, Tensor]:
    ids = dict(q=Q, k=K, v=V, o=O, stats=STATS, do=DO, dq=DQ, dk=DK, dv=DV)
    pack = {ids[name]: t for name, t in tensors.items()}
    if sig.padded:
        pack[SEQ_Q] = torch.full_like(lengths, sig.q.shape[2])
        pack[SEQ_KV] = lengths
    return pack


def _forward(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None, scale: float) -> tuple[Tensor, Tensor, _Signature]:
    o = torch.empty_like(q)
    sig = _Signature(q.device.index if q.is_cuda else -1, q.dtype, _layout(q), _layout(k), _layout(v), _layout(o),
                     lengths is not None, scale)
    built = _checked(_graphs(sig))
    b, h, n, _ = q.shape
    stats = torch.empty(b, h, n, 1, dtype=torch.float32, device=q.device)
    _execute(built.forward, sig, _pack(sig, lengths, q=q, k=k, v=v, o=o, stats=stats), q.device)
    return o, stats, sig


def _backward(sig: _Signature, q: Tensor, k: Tensor, v: Tensor, o: Tensor, stats: Tensor, do: Tensor,
              lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    do = _ready(do)
    graph = _checked(_graphs(sig, backward_stride=tuple(do.stride())), backward=True).backward[tuple(do.stride())]
    dq, dk, dv = _empty_as(q), _empty_as(k), _empty_as(v)  # the layouts the graph declares for them
    _execute(graph, sig, _pack(sig, lengths, q=q, k=k, v=v, o=o, stats=stats, do=do, dq=dq, dk=dk, dv=dv), q.device)
    return dq, dk, dv


def lse_gradient_rows(dlse: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(dO2, O2), each shaped and laid out like ``like`` [B, H, N, D] (D >= 3) in its dtype, with
    rowsum(dO2 * O2) = -dlse to float32 accuracy when the products are summed in float32.

    dlse = f * 2^e; dO2 holds 2^e (a power of two, exact in float16 and bfloat16, clamped to the
    dtype's normal range) in its first three columns, O2 the three float16/bfloat16 pieces of
    -dlse / 2^e (hi, mid, lo: ~3 x the dtype's mantissa bits) there; zeros elsewhere."""
    r = dlse.float()
    _, e = torch.frexp(r)
    info = torch.finfo(like.dtype)
    e = e.clamp(math.ceil(math.log2(info.tiny)), math.floor(math.log2(info.max)))
    sigma = torch.ldexp(torch.ones_like(r), e)
    rest = -r / sigma
    pieces = []
    for _ in range(3):
        piece = rest.to(like.dtype)
        pieces.append(piece)
        rest = rest - piece.float()
    do2, o2 = torch.zeros_like(like), torch.zeros_like(like)
    do2[..., :3] = sigma.to(like.dtype)[..., None]
    o2[..., :3] = torch.stack(pieces, -1)
    return do2, o2


class CudnnAttention(torch.autograd.Function):
    """(out, lse) = cuDNN's exact causal ALiBi of prepared q, k, v (``_ready``, one head dim); both
    outputs differentiable (the LSE's gradient by a second backward call, ``lse_gradient_rows``)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None, scale: float):
        o, stats, sig = _forward(q, k, v, lengths, scale)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.sig, ctx.lengths = sig, lengths
        ctx.set_materialize_grads(False)
        return o, stats.view(stats.shape[:-1])

    @staticmethod
    def backward(ctx: Any, do: Tensor | None, dlse: Tensor | None):
        q, k, v, o, stats = ctx.saved_tensors
        sig, lengths = ctx.sig, ctx.lengths
        grads = None
        if do is not None:
            grads = _backward(sig, q, k, v, o, stats, do, lengths)
        if dlse is not None:
            # zero values: dP = 0, so dS = P * (0 - delta) = P * dLSE, and dV (discarded) is all this call adds
            do2, o2 = lse_gradient_rows(dlse, o)
            dq2, dk2, _ = _backward(sig, q, k, _empty_as(v).zero_(), o2, stats, do2, lengths)
            grads = (dq2, dk2, torch.zeros_like(v)) if grads is None else (grads[0] + dq2, grads[1] + dk2, grads[2])
        if grads is None:
            return None, None, None, None, None
        return grads[0], grads[1], grads[2], None, None


def _ready(t: Tensor) -> Tensor:
    """t itself when cuDNN can read it in place (last dim contiguous; other strides of dims longer than
    1 non-zero multiples of 8 elements; 16-byte aligned), else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s != 0 and s % HEAD_ALIGN == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)
    if ok:
        return t
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def cudnn_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """Run a resolved exact ALiBi spec (``supports_cudnn``) through cuDNN; differentiable in q, k, v.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] (float16 or bfloat16, one dtype, CUDA).
        spec: from ``poslsh.attention.resolve_spec`` (Press slopes, causal, q_offset 0).

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32: the natural log of
        sum_j e^{-m_h (i - j)} exp(scale q_i . k_j) over the kept keys j <= i).
    """
    d, dv_dim = q.shape[-1], v.shape[-1]
    dp = _padded_dim(max(d, dv_dim))
    if dp > MAX_HEAD_DIM:
        raise ValueError(f"the cuDNN backend takes head dims up to {MAX_HEAD_DIM}, got q {d} and v {dv_dim}")
    if dp != d or dp != dv_dim:  # zero columns: q.k and the first Dv output columns unchanged
        q, k, v = (F.pad(t, (0, dp - t.shape[-1])) for t in (q, k, v))
    lengths = None
    if spec.key_padding_mask is not None:
        lengths, why = padding_lengths(spec.key_padding_mask)
        if why is not None:
            raise ValueError(f"the cuDNN backend cannot serve this key padding mask: {why}")
    out, lse = CudnnAttention.apply(_ready(q), _ready(k), _ready(v), lengths, float(spec.scale))
    return out[..., :dv_dim], lse


def _register() -> None:
    global _cudnn
    from ..registry import mark_unavailable, register_backend

    _cudnn = _import_cudnn()
    if _cudnn is None:
        mark_unavailable("cudnn", "needs the nvidia-cudnn-frontend package and cuDNN >= 9 (pip install 'poslsh[cudnn]')")
        return
    if not torch.cuda.is_available():
        mark_unavailable("cudnn", "needs a CUDA device")
        return

    # Below the Triton kernel: "auto" picks it where the shipped speed table measured it fastest.
    register_backend("cudnn", cudnn_attention, supports_cudnn, priority=90, methods=("exact",),
                     explain=explain_cudnn, ready=ready_for_auto)


_register()
