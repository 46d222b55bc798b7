"""Drop-in attention module for transformer blocks: projections, heads, grouped KV, ALiBi by method.

``ALiBiAttention`` maps x [B, N, E] to [B, N, E] with ``poslsh.attention`` in the middle. For
``method="lsh"`` the partitions are

* training: freshly sampled at every forward (from torch's global CPU RNG, so ``torch.manual_seed``
  makes a run reproducible, or from a seed schedule: ``set_partition_schedule``), which keeps the
  estimator unbiased across steps;
* eval: drawn once per sequence length from ``torch.Generator().manual_seed(seed)`` (seed 0 when
  ``seed`` is None) and cached for the ``EVAL_CACHE_SIZE`` most recently used lengths (a length
  evicted and asked for again is drawn again, identically), so evaluation is deterministic and
  repeatable; with the grid scheme the partitions of a shorter length are a prefix of those of a
  longer one.

The configuration is checked when the module is built (numbers may be numpy scalars or 0-d
tensors), so a bad ``window_eps`` fails at construction, not at the first forward.

An explicit ``partitions`` argument to ``forward`` overrides both.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from .alibi import alibi_slopes
from .attention import attention, available_backends
from .attention.core import METHODS
from .checks import as_bool, as_float, as_int
from .hashing import Partitions, check_scheme, sample_partitions

__all__ = ["ALiBiAttention"]


class ALiBiAttention(nn.Module):
    """Multi-head self-attention with ALiBi (exact, windowed, or positional LSH).

    Args:
        embed_dim: E, model width; divisible by num_heads (head dim D = E / H).
        num_heads: H, query heads, with Press slopes ``alibi_slopes(H)``.
        num_kv_heads: Hkv, key/value heads (grouped / multi-query attention); H divisible by it.
            Default H.
        method: "lsh", "hybrid", "window" or "exact".
        samples: r, partitions per head for "lsh" and "hybrid".
        scheme: "grid" or "cut".
        sampling: "iid", "stratified" or "qmc" (correlated samples, each with the exact law; grid only).
        window_eps: truncation level for "window".
        hybrid_eps: target error of the near field for "hybrid" (see ``poslsh.attention``).
        causal: decoder (True) or encoder (False) attention.
        bias: whether the projections have biases.
        backend: passed to ``poslsh.attention``.
        seed: seed of the fixed eval-mode partitions (0 if None).
    """

    EVAL_CACHE_SIZE = 4  # sequence lengths whose eval partitions are kept (least recently used dropped)

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, method: str = "lsh",
                 samples: int = 8, scheme: str = "grid", window_eps: float = 1e-3, causal: bool = True,
                 bias: bool = False, backend: str = "auto", seed: int | None = None, sampling: str = "iid",
                 hybrid_eps: float = 1e-2) -> None:
        super().__init__()
        embed_dim, num_heads = as_int(embed_dim, "embed_dim", minimum=1), as_int(num_heads, "num_heads", minimum=1)
        num_kv_heads = num_heads if num_kv_heads is None else as_int(num_kv_heads, "num_kv_heads", minimum=1)
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_scheme(scheme, sampling)
        samples = as_int(samples, "samples", minimum=1)
        window_eps = as_float(window_eps, "window_eps", above=0, below=1)
        hybrid_eps = as_float(hybrid_eps, "hybrid_eps", above=0)
        causal, bias = as_bool(causal, "causal"), as_bool(bias, "bias")
        seed = None if seed is None else as_int(seed, "seed")
        if backend != "auto" and backend not in available_backends():
            raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got {backend!r}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.method, self.samples, self.scheme, self.window_eps = method, samples, scheme, window_eps
        self.causal, self.backend, self.seed = causal, backend, seed
        self.sampling, self.hybrid_eps = sampling, hybrid_eps
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias)
        # A plain CPU float64 attribute, not a buffer: module.half() must not round the slopes.
        self.slopes = alibi_slopes(num_heads)
        self._eval_partitions: OrderedDict[tuple[int, str], Partitions] = OrderedDict()

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"method={self.method!r}, samples={self.samples}, scheme={self.scheme!r}, causal={self.causal}")

    def partitions_for(self, n: int, device: torch.device) -> Partitions | None:
        """The partitions a forward of length n uses (None unless the method samples them): fresh in
        training, fixed per (n, device) in eval."""
        if self.method not in ("lsh", "hybrid"):
            return None
        draw = lambda gen: sample_partitions(n, self.slopes, self.samples, scheme=self.scheme,  # noqa: E731
                                             sampling=self.sampling, generator=gen, device=device)
        if self.training:
            return draw(self._scheduled_generator())
        key, cache = (n, str(device)), self._eval_partitions
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = draw(torch.Generator().manual_seed(0 if self.seed is None else self.seed))
            while len(cache) > self.EVAL_CACHE_SIZE:
                cache.popitem(last=False)
        return cache[key]

    # -- Training partitions from a seed schedule (issue 14): reproducible without torch's global RNG. --
    partition_schedule: Callable[[int], int] | None = None
    partition_step: int = 0

    def set_partition_schedule(self, schedule: Callable[[int], int] | None, step: int = 0) -> "ALiBiAttention":
        """Draw the partitions of training forward number ``partition_step`` from
        ``torch.Generator().manual_seed(schedule(partition_step))`` instead of torch's global RNG.

        ``partition_step`` starts at ``step`` and advances by one after every training forward; set it
        to follow an optimizer step or to replay one (``poslsh.lm`` seeds layer l at step s from
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
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [B, N, {self.embed_dim}], got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if partitions is None:
            partitions = self.partitions_for(n, x.device)
        out = attention(q, k, v, slopes=self.slopes, causal=self.causal, method=self.method,
                        partitions=partitions, window_eps=self.window_eps, hybrid_eps=self.hybrid_eps,
                        key_padding_mask=key_padding_mask, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
