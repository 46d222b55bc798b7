"""The patch itself: ``patch_model`` builds a ``PoslshPatch`` and swaps every attention module's forward
(models.py) and the mask hooks (masks.py) in; ``PoslshPatch.attend`` is where the model's q, k, v meet
``poslsh.attention``; ``unpatch_model`` undoes it all.

Positions. The patched attention reproduces each model's position convention under padding: BLOOM
and Falcon place the ALiBi bias at the position ``cumsum(attention_mask) - 1`` (padding does not
count), MPT at the raw index, and both agree for left or right padding. We run the operator on the
*compacted* sequence of each row (its unmasked tokens, in order), so a token's position is its index
among unmasked tokens: distances are those of the model, and a padded row sees exactly the LSH
partitions an unpadded one would. Rows with the same compacted length share one operator call.

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

Host work per decode step. The mask pre-hook (masks.py) reads the 2-D mask once per model forward (one
``all()``, and one host copy when some position is masked); the row offsets, kept positions and
eviction arithmetic every layer needs are derived from it on the host once per forward (``_rows``) and
reused, so a layer does no host-device synchronisation of its own. ``_call`` is the one place the
operator is called, through the layer's ``AttentionPlan``. A layer's forward names its arguments without
``inspect.Signature.bind`` (``_arguments``, models.py), finds its cache layer without an import or type check after
the first step, appends in place, and computes the window's eviction point in closed form; a decoding
step on the torch backends computes every head at once (``fused.few_rows_attention``, its exact/window
weights a view of the plan's table). ``bench/host_overhead.py --model tiny-bloom`` times a tiny BLOOM's
decoding per token (compute negligible, so host work) against transformers' own attention.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...attention.dispatch import check_backend_name
from ...attention.plan import HYBRID_WIDTH_N
from ...checks import as_bool, as_int
from ...hashing import UNBOUNDED_WIDTH, Partitions
from ...layer_partitions import LayerPartitions
from ...method import MethodSpec, as_method
from .cache import _in_place_layer
from .masks import _mask_device, _mask_hook, _register_config, _unregister_config
from .models import _ATTN_CLASSES, _LayerInfo, _falcon_kv_heads, _make_forward, _num_heads, model_family, model_slopes
from .versions import FALCON_EAGER_BIAS_FIXED, _check_transformers, _transformers_version, _version_text


@dataclass
class _Options:
    spec: MethodSpec
    seed: int
    backend: str
    evict: bool = False

    @property
    def method(self) -> str:
        return self.spec.method


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
            from ...attention.plan import AttentionPlan

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
                from ...attention import window_sizes

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
            from ...attention import window_sizes

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


@dataclass(eq=False)
class _Rows:
    """Per forward and evicted count: ``start`` the common position of the first stored key (None when
    rows differ), ``offsets`` each row's, and for padded batches ``keep`` [B, Nk] (device) / ``keep_host``
    (which stored positions are real tokens)."""
    start: int | None
    offsets: list[int]
    keep: Tensor | None = None
    keep_host: Tensor | None = None


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
        applies the ALiBi bias twice; the patch applies it once, as Falcon's SDPA path does: see
        models.py's docstring).
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
        from ...alibi import check_slopes

        slopes = check_slopes(slopes)
        if slopes.numel() != own.numel():
            raise ValueError(f"slopes must have one value per head ({own.numel()}), got {slopes.numel()}")
    if evict and spec.rule.all_exact:
        warnings.warn("evict=True has no effect with method='exact': every cached key stays reachable", stacklevel=2)
    options = _Options(spec, seed, backend, evict)
    patch = PoslshPatch(model, family, options, slopes, scale)
    if spec.rule.near_far:
        from ...attention.window import hybrid_widths

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


def unpatch_model(model: nn.Module) -> None:
    """Restore the model's own attention if ``patch_model`` patched it (no-op otherwise)."""
    patch = getattr(model, "_poslsh_patch", None)
    if patch is not None:
        patch.unpatch()
