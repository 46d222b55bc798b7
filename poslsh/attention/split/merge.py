"""Merging the split backend's partial results: for every (head, query row), the r partials of its
r samples (one per slot, see ``backend.SplitPlan``) combined by softmax over their log-sum-exps,

    out = sum_t exp(L_t - M) O_t / sum_t exp(L_t - M),    lse = M + log sum_t exp(L_t - M) - log r,

with the run outputs read where the primitive left them (no copies) and every other row from the
rest buffer. Two implementations of the same function: ``merge_slots_torch`` here (any device and
dtype, two passes: the LSEs, then the weighted sum in the compute dtype), the plain version, and
``merge_slots_triton`` (``poslsh.attention.triton.split_merge``: CUDA, one kernel), held to it in
``tests/test_split_triton_merge.py``. ``merge_slots`` picks the kernel on CUDA when poslsh's Triton package imports.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch
from torch import Tensor

from ..core import EMPTY_LSE

__all__ = ["merge_slots", "merge_slots_torch", "triton_merge_available"]

# The Triton merge moved to poslsh.attention.triton.split_merge; its old names here still work.
MOVED_TO_TRITON = ("merge_slots_triton", "merge_slots_into")


def _slot_pieces(plan, runs: dict, rest, h: int, t: int):
    """(rows slice, o, lse) pieces of slot (h, t), covering rows 0..Nq-1 in order."""
    rest_o, rest_l = rest
    nq = plan.nq
    a, ln, off = plan.run_row[h][t], plan.run_len[h][t], plan.rest_off[h][t]
    pieces = [(slice(0, a), rest_o[:, off:off + a], rest_l[:, off:off + a])]
    if ln:
        o, lse = runs[(h, t)]
        pieces.append((slice(a, a + ln), o, lse))
    pieces.append((slice(a + ln, nq), rest_o[:, off + a:off + nq - ln], rest_l[:, off + a:off + nq - ln]))
    return [p for p in pieces if p[0].stop > p[0].start]


def merge_slots_torch(plan, run_out, rest, b: int, dv: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The merge in torch ops.

    Args:
        plan: ``SplitPlan`` (heads, samples, nq, runs, run_row, run_len, rest_off).
        run_out: per run of ``plan.runs``, (o [B, nb, W, Dv], lse [B, nb, W]).
        rest: (o [B, rest_rows, Dv], lse [B, rest_rows]).

    Returns:
        (out [B, H, Nq, Dv] in ``out_dtype``, lse [B, H, Nq] in the rest lse's dtype); rows empty in
        every slot get 0 and EMPTY_LSE.
    """
    rest_l = rest[1]
    h_, r, nq = plan.heads, plan.samples, plan.nq
    dev, ldt = rest_l.device, rest_l.dtype
    runs = {(run.h, run.t): o for run, o in zip(plan.runs, run_out)}
    lse_all = torch.empty(r, b, h_, nq, dtype=ldt, device=dev)
    for h in range(h_):
        for t in range(r):
            for rows, _, lse in _slot_pieces(plan, runs, rest, h, t):
                lse_all[t, :, h, rows] = lse.reshape(b, -1)
    m = lse_all.amax(0)
    total = m + torch.log(torch.exp(lse_all - m).sum(0))
    w = torch.exp(lse_all - total)
    acc = torch.zeros(b, h_, nq, dv, dtype=ldt, device=dev)
    for h in range(h_):
        for t in range(r):
            for rows, o, _ in _slot_pieces(plan, runs, rest, h, t):
                acc[:, h, rows].view(o.shape).addcmul_(o, w[t, :, h, rows].reshape(*o.shape[:-1], 1))
    lse = torch.where(m <= EMPTY_LSE / 2, torch.full_like(total, EMPTY_LSE), total - math.log(r))
    return acc.to(out_dtype), lse


@functools.cache
def triton_merge_available() -> bool:
    """Whether poslsh's Triton package imports (triton installed, a release it supports)."""
    try:
        importlib.import_module("poslsh.attention.triton")
    except ImportError:
        return False
    return True


def merge_slots(plan, run_out, rest, b: int, dv: int, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``merge_slots_triton`` on CUDA (float32 lse, 16/32-bit out) when poslsh's Triton package imports, else
    ``merge_slots_torch``."""
    if (rest[1].is_cuda and triton_merge_available() and rest[1].dtype == torch.float32
            and out_dtype in (torch.float16, torch.bfloat16, torch.float32)):
        from ..triton.split_merge import merge_slots_triton  # imports triton: only here, on CUDA

        return merge_slots_triton(plan, run_out, rest, b, dv, out_dtype)
    return merge_slots_torch(plan, run_out, rest, b, dv, out_dtype)


def __getattr__(name: str):
    """``split.merge.merge_slots_triton`` (and the old ``poslsh.attention.split_merge``'s): the moved
    Triton merge, with a DeprecationWarning."""
    if name not in MOVED_TO_TRITON:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..triton import split_merge

    warnings.warn(f"{__name__}.{name} moved to {split_merge.__name__}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(split_merge, name)
