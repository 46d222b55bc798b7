"""The plans ``poslsh.attention`` keeps of its earlier calls, so a repeated decode-shaped public call does
constant host work too, as an ``AttentionPlan`` held by the caller does.

A call's resolution is cached on what the call gives: the method and its options as given (before
``method_options`` reads them), slopes by content for a list and by identity and version for a tensor
(``cache_keys``), the partitions' grid tensors by identity and version, head counts, causality, scale,
device and backend. A call found here runs the stored plan after the plan's own checks of the tensors;
a first call goes through ``resolve_spec``, which validates everything, and is stored where a plan can
hold its resolution (``remember_public_call``). Anything the key cannot tell apart (trainable slopes,
cut partitions, types it does not cover) is resolved at every call: slower, never stale.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from ..cache_keys import version_key
from ..hashing import Partitions
from ..method import METHOD_RULES, OPTIONS, MethodSpec, ignored_options
from .core import AttentionSpec
from .plan import HYBRID_WIDTH_N, AttentionPlan
from .window import hybrid_widths, hybrid_widths_settle_past

__all__ = ["public_call", "remember_public_call", "clear_public_plans"]


_PUBLIC: OrderedDict = OrderedDict()  # key -> (plan, weak references that must still hold, hybrid's (eps, settle_past))
PUBLIC_CACHE_SIZE = 128
_PLAIN = frozenset((int, float, str, type(None)))  # not bool: True == 1 would find the plan of a 1, unchecked


def _public_key(q, k, method_args: tuple, slopes, partitions, causal, scale, backend):
    """(key, objects the key refers to by identity) of a public call, from its arguments as given (so a
    call found here needs no ``method_options``), else None where the key cannot tell calls apart:
    arguments of types it does not cover, trainable slopes, partitions other than grid ones.
    ``method_args``: (method, samples, scheme, sampling, window_eps, hybrid_eps) as the caller gave them.
    Which keys may hold a plan is decided when one is stored (``remember_public_call``)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and q.ndim == 4 and k.ndim == 4):
        return None  # the dispatcher names what is wrong
    method = method_args[0]
    if type(method) is not str and type(method) is not MethodSpec:
        return None
    if not _PLAIN.issuperset(map(type, method_args[1:])):
        return None
    if type(causal) is not bool or type(scale) not in (int, float, type(None)):
        return None
    held = []
    if slopes is None:
        skey = None
    elif isinstance(slopes, Tensor):
        if slopes.requires_grad:
            return None
        version = version_key(slopes)
        if version is None:  # made under inference_mode: nothing to recognise it by
            return None
        skey, held = ("tensor",) + version, [slopes]
    elif isinstance(slopes, (list, tuple)) and all(type(x) in (int, float) for x in slopes):
        skey = ("list", tuple(slopes))
    else:
        return None
    pkey = None
    if partitions is not None:
        if not isinstance(partitions, Partitions) or partitions.scheme != "grid" or partitions.kernels is not None:
            return None
        held += [partitions.widths, partitions.offsets, partitions.slopes]
        pkey = tuple(version_key(t) for t in held[-3:])
        if None in pkey:
            return None
    key = (method_args, skey, pkey, causal, scale, q.shape[1], k.shape[1], q.device, backend)
    return key, held


def _hybrid_settled(partitions: Partitions, eps: float, nk: int, settle_past: int | None) -> bool:
    """Whether the hybrid's near field at Nk keys (what ``resolve_spec`` gives a call) is the one a plan
    holds for every length (``HYBRID_WIDTH_N``): true past ``settle_past`` keys
    (``window.hybrid_widths_settle_past``: 80 / m of the smallest slope), computed where that is unknown
    (a slope 0); a shorter cache is resolved per call. ``eps`` is one a call was resolved with."""
    if settle_past is not None and min(nk, HYBRID_WIDTH_N) > settle_past:
        return True  # a decode step: no slopes read, no width computed
    slopes, r = partitions.slopes, partitions.num_samples
    return torch.equal(hybrid_widths(slopes, eps, r, nk), hybrid_widths(slopes, eps, r, HYBRID_WIDTH_N))


def public_call(q, k, v, *, method_args: tuple, slopes, partitions, causal, scale, key_padding_mask, q_offset,
                return_lse: bool, backend: str):
    """``poslsh.attention``'s result from a plan of an earlier call with the same arguments, or (None, key)
    when there is none (``remember_public_call`` then stores the call's resolution under key, if a plan
    can hold it)."""
    found = _public_key(q, k, method_args, slopes, partitions, causal, scale, backend)
    if found is None:
        return None, None
    key, held = found
    hit = _PUBLIC.get(key)
    if hit is not None:
        plan, refs, hybrid_field = hit
        checked = None
        if all(ref() is obj for ref, obj in zip(refs, held)) and (partitions is None or partitions.n == k.shape[2]):
            checked = plan.checked(q, k, v, q_offset, key_padding_mask)
        if checked is not None and hybrid_field is not None:  # hybrid: only where its near field settled
            eps, settle_past = hybrid_field
            if not _hybrid_settled(partitions, eps, checked[2], settle_past):
                checked = None
        if checked is not None:  # else resolved below, which raises the dispatcher's own error
            _PUBLIC.move_to_end(key)
            _, nq, nk, q_offset = checked
            return plan.run_checked(q, k, v, nq, nk, q_offset, key_padding_mask, return_lse), None
    return None, (key, held)


def remember_public_call(pending, spec: AttentionSpec, k: Tensor, options: dict, backend: str) -> None:
    """Store a plan of a resolved public call (``pending`` from ``public_call``; ``options`` from
    ``method_options``) where one can hold its resolution for later calls with the same arguments: not
    lsh or hybrid without partitions (drawn afresh per call), not hybrid at a key count where its near
    field still depends on Nk (``_hybrid_settled``), and not a call whose arguments include an option
    its method ignores (its ``IgnoredOptionWarning`` comes at every call: a stored call skips
    ``method_options``)."""
    key, held = pending
    method_args, pkey = key[0], key[2]
    rule = METHOD_RULES[options["method"]]
    if rule.collisions and (pkey is None or spec.partitions is None):
        return
    hybrid_field = None
    if rule.near_far:  # (the partitions' slopes, whose tail ``settle_past`` is, are held by the key)
        eps, parts = options["hybrid_eps"], spec.partitions
        hybrid_field = (eps, hybrid_widths_settle_past(parts.slopes, eps, parts.num_samples))
        if not _hybrid_settled(parts, eps, k.shape[2], hybrid_field[1]):
            return
    if ignored_options(method_args[0], **dict(zip(OPTIONS, method_args[1:]))):
        return
    plan = AttentionPlan(MethodSpec(**options), num_heads=spec.num_heads, num_kv_heads=k.shape[1],
                         slopes=spec.slopes, causal=spec.causal, scale=key[4], device=k.device,
                         partitions=spec.partitions, backend=backend)
    _PUBLIC[key] = (plan, [weakref.ref(obj) for obj in held], hybrid_field)
    while len(_PUBLIC) > PUBLIC_CACHE_SIZE:
        _PUBLIC.popitem(last=False)


def clear_public_plans() -> None:
    """Forget the plans of earlier public calls (tests; a changed backend registry)."""
    _PUBLIC.clear()

