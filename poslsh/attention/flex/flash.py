"""The "flex_fa4" backend: the flex backend's score and mask mods run by FlexAttention's FlashAttention-4
kernels (``kernel_options={"BACKEND": "FLASH"}``: the CuTe DSL kernels of the ``flash-attn-4`` package),
for exact ALiBi and the per-head window, on Hopper and newer GPUs.

On an H100 these run exact causal ALiBi at ~550 TFLOP/s where FlexAttention's Triton template runs ~400
(``bench/results/flex_fa4_h100_s12``), with any slopes (cuDNN's built-in ALiBi takes only the Press
slopes of the head count).

One gap is closed here: FlashAttention-4's backward takes no gradient of the log-sum-exp (dLSE). The
kernel's LSE is therefore returned detached from inside the compiled call (so its backward never sees a
dLSE) and re-attached by ``LseGradient``, whose backward adds the LSE's share by two more kernel calls:
with P the attention weights and s = scale,

    d lse_i / d q_i = s sum_j P_ij k_j          = s (P k)_i          (attention with values k)
    d lse_i / d k_j = s sum_i P_ij q_i dlse_i   = s (P^T (dlse q))_j (its value gradient)

so training through ``return_lse=True`` or the split form's LSE merges is exact as well; the extra calls
run only when the LSE gets a gradient. Where torch scales the kernel's natural-log LSE by ln 2 (torch 2.11,
pytorch/pytorch#181645), ``lse_factor`` measures it once per device and undoes it.

Grouped KV is FlashAttention-4's own in the forward; where gradients are needed its k and v are expanded
to one head per query head first (the FLASH backward with grouped KV gave wrong gradients on an H100).

Not served, "auto" passing such calls to the next backend: key padding masks (with one, torch 2.11 +
flash-attn-4 4.0.0b40 gave a right output but a wrong LSE and NaN gradients on an H100), two-sided
windows (not yet run on a GPU) and slopes that require grad (the kernels take no gradient of captured
tensors).

Installed by ``pip install flash-attn-4`` (which brings the CUTLASS DSL); registered when that package
is importable, CUDA is present and torch's FlexAttention takes the FLASH option. The first call at a
shape compiles (about a second; "auto" waits until a shape's calls have paid for it: ``rent``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import EMPTY_LSE, AttentionSpec
from .backend import DEFAULT_BLOCK, compile_ready, compiled_on, flex_available, flex_mods

__all__ = ["flex_fa4_attention", "supports_flex_fa4", "explain_flex_fa4", "fa4_installed", "lse_factor",
           "LseGradient", "HEAD_DIMS"]

HEAD_DIMS = (64, 96, 128)  # FlashAttention-4's head dims on Hopper (q, k and v alike)
FLASH = {"BACKEND": "FLASH"}


@functools.lru_cache(maxsize=1)
def fa4_installed() -> bool:
    """Whether FlashAttention-4's CuTe kernels (``flash_attn.cute``) can be imported; not imported here
    (its first import takes seconds)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except Exception:  # a flash_attn without cute (FlashAttention-2, whose import may fail), or a broken one
        return False


def _attend_detached_lse(q: Tensor, k: Tensor, v: Tensor, score_mod: Callable, block_mask: Any,
                         scale: float, enable_gqa: bool, kernel_options: dict | None) -> tuple[Tensor, Tensor]:
    """flex_attention's (out, lse), the LSE detached inside the call: FlashAttention-4's backward is then
    asked for dO only (``LseGradient`` supplies the LSE's share)."""
    from torch.nn.attention.flex_attention import flex_attention

    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, return_lse=True, kernel_options=kernel_options)
    return out, lse.detach()


def _attend_fn(device: torch.device) -> Callable:
    """``_attend_detached_lse`` compiled on CUDA (static shapes, as the flex backend's), eager elsewhere."""
    return compiled_on(device, _attend_detached_lse)


_lse_factors: dict[torch.device, float] = {}


def lse_factor(device: torch.device) -> float:
    """What the FLASH backend's log-sum-exp must be multiplied by to be the natural log: 1, or 1 / ln 2
    where torch multiplies FlashAttention-4's natural-log LSE by ln 2 as if it were base 2 (torch 2.11 does,
    pytorch/pytorch#181645, fixed by #181824). Measured once per device on a call whose LSE is known
    (all scores 0 over 256 keys: ln 256)."""
    if device not in _lse_factors:
        zeros = torch.zeros(1, 1, 256, 64, device=device, dtype=torch.bfloat16)
        _, lse = _attend_fn(device)(zeros, zeros, zeros, None, None, 1.0, False, FLASH)
        got, want = float(lse.float().mean()), math.log(256)
        for factor in (1.0, 1 / math.log(2)):
            if abs(got * factor - want) < 1e-3 * want:
                _lse_factors[device] = factor
                break
        else:
            raise RuntimeError(f"FlexAttention's FLASH backend gave a log-sum-exp of {got:.6g} where ln 256 = "
                               f"{want:.6g} is expected (neither natural log nor base 2): this torch and "
                               "flash-attn-4 are not usable by the flex_fa4 backend")
    return _lse_factors[device]


class LseGradient(torch.autograd.Function):
    """lse (from a detached kernel call) made differentiable in q and k: the backward adds
    dq = s dlse (P k) and dk = s P^T (dlse q), each from one more call of ``attend`` (module docstring).

    ``attend(q, k, v) -> (out, lse)`` is the same kernel with the same mods; q [B, H, Nq, D],
    k [B, Hkv, Nk, D], lse [B, H, Nq] float32."""

    @staticmethod
    def forward(ctx: Any, lse: Tensor, q: Tensor, k: Tensor, attend: Callable, scale: float) -> Tensor:
        ctx.save_for_backward(q, k)
        ctx.attend, ctx.scale = attend, scale
        ctx.set_materialize_grads(False)
        return lse.clone()

    @staticmethod
    def backward(ctx: Any, dlse: Tensor | None):
        if dlse is None:
            return None, None, None, None, None
        q, k = ctx.saved_tensors
        weight = (ctx.scale * dlse).to(q.dtype)[..., None]  # [B, H, Nq, 1]
        with torch.enable_grad():
            # q and k require grad too, though only the values' gradient is asked for: the FLASH template's
            # backward fails to compile for a call where v alone requires grad (torch 2.11, "AssertionError:
            # buf3" on an H100)
            q_, k_, values = (t.detach().requires_grad_() for t in (q, k, k))
            pk, _ = ctx.attend(q_, k_, values)  # P k: [B, H, Nq, D]
            (dk,) = torch.autograd.grad(pk, values, grad_outputs=weight * q)  # P^T (s dlse q), GQA summed
        dq = weight * pk.detach()
        return None, dq if ctx.needs_input_grad[1] else None, dk if ctx.needs_input_grad[2] else None, None, None


def flex_fa4_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, block: int = DEFAULT_BLOCK,
                       kernel_options: dict | None = FLASH) -> tuple[Tensor, Tensor]:
    """Run ``spec`` (exact or window) through FlexAttention's FlashAttention-4 kernels.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, D] (float16 or bfloat16, CUDA, D in
            ``HEAD_DIMS``; ``supports_flex_fa4``).
        spec: from ``poslsh.attention.resolve_spec``.
        kernel_options: FlexAttention's; None runs its default template (the CPU tests of the LSE's
            gradient use that, eagerly).

    Returns:
        (out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] float32), both differentiable in q, k, v.
    """
    d, dv = q.shape[-1], v.shape[-1]
    if dv != d:  # zero columns: q.k and the first Dv output columns unchanged
        if max(d, dv) not in HEAD_DIMS:
            raise ValueError(f"the flex_fa4 backend takes q, k and v head dims in {HEAD_DIMS} (or a smaller v "
                             f"dim, padded), got q {d} and v {dv}")
        q, k, v = (F.pad(t, (0, max(d, dv) - t.shape[-1])) for t in (q, k, v))
    nq, nk = q.shape[2], k.shape[2]
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if need_grad and q.shape[1] != k.shape[1]:
        # grouped KV expanded to one k, v head per query head when gradients are needed: the FLASH
        # backward with enable_gqa gave wrong dq and NaN dv on an H100 (torch 2.11, flash-attn-4 4.0.0b40);
        # autograd sums the expanded heads' gradients back
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    score_mod, block_mask = flex_mods(spec, nq, nk, q.device, block, with_q_blocks=need_grad)
    fn, gqa = _attend_fn(q.device), q.shape[1] != k.shape[1]

    def attend(q_: Tensor, k_: Tensor, v_: Tensor) -> tuple[Tensor, Tensor]:
        return fn(q_, k_, v_, score_mod, block_mask, spec.scale, gqa, kernel_options)

    # q, k, v carry the compute dtype already; autocast around compiled flex_attention is fragile (as the
    # flex backend says), so it is switched off where it is on
    autocast = torch.is_autocast_enabled(q.device.type)
    with torch.autocast(q.device.type, enabled=False) if autocast else contextlib.nullcontext():
        out, lse = attend(q, k, v)
    lse = lse.float()
    if kernel_options == FLASH and lse_factor(q.device) != 1.0:
        lse = lse * lse_factor(q.device)
    if need_grad and (q.requires_grad or k.requires_grad):
        lse = LseGradient.apply(lse, q, k, attend, float(spec.scale))
    if spec.key_padding_mask is not None:  # rows that see no key: the library's EMPTY_LSE, not -inf
        lse = torch.where(torch.isneginf(lse), torch.full_like(lse, EMPTY_LSE), lse)
    return out[..., :dv], lse


def explain_flex_fa4(q: Tensor, spec: AttentionSpec) -> str | None:
    """Why the flex_fa4 backend cannot serve this call (the dispatcher's error names it), or None."""
    if not fa4_installed():
        return "FlashAttention-4 is not installed (pip install flash-attn-4)"
    if spec.key_padding_mask is not None:
        # with a padding mask (a mask_mod reading a [B, Nk] tensor by batch) torch 2.11 + flash-attn-4
        # 4.0.0b40 gave a right output but a wrong LSE and NaN gradients on an H100 (session 12)
        return "it takes no key padding mask (its LSE and gradients were wrong with one)"
    if spec.rule.bounded and not spec.causal:
        return "it takes causal windows only (a two-sided window is not verified on FlashAttention-4 yet)"
    if q.device.type != "cuda":
        return f"it runs on CUDA devices only, got {q.device}"
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return f"it needs a Hopper or newer GPU (compute capability 9.0+), got {torch.cuda.get_device_name(q.device)}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it takes head dims {HEAD_DIMS}, got {q.shape[-1]}"
    return None


def supports_flex_fa4(q: Tensor, spec: AttentionSpec) -> bool:
    """FlashAttention-4 installed, a Hopper+ GPU, fp16/bf16, D in ``HEAD_DIMS``, no key padding mask
    (methods and slope gradients are checked by the registry)."""
    return explain_flex_fa4(q, spec) is None


def _torch_has_flash_backend() -> bool:
    """Whether this torch's FlexAttention takes ``kernel_options={"BACKEND": "FLASH"}`` (a documented option
    of ``FlexKernelOptions``; torch 2.11 has it, the library's oldest supported torch does not)."""
    from torch.nn.attention import flex_attention as flex

    options = getattr(flex, "FlexKernelOptions", None)
    return options is not None and "BACKEND" in getattr(options, "__annotations__", {})


def _register() -> None:
    from ..registry import mark_unavailable, register_backend

    why = ("this torch has no FlexAttention" if not flex_available
           else "needs FlashAttention-4 (pip install flash-attn-4)" if not fa4_installed()
           else "needs a CUDA device" if not torch.cuda.is_available()
           else "this torch's FlexAttention has no FLASH backend" if not _torch_has_flash_backend() else None)
    if why is not None:
        mark_unavailable("flex_fa4", why)
        return

    # Below the flex and Triton backends: "auto" takes it where the shipped speed table measured it
    # fastest, at a shape whose calls have paid for its compile (``compile_ready``).
    register_backend("flex_fa4", flex_fa4_attention, supports_flex_fa4, priority=40, methods=("exact", "window"),
                     explain=explain_flex_fa4, ready=compile_ready("flex_fa4", supports_flex_fa4))


_register()
