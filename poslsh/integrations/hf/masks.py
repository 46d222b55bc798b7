"""The attention masks of a patched model: the 2-D ``attention_mask`` the user passes, captured by a
pre-hook on the base model (``_mask_hook``), which the patched attention reads; and the 4-D mask
transformers builds, answered through its mask registry without an n x n tensor. The ``patch`` the
functions here take is the ``PoslshPatch`` (patch.py), typed ``Any``: patch.py imports this module,
never the reverse.

The 4-D mask. ``create_causal_mask`` asks ``ALL_MASK_ATTENTION_FUNCTIONS[<implementation>]`` for the 4-D
mask and passes it the model's ``config``. While a model is patched every entry of that registry is
replaced (the registry's own per-key override) by a dispatcher that hands a patched model's calls to
the patch and every other call to the function the entry held, so other models are untouched; the last
``unpatch`` restores the entries. The patch answers with a [B, 1, 1, 1] "attend" mask: the patched
attention reads the 2-D mask the user passed, never the 4-D one, so prefill builds no n x n tensor
(transformers' 4-D mask is [B, 1, n, n], and Falcon's [B, H, n, n] once its bias is folded in: 17 GB at
64K for a BLOOM-560m shape). What the models still build from it is linear in n: BLOOM's and Falcon's
[B*H, 1, Nk] bias, Falcon's [B, H, 1, Nk] bias-in-mask, MPT's [H, 1, max_seq_len] bias (none of them read).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .models import _argument_names, _arguments


def _mask_hook(patch: Any, base: nn.Module):
    signature, names = _argument_names(base.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = _arguments(signature, names, args, kwargs)
        mask = bound.get("attention_mask")
        if mask is None:
            mask = (bound.get("kwargs") or {}).get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise NotImplementedError("the poslsh patch needs a 2-D [batch, length] attention_mask")
        patch.attention_mask = None if mask is None else mask.bool()
        # One host read per forward (not per layer): every position attended (generation's usual mask)?
        patch.mask_host = None if mask is None or bool(patch.attention_mask.all()) else patch.attention_mask.cpu()
        patch.forward_rows = {}

    return base.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------------- transformers' mask registry
# A patched model's base model builds its 4-D mask with ``masking_utils.create_causal_mask``, which calls
# ``ALL_MASK_ATTENTION_FUNCTIONS[<the model's attention implementation>](..., config=config)``. While any
# model is patched, every entry of that registry is replaced (its documented per-key override) by a
# dispatcher: a call for a patched model's config goes to the patch, any other call to the function
# the entry held, so other models in the process build their masks as before.
_PATCHED_CONFIGS: dict[int, tuple[Any, Any]] = {}  # id(config) -> (weakref to config, weakref to patch)
_MASK_ENTRIES: dict[str, Any] = {}  # registry key -> the function its entry held before the dispatcher


def _mask_device(kwargs: dict, model: nn.Module) -> torch.device:
    """The device of the mask a registry call asks for: its ``device`` argument (5.25), else that of a
    tensor argument (``cache_position`` in 5.2), else the model's."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for value in kwargs.values():
        if isinstance(value, Tensor):
            return value.device
    return next(model.parameters()).device


def _mask_registry() -> Any:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS


def _patch_for_config(config: Any) -> Any:
    entry = _PATCHED_CONFIGS.get(id(config))
    if entry is None or entry[0]() is not config:
        return None
    return entry[1]()


def _mask_dispatcher(key: str, original: Any):
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        patch = _patch_for_config(kwargs.get("config"))
        if patch is None:
            return original(*args, **kwargs)
        return patch.model_mask(key, original, args, kwargs)

    dispatch.poslsh_original = original
    return dispatch


def _register_config(config: Any, patch: Any) -> None:
    import weakref

    # Weak references both: the model holds its patch (``_poslsh_patch``), and a model dropped without
    # unpatch_model must not be kept alive by this table.
    for key in [k for k, (c, p) in _PATCHED_CONFIGS.items() if c() is None or p() is None]:
        del _PATCHED_CONFIGS[key]  # models dropped while patched
    _PATCHED_CONFIGS[id(config)] = (weakref.ref(config), weakref.ref(patch))
    registry = _mask_registry()
    for key in list(registry.keys()):
        if key not in _MASK_ENTRIES:
            _MASK_ENTRIES[key] = registry[key]
            registry[key] = _mask_dispatcher(key, registry[key])


def _unregister_config(config: Any, patch: Any) -> None:
    if _patch_for_config(config) is patch:
        del _PATCHED_CONFIGS[id(config)]
    if _PATCHED_CONFIGS:
        return
    registry = _mask_registry()
    for key, original in _MASK_ENTRIES.items():
        current = registry.get(key)
        if getattr(current, "poslsh_original", None) is not original:
            continue  # someone replaced our dispatcher since: theirs stays
        del registry[key]  # drops the override; the registry's global entry shows through
        if registry.get(key) is not original:
            registry[key] = original  # the entry we replaced was itself an override
    _MASK_ENTRIES.clear()
