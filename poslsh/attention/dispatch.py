"""The dispatcher behind ``poslsh.attention`` (``public``): validation, resolution, and the backend registry.

The dispatcher checks the inputs (errors name the offending argument), resolves slopes, partitions
and window sizes into one frozen ``AttentionSpec``, and calls a backend ``fn(q, k, v, spec) ->
(out, lse)``. Backends live in ``BACKENDS``; ``backend="auto"`` takes the highest-priority one whose
``supports(q, spec)`` is true. Torch backends registered here:

=========== ======== ==================================================================
name        priority what
=========== ======== ==================================================================
fused       20       tiled one pass; LSH by collision counts, exact/window banded
split       10       LSH only: r passes of block-local attention on a pluggable primitive
                     (``primitive=``: sdpa / flex / torch / callable), merged by their LSEs
reference   0        dense O(Nq * Nk) definition, any dtype
=========== ======== ==================================================================

Capabilities: a backend also declares the ``methods`` it computes, whether it honours
``spec.kernels`` (general positional kernels) and whether it differentiates slopes that require
grad (``slope_grad``: trainable ALiBi slopes for exact and window; reference and fused do). The
defaults, ("exact", "window", "lsh"), no kernels and no slope gradients, are what every backend
did before "hybrid" and kernels existed, so a backend registered without them is never handed a
call it would silently compute as something else (or silently detach); ``supports`` is only asked
once the capabilities match. A backend may also declare ``ready(q, spec)``: "auto" passes over it while
that says no (cuDNN at a shape whose graph build the calls at that shape have not yet paid for).

GPU backends register themselves from ``poslsh.attention.triton``,
``poslsh.attention.flex`` and ``poslsh.attention.cudnn`` with one call, e.g.
``register_backend("triton", fn, supports, priority=100)``; those modules are imported lazily on the
first dispatch, and their absence (or a missing triton or cuDNN frontend) is not an error.
"""

from __future__ import annotations

import importlib
import math
import warnings

import torch
from torch import Tensor

from ..alibi import alibi_slopes, check_slopes
from ..checks import as_bool, as_float, as_int, check_generator
from ..hashing import Partitions, check_scheme, sample_partitions
from ..method import method_rule
from .core import METHODS, AttentionSpec
from .fused import fused_attention, supports_fused
from .reference import reference_attention, supports_reference
from .speed import measured_order
from .registry import BACKENDS, UNAVAILABLE, Backend, mark_unavailable, register_backend
from .split import split_attention, supports_split
from .window import hybrid_widths, kernel_window_sizes, window_size_widths, window_sizes

__all__ = ["AttentionSpec", "Backend", "BACKENDS", "register_backend", "available_backends",
           "resolve_spec", "select_backend"]

# Backend folders that register an optional (GPU) backend when imported (their ``backend.py``, or
# triton's ``__init__``); tried once, on first dispatch.
OPTIONAL_BACKEND_MODULES = ("poslsh.attention.triton", "poslsh.attention.flex", "poslsh.attention.cudnn")
_optional_loaded = False


def _load_optional_backends() -> None:
    global _optional_loaded
    if _optional_loaded:
        return
    _optional_loaded = True
    for module in OPTIONAL_BACKEND_MODULES:
        name = module.rsplit(".", 1)[1]  # the backend it registers
        try:
            importlib.import_module(module)
        except ImportError as err:  # the module or one of its dependencies (triton) is absent
            if isinstance(err, ModuleNotFoundError) and err.name and module.startswith(err.name):
                continue
            if isinstance(err, ModuleNotFoundError) and err.name == "triton":
                mark_unavailable(name, "the triton package is not installed (pip install 'poslsh[triton]')")
                continue
            mark_unavailable(name, str(err))
            warnings.warn(f"optional attention backend {module} could not be imported: {err}", stacklevel=3)
        except Exception as err:  # a broken optional module must not take the torch backends down
            mark_unavailable(name, f"its module failed on import: {err!r}")
            warnings.warn(f"optional attention backend {module} failed on import: {err!r}", stacklevel=3)


def available_backends() -> list[str]:
    """Registered backend names, in "auto" preference order (optional modules loaded first)."""
    _load_optional_backends()
    return [b.name for b in sorted(BACKENDS.values(), key=lambda b: -b.priority)]


def check_backend_name(backend) -> None:
    """ValueError unless ``backend`` is "auto" or a registered backend's name (the one check of every
    entry that takes ``backend=``, made before any work; loads the optional backends first)."""
    _load_optional_backends()
    if backend != "auto" and (not isinstance(backend, str) or backend not in BACKENDS):
        if isinstance(backend, str) and backend in UNAVAILABLE:  # an optional backend this process lacks
            raise ValueError(f"backend {backend!r} is not available here: {UNAVAILABLE[backend]}; use 'auto' or one "
                             f"of {available_backends()}")
        raise ValueError(f"backend must be 'auto' or one of {available_backends()}, got {backend!r}")


def select_backend(q: Tensor, spec: AttentionSpec, backend: str = "auto", grad: bool | None = None,
                   deferred: list[str] | None = None) -> Backend:
    """The backend that will run: the named one (checked to support the call) or, for "auto", the
    fastest measured one that supports it (``speed.measured_order``; forward + backward times when the
    call needs gradients: ``grad``, by default whether grad mode is on and q or the slopes require it),
    else the highest-priority one. "auto" passes over a backend that is not ``ready`` for the call yet
    (cuDNN before the calls at a shape have paid for its graph build) and names it in ``deferred``,
    if given: a caller that remembers the choice should ask again later."""
    _load_optional_backends()
    if backend == "auto":
        if grad is None:
            grad = torch.is_grad_enabled() and (q.requires_grad or spec.slopes.requires_grad)
        measured = [b for b in measured_order(q.device, spec.method, q.shape[2], spec.q_offset + q.shape[2], grad)
                    if b in BACKENDS]
        for name in measured + available_backends():
            candidate = BACKENDS[name]
            if not candidate.declares(spec):  # before ready: a call it never serves defers nothing
                continue
            if candidate.ready is not None and not candidate.ready(q, spec):
                if deferred is not None:
                    deferred.append(name)
                continue
            if candidate.supports(q, spec):
                return candidate
        raise RuntimeError("no registered attention backend supports this call")  # reference always does
    check_backend_name(backend)
    chosen = BACKENDS[backend]
    if not chosen.accepts(q, spec):
        grad = ", slopes that require grad" if spec.slopes.requires_grad and not chosen.slope_grad else ""
        why = chosen.explain(q, spec) if chosen.explain is not None else None
        raise ValueError(f"backend {backend!r} does not support this call (method={spec.method!r}, "
                         f"dtype={q.dtype}, device={q.device}{grad})" + (f": {why}" if why else ""))
    return chosen


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"q, k, v must share the batch size, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must share heads and length [B, Hkv, Nk, *], got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share the head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if min(q.shape) < 1 or min(k.shape) < 1 or v.shape[3] < 1:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads H={q.shape[1]} must be divisible by key/value heads Hkv={k.shape[1]} "
                         f"(k {tuple(k.shape)})")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q length Nq={q.shape[2]} must be <= key length Nk={k.shape[2]} "
                         f"(queries are the last Nq key positions)")


def resolve_spec(
    q: Tensor, k: Tensor, v: Tensor, *, slopes=None, causal: bool = True, method: str = "exact",
    samples: int = 8, scheme: str = "grid", partitions: Partitions | None = None,
    generator: torch.Generator | None = None, window_eps: float = 1e-3, scale: float | None = None,
    key_padding_mask: Tensor | None = None, sampling: str = "iid", hybrid_eps: float = 1e-2, kernel=None,
    q_offset: int | None = None, widths=None, window_size=None,
) -> AttentionSpec:
    """Validate everything but the backend and build the ``AttentionSpec`` (samples partitions for
    "lsh" when none are given). Arguments as in ``attention``, and ``widths``: H ints >= 0, the
    half-widths of "window" (or the near field of "hybrid") instead of the ones ``window_eps``
    (``hybrid_eps``) give, capped at Nk - 1 (``hashing.UNBOUNDED_WIDTH``: every key)."""
    _check_qkv(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    if q_offset is None:
        q_offset = nk - nq
    elif isinstance(q_offset, bool) or not isinstance(q_offset, int) or not 0 <= q_offset <= nk - nq:
        raise ValueError(f"q_offset must be an int in [0, Nk - Nq] = [0, {nk - nq}] (query row i sits at key "
                         f"position q_offset + i), got {q_offset!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rule = method_rule(method)  # what the method's weights are: read below, never its name
    causal = as_bool(causal, "causal")
    right = None
    if window_size is not None:  # FlashAttention's (left, right): a cut is the "window" method with those widths
        causal, cut, right = window_size_widths(window_size, causal, h)
        if cut is not None:
            if not rule.all_exact or widths is not None:
                raise ValueError(f"window_size sets the window itself; method={method!r} cannot take one (use "
                                 "method='exact', the default, with window_size, or method='window' with "
                                 "window_eps)")
            method, widths = "window", cut
            rule = method_rule(method)
    generator = check_generator(generator)
    if partitions is not None:  # checked before the slopes, which may default to the partitions'
        if not rule.collisions:
            raise ValueError(f"partitions are only used by method='lsh' or 'hybrid', got method={method!r}")
        if not isinstance(partitions, Partitions):
            raise TypeError(f"partitions must be a poslsh.Partitions, got {type(partitions).__name__}")
        if partitions.n != nk:
            raise ValueError(f"partitions must cover the Nk={nk} key positions, got n={partitions.n}")
        if partitions.num_heads != h:
            raise ValueError(f"partitions must have one set per query head ({h}), got "
                             f"{partitions.num_heads} heads")
    kernels = None
    if kernel is None and partitions is not None and partitions.kernels is not None:
        kernel = partitions.kernels  # partitions drawn for kernels carry them
    if kernel is not None:
        from ..positional_kernels import as_kernels, check_kernel

        if slopes is not None:
            raise ValueError("give either slopes (ALiBi) or kernel, not both")
        kernels = tuple(check_kernel(kern) for kern in as_kernels(kernel, h if not isinstance(kernel, (list, tuple))
                                                                     else None))
        if len(kernels) != h:
            raise ValueError(f"kernel must be one Kernel or one per query head ({h}), got {len(kernels)}")
        s = torch.tensor([math.nan if kern.slope is None else kern.slope for kern in kernels], dtype=torch.float64)
    else:
        if slopes is None:
            slopes = partitions.slopes if isinstance(partitions, Partitions) else alibi_slopes(h)
        if rule.collisions and isinstance(slopes, Tensor) and slopes.requires_grad:
            raise ValueError(f"slopes require grad, but method={method!r} samples its partitions from them, which "
                             "no gradient passes through; pass slopes.detach(), or use method 'exact' or 'window'")
        s = check_slopes(slopes, "slopes", allow_grad=True)  # exact / window: trainable slopes
        if s.numel() != h:
            raise ValueError(f"slopes must have one value per query head ({h}), got {s.numel()}")
    scale = 1.0 / math.sqrt(d) if scale is None else as_float(scale, "scale")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = keep), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = {(b, nk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")
    window = None
    if widths is not None:
        if not rule.bounded:
            raise ValueError(f"widths are for method 'window' or 'hybrid', got method={method!r}")
        sides = []
        for name, given in (("widths", widths), ("window_size's right side", right)):
            w = None if given is None else torch.as_tensor(given).detach().to("cpu").reshape(-1)
            if w is not None and (w.dtype.is_floating_point or w.numel() != h or (w < 0).any()):
                raise ValueError(f"{name} must be {h} ints >= 0 (one per query head), got {w.tolist()}")
            sides.append(None if w is None else w.to(torch.int64).clamp(max=nk - 1))  # the one cap
        window, right = sides
    elif rule.band_only:  # window: widths from window_eps (hybrid's: below)
        window_eps = as_float(window_eps, "window_eps", above=0, below=1)
        window = (window_sizes(s, window_eps, nk) if kernels is None
                  else kernel_window_sizes(kernels, window_eps, nk))
    if rule.collisions:
        if partitions is None:
            samples = as_int(samples, "samples", minimum=1)
            check_scheme(scheme, sampling, kernels is not None)
            partitions = sample_partitions(nk, None if kernels is not None else s, samples, scheme=scheme,
                                           generator=generator, device=q.device, sampling=sampling,
                                           kernel=kernels)
        else:
            if kernels is not None:
                if partitions.kernels is None or any(a is not b for a, b in zip(partitions.kernels, kernels)):
                    raise ValueError("partitions were not drawn for these kernels (pass the same Kernel objects, "
                                     "or omit kernel= to use the partitions' own)")
            elif partitions.kernels is not None:
                raise ValueError("partitions were drawn for kernels; pass kernel= (or omit slopes)")
            elif not all(abs(a - b) <= 1e-9 * abs(b) for a, b in zip(partitions.slopes.tolist(), s.tolist())):
                raise ValueError(f"partitions were drawn for slopes {partitions.slopes.tolist()}, "
                                 f"but slopes={s.tolist()}")
            if partitions.device != q.device:
                partitions = partitions.to(q.device)
    if rule.near_far and widths is None:
        window = hybrid_widths(s, as_float(hybrid_eps, "hybrid_eps", above=0), partitions.num_samples, nk, kernels)
    return AttentionSpec(slopes=s, causal=causal, method=method, scale=float(scale), q_offset=q_offset,
                         partitions=partitions, window=window, window_right=right, key_padding_mask=key_padding_mask,
                         kernels=kernels)


register_backend("fused", fused_attention, supports_fused, priority=20, methods=METHODS, kernels=True,
                 slope_grad=True)
register_backend("split", split_attention, supports_split, priority=10, methods=("lsh",), kernels=True)
register_backend("reference", reference_attention, supports_reference, priority=0, methods=METHODS, kernels=True,
                 slope_grad=True)
