"""Greedy decoding of a patched transformers model, each step replayed from one CUDA graph: ``GraphedDecoder``.

    from poslsh.integrations.hf import patch_model
    from poslsh.integrations.hf_graph import GraphedDecoder
    with patch_model(model, method="window", window_eps=1e-3, evict=True):
        tokens = GraphedDecoder(model).generate(input_ids, max_new_tokens=64, chunk_size=4096)  # [1, n + 64]

Why. A decode step of a patched model is host-bound: a BLOOM-560m shape spends ~1.6 ms per token in
GPU kernels and 17-19 ms in the Python of transformers' layers and of the patch. A CUDA graph records the
kernels of one step once and replays them with one launch, so a step costs its kernels, not its Python.
A graph needs fixed shapes and addresses and no host read of device data while it is recorded; the
patch's ``DynamicCache`` grows by one position per step, so decoding here uses a cache of fixed shape.

The static window cache (``StaticWindowCache``). Method "window" weighs, per head h, only the keys within
w_h positions of the query; its plan's ``reach`` is the widest w_h. Every key a future query can weigh is
then among the C = reach + 1 newest positions. Each layer holds keys and values in fixed buffers
[1, Hkv, C, D]: between steps the C - 1 newest positions sit in slots 1..C-1 (the newest at C - 1; slot
0 is stale); a step shifts them left by one slot and writes the new position at C - 1 (device copies of
static shape), so the query is always at slot C - 1 and ``q_offset = C - 1`` is constant. ALiBi weights
depend on distances only, so attention over the buffer equals the window's attention over the whole
sequence (the keys before the buffer are beyond every head's band: weight 0). After a prompt shorter
than C - 1 tokens the front slots hold no position; ``filled`` [1, C] (True = a position) is the plan's
key padding mask, shifted with the keys, so no empty slot is weighed (and the empty slots hold zeros).

What transformers derives from the cache stays constant: ``get_seq_length()`` is C - 1 (the positions the
buffers hold before a step appends one), so every shape the models build from it (BLOOM's and Falcon's
ALiBi tensors, the mask sizes, Falcon's position ids) is the same at every step; the patched attention
reads none of them (distances come from the slots). The step passes no 2-D ``attention_mask``, so the
patch's mask hook reads nothing on the host either.

Prefill. The prompt goes through the ordinary patched path (``hf.chunked_prefill``, with or without
``evict=True``: eviction keeps at least the reach's newest positions, all that is copied), then the
newest min(n, C - 1) keys and values of each layer are copied into the buffers' last slots and the first
token is the argmax of the last logits. The buffers are allocated at the first prefill and reused by
later ones (same addresses), so one graph serves every prompt.

Capture. The first ``step`` after construction runs eagerly on a side stream (the plans pick their
backend for the masked call, Triton compiles, the kernels' plan reads its reach once: all the host work
a graph cannot record), then the same step is recorded (recording executes nothing); every later step
replays it: the graph reads the token buffer and the cache buffers and writes the next token into the
token buffer. If recording fails, the error says where an eager step synchronises with the host
(``torch.cuda.set_sync_debug_mode("error")``), the usual cause; ``graph=False`` runs the same step
eagerly (the CPU path, and the reference the graph is tested against).

Supported: a model patched by ``patch_model`` with method "window" (every head's slope > 0, so the reach
is finite), the families the patch supports, one unpadded sequence (batch 1), greedy decoding of exactly
``max_new_tokens`` tokens (no stopping at an end-of-sequence token: that would be a host read per step).
Refused with a ValueError: "exact" (every cached key stays reachable, so the cache grows with the
sequence and no fixed shape holds it), "lsh" and "hybrid" (their partitions depend on the absolute
position, so a step would need per-step block offsets on the device, which a recorded graph cannot
take yet), a batch of several sequences or a padded one. The eager step is tested on transformers 5.2 and
5.25. Recording was written against 5.25's source, where no BLOOM, MPT or Falcon forward reads the device
or copies host values to it; older releases may (5.2's BLOOM builds its slopes with
``torch.tensor(..., device=...)``), and if a capture refuses that, its error names the line.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .hf import PoslshPatch, chunked_prefill
from .hf.prefill import _cache_argument

__all__ = ["GraphedDecoder", "StaticWindowCache", "StaticWindowLayer"]

REFUSED = {
    "exact": "every cached key stays reachable, so the cache grows with the sequence and no fixed shape holds it",
    "lsh": "its partitions depend on the absolute position, so each step would need new block offsets on the "
           "device, which a recorded graph cannot take yet",
}
REFUSED["hybrid"] = REFUSED["lsh"]


def shift_in(buffer: Tensor, new: Tensor) -> None:
    """In place (same address): ``buffer`` [..., C, D] <- its last C - 1 slots followed by ``new`` [..., 1, D].

    The source slots are cloned first: a copy between overlapping slices of one tensor is undefined."""
    buffer[..., :-1, :].copy_(buffer[..., 1:, :].clone())
    buffer[..., -1:, :].copy_(new)


class StaticWindowLayer(DynamicLayer):
    """One layer's keys and values in fixed buffers [1, Hkv, C, D] (module docstring): ``update`` takes
    one new position and shifts it in; ``get_seq_length`` is C - 1 whatever has been decoded."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)  # the release's own bookkeeping (device, dtype, initialised)
        self.keys, self.values = keys, values

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """key_states, value_states [1, Hkv, 1, D] -> the buffers [1, Hkv, C, D], the new position at C - 1."""
        if key_states.shape[-2] != 1:
            raise ValueError(f"a static window cache takes one new position per forward (decoding), got "
                             f"{key_states.shape[-2]}")
        shift_in(self.keys, key_states)
        shift_in(self.values, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        """C - 1, the positions held before a step appends one: every length transformers derives from it
        (mask sizes, ALiBi tensors, position ids) is the same at every step."""
        return self.keys.shape[-2] - 1


class StaticWindowCache(Cache):
    """A transformers ``Cache`` of ``StaticWindowLayer``s and the slots that hold a position.

    Args:
        layers: one ``StaticWindowLayer`` per attention layer, all of C slots.
        filled: bool [1, C], True where the slots hold a position (the plans' key padding mask).

    ``advance()`` shifts ``filled`` by one slot and marks the last; the decoder calls it once per step,
    before the forward whose layers shift their keys in.
    """

    poslsh_static_window = True  # what the patched attention (hf/patch.py, hf/cache.py) recognises this cache by

    def __init__(self, layers: list[StaticWindowLayer], filled: Tensor) -> None:
        super().__init__(layers=layers)
        self.filled = filled
        self.window = filled.shape[-1]
        self.true = torch.ones((1, 1, 1), dtype=torch.bool, device=filled.device)

    def advance(self) -> None:
        shift_in(self.filled[..., None], self.true)

    def attend(self, plan: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The newest position's attention, q [1, H, 1, D], over a layer's buffers k, v [1, Hkv, C, D]."""
        return plan(q, k, v, q_offset=self.window - 1, key_padding_mask=self.filled)

    def nbytes(self) -> int:
        """Bytes of the key and value buffers of every layer."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))


class GraphedDecoder:
    """Greedy decoding of a model patched with method "window", one CUDA graph replay per token (module
    docstring).

    Args:
        model: a ``...ForCausalLM`` patched by ``poslsh.integrations.hf.patch_model(model, method="window",
            ...)`` (with or without ``evict=True``).
        graph: record the decode step in a CUDA graph (default: when the model is on a CUDA device);
            False runs the same static-cache step eagerly.

    Attributes:
        window: C, the slots per layer (the window's reach + 1). cache: the ``StaticWindowCache`` (after
        the first prefill). token: [1, 1] the newest token (the graph's input and output). logits: [1, vocab]
        those it is the argmax of (the prompt's last, then each step's). length: the positions the cache has
        seen (prompt + decoded steps).
    """

    def __init__(self, model: nn.Module, graph: bool | None = None) -> None:
        patch = getattr(model, "_poslsh_patch", None)
        if not isinstance(patch, PoslshPatch) or not patch.active:
            raise ValueError("model must be patched by poslsh.integrations.hf.patch_model(model, method='window', ...)")
        method = patch.options.spec.method
        if method in REFUSED:
            raise ValueError(f"GraphedDecoder needs a model patched with method='window', got method={method!r}: "
                             f"{REFUSED[method]}")
        self.device = next(model.parameters()).device
        if graph is None:
            graph = self.device.type == "cuda"
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True records a CUDA graph: the model must be on a CUDA device, got {self.device}")
        reaches = [patch.layer_plan(info, self.device).reach for info in patch.layers]
        if any(r is None for r in reaches):
            raise ValueError("the window reaches every key (a head with slope 0): no fixed window holds the cache")
        self.model, self.patch, self.graph = model, patch, bool(graph)
        self.window = max(reaches) + 1
        self.cache: StaticWindowCache | None = None
        self.token: Tensor | None = None
        self.logits: Tensor | None = None
        self.length = 0
        self.ready = False  # a prefill has filled the cache and nothing has left it inconsistent since
        self.cuda_graph: Any = None
        self.cache_argument = _cache_argument(model)

    # -- prefill --------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, chunk_size: int | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """Read a prompt through the patched model and load the static cache with its newest positions.

        Args:
            input_ids: [1, n] token ids.
            chunk_size: tokens per prefill forward (``hf.chunked_prefill``); default n (one forward).
            attention_mask: [1, n] of ones, or None (a padded prompt is refused).

        Returns:
            the logits of position n - 1, [1, vocab]; ``token`` holds their argmax (the first new token).
        """
        if getattr(self.model, "_poslsh_patch", None) is not self.patch or not self.patch.active:
            raise RuntimeError("the model's patch changed since this GraphedDecoder was built: build a new one")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, length]: GraphedDecoder decodes one sequence (batch 1), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise ValueError("attention_mask must be all ones: GraphedDecoder decodes one unpadded sequence")
        n = input_ids.shape[1]
        self.ready = False
        dynamic, logits = chunked_prefill(self.model, input_ids, n if chunk_size is None else chunk_size)
        self._load(dynamic.layers, min(n, self.window - 1))
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.length, self.ready = n, True
        return logits

    def _load(self, layers: list, keep: int) -> None:
        """Copy the newest ``keep`` positions of each layer of the prefill's cache into the buffers' last
        slots (allocated at the first call), zero the others, and mark the filled slots."""
        c = self.window
        if self.cache is None:
            static = []
            for layer in layers:
                k, v = layer.keys, layer.values
                static.append(StaticWindowLayer(k.new_zeros((*k.shape[:2], c, k.shape[3])),
                                                v.new_zeros((*v.shape[:2], c, v.shape[3]))))
            self.cache = StaticWindowCache(static, torch.zeros((1, c), dtype=torch.bool, device=self.device))
            self.token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        for target, layer in zip(self.cache.layers, layers, strict=True):
            stored = layer.keys.shape[-2]
            if stored < keep:
                raise RuntimeError(f"the prefill's cache holds {stored} positions, fewer than the window's {keep}")
            for buffer, source in ((target.keys, layer.keys), (target.values, layer.values)):
                buffer[:, :, :c - keep].zero_()
                buffer[:, :, c - keep:].copy_(source[:, :, stored - keep:])
        self.cache.filled.zero_()
        self.cache.filled[:, c - keep:] = True

    # -- decoding -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Tensor:
        """One greedy step: the model reads ``token`` against the cache and ``token`` becomes the next token.

        Returns:
            ``token`` [1, 1] itself (overwritten by the next step or prefill: clone it to keep it); ``logits``
            holds the step's logits.
        """
        if not self.ready:
            raise RuntimeError("call prefill (or generate) first: the static cache holds no prompt")
        if not self.graph:
            self._forward()
        elif self.cuda_graph is None:
            self._capture()
        else:
            self.cuda_graph.replay()
        self.length += 1
        return self.token

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, chunk_size: int | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        """Prefill, then greedy decoding of exactly ``max_new_tokens`` tokens.

        Returns:
            [1, n + max_new_tokens]: the prompt followed by the new tokens, as ``model.generate`` returns them.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.prefill(input_ids, chunk_size, attention_mask)
        n = input_ids.shape[1]
        out = torch.empty((1, n + max_new_tokens), dtype=torch.long, device=self.device)
        out[:, :n] = input_ids
        out[:, n:n + 1] = self.token
        for i in range(n + 1, n + max_new_tokens):
            out[:, i:i + 1] = self.step()
        return out

    def _forward(self) -> None:
        """The decode step, as recorded: shift the filled slots, run the model on ``token``, write its logits
        and their argmax into the decoder's buffers (what a replay leaves to read)."""
        self.cache.advance()
        out = self.model(input_ids=self.token, use_cache=True, **{self.cache_argument: self.cache})
        self.logits.copy_(out.logits[:, -1])
        self.token.copy_(self.logits.argmax(-1, keepdim=True))

    def _capture(self) -> None:
        """Run the step eagerly on a side stream (the host work of first calls), then record it."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._forward()
        except Exception as err:
            self.ready = False  # the diagnosis below runs a step: the cache no longer matches the tokens
            raise RuntimeError(f"recording the decode step in a CUDA graph failed ({type(err).__name__}: {err}); "
                               f"{self._sync_site()}. GraphedDecoder(model, graph=False) decodes without a graph; "
                               "prefill again before decoding") from err
        self.cuda_graph = graph

    def _sync_site(self) -> str:
        """Where an eager step synchronises the host with the device, the usual reason recording fails: the
        innermost frame of the error ``torch.cuda.set_sync_debug_mode("error")`` raises there."""
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._forward()
        except RuntimeError as err:
            frame = traceback.extract_tb(err.__traceback__)[-1]
            return f"an eager step synchronises at {frame.filename}:{frame.lineno}: {frame.line}"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return "an eager step does not synchronise (look for an operation a graph cannot record)"
