"""BLOOM, MPT and Falcon (``alibi=True``) as the patch sees them: the family of a model, its ALiBi slopes
and logit scale, its head counts, and each family's attention forward (``_FORWARDS``), which splits the
module's own fused QKV projection, appends to the model's cache (cache.py) and hands q, k, v to
``PoslshPatch.attend`` (patch.py). The ``patch`` those forwards take is that ``PoslshPatch``, typed
``Any`` here: patch.py imports this module, never the reverse.

Slopes and scale, as each model applies them: BLOOM adds ``m_h * j`` to ``q.k / sqrt(d)``; MPT adds
it to ``q.k * softmax_scale``; Falcon adds ``bf16(m_h) * j`` *before* the ``1/sqrt(d)`` scaling, so
its effective slope is ``bf16(m_h) / sqrt(d)``. Falcon also rounds every product ``m_h * j`` to
bfloat16; we keep the bias linear (it is ALiBi), so "exact" matches Falcon to float32 precision
only while those products are exact in bfloat16 (slopes that are powers of two, positions < 256),
and differs by that rounding otherwise (a test holds the patch to Falcon with an unrounded bias
beyond 256 positions).

Falcon, eager versus SDPA. The SDPA path (the default ``attn_implementation``) folds ``alibi / sqrt(d)``
into the attention mask and adds that mask to ``q.k / sqrt(d)``: one bias of slope ``bf16(m_h) / sqrt(d)``.
In transformers 5.2 to 5.24 the eager path (``attn_implementation="eager"``, and the SDPA class itself
when called with ``output_attentions=True``) computes ``(q.k + alibi) / sqrt(d)`` and then adds the same
mask, which already holds ``alibi / sqrt(d)``: every slope counts twice, an upstream bug; 5.25 routes
eager Falcon through the attention registry's ``eager_attention_forward``, which adds it once. The
patch reproduces the SDPA path whatever the implementation (one bias, the model's documented ALiBi),
and warns once, at the first forward, when it runs an eager Falcon on a release with the bug.

Supported attention modules: the eager BLOOM/MPT attention and Falcon's eager or SDPA attention (all replaced by the
same forward), ``DynamicCache`` and no cache (static and sliding caches raise). Attention dropout is not
applied by the patched forward (it is meant for inference), ``output_attentions`` yields ``None``
weights, and BLOOM's ``slow_but_exact`` tensor-parallel rounding emulation (``pretraining_tp > 1``) is
not reproduced (one dense projection is used).

Public interfaces only. The patch reads the models' configs (``hidden_size``, head counts, Falcon's
``multi_query`` / ``new_decoder_architecture`` / ``num_kv_heads``), calls their public submodules
(``query_key_value``, ``Wqkv``, ``dense``, ``out_proj``) and public functions (``build_alibi_tensor``),
uses the cache through ``Cache.update`` / ``layers``, and never a ``_name`` attribute or method of a
transformers object (``tests/test_hf_integration.py`` reads this package's syntax trees to hold it to that).
The fused QKV layouts are Falcon's checkpoint formats, split from the config (``_falcon_split``).

Would transformers' attention-function registry be the sturdier hook? (``AttentionInterface``, public,
read in the installed 5.25 source.) BLOOM: no. ``BloomAttention.forward`` computes its scores inline
(``alibi.baddbmm``, softmax, ``bmm``) and never consults the registry; ``set_attn_implementation``
refuses BLOOM for that reason. MPT: no, for the same reason (inline ``matmul`` + ``position_bias``).
Falcon: partly. Since 5.25 ``FalconAttention.forward`` splits QKV itself, updates the cache and calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``, so a
registered function would receive q, k, v already split and cached, with no layout code of ours; but
the call passes only the 4-D mask with the ALiBi bias folded in (the 2-D padding mask and positions
still have to come from our hook), the model's implementation must be switched to the registered name,
and 5.2 to 5.24 compute Falcon's attention inline (the registry is never called there). A forward of
our own is the one hook that works for all three families on every supported release, so the patch
keeps it; once the oldest supported release routes Falcon through the registry, registering there
would be the sturdier hook for Falcon alone.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...layer_partitions import LayerPartitions
from .cache import _find_cache, _update_cache

SUPPORTED_FAMILIES = ("bloom", "mpt", "falcon")
_ATTN_CLASSES = {
    "bloom": ("BloomAttention",),
    "mpt": ("MptAttention",),
    "falcon": ("FalconAttention", "FalconFlashAttention2"),
}


def model_family(model: nn.Module) -> str:
    """"bloom", "mpt" or "falcon" from ``model.config.model_type``; ValueError for anything else."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in ("RefinedWeb", "RefinedWebModel"):
        kind = "falcon"
    if kind not in SUPPORTED_FAMILIES:
        raise ValueError(f"poslsh supports model types {SUPPORTED_FAMILIES}, got {kind!r}")
    if kind == "falcon" and not getattr(config, "alibi", False):
        raise ValueError("this Falcon model uses rotary embeddings (config.alibi is False), not ALiBi")
    return kind


def _num_heads(module: nn.Module) -> int:
    return int(getattr(module, "num_heads", None) or module.n_heads)


def _falcon_kv_heads(config: Any, heads: int) -> int:
    """Key/value heads of a Falcon checkpoint's fused projection (see ``_falcon_split``)."""
    if config.new_decoder_architecture:
        return int(config.num_kv_heads)
    return 1 if config.multi_query else heads


def model_slopes(model: nn.Module) -> tuple[Tensor, float]:
    """The effective ALiBi slopes and logit scale of a supported model, as its own code applies them.

    Returns:
        (slopes float64 [H], scale): attention logits are ``scale * q.k - slopes[h] * (i - j)``.
    """
    family = model_family(model)
    attn = next(m for m in model.modules() if type(m).__name__ in _ATTN_CLASSES[family])
    h, d = _num_heads(attn), attn.head_dim
    ones = torch.ones(1, 2, dtype=torch.long)
    if family == "bloom":
        from transformers.models.bloom import modeling_bloom

        slopes = modeling_bloom.build_alibi_tensor(ones, h, torch.float32)[:, 0, 1].double()
        return slopes, 1.0 / math.sqrt(d)
    if family == "falcon":
        from transformers.models.falcon import modeling_falcon

        slopes = modeling_falcon.build_alibi_tensor(ones, h, torch.float32)[:, 0, 1].double()
        return slopes / math.sqrt(d), 1.0 / math.sqrt(d)
    base = model.base_model
    build = getattr(base, "build_mpt_alibi_tensor", None)
    if build is None:
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor as build
    slopes = -build(h, 2, device="cpu")[:, 0, 0].double()  # bias m*(j - (L-1)): at j = 0, L = 2 it is -m
    return slopes, float(attn.softmax_scale)


@dataclass(eq=False)
class _LayerInfo:
    """One attention module as the patch uses it: its layer index, head counts, head size and fixed
    partitions (None unless the method is "lsh" or "hybrid")."""

    module: nn.Module
    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parts: LayerPartitions | None


# ---------------------------------------------------------------------- per-family forwards
def _heads_to_hidden(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _bloom_forward(patch: Any, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
    hidden, residual = a["hidden_states"], a["residual"]
    b, n, _ = hidden.shape
    qkv = self.query_key_value(hidden).view(b, n, info.num_heads, 3, info.head_dim)
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(3))
    cache = _find_cache(a)
    k, v = _update_cache(cache, k, v, self.layer_idx)
    out = self.dense(_heads_to_hidden(patch.attend(info, q, k, v, cache)))
    if self.training:
        out = F.dropout(out, p=self.hidden_dropout, training=True)
    return residual + out, None


def _mpt_forward(patch: Any, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
    hidden = a["hidden_states"]
    b, n, _ = hidden.shape
    qkv = self.Wqkv(hidden)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(b, n, info.num_heads, info.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    cache = _find_cache(a)
    k, v = _update_cache(cache, k, v, self.layer_idx)
    return self.out_proj(_heads_to_hidden(patch.attend(info, q, k, v, cache))), None


def _falcon_split(info: _LayerInfo, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Falcon's fused QKV projection [B, N, out] -> q [B, N, H, D], k and v [B, N, Hkv, D].

    The three layouts the checkpoints define (from the config): the new decoder architecture groups
    each KV head's queries before its key and value ([Hkv, H/Hkv + 2, D]); multi-query puts the H
    queries before one key and one value ([H + 2, D]); otherwise the heads interleave q, k, v ([H, 3, D]).
    """
    b, n, _ = fused.shape
    h, hkv, d = info.num_heads, info.num_kv_heads, info.head_dim
    config = info.module.config
    if config.new_decoder_architecture:
        grouped = fused.view(b, n, hkv, h // hkv + 2, d)
        return grouped[..., :-2, :].reshape(b, n, h, d), grouped[..., -2, :], grouped[..., -1, :]
    if config.multi_query:
        return fused.view(b, n, h + 2, d).split([h, 1, 1], dim=2)
    return fused.view(b, n, h, 3, d).unbind(3)


def _falcon_forward(patch: Any, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
    q, k, v = (x.transpose(1, 2) for x in _falcon_split(info, self.query_key_value(a["hidden_states"])))
    cache = _find_cache(a)
    k, v = _update_cache(cache, k, v, self.layer_idx)
    return self.dense(_heads_to_hidden(patch.attend(info, q, k, v, cache))), None


_FORWARDS = {"bloom": _bloom_forward, "mpt": _mpt_forward, "falcon": _falcon_forward}


def _argument_names(function: Any) -> tuple[inspect.Signature, tuple[str, ...]]:
    """(signature, names of the positional parameters after the first) of a method or function."""
    signature = inspect.signature(function)
    names = tuple(p.name for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return signature, names


def _arguments(signature: inspect.Signature, names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by name: positional ones named by ``names``, keywords as given (extra keywords
    stay at the top level: ``_find_cache`` and the hook look there and under "kwargs"). ``signature.bind``
    (which also checks the call) only when the positional arguments overflow ``names``; binding every
    call cost more than the rest of a layer's host work for a decoding step."""
    if len(args) > len(names):
        return signature.bind_partial(*args, **kwargs).arguments
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _make_forward(patch: Any, info: _LayerInfo, family: str):
    signature, names = _argument_names(type(info.module).forward)
    body = _FORWARDS[family]

    def forward(self: nn.Module, *args: Any, **kwargs: Any):
        return body(patch, info, self, _arguments(signature, names, (self, *args), kwargs))

    return types.MethodType(forward, info.module)
