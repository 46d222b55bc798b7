"""Keys by which the library's caches recognise a tensor they saw before: its identity and in-place version.

A cache that keeps something derived from a tensor (a plan's device arrays from partitions, a mask's
lengths) must not serve it after the tensor changes. Comparing contents would cost a pass over the tensor
(and a host-device synchronisation for a GPU tensor) on every call; instead a key holds the tensor's
``id`` and its version counter, which every in-place operation increments (the caches keep the tensor
alive, so its ``id`` cannot be reused meanwhile). The counter is ``Tensor._version``, the one attribute
of torch's that says this (torch has no public name for it); this module is the one place that reads it.

Tensors made under ``torch.inference_mode()`` have no version counter: ``version_key`` returns None for
them and the caches then do not cache (the call is resolved afresh: slower, never stale).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["version_key"]


def version_key(t: Tensor) -> tuple[int, int] | None:
    """(id, in-place version) of ``t``, or None when ``t`` tracks no version (an inference tensor)."""
    if t.is_inference():
        return None
    return id(t), t._version
