"""The Triton kernels: exact ALiBi, the per-head window, positional LSH and the hybrid, forward and
backward, one kernel family (``poslsh.attention(..., backend="triton")``).

    jit.py       device helpers: key ranges of a tile, block bounds, collision counts, ALiBi frame
    forward.py   the forward kernel (all methods; split-key decoding) and the partials' merge
    backward.py  dK/dV and dQ kernels (all methods)
    launch.py    host side: cached per-method plans, tile configs (tuned.json), launches, autograd
    split_merge.py  the split backend's merge as one kernel (its plain version: split/merge.py)

The definition every kernel is held to is ``poslsh.attention.reference`` (dense, float64); the tests
run these kernels under TRITON_INTERPRET=1 on the CPU against it.
"""

from __future__ import annotations

import os
import warnings

import triton

# The Triton releases the kernels are tested with, [low, high) as (major, minor): 3.6 on the GPU (H100, H200),
# 3.6 to 3.9 in the CPU interpreter (CI: constraints.txt's 3.7.1). Below 3.6 the backend stays off (3.3 and
# older lack tensor descriptors; the interpreter patch below fails on 3.4's and 3.5's); above, a warning.
TESTED_TRITON = ((3, 6), (3, 10))


def triton_version() -> tuple[int, int]:
    """The installed Triton's (major, minor)."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


_tested = ">={}.{},<{}.{}".format(*TESTED_TRITON[0], *TESTED_TRITON[1])
if triton_version() < TESTED_TRITON[0]:
    raise ImportError(f"poslsh's Triton kernels need triton {_tested}, found {triton.__version__} "
                      f"(pip install 'triton{_tested}')")
if triton_version() >= TESTED_TRITON[1]:
    warnings.warn(f"poslsh's Triton kernels are tested with triton {_tested}; found {triton.__version__}", stacklevel=2)

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from .compat import patch_interpreter

    patch_interpreter()

from .launch import default_config, interpreting, plan_for, supports_triton, triton_attention  # noqa: E402

__all__ = ["triton_attention", "supports_triton", "default_config", "plan_for", "interpreting", "TESTED_TRITON",
           "triton_version"]


def _backend(q, k, v, spec):
    return triton_attention(q, k, v, spec)


def _register() -> None:
    from ..registry import register_backend

    # Under TRITON_INTERPRET=1 the kernels run on the CPU only to be tested: they then rank below every
    # torch backend, so "auto" never routes CPU work through the (slow) interpreter; backend="triton"
    # still reaches them.
    register_backend("triton", _backend, supports_triton, priority=-10 if interpreting() else 100,
                     methods=("exact", "window", "lsh", "hybrid"), kernels=True)


_register()
