"""A resolved per-layer attention call: ``AttentionPlan``, what a model's layer (or a decode loop) holds
and calls at every step with constant host work, whatever the cache length.

``poslsh.attention`` validates and resolves every argument on every call (``resolve_spec``): right for a
single call, too slow for decoding, where the kernel of one token takes ~10-20 us on a GPU. A plan does
that work once, from the one method description (a ``MethodSpec``), the slopes, the head counts,
causality, the scale, the device and, for "lsh" and "hybrid", partitions fixed for every length
(``LayerPartitions``). What only they determine is resolved when the plan is built and never depends on
the key count Nk:

* slopes as a CPU float64 tensor (and on the device inside the Triton plan);
* per-head half-widths for an unbounded length: "window" ``ceil(ln(1/eps) / m_h)`` uncapped (slope 0:
  every key), "hybrid" the near field of ``window.hybrid_widths`` at ``HYBRID_WIDTH_N`` positions
  (the transformers patch's convention: a near field that does not move as the cache grows);
* the Triton kernels' device arrays in a length-free form (``triton.launch.build_plan``: widths capped
  at the kernels' "unbounded", grid scalars normalised to a span of 2^23 positions), so a decode step's
  new length rebuilds nothing; only the cut scheme's per-position block bounds are per length;
* the reach of the method: how many positions left (and right, bidirectional) a query can weigh.

A call ``plan(q, k, v, q_offset=..., key_padding_mask=..., return_lse=...)`` checks shapes, dtypes and
devices on Python ints (no host-device synchronisation), allocates only the output (and the split-key
partials of a decoding row), and runs:

* the Triton kernels (CUDA, or the interpreter) directly on the plan's arrays, one forward launch (plus
  the merge of split-key partials when a few rows read many keys), the split schedule sized by the
  keys the method reaches (``min(reach, Nk)``), not by the cache;
* any other backend on the keys the method can reach only: k, v (and the padding mask) are sliced to
  ``[q_offset - reach, q_offset + Nq + reach)`` (right reach 0 when causal) and the queries re-placed in
  the slice, which is exact (the keys cut off have weight 0) and makes a CPU decoding step O(reach),
  not O(cache). A decoding step (one causal query at the last key) on the fused backend runs
  ``fused.few_rows_attention`` (without the LSE and padding: ``fused.last_row_attention``, three matrix
  operations with the weights), "exact" and "window" with their positional weights a view of a per-plan
  table (``_last_row_weights``): no weights computed per step, a handful of operations; "lsh" on grid
  partitions with its collision counts from ``fused.GridLastRow`` (``_grid_row``: about eight operations).

CUDA graphs: a plan's call reads nothing from the device, so once one call has run (it builds the
plan's device arrays and picks the backend), a call whose shapes, strides, dtypes, ``q_offset``, mask
presence and tensor addresses stay the same can be captured and replayed (``torch.cuda.CUDAGraph``;
what is static: B, H, Nq, Nk, D, ``q_offset``, the mask's presence and the addresses of q, k, v and
mask; to decode into a growing cache, capture one graph per length bucket over a preallocated cache).

``poslsh.attention`` keeps plans of its earlier calls itself (``public_plans``).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch
from torch import Tensor

from ..alibi import alibi_slopes, check_slopes
from ..checks import as_bool, as_float, as_int
from ..hashing import UNBOUNDED_WIDTH, Partitions
from ..layer_partitions import LayerPartitions
from ..method import MethodSpec, as_method
from .core import AttentionSpec
from .dispatch import Backend, check_backend_name, select_backend
from .fused import GridLastRow, few_rows_attention, few_rows_log_weights, last_row_attention, takes_few_rows
from .ranges import normalize_grid
from .speed import DECODE_ROWS
from .window import hybrid_widths, window_sizes

__all__ = ["AttentionPlan", "HYBRID_WIDTH_N"]

# The length the hybrid's near field is computed for, once, and used at every length (the widths of
# ALiBi heads converge long before: the far-field variance lives within ~1/m of the query); widths that
# would cover all of it mean "every key". The transformers patch uses it too.
HYBRID_WIDTH_N = 1 << 16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionPlan:
    """One layer's attention, resolved once: ``plan(q, k, v)`` as ``poslsh.attention`` with the plan's
    method, slopes and partitions, at constant host cost per call (module docstring).

    Args:
        method: a ``MethodSpec``, its text ("window:1e-3", "lsh:8:grid") or a method name with the
            options beside it (``samples``, ``scheme``, ``sampling``, ``window_eps``, ``hybrid_eps``),
            as ``poslsh.method.as_method`` takes them.
        num_heads: H, query heads. num_kv_heads: Hkv (H divisible by it); default H.
        slopes: ALiBi slopes [H], >= 0 (a tensor that requires grad is refused: use ``poslsh.attention``
            for trainable slopes); default ``alibi_slopes(H)``.
        causal: keys j <= p only (default True).
        scale: multiplier of q . k; default 1/sqrt(D) of each call's q.
        device: where q, k, v will be (the plan's device arrays live there).
        partitions: "lsh"/"hybrid" only: a ``LayerPartitions`` (fixed per layer, any length), or
            ``Partitions`` (grid: their widths and offsets, which define blocks at every position; cut:
            calls take Nk <= its n); default ``LayerPartitions(slopes, r, scheme,
            seed, layer, sampling)``. Given partitions decide r (the plan's ``method.samples`` becomes
            theirs, and the hybrid's near field is sized for it), as in ``poslsh.attention``.
        seed, layer: of the default partitions.
        widths: H ints >= 0 instead of the method's half-widths ("window", the near field of
            "hybrid"), e.g. FlashAttention's ``window_size``; ``hashing.UNBOUNDED_WIDTH`` for "all".
        backend: "auto" or a name in ``available_backends()``, as in ``poslsh.attention``.

    Attributes:
        method: the ``MethodSpec``. slopes: float64 CPU [H]. widths: per-head half-widths (Python ints,
        uncapped) or None. reach: the most positions a query can weigh on one side, or None
        (unbounded: exact, or partitions without a bound).
    """

    def __init__(self, method: str | MethodSpec = "exact", *, num_heads: int, num_kv_heads: int | None = None,
                 slopes=None, causal: bool = True, scale: float | None = None,
                 device: torch.device | str = "cpu", partitions: LayerPartitions | Partitions | None = None,
                 seed: int = 0, layer: int = 0, widths=None, backend: str = "auto", **options) -> None:
        spec = as_method(method, **options)
        h = as_int(num_heads, "num_heads", minimum=1)
        hkv = h if num_kv_heads is None else as_int(num_kv_heads, "num_kv_heads", minimum=1)
        if h % hkv:
            raise ValueError(f"num_heads={h} must be divisible by num_kv_heads={hkv}")
        s = alibi_slopes(h) if slopes is None else check_slopes(slopes, "slopes")
        if s.numel() != h:
            raise ValueError(f"slopes must have one value per query head ({h}), got {s.numel()}")
        check_backend_name(backend)
        drawn = getattr(partitions, "samples", None) or getattr(partitions, "num_samples", None)
        if spec.random and isinstance(drawn, int) and drawn != spec.samples:
            # Given partitions decide r, as in ``poslsh.attention`` (the hybrid's near field is sized for it):
            # the plan's description says so, rather than the method's default samples
            spec = dataclasses.replace(spec, samples=drawn)
        self.method, self.num_heads, self.num_kv_heads, self.slopes = spec, h, hkv, s
        self.causal = as_bool(causal, "causal")
        self.scale = None if scale is None else as_float(scale, "scale")
        self.device = _as_device(device)
        self.backend = backend
        self.widths = self._resolve_widths(widths)
        self._window = None if self.widths is None else torch.tensor(self.widths, dtype=torch.int64)
        self._widest = -1 if self.widths is None else max(self.widths)
        self._layer_parts, self._parts, self._grid = self._resolve_partitions(partitions, seed, layer)
        self.reach = self._resolve_reach()
        self._tplan = None  # the Triton kernels' arrays (triton.launch.Plan), built on the first Triton call
        self._tplan_start, self._shifted = 0, None  # its first position (cut), its grid seen from a key_start
        self._random = spec.random  # (read at every call)
        self._backends: dict = {}  # (dtype, regime, grad, length bucket, mask, D == Dv) -> Backend
        self._configs: dict = {}  # (dtype, D, decode) -> the Triton tile configuration
        # (device, compute dtype) -> the decoding weights' table (``_last_row_weights``): causal "exact" and
        # "window" only (the other methods' weights depend on the partitions seen from each step's keys)
        self._band_weights: dict | None = {} if self.causal and not self.method.random else None
        # (device, compute dtype) -> ``fused.GridLastRow`` of causal "lsh" on grid partitions (``_grid_row``)
        grid_lsh = self._grid is not None and self.method.rule.only_collisions
        self._grid_rows: dict | None = {} if self.causal and grid_lsh else None

    # -- construction ---------------------------------------------------------------------------------

    def _resolve_widths(self, widths) -> list[int] | None:
        spec, rule = self.method, self.method.rule
        if widths is not None:
            if not rule.bounded:
                raise ValueError(f"widths are for method 'window' or 'hybrid', got method={spec.method!r}")
            w = torch.as_tensor(widths).detach().to("cpu").reshape(-1)
            if w.dtype.is_floating_point or w.numel() != self.num_heads or bool((w < 0).any()):
                raise ValueError(f"widths must be {self.num_heads} ints >= 0 (one per query head), got {w.tolist()}")
            return [int(x) for x in w.tolist()]
        if rule.band_only:  # window, uncapped: the cap of a length would make the widths depend on it
            return window_sizes(self.slopes, spec.window_eps, UNBOUNDED_WIDTH + 1).tolist()
        if rule.near_far:
            w = hybrid_widths(self.slopes, spec.hybrid_eps, spec.samples, HYBRID_WIDTH_N).tolist()
            return [UNBOUNDED_WIDTH if x >= HYBRID_WIDTH_N - 1 else x for x in w]
        return None

    def _resolve_partitions(self, partitions, seed: int, layer: int):
        """(LayerPartitions or None, Partitions or None, grid (W, U) on the device or None)."""
        spec = self.method
        if not spec.random:
            if partitions is not None:
                raise ValueError(f"partitions are only used by method 'lsh' or 'hybrid', got method={spec.method!r}")
            return None, None, None
        if partitions is None:
            partitions = LayerPartitions(self.slopes, spec.samples, spec.scheme, as_int(seed, "seed"),
                                         as_int(layer, "layer", minimum=0), sampling=spec.sampling)
        if isinstance(partitions, LayerPartitions):
            if partitions.slopes.numel() != self.num_heads:
                raise ValueError(f"partitions must have one set per query head ({self.num_heads}), got "
                                 f"{partitions.slopes.numel()} heads")
            _check_same_slopes(partitions.slopes, self.slopes)
            layer_parts, parts = partitions, None
            grid = partitions.get(1) if partitions.scheme == "grid" else None
        elif isinstance(partitions, Partitions):
            if partitions.num_heads != self.num_heads:
                raise ValueError(f"partitions must have one set per query head ({self.num_heads}), got "
                                 f"{partitions.num_heads} heads")
            if partitions.kernels is not None:
                raise ValueError("partitions drawn for general kernels are not supported by AttentionPlan "
                                 "(use poslsh.attention with kernel=)")
            _check_same_slopes(partitions.slopes, self.slopes)
            # grid scalars define blocks for every position: such partitions serve any length
            grid = partitions if partitions.scheme == "grid" else None
            layer_parts, parts = None, None if grid is not None else partitions
        else:
            raise TypeError(f"partitions must be a LayerPartitions or a Partitions, got {type(partitions).__name__}")
        if grid is not None:  # the grid scalars serve every length: on the device once
            grid = (grid.widths.to(self.device), grid.offsets.to(self.device), int(grid.widths.max()))
        return layer_parts, parts, grid

    def _resolve_reach(self) -> int | None:
        """Positions a query can weigh on one side (None: every key)."""
        near = None if self.widths is None else max(self.widths)
        rule = self.method.rule
        if rule.all_exact or (near is not None and near >= UNBOUNDED_WIDTH):
            return None
        if rule.band_only:
            return near
        if self._grid is None:  # cut blocks: no bound without reading every block
            return None
        widest = self._grid[2]  # a key shares a block of width W with p only if |p - j| <= W - 1
        if widest >= UNBOUNDED_WIDTH:
            return None
        return max(widest - 1, near or 0)

    @property
    def num_samples(self) -> int | None:
        """r of the partitions ("lsh", "hybrid"), else None."""
        if self._grid is not None:
            return self._grid[0].shape[1]
        if self._parts is not None:
            return self._parts.num_samples
        return None if self._layer_parts is None else self._layer_parts.samples

    def __repr__(self) -> str:
        return (f"AttentionPlan({self.method.label!r}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, device={str(self.device)!r}, reach={self.reach})")

    # -- a call ---------------------------------------------------------------------------------------

    def checked(self, q: Tensor, k: Tensor, v: Tensor, q_offset, key_padding_mask) -> tuple | None:
        """``_check``'s (B, Nq, Nk, q_offset) of a call the plan runs, else None."""
        try:
            return self._check(q, k, v, q_offset, key_padding_mask)
        except (TypeError, ValueError):
            return None

    def _check(self, q, k, v, q_offset, kpm, key_start: int = 0) -> tuple[int, int, int, int]:
        """Shapes, dtypes and devices of a call, on Python values only: (B, Nq, Nk, q_offset). (Written for a
        decode step's few microseconds: one pass over the shapes, no intermediate tuples.)"""
        if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
                and q.ndim == 4 and k.ndim == 4 and v.ndim == 4):
            for name, x in (("q", q), ("k", k), ("v", v)):
                if not isinstance(x, Tensor) or x.ndim != 4:
                    raise ValueError(f"{name} must be a 4-D tensor [B, heads, N, D], got "
                                     f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        b, h, nq, d = q.shape
        kb, hkv, nk, kd = k.shape
        vb, vh, vn, dv = v.shape
        if h != self.num_heads or hkv != self.num_kv_heads:
            raise ValueError(f"this plan takes q with {self.num_heads} heads and k, v with {self.num_kv_heads}, got "
                             f"q {tuple(q.shape)}, k {tuple(k.shape)}")
        if kb != b or kd != d or vb != b or vh != hkv or vn != nk:
            raise ValueError(f"q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] do not match: q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}, v {tuple(v.shape)}")
        if b < 1 or nq < 1 or d < 1 or dv < 1 or nq > nk:
            raise ValueError(f"need 1 <= Nq <= Nk and non-empty tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}")
        dtype, device = q.dtype, self.device
        if k.dtype != dtype or v.dtype != dtype:
            raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
        if q.device != device or k.device != device or v.device != device:
            raise ValueError(f"this plan's tensors live on {self.device}; got q on {q.device}, k on {k.device}, "
                             f"v on {v.device}")
        if q_offset is None:
            q_offset = nk - nq
        elif isinstance(q_offset, bool) or not isinstance(q_offset, int) or not 0 <= q_offset <= nk - nq:
            raise ValueError(f"q_offset must be an int in [0, Nk - Nq] = [0, {nk - nq}], got {q_offset!r}")
        if kpm is not None:
            if not isinstance(kpm, Tensor) or kpm.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor [B, Nk] (True = keep)")
            if tuple(kpm.shape) != (b, nk) or kpm.device != self.device:
                raise ValueError(f"key_padding_mask must be [B, Nk] = {(b, nk)} on {self.device}, got "
                                 f"{tuple(kpm.shape)} on {kpm.device}")
        if isinstance(key_start, bool) or not isinstance(key_start, int) or key_start < 0:
            raise ValueError(f"key_start must be an int >= 0 (the position of key 0), got {key_start!r}")
        if self._parts is not None and key_start + nk > self._parts.n:
            raise ValueError(f"the plan's partitions cover {self._parts.n} positions, got keys at "
                             f"{key_start}..{key_start + nk - 1}")
        return b, nq, nk, q_offset

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, q_offset: int | None = None,
                 key_padding_mask: Tensor | None = None, return_lse: bool = False,
                 key_start: int = 0) -> Tensor | tuple[Tensor, Tensor]:
        """Attention of q [B, H, Nq, D] over k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] with the plan's method.

        Args:
            q_offset: key position of query row 0 (default Nk - Nq: the queries are the last keys).
            key_padding_mask: bool [B, Nk], True = keep.
            return_lse: also return the LSE.
            key_start: the sequence position of key 0: a cache whose first ``key_start`` positions were
                evicted. Only the LSH partitions depend on it (those of positions key_start.. are used;
                ALiBi weights depend on distances alone).

        Returns:
            out [B, H, Nq, Dv] in q's dtype, or (out, lse [B, H, Nq]), as ``poslsh.attention``.
        """
        _, nq, nk, q_offset = self._check(q, k, v, q_offset, key_padding_mask, key_start)
        if return_lse is not True and return_lse is not False:
            return_lse = as_bool(return_lse, "return_lse")
        return self.run_checked(q, k, v, nq, nk, q_offset, key_padding_mask, return_lse, key_start)

    def run_checked(self, q, k, v, nq: int, nk: int, q_offset: int, key_padding_mask, return_lse: bool,
                    start: int = 0):
        """A call whose arguments ``checked`` (or ``_check``) accepted, with the (Nq, Nk, q_offset) it gave."""
        d = q.shape[3]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(d)
        start = start if start and self._random else 0
        backend = self._backend_for(q, k, v, nq, nk, q_offset, key_padding_mask, scale, start)
        if backend.name == "triton" and v.shape[3] == d:
            out, lse = self._run_triton(q, k, v, nq, nk, q_offset, key_padding_mask, scale, start)
        else:
            out, lse = self._run_sliced(backend, q, k, v, nq, nk, q_offset, key_padding_mask, scale, start, return_lse)
        return (out, lse) if return_lse else out

    def _spec(self, lo: int, hi: int, q_offset: int, kpm: Tensor | None, scale: float,
              start: int = 0) -> AttentionSpec:
        """The ``AttentionSpec`` of keys [lo, hi) (re-indexed from 0; sequence positions start + lo ..),
        queries at ``q_offset`` in them."""
        n = hi - lo
        window = self._window
        if window is not None and n <= self._widest:  # widths past the keys mean all of them: capped
            window = window.clamp(max=n - 1)
        return AttentionSpec(slopes=self.slopes, causal=self.causal, method=self.method.method, scale=scale,
                             q_offset=q_offset, partitions=self._partitions(start + lo, start + hi), window=window,
                             key_padding_mask=kpm)

    def _partitions(self, lo: int, hi: int) -> Partitions | None:
        """The partitions of sequence positions [lo, hi), re-indexed from 0, on the plan's device."""
        if not self.method.random:
            return None
        if self._grid is not None:
            w, u, _ = self._grid
            offsets = u if lo == 0 else torch.remainder(u + lo, w)  # the same blocks, seen from lo
            return Partitions._unchecked(n=hi - lo, slopes=self.slopes, scheme="grid", widths=w, offsets=offsets)
        if self._layer_parts is not None:
            return self._layer_parts.window(lo, hi - lo, self.device)
        parts = self._parts if (lo, hi) == (0, self._parts.n) else self._parts.restrict(lo, hi)
        return parts.to(self.device)

    def _band(self, nq: int, nk: int, q_offset: int) -> tuple[int, int]:
        """The keys [lo, hi) any query row can weigh."""
        if self.reach is None:
            return 0, nk
        lo = max(0, q_offset - self.reach)
        hi = nk if not self.causal else q_offset + nq
        if not self.causal:
            hi = min(nk, q_offset + nq + self.reach)
        return lo, hi

    def _backend_for(self, q, k, v, nq, nk, q_offset, kpm, scale, start) -> Backend:
        """The backend of a call, chosen once per dtype, regime (decoding or not, gradient or not),
        power-of-two length bucket (the speed table's lengths), mask presence and head dims."""
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        key = (q.dtype, nq <= DECODE_ROWS, grad, nk.bit_length(), kpm is None, q.shape[3] == v.shape[3])
        backend = self._backends.get(key)
        if backend is None:
            spec = self._spec(0, nk, q_offset, kpm, scale, start)
            deferred: list[str] = []
            backend = select_backend(q, spec, self.backend, grad, deferred)
            # Kept for the bucket unless a faster backend was deferred or this one is set up per shape
            # (cuDNN: a new length in the bucket would build a graph): those are asked again per call.
            # Decoding keeps it either way: its key count grows every step, so a backend deferred until
            # the calls at one shape pay for its build would never be paid for there.
            if nq <= DECODE_ROWS or (not deferred and backend.ready is None):
                self._backends[key] = backend
        return backend

    def _run_sliced(self, backend: Backend, q, k, v, nq, nk, q_offset, kpm, scale, start,
                    return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
        lo, hi = self._band(nq, nk, q_offset)
        if (lo, hi) != (0, nk):  # views: the keys no row reaches have weight 0, so the result is the same
            k, v = k.narrow(2, lo, hi - lo), v.narrow(2, lo, hi - lo)
            kpm = None if kpm is None else kpm[:, lo:hi]

        def spec() -> AttentionSpec:  # built where it is read only (LSH's partitions seen from lo cost operations)
            return self._spec(lo, hi, q_offset - lo, kpm, scale, start)

        if backend.name == "fused" and nq == 1 and self.causal and q_offset == nk - 1 and takes_few_rows(q, k):
            # a decoding step: exact/window weights are a view of the plan's table, grid LSH's a few operations
            # (``_grid_row``), the others computed
            weights = None
            if self._band_weights is not None:
                weights = self._last_row_weights(hi - lo, q.device, q.dtype)
            elif self._grid_rows is not None:
                weights = self._grid_row(start + q_offset, hi - lo, q.device, q.dtype)
            if not return_lse and kpm is None:  # its own key has weight 1 in every method: never an empty row
                if weights is None:
                    weights = few_rows_log_weights(spec(), 1, hi - lo, q.device,
                                                   torch.float64 if q.dtype == torch.float64 else torch.float32)
                out = last_row_attention(q, k, v, weights, scale)
                if out is not None:
                    return out, None
            return few_rows_attention(q, k, v, spec(), weights)
        return backend(q, k, v, spec())

    def _last_row_weights(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """log W of a causal query at the last of n keys, "exact" or "window": [H, 1, n], a view of a table
        [H, 1, T] of -m_h * d (-inf for d > w_h) at distances d = T - 1 .. 0, kept per device and compute
        dtype and rebuilt at twice the length when n > T, so a decoding step computes no weights (the
        fused backend's ``few_rows_log_weights`` would take a dozen operations; it is the reference)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        key = (device, dtype)
        table = self._band_weights.get(key)
        if table is None or table.shape[2] < n:
            length = max(64, 2 * n)
            dist = torch.arange(length - 1, -1, -1, device=device)
            table = dist * self.slopes.to(device, dtype).neg()[:, None]
            if self._window is not None:
                table = table.masked_fill(dist > self._window.to(device)[:, None], float("-inf"))
            table = self._band_weights[key] = table[:, None, :]
        return table.narrow(2, table.shape[2] - n, n)

    def _grid_row(self, position: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """log W of a causal "lsh" query at sequence position ``position``, the last of n keys, on grid
        partitions: [H, 1, n] from the plan's ``fused.GridLastRow`` (per device and compute dtype)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        row = self._grid_rows.get((device, dtype))
        if row is None:
            w, u, _ = self._grid
            row = self._grid_rows[(device, dtype)] = GridLastRow(w.to(device), u.to(device), dtype)
        return row(position, n)

    def _run_triton(self, q, k, v, nq, nk, q_offset, kpm, scale, start) -> tuple[Tensor, Tensor]:
        launch = sys.modules["poslsh.attention.triton.launch"]  # imported: the registry chose "triton"
        tplan = self._tplan
        cut_start = 0 if self._grid is not None else start  # cut block bounds are built per window
        if tplan is None or not tplan.serves(nk) or self._tplan_start != cut_start:
            spec = AttentionSpec(slopes=self.slopes, causal=self.causal, method=self.method.method, scale=scale,
                                 q_offset=0, partitions=self._partitions(cut_start, cut_start + nk),
                                 window=self._window)
            reach = None
            if self._grid is not None:  # known on the host: no device read for the split schedule
                near = 0 if self.widths is None else min(max(self.widths), launch.WIDTH_CAP)
                reach = max(min(self._grid[2], launch.grid_span(nk)), near) * (1 if self.causal else 2)
            tplan = self._tplan = launch.build_plan(spec, nk, self.device, reach=reach)
            self._tplan_start, self._shifted = cut_start, None
        if start and self._grid is not None:  # the grid seen from position start: offsets (U + start) mod W
            if self._shifted is None or self._shifted[0] != (start, tplan.span):
                w, u, _ = self._grid
                W, U = normalize_grid(w, torch.remainder(u + start, w), tplan.span)
                self._shifted = ((start, tplan.span), dataclasses.replace(tplan, W=W, U=U))
            tplan = self._shifted[1]
        key = (q.dtype, q.shape[3], nq <= DECODE_ROWS)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = launch.default_config(self.method.method, q.dtype, q.shape[3],
                                                             self.device.type, key[2],
                                                             launch.shared_limit_of(q.device))
        return launch.run_plan(q, k, v, kpm, tplan, self.causal, scale, q_offset, cfg)


def _as_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:  # (torch's message does not say which argument)
        raise ValueError(f"device must be a torch.device or its name (e.g. 'cuda:0'), got {device!r}: {err}") \
            from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _check_same_slopes(drawn: Tensor, slopes: Tensor) -> None:
    a, b = drawn.tolist(), slopes.tolist()
    if not all(abs(x - y) <= 1e-9 * abs(y) for x, y in zip(a, b)):
        raise ValueError(f"partitions were drawn for slopes {a}, but slopes={b}")
