"""Error measurement: structured (no n x n matrix) must equal dense; the O(n) operators must equal
their dense matrices, stably, up to n = 1e6 and slope 10."""

from __future__ import annotations

import math
import time

import pytest
import torch

from poslsh import Partitions, alibi_kernel, sample_partitions
from poslsh.mask_errors import (KernelOperator, MeanMaskOperator, count_matrix, lanczos_norm, mask_errors,
                          mask_errors_dense, mask_errors_structured, select_head)

SCHEMES = ["grid", "cut"]
STEEP = 40.0  # q = 4e-18: masks are almost surely singletons


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
def test_count_matrix_equals_dense_masks(scheme, n):
    parts = sample_partitions(n, [0.0, 0.1, 1.5, STEEP], 9, scheme=scheme, generator=torch.Generator().manual_seed(n))
    assert torch.equal(count_matrix(parts), parts.dense_masks().sum(1))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [1, 2, 7, 33, 64])
def test_structured_equals_dense(scheme, n):
    slopes = [0.0, 0.01, 0.3, 2.0, STEEP]
    for r in (1, 5, 32):
        gen = torch.Generator().manual_seed(1000 * n + r)
        parts = sample_partitions(n, slopes, r, scheme=scheme, generator=gen)
        dense = mask_errors(parts, "dense")
        # rtol 1e-13: at n <= 64 Lanczos runs until its Krylov space is invariant, so it is exact.
        structured = mask_errors(parts, "structured", rtol=1e-13)
        for key in ("max", "spectral", "row_sum"):
            assert dense[key].dtype == torch.float64 and dense[key].shape == (len(slopes),)
            diff = (dense[key] - structured[key]).abs()
            assert bool((diff <= 1e-10 * dense[key].clamp(min=1)).all()), (key, r, dense[key], structured[key])
        assert (dense["max"][0] == 0) and (dense["spectral"][0] == 0)  # slope 0: masks equal B


def test_dense_errors_by_hand():
    """Singleton masks (steep slope): E = -B off the diagonal, so max = e^{-m}, row sum = 2(e^{-m}+e^{-2m}+...)."""
    n, m = 6, 1.0
    parts = sample_partitions(n, [60.0], 3)
    parts = parts.__class__(n, torch.tensor([m], dtype=torch.float64), parts.scheme, parts.widths, parts.offsets,
                            parts.cut_positions, parts.cut_pointers)  # same singleton masks, judged against slope 1
    err = mask_errors_dense(parts)
    b = alibi_kernel(n, m)
    assert err["max"].item() == pytest.approx(math.exp(-m), rel=1e-14)
    assert err["row_sum"].item() == pytest.approx(float((b - torch.eye(n, dtype=torch.float64)).sum(1).max()), rel=1e-14)
    expect = torch.linalg.eigvalsh(b - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert err["spectral"].item() == pytest.approx(expect, rel=1e-12)
    assert mask_errors_structured(parts)["row_sum"].item() == pytest.approx(err["row_sum"].item(), rel=1e-12)


def _dense_kernel_matvec(x: torch.Tensor, slope: float, block: int = 500) -> torch.Tensor:
    """B x and B |x| row block by row block (B never fully formed)."""
    n = x.shape[-1]
    pos = torch.arange(n, dtype=torch.float64)
    out, mag = torch.empty_like(x), torch.empty_like(x)
    for a in range(0, n, block):
        rows = torch.exp(-slope * (pos[a:a + block, None] - pos[None, :]).abs())
        out[..., a:a + block] = x @ rows.T
        mag[..., a:a + block] = x.abs() @ rows.T
    return out, mag


@pytest.mark.parametrize("slope", [0.0, 1e-6, 1 / 256, 0.5, 3.0, 10.0])
@pytest.mark.parametrize("n", [1, 2, 100, 5000])
def test_kernel_matvec_equals_dense(slope, n):
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want, mag = _dense_kernel_matvec(x, slope)
    got = KernelOperator(n, slope).matvec(x)
    # Relative to B|x| entry by entry: the recurrences' rounding error is relative to that.
    assert bool(((got - want).abs() <= 1e-13 * mag + 1e-300).all()), float(((got - want).abs() / mag).max())


@pytest.mark.parametrize("slope", [10.0, 1 / 256, 1e-3, 1e-7])
def test_kernel_matvec_stable_at_a_million(slope):
    """n = 1e6: x is 12 spikes (two at the ends), so B x is exactly a sum of 12 two-sided exponentials."""
    n = 1_000_000
    gen = torch.Generator().manual_seed(5)
    where = torch.cat([torch.tensor([0, n - 1]), torch.randperm(n, generator=gen)[:10]])
    vals = torch.randn(12, dtype=torch.float64, generator=gen)
    x = torch.zeros(n, dtype=torch.float64)
    x[where] = vals
    pos = torch.arange(n, dtype=torch.float64)
    want = torch.zeros(n, dtype=torch.float64)
    mag = torch.zeros(n, dtype=torch.float64)
    for p, v in zip(where.tolist(), vals.tolist()):
        col = torch.exp(-slope * (pos - p).abs())
        want += v * col
        mag += abs(v) * col
    got = KernelOperator(n, slope).matvec(x)
    assert bool(((got - want).abs() <= 1e-12 * mag + 1e-300).all()), float(((got - want).abs() / mag).nan_to_num().max())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mean_mask_matvec_equals_dense(scheme):
    parts = sample_partitions(300, [0.0, 0.02, 0.7, STEEP], 11, scheme=scheme, generator=torch.Generator().manual_seed(2))
    bhat = parts.mean_mask()
    x = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for h in range(4):
        torch.testing.assert_close(MeanMaskOperator(parts, h).matvec(x), bhat[h] @ x, rtol=1e-12, atol=1e-12)
        one = select_head(parts, h)
        assert torch.equal(one.block_ids()[0], parts.block_ids()[h])


def test_lanczos_against_eigvalsh():
    gen = torch.Generator().manual_seed(4)
    for n in (1, 3, 50, 150):
        a = torch.randn(n, n, dtype=torch.float64, generator=gen)
        a = a + a.T
        want = torch.linalg.eigvalsh(a).abs().max().item()
        got, residual, steps = lanczos_norm(lambda v: a @ v, n, rtol=1e-12)
        assert got <= want * (1 + 1e-12)
        assert got == pytest.approx(want, rel=1e-9), (n, steps, residual)
    # A matrix whose largest |eigenvalue| is negative and isolated.
    d = torch.cat([torch.linspace(-3, 3, 999, dtype=torch.float64), torch.tensor([-5.0], dtype=torch.float64)])
    assert lanczos_norm(lambda v: d * v, 1000)[0] == pytest.approx(5.0, rel=1e-8)
    assert lanczos_norm(lambda v: 0 * v, 10)[0] == 0.0


def test_structured_at_100k_is_fast():
    """Spectral, max and row-sum errors at n = 1e5, r = 16 in a few seconds of CPU time.

    Timed as this process's CPU time on one thread, so that other jobs on a shared machine do not
    make it flaky (wall time is printed too); 2 s when measured alone, the bound is generous.
    """
    n = 100_000
    parts = sample_partitions(n, [0.5], 16, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        err = mask_errors(parts)  # auto -> structured
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    print(f"\nstructured errors at n = 1e5, r = 16, m = 0.5: {cpu:.2f} s CPU, {wall:.2f} s wall, "
          f"{ {k: float(v) for k, v in err.items()} }")
    assert float(err["spectral_residual"]) <= 1e-6 * float(err["spectral"])
    # Sanity: ||E||_2 lies between max|E_ij| and the row-sum norm (E symmetric).
    assert float(err["max"]) <= float(err["spectral"]) * (1 + 1e-9) <= float(err["row_sum"]) * (1 + 1e-9)
    assert cpu < 15.0


def test_bad_input():
    parts = sample_partitions(8, [0.5], 2)
    with pytest.raises(ValueError, match="^method must"):
        mask_errors(parts, "eigen")
    with pytest.raises(TypeError, match="^partitions must"):
        mask_errors(torch.ones(8, 8))
    with pytest.raises(ValueError, match="^head must"):
        select_head(parts, 1)
    # A head drawn for a general (non-exponential) kernel has slope NaN: no ALiBi B to compare with.
    general = Partitions(8, torch.tensor([float("nan")], dtype=torch.float64), "grid", widths=parts.widths,
                         offsets=parts.offsets)
    for method in ("dense", "structured"):
        with pytest.raises(ValueError, match="^partitions must be drawn for ALiBi slopes"):
            mask_errors(general, method)
    with pytest.raises(ValueError, match="^slope must"):
        KernelOperator(8, -1.0)
    with pytest.raises(ValueError, match="^x must"):
        KernelOperator(8, 1.0).matvec(torch.ones(7, dtype=torch.float64))
