"""The model's KV cache, as the patched attention uses it: found among a forward's arguments
(``_find_cache``), appended to in place (``_update_cache``, ``InPlaceLayer``), a prefix dropped when
``evict=True`` (what to drop is the patch's arithmetic, patch.py).

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
by its ``poslsh_static_window`` marker (hf_graph builds on this package, so it is not imported here).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

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


_CACHE_NAMES = ("layer_past", "cache", "past_key_values", "past_key_value")


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
