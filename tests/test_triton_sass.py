"""The forward kernel's machine code for an H100/H200 (sm_90a), compiled on the CPU by Triton's own
ptxas: a guard on the per-tile cost that the GPU timings rest on (bench/NOTES.md, kernel v3).

Kernel v2 spent 497 instructions per thread on each 64 x 16 boundary tile at r = 8, half of them
integer compare-and-add on the narrow INT32 pipe; v3 compares and counts in float32 (380). A change
that brings the integer path back, or spills, fails here before any device time is spent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                                reason="Triton's ptxas/cuobjdump not shipped")


def _report():
    spec = importlib.util.spec_from_file_location("sass_report", Path(__file__).parents[1] / "bench" / "sass_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forward_boundary_tile_budget():
    rep = _report()
    const = dict(R=8, CUT=False, CAUSAL=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=64, BLOCK_N=16, PREC="tf32",
                 FDIV=True, HYBRID=False)
    kernel = rep.compile_kernel(rep.KERNELS["fwd"], const, warps=4, stages=3)
    info = rep.ptxas_info(kernel.asm["ptx"])
    assert "0 bytes spill stores" in info, info
    loops = rep.loops(rep.sass(kernel.asm["cubin"]))
    assert len(loops) == 3  # left boundary, plain, right boundary stretches
    boundary, ops = loops[0]
    assert boundary <= 420, (boundary, ops.most_common(12))
    assert ops["FSETP"] >= 64 and ops["ISETP"] <= 30, ops.most_common(12)  # r compares per element in float
    plain, _ = loops[1]
    assert plain < boundary
