"""Drop-in attention module for transformer blocks: projections, heads, grouped KV, ALiBi by method.

``ALiBiAttention`` maps x [B, N, E] to [B, N, E] with ``poslsh.attention`` in the middle. Its method
is a ``poslsh.method.MethodSpec``, given as one or as a name and options, and checked when the module
is built (numbers may be numpy scalars or 0-d tensors), so a bad ``window_eps`` fails at
construction, not at the first forward. The default is "exact": nothing is approximated unless asked.

For "lsh" and "hybrid" the partitions are

* training: freshly sampled at every forward (from torch's global CPU RNG, so ``torch.manual_seed``
  makes a run reproducible, or from a seed schedule: ``set_partition_schedule``), which keeps the
  estimator unbiased across steps;
* eval: fixed, ``poslsh.layer_partitions.LayerPartitions(slopes, r, scheme, seed, layer)``: drawn
  from (seed, layer) alone (seed 0 when ``seed`` is None), the partitions of a shorter length the
  restriction of those of a longer one, kept for the ``EVAL_CACHE_SIZE`` most recently used lengths
  (a length evicted and asked for again is drawn again, identically), so evaluation is
  deterministic and repeatable.

An explicit ``partitions`` argument to ``forward`` overrides both.

In eval mode the module holds a ``poslsh.attention.plan.AttentionPlan`` per device (its method, slopes
and eval partitions resolved once) and calls it: constant host work per call, a CPU call reads only the
keys its method reaches. Its "window" widths are those of ``poslsh.attention`` for any length; its
"hybrid" near field is the length-free one (``plan.HYBRID_WIDTH_N``, the transformers patch's), so a
prefix's outputs do not change as the sequence grows. Training calls go through ``poslsh.attention``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .alibi import alibi_slopes
from .attention import attention
from .attention.dispatch import check_backend_name
from .attention.plan import AttentionPlan
from .cache_keys import version_key
from .checks import as_bool, as_int
from .hashing import Partitions, sample_partitions
from .layer_partitions import LayerPartitions
from .method import MethodSpec, as_method

__all__ = ["ALiBiAttention"]


class ALiBiAttention(nn.Module):
    """Multi-head self-attention with ALiBi (exact, windowed, positional LSH or the hybrid).

    Args:
        embed_dim: E, model width; divisible by num_heads (head dim D = E / H).
        num_heads: H, query heads, with Press slopes ``alibi_slopes(H)``.
        num_kv_heads: Hkv, key/value heads (grouped / multi-query attention); H divisible by it.
            Default H.
        method: "exact" (the default), "window", "lsh" or "hybrid", or a ``MethodSpec`` (then the five
            options below stay unset: it holds them).
        samples: r, partitions per head for "lsh" and "hybrid" (default 8).
        scheme: "grid" (default) or "cut".
        window_eps: truncation level for "window" (default 1e-3).
        causal: decoder (True) or encoder (False) attention.
        bias: whether the projections have biases.
        backend: passed to ``poslsh.attention``.
        seed: seed of the fixed eval-mode partitions (0 if None).
        sampling: "iid" (default), "stratified" or "qmc" (correlated samples, each with the exact law;
            grid only).
        hybrid_eps: target error of the near field for "hybrid" (default 1e-2; see ``poslsh.attention``).
        layer: the layer's index in a model: the eval partitions are drawn from (seed, layer).
    """

    EVAL_CACHE_SIZE = 4  # sequence lengths whose eval partitions are kept (least recently used dropped)

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 method: str | MethodSpec = "exact", samples: int | None = None, scheme: str | None = None,
                 window_eps: float | None = None, causal: bool = True, bias: bool = False, backend: str = "auto",
                 seed: int | None = None, sampling: str | None = None, hybrid_eps: float | None = None,
                 layer: int = 0) -> None:
        super().__init__()
        embed_dim, num_heads = as_int(embed_dim, "embed_dim", minimum=1), as_int(num_heads, "num_heads", minimum=1)
        num_kv_heads = num_heads if num_kv_heads is None else as_int(num_kv_heads, "num_kv_heads", minimum=1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
        spec = as_method(method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                         hybrid_eps=hybrid_eps)
        causal, bias = as_bool(causal, "causal"), as_bool(bias, "bias")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.layer = causal, as_int(layer, "layer", minimum=0)
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        # A plain CPU float64 attribute, not a buffer: module.half() must not round the slopes.
        self.slopes = alibi_slopes(num_heads)
        self.set_method(spec, seed=seed, backend=backend)

    def set_method(self, method: str | MethodSpec, *, seed: int | None = None, backend: str = "auto",
                   **options) -> "ALiBiAttention":
        """Switch to another method (a ``MethodSpec``, or a name and options as in the constructor),
        eval partitions seed and backend; the weights stay."""
        spec = as_method(method, **options)
        seed = None if seed is None else as_int(seed, "seed")
        check_backend_name(backend)
        self.spec, self.seed, self.backend = spec, seed, backend
        self.eval_partitions = (LayerPartitions(self.slopes, spec.samples, spec.scheme, 0 if seed is None else seed,
                                                self.layer, sampling=spec.sampling, cache_size=self.EVAL_CACHE_SIZE)
                                if spec.random else None)
        self._plans: dict = {}  # device -> the eval-mode AttentionPlan (rebuilt when the method changes)
        return self

    def plan(self, device: torch.device | str) -> AttentionPlan:
        """The eval-mode ``AttentionPlan`` of this module on ``device`` (built once, kept until
        ``set_method`` or a change of ``slopes``)."""
        device = torch.device(device)
        key = (device, version_key(self.slopes))
        plan = None if key[1] is None else self._plans.get(key)
        if plan is None:
            plan = AttentionPlan(self.spec, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                 slopes=self.slopes, causal=self.causal, device=device,
                                 partitions=self.eval_partitions, backend=self.backend)
            if key[1] is not None:  # (slopes made under inference_mode track no version: not kept)
                self._plans = {key: plan, **{k: p for k, p in self._plans.items() if k[1:] == key[1:]}}
        return plan

    # The method's fields, read from the spec (change them with ``set_method``).
    method = property(lambda self: self.spec.method)
    samples = property(lambda self: self.spec.samples)
    scheme = property(lambda self: self.spec.scheme)
    sampling = property(lambda self: self.spec.sampling)
    window_eps = property(lambda self: self.spec.window_eps)
    hybrid_eps = property(lambda self: self.spec.hybrid_eps)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"method={self.spec.label!r}, causal={self.causal}")

    def partitions_for(self, n: int, device: torch.device) -> Partitions | None:
        """The partitions a forward of length n uses (None unless the method samples them): fresh in
        training, the fixed ``eval_partitions`` in eval."""
        if not self.spec.random:
            return None
        if self.training:
            return sample_partitions(n, self.slopes, self.samples, scheme=self.scheme, sampling=self.sampling,
                                     generator=self._scheduled_generator(), device=device)
        return self.eval_partitions.get(n, device)

    # -- Training partitions from a seed schedule (issue 14): reproducible without torch's global RNG. --
    partition_schedule: Callable[[int], int] | None = None
    partition_step: int = 0

    def set_partition_schedule(self, schedule: Callable[[int], int] | None, step: int = 0) -> "ALiBiAttention":
        """Draw the partitions of training forward number ``partition_step`` from
        ``torch.Generator().manual_seed(schedule(partition_step))`` instead of torch's global RNG.

        ``partition_step`` starts at ``step`` and advances by one after every training forward; set it
        to follow an optimizer step or to replay one (``poslsh_lab.lm`` seeds layer l at step s from
        (seed, l, s)). ``schedule=None`` restores the global RNG. Eval mode is unaffected."""
        self.partition_schedule, self.partition_step = schedule, step
        return self

    def _scheduled_generator(self) -> torch.Generator | None:
        if self.partition_schedule is None:
            return None
        gen = torch.Generator().manual_seed(self.partition_schedule(self.partition_step))
        self.partition_step += 1
        return gen

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                partitions: Partitions | None = None) -> Tensor:
        """x [B, N, E] -> [B, N, E]. key_padding_mask: bool [B, N], True = keep (padded positions'
        outputs are still computed; with causal left padding they are 0 before out_proj)."""
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != self.embed_dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, {self.embed_dim}], got {got}")
        if not x.is_floating_point():  # (torch's linear said "expected m1 and m2 to have the same dtype")
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if partitions is None and not self.training:
            out = self.plan(x.device)(q, k, v, key_padding_mask=key_padding_mask)
        else:
            if partitions is None:
                partitions = self.partitions_for(n, x.device)
            out = attention(q, k, v, slopes=self.slopes, causal=self.causal, method=self.spec, partitions=partitions,
                            key_padding_mask=key_padding_mask, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
