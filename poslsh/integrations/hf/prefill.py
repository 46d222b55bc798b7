"""Feeding a prompt to a model a chunk at a time against its cache (patched or not).

Chunked prefill. ``chunked_prefill(model, input_ids, chunk_size)`` feeds a prompt C tokens at a time
against the cache (transformers' ``past_key_values`` convention, the 2-D mask covering past + chunk):
with eviction its peak memory is the weights, one chunk's activations and the reachable cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn


def _cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes its cache under ("cache" since 5.25, "past_key_values" before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def chunked_prefill(model: nn.Module, input_ids: Tensor, chunk_size: int,
                    attention_mask: Tensor | None = None) -> tuple[Any, Tensor]:
    """Feed a prompt to a (patched) model ``chunk_size`` tokens at a time against a transformers
    ``DynamicCache``, as ``model(input_ids=chunk, attention_mask=mask[:, :end], <cache>=cache,
    use_cache=True)`` in a loop (transformers' ``past_key_values`` convention), without gradients.

    Args:
        model: a ``...ForCausalLM`` (patched by ``patch_model`` or not).
        input_ids: [B, N] token ids.
        chunk_size: C >= 1 tokens per forward.
        attention_mask: [B, N], 1 for tokens and 0 for padding (left padding keeps the last position
            a token), or None.

    Returns:
        (cache, last_logits): the ``DynamicCache`` holding the prompt (with ``evict=True``, only the keys
        a future query can reach) and the logits of position N - 1, [B, vocab].

    Peak memory: the weights, one chunk's activations ([B, C, hidden], the chunk's attention) and the
    cache; with window, LSH or hybrid and ``evict=True`` the cache is the reachable keys, whatever N.
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0 \
            or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a [batch, length] integer tensor with length >= 1, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # releases whose DynamicCache takes no config
        cache = DynamicCache()
    extra = {_cache_argument(model): cache, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # no [B, C, vocab] logits per chunk
    n = input_ids.shape[1]
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        mask = None if attention_mask is None else attention_mask[:, :end]
        out = model(input_ids=input_ids[:, start:end], attention_mask=mask, **extra)
    return cache, out.logits[:, -1]
