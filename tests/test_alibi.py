"""ALiBi slopes and kernel: the slope schedule must match BLOOM's ``build_alibi_tensor`` exactly."""

import math

import pytest
import torch

from poslsh import alibi_bias, alibi_kernel, alibi_slopes


def _bloom_reference(num_heads: int) -> list[float]:
    """BLOOM's slope rule, written out from its definition (not from poslsh's code):
    P = the largest power of two <= H; heads 1..P get 2^(-8h/P); the other H - P heads get the
    odd-indexed slopes 2^(-8(2k-1)/(2P)), k = 1..H-P, of the 2P-head schedule."""
    p = 1
    while 2 * p <= num_heads:
        p *= 2
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    slopes += [2.0 ** (-8.0 * (2 * k - 1) / (2 * p)) for k in range(1, num_heads - p + 1)]
    return slopes


@pytest.mark.parametrize("num_heads", range(1, 65))
def test_slopes_match_bloom(num_heads):
    got = alibi_slopes(num_heads)
    assert got.dtype == torch.float64 and got.shape == (num_heads,)
    ref = torch.tensor(_bloom_reference(num_heads), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)


def test_press_schedule_examples():
    # Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256.
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -k for k in range(1, 9)], dtype=torch.float64))
    # 12 heads (a BLOOM-560m-like count): 8 of the 8-head schedule then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    extra = alibi_slopes(12)[8:]
    torch.testing.assert_close(extra, torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5], dtype=torch.float64))


def test_kernel_values_dtype_and_causal():
    n, m = 9, 0.3
    b = alibi_kernel(n, m)
    assert b.dtype == torch.float64 and b.shape == (n, n)
    for i in range(n):
        for j in range(n):
            assert b[i, j].item() == pytest.approx(math.exp(-m * abs(i - j)), rel=1e-15)
    c = alibi_kernel(n, m, causal=True)
    assert c.dtype == torch.float64
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    assert (c[upper] == 0).all()
    torch.testing.assert_close(c[~upper], b[~upper])
    # The additive bias is the log of the kernel, -inf where causal masks.
    torch.testing.assert_close(alibi_bias(n, m).exp(), b)
    assert torch.isinf(alibi_bias(n, m, causal=True)[upper]).all()


def test_kernel_slope_zero_and_n_one():
    assert (alibi_kernel(5, 0.0) == 1).all()
    assert alibi_kernel(1, 2.0).tolist() == [[1.0]]


@pytest.mark.parametrize("bad, exc, match", [
    (0, ValueError, "^num_heads must"), (-3, ValueError, "^num_heads must"), (2.0, TypeError, "^num_heads must"),
    (True, TypeError, "^num_heads must"),
])
def test_slopes_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        alibi_slopes(bad)


@pytest.mark.parametrize("n, slope, exc, match", [
    (0, 0.5, ValueError, "^n must"), (3.0, 0.5, TypeError, "^n must"), (4, -0.1, ValueError, "^slope must"),
    (4, float("nan"), ValueError, "^slope must"), (4, float("inf"), ValueError, "^slope must"),
])
def test_kernel_bad_input(n, slope, exc, match):
    with pytest.raises(exc, match=match):
        alibi_kernel(n, slope)


def test_bias_of_several_slopes_is_one_matrix_per_head():
    """alibi_bias(200, alibi_slopes(8)) used to use the first slope only, silently."""
    slopes = alibi_slopes(8)
    many = alibi_bias(200, slopes, causal=True)
    assert many.shape == (8, 200, 200)
    for h, m in enumerate(slopes.tolist()):
        torch.testing.assert_close(many[h], alibi_bias(200, m, causal=True), rtol=0, atol=0)
    assert alibi_bias(5, [0.5]).shape == (1, 5, 5) and alibi_bias(5, torch.tensor(0.5)).shape == (5, 5)
    torch.testing.assert_close(alibi_kernel(7, [0.5, 0.1])[1], alibi_kernel(7, 0.1))
    with pytest.raises(ValueError, match=r"slope must be 1-D with one slope per head"):
        alibi_bias(5, torch.ones(2, 3))
