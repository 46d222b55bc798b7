"""Run a transformers ALiBi checkpoint (BLOOM, MPT, Falcon with ``alibi=True``) with ``poslsh.attention``.

    from transformers import AutoModelForCausalLM
    from poslsh.integrations.hf import patch_model
    model = AutoModelForCausalLM.from_pretrained("path/to/bloom", dtype=torch.bfloat16)
    with patch_model(model, method="lsh", samples=8, scheme="grid", seed=0):
        out = model.generate(**inputs, max_new_tokens=50)

Every method and option of ``poslsh.attention`` is accepted ("exact", the default, "window",
"lsh", "hybrid"; ``sampling`` iid/stratified/qmc, ``window_eps``, ``hybrid_eps``), validated once
as a ``poslsh.method.MethodSpec``.

How it works. ``patch_model`` replaces the ``forward`` of every attention module (as an instance
attribute, so ``unpatch_model`` simply deletes it) by one that uses the module's own projection
weights and the model's own KV cache, but computes attention with ``poslsh.attention``. The 2-D
``attention_mask`` the user passes is captured by a pre-hook on the base model. No transformers
source is copied; the query/key/value layouts are those the checkpoints define.

Positions. The patched attention reproduces each model's position convention under padding: BLOOM
and Falcon place the ALiBi bias at the position ``cumsum(attention_mask) - 1`` (padding does not
count), MPT at the raw index, and both agree for left or right padding. We run the operator on the
*compacted* sequence of each row (its unmasked tokens, in order), so a token's position is its index
among unmasked tokens: distances are those of the model, and a padded row sees exactly the LSH
partitions an unpadded one would. Rows with the same compacted length share one operator call.

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

Partitions are fixed per layer and head, drawn from ``seed`` (with ``sampling``), and so are the
hybrid's near-field widths (computed once for long sequences, ``HYBRID_WIDTH_N``, then capped at
the length), so they never depend on how many keys a call holds: the grid scheme is two integers per
head and sample (valid for every length); the cut scheme is drawn in chunks of ``CUT_CHUNK``
positions, each from its own seeded generator, so the cuts of a prefix never depend on how long a
sequence was asked for first. Hence cached decoding attends with the same partitions as
recomputing the full sequence, and a batch attends like its rows one at a time.

KV cache. With "lsh", "hybrid" or "window" a cached key becomes unreachable once no future query can
see it: a query at position i >= T sees key j < T in sample t iff j lies in the block of T, so the
reachable keys are j >= min_t start_t(T) (window: j >= T - w_h; hybrid: the smaller of the two).
``cache_report`` counts them for any length.

The cache's layers. Every layer of a ``DynamicCache`` a patched model uses is an ``InPlaceLayer`` (a
``DynamicLayer`` subclass, swapped in at the layer's first update: one buffer per tensor, the stored
keys a window of it), evicting or not. ``DynamicLayer.update`` concatenates (``torch.cat``), which copies
the whole cached layer at every step: O(n) per layer and token, the cost that grew with the cache when
decoding without eviction (``bench/host_overhead.py --model tiny-bloom --contexts 1024 4096 16384``
times a decoding step at several cache lengths). The buffer appends in place and grows by half its
need when full (``grown``), so each position is copied O(1) times on average and a layer holds at most
1.5x its stored keys after an append (the prompt's update stores it exactly). ``patch_model(...,
evict=True)`` also drops, after every forward, the prefix unreachable for all heads and rows, so the
memory a layer holds is bounded by its reachable keys (at most 4x, 1.5x after an append), not by the
sequence; its ``get_seq_length`` is the logical length (stored + evicted), from which transformers
derives positions and masks. ``PoslshPatch.cache_memory(cache)`` reports stored, held and evicted
bytes; ``evict=True`` warns once when it cannot act (method "exact", no cache: ``use_cache=False``,
MPT's default, or a cache other than ``DynamicCache``). Eviction is rectangular (a [B, Hkv, N, D] cache
cannot drop keys of one head only), so the head with the smallest slope sets how much goes;
``cache_report`` also gives the per-head figure a ragged cache could reach.

Static caches are refused (NotImplementedError), for these reasons (read in transformers 5.25's
``cache_utils``). ``StaticLayer.update`` writes the new keys with ``index_copy_`` and returns its whole
[B, Hkv, max_cache_len, D] buffer, zeros past the valid length; that length lives in
``StaticLayer.cumulative_length``, a device tensor (reading it is a host-device synchronisation per layer
and step), and in the 4-D mask this patch does not build. The patch could slice the buffer to the 2-D
mask's length, which it reads on the host, but the keys' shape would then change at every step, and a
static cache exists for fixed shapes (``torch.compile`` without recompiling, CUDA graph capture): it would
work as a slower ``DynamicCache``. Keeping the shapes fixed would need the attention call to take the
whole buffer and the valid length as a device value; ``AttentionPlan``'s calls take the length from the
keys' shape (its CUDA graph capture holds Nk fixed), and the patched forward does host work per step that
a captured graph cannot replay (the 2-D mask's rows, slicing to the method's reach, eviction). With
eviction a static cache would be a ring buffer, whose wrap-around ``poslsh.attention`` (keys at contiguous
positions start..start+Nk-1) cannot take without a copy per step. ``hf_graph.StaticWindowCache`` (method "window") is that copy: fixed buffers of
the reach + 1 newest positions, shifted by one per step, which ``attend`` and ``_update_cache`` recognise
by its ``poslsh_static_window`` marker (hf_graph builds on this module, so it is not imported here).

Chunked prefill. ``chunked_prefill(model, input_ids, chunk_size)`` feeds a prompt C tokens at a time
against the cache (transformers' ``past_key_values`` convention, the 2-D mask covering past + chunk):
with eviction its peak memory is the weights, one chunk's activations and the reachable cache.

Host work per decode step. The mask pre-hook reads the 2-D mask once per model forward (one
``all()``, and one host copy when some position is masked); the row offsets, kept positions and
eviction arithmetic every layer needs are derived from it on the host once per forward (``_rows``) and
reused, so a layer does no host-device synchronisation of its own. ``_call`` is the one place the
operator is called, through the layer's ``AttentionPlan``. A layer's forward names its arguments without
``inspect.Signature.bind`` (``_arguments``), finds its cache layer without an import or type check after
the first step, appends in place, and computes the window's eviction point in closed form; a decoding
step on the torch backends computes every head at once (``fused.few_rows_attention``, its exact/window
weights a view of the plan's table). ``bench/host_overhead.py --model tiny-bloom`` times a tiny BLOOM's
decoding per token (compute negligible, so host work) against transformers' own attention.

Supported: transformers >=5.2,<5.26 (``TESTED_TRANSFORMERS``; tested 5.2.0 and 5.25.0; ``patch_model``
warns once outside that range and refuses below 4.54). 5.2 is the first release in which all three
families build their 4-D mask through ``masking_utils.create_causal_mask`` and its public mask registry
(below). Before it, BLOOM and Falcon build the mask in the private ``_update_causal_mask`` and MPT through
``_prepare_4d_causal_attention_mask``: the n x n mask could only be avoided there by overriding a
private method. The eager BLOOM/MPT attention and Falcon's eager or SDPA attention (all replaced by the
same forward), ``DynamicCache`` and no cache (static and sliding caches raise). Attention dropout is not
applied by the patched forward (it is meant for inference), ``output_attentions`` yields ``None``
weights, and BLOOM's ``slow_but_exact`` tensor-parallel rounding emulation (``pretraining_tp > 1``) is
not reproduced (one dense projection is used).

Public interfaces only. The patch reads the models' configs (``hidden_size``, head counts, Falcon's
``multi_query`` / ``new_decoder_architecture`` / ``num_kv_heads``), calls their public submodules
(``query_key_value``, ``Wqkv``, ``dense``, ``out_proj``) and public functions (``build_alibi_tensor``),
uses the cache through ``Cache.update`` / ``layers``, and never a ``_name`` attribute or method of a
transformers object (``tests/test_hf_integration.py`` reads this file's syntax tree to hold it to that).
The fused QKV layouts are Falcon's checkpoint formats, split from the config (``_falcon_split``).

The mask. ``create_causal_mask`` asks ``ALL_MASK_ATTENTION_FUNCTIONS[<implementation>]`` for the 4-D
mask and passes it the model's ``config``. While a model is patched every entry of that registry is
replaced (the registry's own per-key override) by a dispatcher that hands a patched model's calls to
the patch and every other call to the function the entry held, so other models are untouched; the last
``unpatch`` restores the entries. The patch answers with a [B, 1, 1, 1] "attend" mask: the patched
attention reads the 2-D mask the user passed, never the 4-D one, so prefill builds no n x n tensor
(transformers' 4-D mask is [B, 1, n, n], and Falcon's [B, H, n, n] once its bias is folded in: 17 GB at
64K for a BLOOM-560m shape). What the models still build from it is linear in n: BLOOM's and Falcon's
[B*H, 1, Nk] bias, Falcon's [B, H, 1, Nk] bias-in-mask, MPT's [H, 1, max_seq_len] bias (none of them read).

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
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention.dispatch import check_backend_name
from ..checks import as_bool, as_int
from ..hashing import UNBOUNDED_WIDTH, Partitions
from ..method import MethodSpec, as_method
from ..layer_partitions import CUT_CHUNK, LayerPartitions
from ..attention.plan import HYBRID_WIDTH_N

__all__ = ["patch_model", "unpatch_model", "PoslshPatch", "cache_report", "chunked_prefill", "model_family", "model_slopes",
           "CUT_CHUNK", "SUPPORTED_FAMILIES", "HYBRID_WIDTH_N"]

SUPPORTED_FAMILIES = ("bloom", "mpt", "falcon")
# The transformers versions this patch is tested with: [TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1]),
# major.minor (pyproject.toml's hf extra says the same). 5.2 is the first release in which BLOOM, MPT
# and Falcon all build their 4-D mask through ``masking_utils.create_causal_mask``, whose public mask
# registry lets the patch build no n x n mask; earlier releases build it in private model methods.
TESTED_TRANSFORMERS = ((5, 2), (5, 26))
# Below this the attention modules returned three values (4.51); the patch refuses to run there.
MIN_TRANSFORMERS = (4, 54)
# transformers 5.2 to 5.24 (read in their source): an eager Falcon adds the ALiBi bias to its logits
# and again through the mask that already holds it; 5.25 routes eager Falcon through the attention
# registry's ``eager_attention_forward``, which adds it once.
FALCON_EAGER_BIAS_FIXED = (5, 25)
_ATTN_CLASSES = {
    "bloom": ("BloomAttention",),
    "mpt": ("MptAttention",),
    "falcon": ("FalconAttention", "FalconFlashAttention2"),
}
_CACHE_NAMES = ("layer_past", "cache", "past_key_values", "past_key_value")


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return major, minor


def _version_text(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


_RANGE_WARNED: set = set()  # installed versions already warned about (once per process)


def _check_transformers() -> tuple[int, int]:
    """The installed transformers (major, minor); RuntimeError below MIN_TRANSFORMERS, a warning (once)
    outside TESTED_TRANSFORMERS."""
    import transformers

    version = _transformers_version()
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(f"poslsh.integrations.hf needs transformers >= {_version_text(MIN_TRANSFORMERS)}, "
                           f"found {transformers.__version__}")
    low, high = TESTED_TRANSFORMERS
    if not low <= version < high and transformers.__version__ not in _RANGE_WARNED:
        _RANGE_WARNED.add(transformers.__version__)
        warnings.warn(f"poslsh.integrations.hf is tested with transformers >={_version_text(low)},<{_version_text(high)}"
                      f"; found {transformers.__version__}: the patch may fail or build a quadratic attention mask",
                      stacklevel=3)
    return version


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


@dataclass
class _Options:
    spec: MethodSpec
    seed: int
    backend: str
    evict: bool = False

    @property
    def method(self) -> str:
        return self.spec.method


@dataclass(eq=False)
class _LayerInfo:
    module: nn.Module
    index: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    parts: LayerPartitions | None


@dataclass(eq=False, repr=False)
class PoslshPatch:
    """A patched model; ``unpatch()`` (or leaving the ``with`` block) restores the original attention.

    Attributes:
        model: the patched model.
        family: "bloom", "mpt" or "falcon".
        options: ``spec`` (the ``MethodSpec``), ``seed``, ``backend``, ``evict``.
        slopes: effective ALiBi slopes float64 [H]; scale: the logit scale.
        layers: per attention module, its index, head counts and fixed partitions.
    """

    model: nn.Module
    family: str
    options: _Options
    slopes: Tensor
    scale: float
    layers: list[_LayerInfo] = field(default_factory=list)
    attention_mask: Tensor | None = None  # the 2-D mask of the running forward (bool, its device)
    mask_host: Tensor | None = None  # a host copy of it when some position is masked, else None
    forward_rows: dict = field(default_factory=dict)  # per running forward: _Rows per evicted count, reaches
    _hook: Any = None
    active: bool = True
    widths: Tensor | None = None  # hybrid: fixed near-field half-widths [H] (UNBOUNDED_WIDTH = every key)
    plans: dict = field(default_factory=dict)  # (layer index, device) -> the layer's AttentionPlan
    window_reach: int | None = None  # window: the widest head's half-width, uncapped (set at the first eviction)
    _warned: set = field(default_factory=set)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def __enter__(self) -> "PoslshPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    def unpatch(self) -> None:
        """Restore every attention module's own forward and remove the mask hook (idempotent)."""
        if not self.active:
            return
        for info in self.layers:
            if "forward" in info.module.__dict__:
                del info.module.forward
        if self._hook is not None:
            self._hook.remove()
        _unregister_config(self.model.config, self)
        if getattr(self.model, "_poslsh_patch", None) is self:
            del self.model._poslsh_patch
        self.active = False

    def model_mask(self, key: str, original: Any, args: tuple, kwargs: dict) -> Any:
        """The 4-D mask transformers builds for this model (called through its mask registry, ``key``
        being the model's attention implementation)."""
        if (self.family == "falcon" and key == "eager" and _transformers_version() < FALCON_EAGER_BIAS_FIXED):
            self._warn_once("falcon-eager", "this Falcon model runs attn_implementation='eager': transformers < "
                            f"{_version_text(FALCON_EAGER_BIAS_FIXED)}'s eager Falcon attention adds the ALiBi bias "
                            "twice, the patch adds it once as Falcon's SDPA path does, so the patched logits differ "
                            "from this model's own (use attn_implementation='sdpa' to compare)")
        # The patched attention reads the 2-D mask (``attention_mask``), never this one: a [B, 1, 1, 1]
        # "attend" mask keeps every shape the models derive from it linear in the length (Falcon
        # broadcasts it against its [B, H, 1, Nk] bias; MPT converts it with ``.to(torch.bool)``).
        batch = kwargs.get("batch_size", 1)
        return torch.ones((batch, 1, 1, 1), dtype=torch.bool, device=_mask_device(kwargs, self.model))

    def partitions(self, layer: int, n: int, device: torch.device | str = "cpu") -> Partitions | None:
        """The partitions layer ``layer`` uses for a sequence of n positions (None unless the method is
        "lsh" or "hybrid")."""
        parts = self.layers[layer].parts
        return None if parts is None else parts.get(n, device)

    # ------------------------------------------------------------------ attention
    def attend(self, info: _LayerInfo, q: Tensor, k: Tensor, v: Tensor, cache: Any = None) -> Tensor:
        """Causal ALiBi attention of the last Nq positions in the model's position convention.

        Args:
            q: [B, H, Nq, D]; k, v: [B, Hkv, Nk, D] (the whole cached sequence, less any evicted prefix).
            cache: the model's cache object, for eviction (``evict=True``).

        Returns:
            [B, H, Nq, D]; rows of padding queries are 0.
        """
        if getattr(cache, "poslsh_static_window", False):  # hf_graph's fixed-shape cache: no host work here
            return cache.attend(self.layer_plan(info, q.device), q, k, v)
        layer = None
        if self.options.evict and not self.options.spec.rule.all_exact:
            layer = _in_place_layer(cache, info.module.layer_idx)
            if layer is None:
                self._warn_once("no-cache", "evict=True has no effect: this forward ran without a transformers "
                                "DynamicCache (use_cache=False, MPT's default: pass use_cache=True; static, "
                                "sliding and quantized caches are not evicted)")
        evicted = layer.evicted if layer is not None else 0
        rows = self._rows(evicted, k.shape[-2], q.device)
        if rows.keep is None:
            if rows.start is not None:
                out = self._call(info, q, k, v, rows.start)
            else:  # unpadded rows with different evicted offsets (not produced by transformers)
                out = torch.cat([self._call(info, q[b:b + 1], k[b:b + 1], v[b:b + 1], o)
                                 for b, o in enumerate(rows.offsets)])
        else:
            out = self._call_compacted(info, q, k, v, rows)
        if layer is not None:
            self._evict(info, layer, rows, k.shape[-2])
        return out

    def _rows(self, evicted: int, nk: int, device: torch.device) -> "_Rows":
        """What the 2-D mask says about each row's stored keys, computed once per forward and evicted count
        (on the host, from one copy of the mask per forward) and reused by every layer."""
        rows = self.forward_rows.get(("rows", evicted))
        if rows is not None:
            return rows
        mask = self.attention_mask
        if mask is not None and mask.shape[-1] != nk + evicted:
            raise RuntimeError(f"attention_mask covers {mask.shape[-1]} positions but the keys are {nk} "
                               f"(+{evicted} evicted); static or sliding caches are not supported by the poslsh patch")
        if self.mask_host is None:  # no mask, or every position attended: one call, positions evicted..
            rows = _Rows(start=evicted, offsets=[evicted] * (1 if mask is None else mask.shape[0]))
        else:
            host = self.mask_host
            offsets = host[:, :evicted].sum(-1).tolist()  # each row's position (among kept tokens) of its first key
            keep = host[:, evicted:]
            if bool(keep.all()):
                rows = _Rows(start=offsets[0] if len(set(offsets)) == 1 else None, offsets=offsets)
            else:
                rows = _Rows(start=None, offsets=offsets, keep=keep.to(device), keep_host=keep)
        self.forward_rows[("rows", evicted)] = rows
        return rows

    def _call_compacted(self, info: _LayerInfo, q: Tensor, k: Tensor, v: Tensor, rows: "_Rows") -> Tensor:
        """Run each row on its unmasked tokens only; rows with equal lengths and offsets share a call."""
        nq, nk = q.shape[-2], k.shape[-2]
        out = q.new_zeros(q.shape)
        keep = rows.keep
        lengths = rows.keep_host.sum(-1).tolist()
        qlengths = rows.keep_host[:, nk - nq:].sum(-1).tolist()
        groups: dict[tuple[int, int, int], list[int]] = {}
        for b, key in enumerate(zip(lengths, qlengths, rows.offsets)):
            groups.setdefault(key, []).append(b)
        for (length, qlength, offset), members in groups.items():
            if length == 0 or qlength == 0:
                continue
            idx = torch.tensor(members, device=q.device)
            # Indices of the kept keys (and kept queries) in order: a stable sort puts True first.
            korder = torch.argsort((~keep[idx]).to(torch.int8), dim=-1, stable=True)[:, :length]
            qorder = torch.argsort((~keep[idx, nk - nq:]).to(torch.int8), dim=-1, stable=True)[:, :qlength]
            gk = korder[:, None, :, None]
            kc = k[idx].gather(2, gk.expand(-1, k.shape[1], -1, k.shape[-1]))
            vc = v[idx].gather(2, gk.expand(-1, v.shape[1], -1, v.shape[-1]))
            gq = qorder[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1])
            res = self._call(info, q[idx].gather(2, gq), kc, vc, offset)
            sub = out[idx]
            sub.scatter_(2, gq, res)
            out[idx] = sub
        return out

    def _call(self, info: _LayerInfo, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """The layer's attention over keys at positions start..start+Nk-1 (``start``: the evicted prefix),
        through the layer's ``AttentionPlan`` (``layer_plan``), so a decode step does constant host work
        whatever the cache.

        The one place the patch calls the operator."""
        return self.layer_plan(info, q.device)(q, k, v, key_start=start)

    def layer_plan(self, info: _LayerInfo, device: torch.device) -> Any:
        """The layer's ``AttentionPlan`` on ``device``: the method, slopes, partitions and (hybrid) fixed
        widths resolved once per layer and device, then reused."""
        plan = self.plans.get((info.index, device))
        if plan is None:
            from ..attention.plan import AttentionPlan

            o = self.options
            plan = self.plans[(info.index, device)] = AttentionPlan(
                o.spec, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, slopes=self.slopes, causal=True,
                scale=self.scale, device=device, partitions=info.parts, backend=o.backend,
                widths=self.widths if o.spec.rule.near_far else None)  # fixed widths: decoding = recomputation
        return plan

    # ------------------------------------------------------------------ eviction
    def _reach_start(self, info: _LayerInfo, t: int) -> int:
        """First position (among kept tokens) any query at position >= t can see, over all heads: the
        minimum of ``_layer_starts`` (host arithmetic on the slopes and partitions, once per forward and
        layer; the window's in closed form, ``t - max_h w_h``: its widths do not depend on t; LSH's the
        partitions' ``first_reachable``)."""
        rule = self.options.spec.rule
        if rule.band_only:  # window: t - w_h for the widest head, every layer alike, no tensor work
            if self.window_reach is None:
                from ..attention import window_sizes

                self.window_reach = int(window_sizes(self.slopes, self.options.spec.window_eps, UNBOUNDED_WIDTH + 1).max())
            return max(0, t - self.window_reach)
        key = ("reach", info.index, t)
        start = self.forward_rows.get(key)
        if start is None:
            start = self.forward_rows[key] = (info.parts.first_reachable(t) if rule.only_collisions
                                              else int(self._layer_starts(info, t).min()))
        return start

    def _layer_starts(self, info: _LayerInfo, t: int) -> Tensor:
        """Per head, the first key position a query at position >= t can see: int64 [H]."""
        o, rule = self.options, self.options.spec.rule
        h = self.slopes.numel()
        if rule.all_exact:
            return torch.zeros(h, dtype=torch.int64)
        starts = torch.full((h,), t, dtype=torch.int64)
        if rule.collisions:
            starts = info.parts.block_starts_at(t).amin(-1)
        if rule.band_only:  # window
            from ..attention import window_sizes

            starts = (t - window_sizes(self.slopes, o.spec.window_eps, t + 1)).clamp(min=0)
        if rule.near_far:
            starts = torch.minimum(starts, (t - self.widths.clamp(max=t)).clamp(min=0))
        return starts

    def _evict(self, info: _LayerInfo, layer: Any, rows: "_Rows", nk: int) -> None:
        """Drop the stored prefix that no future query of any row and head can reach (host arithmetic only)."""
        drops = []
        for b, o in enumerate(rows.offsets):
            kept = None if rows.keep_host is None else torch.nonzero(rows.keep_host[b]).flatten()
            length = nk if kept is None else kept.numel()
            need = self._reach_start(info, o + length) - o  # unreachable kept keys among the stored ones
            if need <= 0:
                drops.append(0)
            elif need >= length:
                drops.append(nk)
            else:
                drops.append(need if kept is None else int(kept[need]))
        drop = min(min(drops), nk - 1)  # keep one key so the layer never looks empty
        if drop > 0:
            layer.drop(drop)

    def cache_memory(self, cache: Any) -> dict[str, Any]:
        """Bytes a transformers cache holds now and bytes evicted from it (``evict=True``).

        Returns:
            {"stored_bytes", "held_bytes", "evicted_bytes", "saved_fraction",
            "layers": [{"layer", "stored", "held", "evicted"}]}: ``stored``/``held``/``evicted`` counted in key
            positions; ``held`` is what the layer's buffers occupy (stored keys plus the in-place layer's
            free room), ``held_bytes`` the bytes of the storages behind its keys and values.
        """
        stored = held = evicted = 0
        rows = []
        for i, layer in enumerate(getattr(cache, "layers", [])):
            keys = getattr(layer, "keys", None)
            if keys is None or keys.numel() == 0:
                continue
            per_position = 2 * keys.shape[0] * keys.shape[1] * keys.shape[3] * keys.element_size()
            e = getattr(layer, "evicted", 0)
            capacity = layer.capacity if hasattr(layer, "capacity") else keys.shape[2]
            stored += keys.shape[2] * per_position
            held += keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
            evicted += e * per_position
            rows.append({"layer": i, "stored": keys.shape[2], "held": capacity, "evicted": e})
        total = stored + evicted
        return {"stored_bytes": stored, "held_bytes": held, "evicted_bytes": evicted,
                "saved_fraction": evicted / total if total else 0.0, "layers": rows}

    # ------------------------------------------------------------------ cache report
    def reachable_starts(self, length: int) -> Tensor:
        """First key position any future query (position >= ``length``) can see, per layer and head.

        A future query i >= T sees key j < T in sample t iff j and i share a block; blocks are
        contiguous, so iff j lies in the block of position T: j >= start_t(T). Over the r samples the
        reachable keys are j >= min_t start_t(T). Window attention: j >= T - w_h; hybrid: the smaller
        of the two. Exact: 0.

        Returns:
            int64 [L, H] (L attention layers).
        """
        return torch.stack([self._layer_starts(info, length) for info in self.layers])


def cache_report(patch: PoslshPatch | nn.Module, length: int, batch_size: int = 1,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """How much of a KV cache of ``length`` tokens no future query can reach under the patch's method.

    ``saved_bytes`` counts unreachable (key, value) pairs per KV head (what a per-head cache could
    free); ``saved_bytes_rectangular`` only the prefix unreachable for every KV head of a layer (what
    ``evict=True`` drops from a rectangular [B, Hkv, N, D] cache). Computed, nothing is evicted here.

    Returns:
        {"length", "total_bytes", "saved_bytes", "saved_fraction", "saved_bytes_rectangular",
        "layers": [{"layer", "unreachable_per_kv_head", "rectangular_prefix"}]}.
    """
    if not isinstance(patch, PoslshPatch):
        patch = getattr(patch, "_poslsh_patch", None)
        if patch is None:
            raise ValueError("the model is not patched by poslsh")
    starts = patch.reachable_starts(length)
    elem = torch.empty((), dtype=dtype).element_size()
    total = saved = rect = 0
    layers = []
    for info, s in zip(patch.layers, starts):
        group = info.num_heads // info.num_kv_heads
        # A KV head serves `group` query heads: its key is reachable if any of them reaches it.
        kv_start = s.reshape(info.num_kv_heads, group).amin(-1)
        per_pair = 2 * info.head_dim * elem * batch_size
        total += length * info.num_kv_heads * per_pair
        saved += int(kv_start.sum()) * per_pair
        prefix = int(kv_start.min())
        rect += prefix * info.num_kv_heads * per_pair
        layers.append({"layer": info.index, "unreachable_per_kv_head": kv_start.tolist(), "rectangular_prefix": prefix})
    return {"length": length, "method": patch.options.method, "total_bytes": total, "saved_bytes": saved,
            "saved_fraction": saved / total if total else 0.0, "saved_bytes_rectangular": rect, "layers": layers}


@dataclass(eq=False)
class _Rows:
    """Per forward and evicted count: ``start`` the common position of the first stored key (None when
    rows differ), ``offsets`` each row's, and for padded batches ``keep`` [B, Nk] (device) / ``keep_host``
    (which stored positions are real tokens)."""
    start: int | None
    offsets: list[int]
    keep: Tensor | None = None
    keep_host: Tensor | None = None


_IN_PLACE_LAYER: Any = None


def grown(columns: int) -> int:
    """The capacity an ``InPlaceLayer`` buffer is reallocated to when ``columns`` must fit: 1.5x (a full
    exact cache at a long context is the largest allocation a patched model makes; doubling it would let
    the first decoding step after a prompt need 3x the cache), at least one spare column."""
    return columns + max(1, columns // 2)


def _in_place_layer_class() -> type:
    """``InPlaceLayer``, a transformers ``DynamicLayer`` that appends in place and can drop a prefix
    (built on first use: importing this module does not import transformers)."""
    global _IN_PLACE_LAYER
    if _IN_PLACE_LAYER is not None:
        return _IN_PLACE_LAYER
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A cache layer that stores keys and values in one buffer [B, Hkv, capacity, D] per tensor, the
        stored ones in its columns begin..end-1, so appending is a write after ``end`` and dropping a
        prefix (``drop``, eviction) is moving ``begin``.

        ``keys``/``values`` (what transformers and the patch read) are views of the stored columns. The
        first update stores its keys exactly (a prompt takes no spare room). When an append does not fit,
        the stored columns are moved to the buffer's front if they fit in its first half (source and
        target never overlap), else copied into a buffer of ``grown(stored + new)`` columns (1.5x); a drop
        that leaves the buffer less than a quarter full copies the stored columns into a buffer of twice
        their size, which frees the dropped prefix. Each appended position is copied O(1) times on
        average, and a layer holds at most 1.5x its stored keys after an append (4x after a drop), where
        DynamicLayer's ``torch.cat`` copies the whole cache at every step.
        ``get_seq_length`` is the logical length (``evicted`` + stored), so transformers' positions and
        masks count the dropped tokens. Operations transformers applies to ``keys`` itself (crop, beam
        reordering, batch selection) leave a tensor the next ``update`` adopts as its buffer.
        """

        def __init__(self) -> None:
            super().__init__()
            self.evicted = 0
            self.buffer_keys = self.buffer_values = self.shown_keys = self.shown_values = None
            self.begin = self.end = 0

        @property
        def capacity(self) -> int:
            return 0 if self.buffer_keys is None else self.buffer_keys.shape[2]

        def show(self) -> None:
            self.keys = self.shown_keys = self.buffer_keys[:, :, self.begin:self.end]
            self.values = self.shown_values = self.buffer_values[:, :, self.begin:self.end]

        def adopt(self) -> None:
            """Take ``keys``/``values`` as the buffer when something other than this class set them."""
            if self.buffer_keys is not None and self.keys is self.shown_keys and self.values is self.shown_values:
                return
            if self.keys is None or self.keys.numel() == 0:
                self.buffer_keys = self.buffer_values = None
                self.begin = self.end = 0
                return
            self.buffer_keys, self.buffer_values = self.keys, self.values
            self.begin, self.end = 0, self.keys.shape[2]

        def reallocate(self, capacity: int) -> None:
            stored = self.end - self.begin
            keys, values = self.keys, self.values
            shape = (*keys.shape[:2], capacity, keys.shape[3])
            self.buffer_keys = keys.new_empty(shape)
            self.buffer_values = values.new_empty((*shape[:3], values.shape[3]))
            self.buffer_keys[:, :, :stored] = keys
            self.buffer_values[:, :, :stored] = values
            self.begin, self.end = 0, stored

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.adopt()
            n = key_states.shape[2]
            if self.buffer_keys is None:
                self.buffer_keys, self.buffer_values = key_states.clone(), value_states.clone()
                self.begin, self.end = 0, n
                self.show()
                return self.keys, self.values
            stored = self.end - self.begin
            if self.end + n > self.capacity:
                if 2 * (stored + n) <= self.capacity:  # fits in the first half: move the stored columns
                    self.buffer_keys[:, :, :stored] = self.keys
                    self.buffer_values[:, :, :stored] = self.values
                    self.begin, self.end = 0, stored
                else:
                    self.reallocate(grown(stored + n))
            self.buffer_keys[:, :, self.end:self.end + n] = key_states
            self.buffer_values[:, :, self.end:self.end + n] = value_states
            self.end += n
            self.show()
            return self.keys, self.values

        def drop(self, count: int) -> None:
            """Forget the first ``count`` stored positions (they stay counted in the logical length)."""
            self.adopt()
            self.begin += count
            self.evicted += count
            self.show()
            stored = self.end - self.begin
            if 4 * stored < self.capacity:
                self.reallocate(2 * stored)
                self.show()

        def crop(self, length: int) -> None:
            """Keep the first ``length`` logical positions, or remove ``-length`` when negative (both
            conventions transformers has used); what was evicted cannot be cropped back into."""
            self.adopt()
            logical = self.get_seq_length()
            remove = -length if length < 0 else logical - length
            if remove <= 0 or self.buffer_keys is None:
                return
            if remove > self.end - self.begin - 1:
                raise ValueError(f"cannot crop {remove} positions from a layer that stores "
                                 f"{self.end - self.begin} after evicting {self.evicted}")
            self.end -= remove
            self.show()

        def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
            n = super().get_seq_length(*args, **kwargs)
            return n + self.evicted if n > 0 else 0

        def reset(self) -> None:
            super().reset()
            # Empty whatever the release's reset does (5.2 zeroes the tensors and keeps their length).
            self.keys = self.values = self.buffer_keys = self.buffer_values = self.shown_keys = self.shown_values = None
            self.is_initialized = False
            self.evicted = 0
            self.begin = self.end = 0

    _IN_PLACE_LAYER = InPlaceLayer
    return InPlaceLayer


def _in_place_layer(cache: Any, layer_idx: int) -> Any:
    """The cache's layer ``layer_idx`` as an ``InPlaceLayer`` (a plain ``DynamicLayer`` is replaced by
    one that adopts its keys), or None when the cache is not a ``DynamicCache`` of such layers."""
    cls = _in_place_layer_class()
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx < len(layers) and type(layers[layer_idx]) is cls:
        return layers[layer_idx]  # every step after the first: no import, no isinstance of the cache
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache):
        return None
    while len(layers) <= layer_idx:
        layers.append(cls())
    layer = layers[layer_idx]
    if type(layer) is DynamicLayer:  # exactly: sliding and other subclasses keep their own layout
        new = cls()
        if layer.is_initialized:
            new.lazy_initialization(layer.keys, layer.values)
            new.keys, new.values = layer.keys, layer.values
        layers[layer_idx] = layer = new
    return layer if isinstance(layer, cls) else None


# ---------------------------------------------------------------------- per-family forwards
def _find_cache(args: dict[str, Any]) -> Any:
    extra = args.get("kwargs") or {}
    for name in _CACHE_NAMES:
        for src in (args, extra):
            if src.get(name) is not None:
                return src[name]
    return None


def _update_cache(cache: Any, k: Tensor, v: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
    """The layer's keys and values [B, Hkv, Nk, D] after appending k, v [B, Hkv, n, D] to the cache (the
    module docstring's "The cache's layers": an ``InPlaceLayer`` in place of a ``DynamicLayer``)."""
    if cache is None:
        return k, v
    if getattr(cache, "poslsh_static_window", False):  # hf_graph's fixed buffers: nothing to swap in
        return cache.update(k, v, layer_idx)
    if _in_place_layer(cache, layer_idx) is None:  # before the update, so the prompt goes into its buffer
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise NotImplementedError(f"the poslsh patch supports DynamicCache (the default) or no cache, got "
                                      f"{type(cache).__name__}")
    return cache.update(k, v, layer_idx)


def _heads_to_hidden(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _bloom_forward(patch: PoslshPatch, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
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


def _mpt_forward(patch: PoslshPatch, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
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


def _falcon_forward(patch: PoslshPatch, info: _LayerInfo, self: nn.Module, a: dict[str, Any]):
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


def _make_forward(patch: PoslshPatch, info: _LayerInfo, family: str):
    signature, names = _argument_names(type(info.module).forward)
    body = _FORWARDS[family]

    def forward(self: nn.Module, *args: Any, **kwargs: Any):
        return body(patch, info, self, _arguments(signature, names, (self, *args), kwargs))

    return types.MethodType(forward, info.module)


def _mask_hook(patch: PoslshPatch, base: nn.Module):
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


def _patch_for_config(config: Any) -> "PoslshPatch | None":
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


def _register_config(config: Any, patch: "PoslshPatch") -> None:
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


def _unregister_config(config: Any, patch: "PoslshPatch") -> None:
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


def patch_model(model: nn.Module, method: str | MethodSpec = "exact", samples: int | None = None,
                scheme: str | None = None, seed: int = 0, window_eps: float | None = None, backend: str = "auto",
                evict: bool = False, slopes: Tensor | list[float] | None = None, sampling: str | None = None,
                hybrid_eps: float | None = None) -> PoslshPatch:
    """Switch a loaded BLOOM, MPT or Falcon(alibi) model's attention to ``poslsh.attention``.

    Args:
        model: a transformers model of a supported family (``...ForCausalLM`` or the base model).
        method: "exact" (the default), "window", "lsh" or "hybrid", as ``poslsh.attention`` takes them,
            or a ``poslsh.method.MethodSpec`` (which holds samples, scheme, sampling, window_eps and
            hybrid_eps: leave those unset then).
        samples: r, the number of LSH partitions per head ("lsh", "hybrid"; default 8).
        scheme: "grid" (default) or "cut".
        seed: partitions of layer l are drawn from (seed, l); the same seed gives the same partitions
            for every sequence length, batch layout and cache use.
        window_eps: dropped-weight bound of the window baseline (default 1e-3).
        backend: passed to ``poslsh.attention``.
        evict: with "lsh", "hybrid" or "window" and a transformers ``DynamicCache``, drop from the cache
            every key that no future query can reach (the prefix common to all heads and rows of a
            layer) after each forward; ``PoslshPatch.cache_memory(cache)`` reports what was freed.
            Warns once when it cannot act (method "exact", or a forward without such a cache).
        slopes: replace the model's own ALiBi slopes [H] (for studies; "exact" then no longer
            reproduces the model).
        sampling: "iid" (default), "stratified" or "qmc": joint law of a head's r partitions (grid only).
        hybrid_eps: the hybrid near field's target error (sets its widths, fixed per head; default 1e-2).

    Returns:
        A ``PoslshPatch``: call ``.unpatch()`` or use it as a context manager. Patching an already
        patched model replaces the previous patch.

    Warns:
        once, when the installed transformers is outside the tested range (``TESTED_TRANSFORMERS``);
        once, at its first forward, for an eager Falcon on transformers < 5.25 (its own eager attention
        applies the ALiBi bias twice; the patch applies it once, as Falcon's SDPA path does: see the
        module docstring).
    """
    _check_transformers()
    family = model_family(model)
    spec = as_method(method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                     hybrid_eps=hybrid_eps)  # every option checked here, once
    seed, evict = as_int(seed, "seed"), as_bool(evict, "evict")  # ("yes" was true, 2.7 was 2)
    check_backend_name(backend)  # (else refused at the first forward, mid-generation)
    unpatch_model(model)
    own, scale = model_slopes(model)
    if slopes is None:
        slopes = own
    else:
        from ..alibi import check_slopes

        slopes = check_slopes(slopes)
        if slopes.numel() != own.numel():
            raise ValueError(f"slopes must have one value per head ({own.numel()}), got {slopes.numel()}")
    if evict and spec.rule.all_exact:
        warnings.warn("evict=True has no effect with method='exact': every cached key stays reachable", stacklevel=2)
    options = _Options(spec, seed, backend, evict)
    patch = PoslshPatch(model, family, options, slopes, scale)
    if spec.rule.near_far:
        from ..attention.window import hybrid_widths

        w = hybrid_widths(slopes, spec.hybrid_eps, spec.samples, HYBRID_WIDTH_N)
        patch.widths = torch.where(w >= HYBRID_WIDTH_N - 1, UNBOUNDED_WIDTH, w)
    modules = [m for m in model.modules() if type(m).__name__ in _ATTN_CLASSES[family]]
    if not modules:
        raise ValueError(f"no {family} attention module found in {type(model).__name__}")
    for pos, module in enumerate(modules):
        index = module.layer_idx if getattr(module, "layer_idx", None) is not None else pos
        heads = _num_heads(module)
        kv_heads = _falcon_kv_heads(model.config, heads) if family == "falcon" else heads
        parts = (LayerPartitions(slopes, spec.samples, spec.scheme, options.seed, index, sampling=spec.sampling)
                 if spec.random else None)
        info = _LayerInfo(module, index, heads, kv_heads, module.head_dim, parts)
        patch.layers.append(info)
    for info in patch.layers:
        info.module.forward = _make_forward(patch, info, family)
    patch._hook = _mask_hook(patch, model.base_model)
    _register_config(model.config, patch)
    model._poslsh_patch = patch
    return patch


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


def unpatch_model(model: nn.Module) -> None:
    """Restore the model's own attention if ``patch_model`` patched it (no-op otherwise)."""
    patch = getattr(model, "_poslsh_patch", None)
    if patch is not None:
        patch.unpatch()
