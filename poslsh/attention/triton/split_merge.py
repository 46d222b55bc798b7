"""The split backend's merge as one Triton kernel (used on CUDA): for every (head, query row), the r
partials of its r samples read once through a table of the run outputs' addresses and strides, out
and lse written once (r + 1 tensor passes instead of ~5 r for the torch merge).

Its plain version, the one it is held to (``tests/test_split_triton_merge.py``, under TRITON_INTERPRET=1),
is ``poslsh.attention.split.merge.merge_slots_torch``; ``split.merge.merge_slots`` picks this kernel on
CUDA when Triton is importable.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..core import EMPTY_LSE, last_dim_contiguous
from .jit import COMPILE_OPTIONS

__all__ = ["merge_slots_triton", "merge_slots_into"]


# Columns of the slot table: run output address and strides (elements), run lse address and
# strides, the run's first row, its row count and block width, and the slot's rest-buffer offset.
_O_PTR, _L_PTR, _ROW, _LEN, _W, _OSB, _OSK, _OSR, _LSB, _LSK, _LSR, _OFF = range(12)

# The kernel's one grid axis: CUDA's limit for axis 0.
GRID_LIMIT = 2**31 - 1


@functools.cache
def _merge_kernel():
    """The kernel, defined on first use (``split.merge`` imports this module only on CUDA; decorated
    late, a test that sets TRITON_INTERPRET and reloads the module gets it interpreted)."""
    import triton
    import triton.language as tl

    # Builtins only (tl.full, not tl.zeros, itself a @triton.jit helper): under TRITON_INTERPRET, jit
    # helpers that triton decorated before the variable was set cannot be called.
    @triton.jit
    def kernel(TABLE, REST_O, REST_L, OUT, LSE, Nq, H, rest_rows, stride_ob, stride_oh, stride_on, stride_lb,
               stride_lh, log_r, R: tl.constexpr, DV: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
        # One flat grid axis, row blocks fastest (CUDA caps grid axes 1 and 2 at 65535, axis 0 at 2^31 - 1).
        num_i = (Nq + BLOCK_I - 1) // BLOCK_I
        pid = tl.program_id(0)
        pid_i = pid % num_i
        bh = pid // num_i
        # 64-bit b and h: every offset below is then computed in int64. In int32, h * stride_oh wraps
        # once H Nq Dv >= 2^31 (n = 2^20, H = 32, Dv = 128: heads 16..31 addressed 4 GiB to 256 MiB before out).
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        d = tl.arange(0, BLOCK_D)
        row_ok = i < Nq
        d_ok = d < DV
        m = tl.full([BLOCK_I], float("-inf"), tl.float32)
        den = tl.full([BLOCK_I], 0.0, tl.float32)
        acc = tl.full([BLOCK_I, BLOCK_D], 0.0, tl.float32)
        for t in tl.static_range(R):
            base = TABLE + (h * R + t) * 12
            o_ptr = tl.load(base + 0).to(tl.pointer_type(OUT.dtype.element_ty))
            l_ptr = tl.load(base + 1).to(tl.pointer_type(tl.float32))
            a = tl.load(base + 2)
            ln = tl.load(base + 3)
            w = tl.load(base + 4)
            in_run = row_ok & (i >= a) & (i < a + ln)
            rel = tl.where(in_run, i - a, 0)
            blk = rel // w
            row = rel - blk * w
            o_off = b * tl.load(base + 5) + blk * tl.load(base + 6) + row * tl.load(base + 7)
            l_off = b * tl.load(base + 8) + blk * tl.load(base + 9) + row * tl.load(base + 10)
            rest_ok = row_ok & ~in_run
            rest = tl.load(base + 11) + tl.where(i < a, i, i - ln)
            rest = tl.where(rest_ok, rest, 0) + b * rest_rows
            o_run = tl.load(o_ptr + o_off[:, None] + d[None, :], mask=in_run[:, None] & d_ok[None, :], other=0.0)
            o_rest = tl.load(REST_O + rest[:, None] * DV + d[None, :], mask=rest_ok[:, None] & d_ok[None, :], other=0.0)
            o = tl.where(in_run[:, None], o_run.to(tl.float32), o_rest.to(tl.float32))
            l_run = tl.load(l_ptr + l_off, mask=in_run, other=-1e30)
            l_rest = tl.load(REST_L + rest, mask=rest_ok, other=-1e30)
            lse = tl.where(in_run, l_run, l_rest)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp(m - m_new)
            beta = tl.exp(lse - m_new)
            acc = acc * alpha[:, None] + o * beta[:, None]
            den = den * alpha + beta
            m = m_new
        out = acc / den[:, None]
        empty = m <= -5e29
        lse_out = tl.where(empty, -1e30, m + tl.log(den) - log_r)
        out = tl.where(empty[:, None], 0.0, out)
        o_base = OUT + b * stride_ob + h * stride_oh
        tl.store(o_base + i[:, None].to(tl.int64) * stride_on + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b * stride_lb + h * stride_lh + i, lse_out, mask=row_ok)

    return kernel


def merge_slots_triton(plan, run_out, rest, b: int, dv: int, out_dtype: torch.dtype,
                       block_i: int = 64) -> tuple[Tensor, Tensor]:
    """``merge_slots_torch`` as one Triton kernel (float32 lse; out in float16/bfloat16/float32)."""
    dev = rest[1].device
    out = torch.empty(b, plan.heads, plan.nq, dv, dtype=out_dtype, device=dev)
    lse = torch.empty(b, plan.heads, plan.nq, dtype=torch.float32, device=dev)
    merge_slots_into(plan, run_out, rest, out, lse, block_i)
    return out, lse


def merge_slots_into(plan, run_out, rest, out: Tensor, lse: Tensor, block_i: int = 64) -> None:
    """The Triton merge written into ``out`` [B, H, Nq, Dv] and ``lse`` [B, H, Nq] float32 (any
    strides with a unit last one: views of larger buffers too; offsets are 64-bit). The run outputs
    must stay alive until it returns (the table holds their addresses only)."""
    b, h_, nq, dv = out.shape
    out_dtype = out.dtype
    if out.stride(-1) != 1 or lse.stride(-1) != 1 or lse.dtype != torch.float32 or tuple(lse.shape) != (b, h_, nq):
        raise ValueError(f"merge_slots_into: out [B, H, Nq, Dv] and lse [B, H, Nq] float32 with unit last strides, "
                         f"got out {tuple(out.shape)} strides {out.stride()}, lse {tuple(lse.shape)} {lse.dtype} "
                         f"strides {lse.stride()}")
    rest_o, rest_l = rest[0].contiguous(), rest[1].contiguous()
    r = plan.samples
    if rest_o.shape[1] == 0:  # no rest rows: a dummy row, never read, so the kernel gets a real pointer
        rest_o, rest_l = rest_o.new_zeros(b, 1, dv), rest_l.new_full((b, 1), EMPTY_LSE)
    if rest_o.dtype != out_dtype or rest_l.dtype != torch.float32:
        raise TypeError(f"merge_slots_triton: rest buffer must be ({out_dtype}, float32), got "
                        f"({rest_o.dtype}, {rest_l.dtype})")
    table = [[rest_o.data_ptr(), rest_l.data_ptr(), 0, 0, 1, 0, 0, 0, 0, 0, 0, plan.rest_off[h][t]]
             for h in range(h_) for t in range(r)]
    keep = []
    for run, (o, l) in zip(plan.runs, run_out):
        o, l = last_dim_contiguous(o), l.float()
        if o.dtype != out_dtype:
            o = o.to(out_dtype)
        keep.append((o, l))
        row = table[run.h * r + run.t]
        row[_O_PTR], row[_L_PTR] = o.data_ptr(), l.data_ptr()
        row[_ROW], row[_LEN], row[_W] = plan.run_row[run.h][run.t], plan.run_len[run.h][run.t], run.width
        row[_OSB], row[_OSK], row[_OSR] = o.stride(0), o.stride(1), o.stride(2)
        row[_LSB], row[_LSK], row[_LSR] = l.stride(0), l.stride(1), l.stride(2)
    table_t = torch.tensor(table, dtype=torch.int64).to(out.device)
    programs = -(-nq // block_i) * b * h_
    if programs > GRID_LIMIT:
        raise ValueError(f"merge_slots_triton: {programs} programs (Nq / {block_i} x B x H) exceed the CUDA grid's "
                         f"{GRID_LIMIT}; pass a larger block_i")
    _merge_kernel()[(programs,)](table_t, rest_o, rest_l, out, lse, nq, h_, plan.rest_rows,
                                 out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                                 math.log(r), R=r, DV=dv, BLOCK_I=block_i,
                                 BLOCK_D=max(16, 1 << (dv - 1).bit_length()), **COMPILE_OPTIONS)
    del keep
