"""The backend registry: ``Backend`` (an implementation and what it can run), ``BACKENDS`` and
``register_backend``. Below everything that registers or chooses a backend (the dispatcher, the
optional GPU backends, the split form's primitives), so registering needs no import of the dispatcher.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from .core import AttentionSpec

__all__ = ["Backend", "BACKENDS", "UNAVAILABLE", "register_backend", "mark_unavailable"]

BackendFn = Callable[[Tensor, Tensor, Tensor, AttentionSpec], "tuple[Tensor, Tensor]"]
SupportsFn = Callable[[Tensor, AttentionSpec], bool]


@dataclass(frozen=True)
class Backend:
    """An attention implementation: ``fn(q, k, v, spec) -> (out, lse)`` and what it can run."""

    name: str
    fn: BackendFn
    supports: SupportsFn
    priority: int = 0
    methods: tuple[str, ...] = ("exact", "window", "lsh")
    kernels: bool = False
    slope_grad: bool = False
    explain: Callable[[Tensor, AttentionSpec], "str | None"] | None = None  # why supports is False
    # "auto" asks it before ``accepts``: is the backend set up for this call, or worth setting up now? A
    # backend that builds something per shape (cuDNN's graphs, the flex backends' compiles) says no until
    # the calls at a shape have done about as much work as the build costs (``rent``); None: always set up.
    ready: Callable[[Tensor, AttentionSpec], bool] | None = None

    def declares(self, spec: AttentionSpec) -> bool:
        """Whether its declared capabilities (method, kernels, slope gradients) cover the call."""
        if spec.method not in self.methods or (spec.kernels is not None and not self.kernels):
            return False
        return self.slope_grad or not spec.slopes.requires_grad

    def accepts(self, q: Tensor, spec: AttentionSpec) -> bool:
        """Declared capabilities first, then its own ``supports``."""
        return self.declares(spec) and self.supports(q, spec)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
        return self.fn(q, k, v, spec)


BACKENDS: dict[str, Backend] = {}
# Optional backends not registered in this process, and why (``dispatch.check_backend_name`` says it).
UNAVAILABLE: dict[str, str] = {}



def register_backend(name: str, fn: BackendFn, supports: SupportsFn | None = None, *,
                     priority: int = 0, methods: tuple[str, ...] = ("exact", "window", "lsh"),
                     kernels: bool = False, slope_grad: bool = False,
                     explain: Callable[[Tensor, AttentionSpec], "str | None"] | None = None,
                     ready: Callable[[Tensor, AttentionSpec], bool] | None = None) -> Backend:
    """Add (or replace) a backend. ``supports`` defaults to "always"; "auto" tries higher
    ``priority`` first (torch backends use 0..20, so GPU kernels should use e.g. 100).
    ``methods``, ``kernels`` and ``slope_grad`` declare what it computes (see module docstring);
    ``explain(q, spec)``, if given, says why ``supports`` refuses a call (named in the error);
    ``ready(q, spec)``, if given, whether "auto" may take it for this call yet (``Backend.ready``)."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"backend name must be a non-empty string other than 'auto', got {name!r}")
    backend = Backend(name, fn, supports if supports is not None else (lambda q, spec: True), priority,
                      tuple(methods), bool(kernels), bool(slope_grad), explain, ready)
    BACKENDS[name] = backend
    UNAVAILABLE.pop(name, None)
    forget_public_plans()  # plans of public calls chose among the old registry
    return backend


def mark_unavailable(name: str, why: str) -> None:
    """Record why the optional backend ``name`` is not registered here (what to install, or what it needs)."""
    if name not in BACKENDS:
        UNAVAILABLE[name] = why


def forget_public_plans() -> None:
    """Drop the plans remembered for earlier public calls (``public_plans``), if that module is loaded: they
    chose their backend among what is registered and by the speed table, and either has changed."""
    plans = sys.modules.get("poslsh.attention.public_plans")
    if plans is not None:
        plans.clear_public_plans()
