"""The Triton forward's host work without a GPU: ``stub_launches()`` runs the CUDA launch path on CPU
tensors, every kernel replaced by a stub that computes nothing and records what it was handed.

Inside it a call takes the branches a CUDA call takes: the pre-bound launches (``launch.Launcher``), the
CUDA tile configurations (``default_config(..., "cuda")``: ``tuned.json``) and the split schedule of a
GPU with ``multiprocessors`` multiprocessors (132: an H100). What a timed call then costs is the
library's Python: plan and spec lookups, checks, allocations (on the CPU allocator), the split
schedule, the launch keys and argument tuples. Not in it: Triton's compiled launcher (its parsing of the
arguments, in C), the driver, the kernels. A stub measurement: the GPU's number must be measured on a
GPU (``bench/host_overhead.py --device cuda``).

The records hold each launch as the JIT would take it (``("jit", kernel name, grid, args, constexprs,
options)``, the first launch of a specialisation, or every launch with ``launch.PREBOUND = False``) or as
the compiled kernel would (``("compiled", kernel name, grid, args)``), so tests can hold the pre-bound
launches to the JIT's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Iterator

import torch

__all__ = ["stub_launches"]


class _StubCompiled:
    """Stands where Triton's ``CompiledKernel`` does: ``compiled[grid](*args)`` records, runs nothing."""

    def __init__(self, name: str, record: list | None) -> None:
        self.name, self.record = name, record

    def __getitem__(self, grid):
        return lambda *args: self.record is not None and self.record.append(("compiled", self.name, grid, args))


@contextlib.contextmanager
def stub_launches(multiprocessors: int = 132, record: list | None = None) -> Iterator[list | None]:
    """Within it, Triton launches of CPU tensors take the CUDA path and run stubs (module docstring);
    ``record`` (a list), if given, receives one entry per launch. The "triton" backend accepts CPU
    tensors meanwhile; the cached Triton plans and configs and the plans of public calls are forgotten
    on entry and on exit. A plan object called inside keeps CUDA tile configurations and stub kernels: call it inside
    only."""
    from poslsh.attention import registry
    from poslsh.attention.triton import launch

    def clear_public_plans():  # (the plans live a layer up: reached as the registry reaches them)
        plans = sys.modules.get("poslsh.attention.public_plans")
        if plans is not None:
            plans.clear_public_plans()

    launch = sys.modules[launch.__name__]  # the module as last (re)loaded: tests reload it interpreted
    saved = dict(interpreting=launch.interpreting, default_config=launch.default_config,
                 _multiprocessors=launch._multiprocessors)
    saved_jit, saved_device, saved_backend = launch.Launcher.jit, torch.cuda.current_device, registry.BACKENDS["triton"]
    cuda_config = launch.default_config

    def jit(self, args):
        name = getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__
        if record is not None:
            record.append(("jit", name, self.grid, args, self.constexprs, self.options))
        return _StubCompiled(name, record)

    launch.interpreting = lambda: False  # the Launcher's pre-bound branch, even where the kernels are interpreted
    launch.default_config = lambda method, dtype, head_dim, device_type="cuda", decode=False, \
        shared_limit=launch.HOPPER_SHARED: cuda_config(method, dtype, head_dim, "cuda", decode, shared_limit)
    launch._multiprocessors = lambda device: multiprocessors
    launch.Launcher.jit = jit
    torch.cuda.current_device = lambda: 0  # the launch key's device; a CPU-only torch has none
    registry.BACKENDS["triton"] = dataclasses.replace(saved_backend, supports=lambda q, spec: True)
    launch._PLANS.clear()
    launch._CALL_CONFIGS.clear()
    clear_public_plans()
    try:
        yield record
    finally:
        for name, value in saved.items():
            setattr(launch, name, value)
        launch.Launcher.jit = saved_jit
        torch.cuda.current_device = saved_device
        registry.BACKENDS["triton"] = saved_backend
        launch._PLANS.clear()
        launch._CALL_CONFIGS.clear()
        clear_public_plans()
