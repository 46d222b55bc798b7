"""The bounds of poslsh.theory: their formulas, their inverses, and that they hold empirically at
the sample counts they prescribe (in at least a 1 - delta share of repeated trials)."""

from __future__ import annotations

import math

import pytest
import torch

from poslsh import alibi_kernel, sample_partitions
from poslsh import theory
from poslsh.mask_errors import count_matrix, mask_errors_dense

TRIALS = 20
DELTA = 0.1
# A bound at failure probability delta = 0.1 must hold in >= 18 of 20 trials. (If it held with
# probability exactly 0.9, 17 or fewer successes would still happen 32 % of the time, so this is
# only a sanity check of gross errors; the bounds are loose, and in practice all 20 trials pass.)
NEEDED = math.ceil((1 - DELTA) * TRIALS)


def test_max_norm_formula_and_inverse():
    n, eps, delta = 100, 0.05, 0.01
    r = theory.max_norm_samples(n, eps, delta)
    assert r == math.ceil(math.log(2 * (n * (n - 1) / 2) / delta) / (2 * eps**2))
    assert theory.max_norm_eps(n, r, delta) <= eps < theory.max_norm_eps(n, r - 1, delta)
    assert theory.max_norm_samples(n, eps, delta, heads=8) > r
    assert theory.max_norm_samples(1, eps, delta) == 1 and theory.max_norm_eps(1, 5, delta) == 0.0
    assert theory.max_norm_samples(n, 1.0, delta) == 1


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_max_norm_bound_holds(scheme):
    n, eps, slopes = 16, 0.1, [0.3, 1.0]
    r = theory.max_norm_samples(n, eps, DELTA, heads=len(slopes))  # 424
    gen = torch.Generator().manual_seed(100)
    good = 0
    for _ in range(TRIALS):
        parts = sample_partitions(n, slopes, r, scheme=scheme, generator=gen)
        good += float(mask_errors_dense(parts)["max"].max()) < eps
    print(f"\nmax norm, {scheme}: r = {r}, error < {eps} in {good}/{TRIALS} trials")
    assert good >= NEEDED, (good, r)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@pytest.mark.parametrize("n, slope, eps", [(16, 1.0, 1.0), (16, 0.3, 3.0), (24, 2.0, 0.5)])
def test_spectral_bound_holds(scheme, n, slope, eps):
    r = theory.spectral_samples(n, slope, eps, DELTA)
    assert r <= 2000  # "a few thousand at most": the test stays fast
    gen = torch.Generator().manual_seed(200)
    good = 0
    for _ in range(TRIALS):
        parts = sample_partitions(n, [slope], r, scheme=scheme, generator=gen)
        good += float(mask_errors_dense(parts)["spectral"][0]) < eps
    print(f"\nspectral, {scheme}, n = {n}, m = {slope}: r = {r}, error < {eps} in {good}/{TRIALS} trials")
    assert good >= NEEDED, (good, r)


def test_spectral_inverse_and_monotone():
    for n, slope in [(64, 0.5), (1000, 1 / 16), (5000, 1 / 256)]:
        r = theory.spectral_samples(n, slope, 2.0, DELTA)
        eps = theory.spectral_eps(n, slope, r, DELTA)
        assert eps <= 2.0 * (1 + 1e-6)  # bisection to a relative 1e-6
        assert theory.spectral_samples(n, slope, eps, DELTA) <= r
        assert theory.spectral_samples(n, slope, eps / 1.01, DELTA) > r or eps / 1.01 < 1e-12
        assert theory.spectral_samples(n, slope, 1.0, DELTA) >= r  # smaller eps needs more samples
    assert theory.spectral_samples(100, 0.0, 0.01, DELTA) == 1  # slope 0: every mask equals B
    assert theory.spectral_eps(100, 0.0, 3, DELTA) == 0.0
    # ||B|| bound: at least the true norm, and tends to coth(m/2).
    for n, m in [(1, 0.5), (10, 0.5), (300, 0.05), (7, 0.0)]:
        true = torch.linalg.eigvalsh(alibi_kernel(n, m)).max().item()
        assert true <= theory.kernel_norm_bound(n, m) * (1 + 1e-12)
    assert theory.kernel_norm_bound(10**6, 0.5) == pytest.approx(1 / math.tanh(0.25), rel=1e-12)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@pytest.mark.parametrize("n, slope, r", [(200, 0.3, 50), (2000, 0.05, 20), (100, 2.0, 20)])
def test_block_size_bound_holds(scheme, n, slope, r):
    """2000 trials, drawn as one batch of 2000 r samples: the union bound is nearly tight for the
    cut scheme at steep slopes (failure rate ~0.08 against delta = 0.1 at n = 100, m = 2), where
    20 trials would miss the (1 - delta) share by chance 21 % of the time; with 2000 trials a
    correct bound fails this check with probability ~5e-4, while a bound one smaller (failure rate
    e^m ~ 7 times higher there) would fail it."""
    trials = 2000
    length = theory.block_size_bound(n, slope, r, DELTA)
    assert 1 <= length < n  # a bound clipped at n could not fail
    gen = torch.Generator().manual_seed(300)
    largest = sample_partitions(n, [slope], r * trials, scheme=scheme, generator=gen).max_block_size()
    good = int((largest.reshape(trials, r).amax(1) <= length).sum())
    print(f"\nblock size, {scheme}, n = {n}, m = {slope}, r = {r}: largest <= {length} in {good}/{trials} trials")
    assert good >= (1 - DELTA) * trials, (good, length)


def test_block_size_bound_values():
    assert theory.block_size_bound(1000, 0.0, 5, DELTA) == 1000
    assert theory.block_size_bound(1000, 0.5, 5, DELTA) == math.ceil(math.log(1000 * 5 / DELTA) / 0.5)
    assert theory.block_size_bound(10, 1e-4, 5, DELTA) == 10  # clipped at n
    assert theory.block_tail_probability(10, 0.3, 10) == 0.0


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@pytest.mark.parametrize("n, slope, r", [(64, 0.5, 200), (64, 2.0, 100)])
def test_row_sum_bound_holds(scheme, n, slope, r):
    bound = theory.row_sum_error_bound(n, slope, r, DELTA)
    gen = torch.Generator().manual_seed(400)
    good = 0
    for _ in range(TRIALS):
        parts = sample_partitions(n, [slope], r, scheme=scheme, generator=gen)
        good += float(mask_errors_dense(parts)["row_sum"][0]) <= bound
    print(f"\nrow sum, {scheme}, n = {n}, m = {slope}, r = {r}: error <= {bound:.3g} in {good}/{TRIALS} trials")
    assert good >= NEEDED, (good, bound)
    assert theory.row_sum_error_bound(n, 0.0, r, DELTA) == 0.0


def _attention(scores: torch.Tensor, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_j e^{s_ij} W_ij v_j / sum_j e^{s_ij} W_ij in float64 (W = B or B-hat, zero = masked)."""
    w = torch.exp(scores) * weights
    return (w @ v) / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_attention_error_bound_holds(causal, scheme):
    """The bound is deterministic given B-hat: it must hold for every Q, K, V, row by row."""
    n, d = 48, 8
    gen = torch.Generator().manual_seed(500)
    worst = 0.0
    for slope in (0.05, 0.5, 2.0):
        for r in (1, 4, 32):
            parts = sample_partitions(n, [slope], r, scheme=scheme, generator=gen)
            bhat = count_matrix(parts)[0].to(torch.float64) / r
            b = alibi_kernel(n, slope)
            if causal:
                bhat, b = bhat.tril(), b.tril()
            rho = (bhat - b).abs().sum(-1)  # per-row error of this B-hat [n]
            mass = b.sum(-1)  # S_i [n]
            for beta, vmax in ((0.5, 1.0), (3.0, 2.0)):
                for _ in range(3):
                    q = torch.randn(n, d, dtype=torch.float64, generator=gen)
                    k = torch.randn(n, d, dtype=torch.float64, generator=gen)
                    s = q @ k.T
                    s = beta * s / s.abs().max()  # |logits| <= beta, some attaining it
                    # values at +-V (the extreme case for |v_j - O_i| <= 2V) or uniform within
                    v = vmax * torch.sign(torch.randn(n, 3, dtype=torch.float64, generator=gen))
                    v[:, 2] = vmax * (2 * torch.rand(n, dtype=torch.float64, generator=gen) - 1)
                    err = (_attention(s, bhat, v) - _attention(s, b, v)).abs().amax(-1)  # [n]
                    plain = theory.attention_error_bound(rho, beta, vmax)
                    improved = theory.attention_error_bound(rho, beta, vmax, row_mass=mass)
                    assert bool((improved <= plain + 1e-15).all())
                    assert bool((err <= improved * (1 + 1e-9) + 1e-15).all()), float((err - improved).max())
                    worst = max(worst, float((err / improved.clamp(min=1e-300)).max()))
                    # the scalar form with the worst row's rho bounds every row
                    assert float(err.max()) <= theory.attention_error_bound(float(rho.max()), beta, vmax) * (1 + 1e-9)
    print(f"\nlargest (measured error / improved bound) over all rows and cases: {worst:.3f}")
    assert 0 < worst <= 1


def test_attention_bound_formula():
    assert theory.attention_error_bound(0.1, 1.0, 2.0) == pytest.approx(2 * 2.0 * math.exp(2) * 0.1)
    assert theory.attention_error_bound(0.1, 1.0, 2.0, row_mass=50.0) == pytest.approx(4 * math.exp(2) * 0.1 / 49.9)
    assert theory.attention_error_bound(0.0, 5.0, 1.0) == 0.0


@pytest.mark.parametrize("call, exc, match", [
    (lambda: theory.max_norm_samples(0, 0.1, 0.1), ValueError, "^n must"),
    (lambda: theory.max_norm_samples(10, 0.0, 0.1), ValueError, "^eps must"),
    (lambda: theory.max_norm_samples(10, float("nan"), 0.1), ValueError, "^eps must"),
    (lambda: theory.max_norm_samples(10, 0.1, 1.0), ValueError, "^delta must"),
    (lambda: theory.max_norm_samples(10, 0.1, 0.1, heads=0), ValueError, "^heads must"),
    (lambda: theory.max_norm_eps(10, 2.5, 0.1), TypeError, "^samples must"),
    (lambda: theory.block_size_bound(10, -1.0, 5, 0.1), ValueError, "^slope must"),
    (lambda: theory.block_size_bound(10, float("inf"), 5, 0.1), ValueError, "^slope must"),
    (lambda: theory.block_size_bound(10, 0.5, 0, 0.1), ValueError, "^samples must"),
    (lambda: theory.spectral_samples(10, 0.5, -1.0, 0.1), ValueError, "^eps must"),
    (lambda: theory.spectral_samples(10.0, 0.5, 1.0, 0.1), TypeError, "^n must"),
    (lambda: theory.spectral_eps(10, 0.5, 5, 0.0), ValueError, "^delta must"),
    (lambda: theory.row_sum_error_bound(10, "0.5", 5, 0.1), TypeError, "^slope must"),
    (lambda: theory.attention_error_bound(-0.1, 1.0, 1.0), ValueError, "^row_sum_error must"),
    (lambda: theory.attention_error_bound(0.1, -1.0, 1.0), ValueError, "^logit_bound must"),
    (lambda: theory.attention_error_bound(0.1, 1.0, float("inf")), ValueError, "^value_bound must"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
