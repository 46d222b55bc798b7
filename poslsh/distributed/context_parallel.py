"""``context_parallel_attention``: ALiBi attention of a sequence sharded over the ranks of a process group.

Each rank holds a contiguous shard (q, k, v [B, H, n_r, D]; n_r may differ between ranks; the global
sequence is the concatenation in rank order) and gets its shard of the output, equal to what
``poslsh.attention`` gives on the whole sequence. Window, lsh and hybrid exchange only the halo each
head reaches (``halo``); exact rotates keys and values around a ring (``ring``).

One small all-gather per call carries, from every rank: its shard length, whether its arguments passed
validation, a fingerprint of the call's arguments and one of the partitions' source (the partitions,
the seed or the generator's state). So a rank with an empty shard, a rank whose arguments were refused,
or ranks with different seeds raise the same clear error everywhere instead of hanging in a transfer.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import Tensor

from ..attention import METHODS, resolve_spec
from ..attention.dispatch import check_backend_name
from ..attention.window import hybrid_widths, window_sizes
from ..hashing import Partitions, check_given_partitions, sample_partitions
from ..method import METHOD_RULES, MethodSpec, method_options, method_rule
from .exchange import all_gather_ints
from .halo import halo_attention
from .layout import LAYOUTS, rank_segments
from .local import LocalCall
from .plan import Reach, plan_halo
from .ring import ring_attention

__all__ = ["context_parallel_attention", "HALO_MODES", "partitions_fingerprint"]

HALO_MODES = ("head", "max")
RING_BACKENDS = ("auto", "flex", "fused", "reference")  # each block of the ring runs on one of these (ring.py)


def _digest(*items) -> int:
    """A signed 63-bit hash of the items' bytes (tensors by their CPU contents)."""
    h = hashlib.blake2b(digest_size=8)
    for item in items:
        if isinstance(item, Tensor):
            t = item.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        else:
            h.update(repr(item).encode())
    return int.from_bytes(h.digest(), "little", signed=True) >> 1


def partitions_fingerprint(parts: Partitions) -> int:
    """A hash of the partitions: grid (W, U) in full; cut: the per-row cut counts, the cuts' sum and a
    strided sample of them (cheap at any length, and any two seeds differ in it almost surely)."""
    if parts.scheme == "grid":
        return _digest("grid", parts.n, parts.slopes, parts.widths, parts.offsets)
    cuts = parts.cut_positions
    step = max(1, cuts.numel() // 4096)
    return _digest("cut", parts.n, parts.slopes, parts.cut_pointers, int(cuts.sum()), cuts[::step])


def _metadata_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _validate(q, k, v, *, method, slopes, causal, samples, scheme, sampling, partitions, generator, seed,
              window_eps, hybrid_eps, scale, key_padding_mask, return_lse, backend, layout, halo):
    """Every local check, by one resolution of the local call (the dispatcher's own checks: tensors,
    mask, slopes, scale and the method's arguments); returns it (its slopes and scale are passed on)."""
    n = k.shape[2] if isinstance(k, Tensor) and k.ndim == 4 else 0
    # LSH partitions cover the N global positions: their first local-length positions stand for them
    # here (N itself is known after the ranks have exchanged their lengths, and is checked then).
    local_parts = partitions.restrict(0, n) if isinstance(partitions, Partitions) and 0 < n <= partitions.n \
        else partitions
    spec = resolve_spec(q, k, v, slopes=slopes, causal=causal, method=method, samples=samples, scheme=scheme,
                        partitions=local_parts, generator=torch.Generator(), window_eps=window_eps, scale=scale,
                        sampling=sampling, hybrid_eps=hybrid_eps, key_padding_mask=key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k, v must hold the same positions of the sharded sequence (self-attention): q has "
                         f"n={q.shape[2]}, k has n={k.shape[2]}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rule = method_rule(method)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and not rule.all_exact:
        raise ValueError(f"layout='zigzag' balances the causal exact ring; method={method!r} works on "
                         "contiguous shards (its work is local to each shard already)")
    if halo not in HALO_MODES:
        raise ValueError(f"halo must be one of {HALO_MODES}, got {halo!r}")
    check_backend_name(backend)
    if rule.all_exact and backend not in RING_BACKENDS:
        raise ValueError(f"method='exact' (a ring merging per-block LSEs, which needs their gradient) runs with "
                         f"backend in {RING_BACKENDS}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    sources = [name for name, x in (("partitions", partitions), ("generator", generator), ("seed", seed))
               if x is not None]
    if len(sources) > 1:
        raise ValueError(f"give at most one of partitions, generator, seed; got {sources}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(partitions, Partitions) and partitions.kernels is not None:
        raise ValueError("partitions drawn for general kernels are not supported by context parallelism")
    return spec


def context_parallel_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group=None, method: str | MethodSpec = "exact", slopes=None,
    is_causal: bool | None = None, causal: bool | None = None, samples: int | None = None, scheme: str | None = None,
    sampling: str | None = None, partitions: Partitions | None = None, generator: torch.Generator | None = None,
    seed: int | None = None, window_eps: float | None = None, hybrid_eps: float | None = None,
    scale: float | None = None, key_padding_mask: Tensor | None = None,
    return_lse: bool = False, backend: str = "auto", layout: str = "contiguous", halo: str = "head",
) -> Tensor | tuple[Tensor, Tensor]:
    """ALiBi attention (exact, window, lsh, hybrid) of a sequence sharded over ``group``.

    Every rank of the group calls this with its shard; the result equals ``poslsh.attention`` on the
    gathered sequence (same method arguments; queries = keys = the whole sequence), sharded the same
    way. Autograd works (every rank must run the backward: the gradient transfers pair up).

    Args:
        q: [B, H, n_r, D] this rank's queries; k: [B, Hkv, n_r, D]; v: [B, Hkv, n_r, Dv], H % Hkv == 0.
            n_r >= 1 on every rank, lengths may differ; the global sequence is the shards in rank order
            (``layout="zigzag"``: see ``poslsh.distributed.layout``).
        group: the process group (default: the world). Gloo (CPU tensors) or NCCL (CUDA tensors).
        method, slopes, is_causal (or its alias causal; default True), samples, scheme, sampling,
            window_eps, hybrid_eps, scale, backend: as in ``poslsh.attention`` (method also a
            ``MethodSpec`` or its text; the backend runs every local call; "auto" picks per call).
        partitions: ``Partitions`` over the N global positions (identical on every rank), or
        seed: an int that every rank passes (partitions drawn from ``torch.Generator().manual_seed(seed)``),
        generator: a CPU generator in the same state on every rank; none of the three: rank 0 draws a
            seed from torch's default generator and every rank uses it. Different partitions on
            different ranks are detected and refused.
        key_padding_mask: bool [B, n_r], True = keep, this rank's part of the [B, N] mask.
        return_lse: also return the LSE [B, H, n_r].
        layout: "contiguous", or "zigzag" for exact causal attention (load-balanced ring).
        halo: "head" (each KV head receives only the keys it reaches) or "max" (every head the widest
            head's halo).

    Returns:
        out [B, H, n_r, Dv] in q's dtype, or (out, lse) with lse [B, H, n_r] in the compute dtype.
    """
    rank = dist.get_rank(group)
    if is_causal is not None and causal is not None:
        raise TypeError("pass is_causal (SDPA's name) or causal (its alias), not both")
    causal = True if is_causal is None and causal is None else (causal if is_causal is None else is_causal)
    n = q.shape[2] if isinstance(q, Tensor) and q.ndim == 4 else -1
    error, slopes_t = None, None
    try:
        check_given_partitions(partitions, samples, scheme)
        options = method_options(method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                                 hybrid_eps=hybrid_eps)
        method, samples, scheme, sampling, window_eps, hybrid_eps = (
            options[name] for name in ("method", "samples", "scheme", "sampling", "window_eps", "hybrid_eps"))
        if n != 0:
            resolved = _validate(q, k, v, method=method, slopes=slopes, causal=causal, samples=samples,
                                 scheme=scheme, sampling=sampling, partitions=partitions, generator=generator,
                                 seed=seed, window_eps=window_eps, hybrid_eps=hybrid_eps, scale=scale,
                                 key_padding_mask=key_padding_mask, return_lse=return_lse, backend=backend,
                                 layout=layout, halo=halo)
            slopes_t, scale = resolved.slopes, resolved.scale  # resolved once, passed on
    except Exception as err:  # noqa: BLE001 - raised below, after every rank has learnt that one failed
        error = err
    # what the method's weights are (None: refused here, or unchecked on a rank without positions; raised below)
    rule = METHOD_RULES.get(method) if error is None and isinstance(method, str) else None
    lsh = rule is not None and rule.collisions
    config = 0
    source = 0
    if error is None and n > 0:
        config = _digest(method, causal, scale, slopes_t, window_eps, hybrid_eps if rule.near_far else None,
                         (samples, scheme, sampling) if lsh and partitions is None else None, layout, halo,
                         tuple(q.shape[:2]), tuple(k.shape[1:2]), q.shape[3], v.shape[3], str(q.dtype),
                         key_padding_mask is None, torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                                or v.requires_grad))
        if lsh:
            source = (partitions_fingerprint(partitions) if partitions is not None else
                      _digest("seed", seed) if seed is not None else
                      _digest("generator", generator.get_state()) if generator is not None else 0)
    candidate = int(torch.randint(0, 2**62, (1,))) if lsh and partitions is None and seed is None \
        and generator is None else 0
    device = _metadata_device(group)
    info = all_gather_ints([max(n, 0), int(error is None), config, source, candidate], group, device)
    lengths = [row[0] for row in info]
    if any(m == 0 for m in lengths):
        empty = [r for r, m in enumerate(lengths) if m == 0]
        raise ValueError(f"every rank must hold at least one position of the sequence; rank(s) {empty} hold none "
                         f"(shard lengths {lengths})")
    if error is not None:
        raise error
    refused = [r for r, row in enumerate(info) if not row[1]]
    if refused:
        raise ValueError(f"context_parallel_attention: the arguments of rank(s) {refused} were refused "
                         "(see the error raised there)")
    if len({row[2] for row in info}) > 1:
        raise ValueError("context_parallel_attention: the ranks were called with different arguments (method, "
                         "slopes, eps, shapes, dtype, mask presence or grad mode differ)")
    if len({row[3] for row in info}) > 1:
        raise ValueError("context_parallel_attention: the LSH partitions differ between ranks (different seeds, "
                         "generator states or partitions); every rank must use the same")
    total = sum(lengths)
    segments = rank_segments(lengths, layout)
    window = parts = None
    if lsh:
        if partitions is not None:
            if partitions.n != total:
                raise ValueError(f"partitions must cover the N={total} positions of the whole sequence, got "
                                 f"n={partitions.n}")
            parts = partitions.to("cpu")
        else:
            gen = generator if generator is not None else torch.Generator().manual_seed(
                seed if seed is not None else info[0][4])
            parts = sample_partitions(total, slopes_t, samples, scheme=scheme, generator=gen, sampling=sampling)
    if rule.band_only:  # window
        window = window_sizes(slopes_t, float(window_eps), total)
    elif rule.near_far:
        window = hybrid_widths(slopes_t, float(hybrid_eps), parts.num_samples, total)
    call = LocalCall(method, slopes_t, causal, scale, float(window_eps), backend, window, parts)
    if rule.all_exact:
        out, lse = ring_attention(q, k, v, key_padding_mask, rank, segments, group, call)
    else:
        plan = plan_halo(Reach(total, causal, window, parts), lengths, rank, k.shape[1], uniform=halo == "max")
        out, lse = halo_attention(q, k, v, key_padding_mask, plan, group, call)
    return (out, lse) if return_lse else out

