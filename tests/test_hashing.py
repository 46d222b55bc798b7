"""Positional-LSH sampler: exact collision law (and a demonstration that subtly wrong laws fail),
marginal laws, structure of the partitions, reproducibility, speed, and bad input."""

from __future__ import annotations

import math
import time

import pytest
import torch

from poslsh import Partitions, alibi_kernel, sample_partitions
from poslsh.mask_errors import count_matrix

SLOPES = [0.02, 0.2, 1.0, 3.0]
N = 64
R = 20_000
# Family-wise false-alarm rate of the unbiasedness check, over all entries checked at once.
FAMILY_ALPHA = 1e-6


# ----------------------------------------------------------------------------- the unbiasedness check


def unbiasedness_check(parts: Partitions, alpha: float = FAMILY_ALPHA) -> dict:
    """Is every entry of B-hat consistent with B_ij = e^{-m|i-j|}? Chernoff-bounded, family-wise.

    Each off-diagonal entry of B-hat is a mean of r i.i.d. Bernoulli(p) with p = B_ij, if the
    sampler is right. Chernoff's bound P(p-hat >= a) <= exp(-r KL(a || p)) for a >= p (and the
    mirror bound below p) gives P(r KL(p-hat || p) >= t) <= 2 e^{-t} exactly, with no normal
    approximation. Over the N = H n (n-1)/2 entries i < j, rejecting when any entry has
    r KL(p-hat || p) >= t = ln(2N / alpha) is a test with family-wise false-alarm rate <= alpha
    (Bonferroni; no independence between entries needed).

    Here H = 4 slopes and n = 64: N = 8064, alpha = 1e-6, t = ln(1.61e10) = 23.5. Where the
    normal approximation holds (r p (1-p) large), r KL ~ z^2 / 2, so this is "within
    sqrt(2t) = 6.86 standard errors sqrt(B(1-B)/r)". Where B is tiny (slope 3 at large distances,
    B down to e^-189), the bound is exact where a floored z-score would not be: p-hat = 0 is
    accepted unless r B > 23.5, and any nonzero count at B ~ 1e-80 is rejected.
    """
    h, r, n = parts.num_heads, parts.num_samples, parts.n
    counts = count_matrix(parts).to(torch.float64)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    phat = counts[:, upper] / r  # [H, N/H]
    p = torch.stack([alibi_kernel(n, float(m))[upper] for m in parts.slopes])
    kl = torch.special.xlogy(phat, phat / p) + torch.special.xlogy(1 - phat, (1 - phat) / (1 - p))
    stat = r * kl
    entries = h * int(upper.sum())
    threshold = math.log(2 * entries / alpha)
    z = (phat - p) / torch.sqrt(p * (1 - p) / r)
    normal = r * p * (1 - p) >= 10  # where a z-score means something
    return {
        "entries": entries,
        "threshold": threshold,
        "rejected_per_head": (stat >= threshold).sum(1).tolist(),
        "max_stat": float(stat.max()),
        "max_abs_z_normal_regime": float(z[normal].abs().max()) if normal.any() else 0.0,
        "ok": bool((stat < threshold).all()),
    }


def _partitions_from_cut_mask(cut: torch.Tensor, slopes) -> Partitions:
    """Partitions from a bool [H, r, n-1] tensor: cut[h, t, g] cuts the gap between g and g+1."""
    h, r, gaps = cut.shape
    flat = cut.reshape(h * r, gaps)
    rows, cols = flat.nonzero(as_tuple=True)  # row-major: sorted within each (head, sample)
    pointers = torch.zeros(h * r + 1, dtype=torch.int64)
    pointers[1:] = torch.bincount(rows, minlength=h * r).cumsum(0)
    return Partitions(gaps + 1, torch.tensor(slopes, dtype=torch.float64), "cut",
                      cut_positions=cols + 1, cut_pointers=pointers)


def wrong_cut_probability(n: int, slopes, r: int, gen: torch.Generator) -> Partitions:
    """WRONG: cuts each gap with probability m (clipped to 1) instead of 1 - e^{-m}."""
    p = torch.tensor(slopes, dtype=torch.float64).clamp(max=1.0)[:, None, None]
    return _partitions_from_cut_mask(torch.rand(len(slopes), r, n - 1, generator=gen, dtype=torch.float64) < p, slopes)


def _grid_from(widths: torch.Tensor, offsets: torch.Tensor, n: int, slopes) -> Partitions:
    return Partitions(n, torch.tensor(slopes, dtype=torch.float64), "grid", widths=widths, offsets=offsets)


def wrong_uniform_width(n: int, slopes, r: int, gen: torch.Generator) -> Partitions:
    """WRONG: width uniform on {1, ..., 2 E[W] - 1} (the right mean, E[W] = (1+q)/(1-q)) instead of
    P(W = w) = w (1-q)^2 q^(w-1); offset uniform on {0..W-1} as it should be."""
    m = torch.tensor(slopes, dtype=torch.float64)[:, None]
    top = (2 * torch.round((1 + torch.exp(-m)) / -torch.expm1(-m)) - 1).clamp(min=1)
    u = torch.rand(len(slopes), r, generator=gen, dtype=torch.float64)
    widths = 1 + torch.floor(u * top).long()
    offsets = torch.floor(torch.rand(len(slopes), r, generator=gen, dtype=torch.float64) * widths).long()
    return _grid_from(widths, offsets, n, slopes)


def wrong_offset_range(n: int, slopes, r: int, gen: torch.Generator) -> Partitions:
    """WRONG (off by one): the right width law, but the offset uniform on {0..W} instead of {0..W-1}."""
    right = sample_partitions(n, slopes, r, scheme="grid", generator=gen)
    u = torch.rand(right.widths.shape, generator=gen, dtype=torch.float64)
    offsets = torch.floor(u * (right.widths + 1)).long()
    # Offset W gives the blocks of offset 0; Partitions stores offsets in 0..W-1, so wrap it: the same
    # wrong law (offset 0 twice as likely as each other one).
    return _grid_from(right.widths, torch.remainder(offsets, right.widths), n, slopes)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_unbiased(scheme):
    gen = torch.Generator().manual_seed(20240601)
    parts = sample_partitions(N, SLOPES, R, scheme=scheme, generator=gen)
    res = unbiasedness_check(parts)
    print(f"\n{scheme}: {res}")
    assert res["entries"] == 4 * 64 * 63 // 2
    assert res["ok"], res


@pytest.mark.parametrize("wrong", [wrong_cut_probability, wrong_uniform_width, wrong_offset_range])
def test_wrong_sampler_is_rejected(wrong):
    gen = torch.Generator().manual_seed(7)
    res = unbiasedness_check(wrong(N, SLOPES, R, gen))
    print(f"\n{wrong.__name__}: {res}")
    assert not res["ok"], f"the check failed to reject {wrong.__name__}: {res}"


# ----------------------------------------------------------------------------- marginal laws

CHI2_ALPHA = 1e-6  # false-alarm rate of each chi-square test below


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, int]:
    """Pearson chi-square statistic, its df and p-value (P(chi2_df >= stat) = Q(df/2, stat/2))."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = observed.numel() - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, df, p


def _binned(values: torch.Tensor, probs: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed and expected counts on bins 1..K (K: last bin with expected >= 20) plus a tail bin."""
    expected = probs * total
    k = int((expected >= 20).nonzero().max()) + 1  # bins for values 1..k
    obs = torch.bincount(values.clamp(max=k + 1), minlength=k + 2)[1:].to(torch.float64)
    exp_counts = torch.cat([expected[:k], (total - expected[:k].sum()).reshape(1)])
    return obs, exp_counts


@pytest.mark.parametrize("slope", [0.05, 0.2, 1.0])
def test_grid_width_law(slope):
    """W ~ P(W = w) = w (1-q)^2 q^(w-1): chi-square at false-alarm 1e-6; rejects a uniform width."""
    r = 100_000
    gen = torch.Generator().manual_seed(11)
    w = sample_partitions(1, [slope], r, scheme="grid", generator=gen).widths[0]
    q = math.exp(-slope)
    ws = torch.arange(1, 4000, dtype=torch.float64)
    probs = ws * (1 - q) ** 2 * q ** (ws - 1)
    obs, exp_counts = _binned(w, probs, r)
    stat, df, p = _chi2_pvalue(obs, exp_counts)
    assert p >= CHI2_ALPHA, (stat, df, p)
    # Power: the uniform width of the same mean is rejected by the very same test.
    bad = wrong_uniform_width(1, [slope], r, gen).widths[0]
    obs, exp_counts = _binned(bad, probs, r)
    assert _chi2_pvalue(obs, exp_counts)[2] < CHI2_ALPHA


def test_grid_offsets_uniform_given_width():
    """Given W = w, U is uniform on {0..w-1}: chi-square summed over all w with >= 20 draws per cell."""
    r = 200_000
    gen = torch.Generator().manual_seed(12)
    parts = sample_partitions(1, [0.3], r, scheme="grid", generator=gen)
    w, u = parts.widths[0], parts.offsets[0]
    assert bool(((u >= 0) & (u < w)).all())
    stat, df = 0.0, 0
    for width in torch.unique(w).tolist():
        sel = u[w == width]
        if width < 2 or sel.numel() < 20 * width:
            continue
        obs = torch.bincount(sel, minlength=width).to(torch.float64)
        s, d, _ = _chi2_pvalue(obs, torch.full((width,), sel.numel() / width, dtype=torch.float64))
        stat, df = stat + s, df + d
    assert df > 50
    p = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))
    assert p >= CHI2_ALPHA, (stat, df, p)


@pytest.mark.parametrize("slope", [0.1, 0.7])
def test_cut_block_lengths_geometric(slope):
    """Cut scheme: the first block's length is geometric, P(L = k) = q^(k-1) (1-q) (chi-square,
    false alarm 1e-6), and each gap is cut with frequency 1 - q (Chernoff-KL, family-wise 1e-6)."""
    n, r = 200, 50_000
    gen = torch.Generator().manual_seed(13)
    parts = sample_partitions(n, [slope], r, scheme="cut", generator=gen)
    q = math.exp(-slope)
    counts = parts.cut_pointers.diff()
    first = torch.where(counts > 0, parts.cut_positions[parts.cut_pointers[:-1].clamp(max=parts.cut_positions.numel() - 1)], n)
    ks = torch.arange(1, n, dtype=torch.float64)
    obs, exp_counts = _binned(first, q ** (ks - 1) * (1 - q), r)
    stat, df, p = _chi2_pvalue(obs, exp_counts)
    assert p >= CHI2_ALPHA, (stat, df, p)
    # Per-gap cut frequencies: each is Binomial(r, 1 - q).
    freq = torch.bincount(parts.cut_positions, minlength=n)[1:].to(torch.float64) / r
    p_cut = 1 - q
    kl = torch.special.xlogy(freq, freq / p_cut) + torch.special.xlogy(1 - freq, (1 - freq) / (1 - p_cut))
    assert float((r * kl).max()) < math.log(2 * (n - 1) / 1e-6)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_block_structure(scheme):
    gen = torch.Generator().manual_seed(3)
    parts = sample_partitions(50, [0.0, 0.05, 0.4, 2.0, 30.0], 7, scheme=scheme, generator=gen)
    ids = parts.block_ids()
    assert ids.dtype == torch.int64 and ids.shape == (5, 7, 50)
    assert (ids[..., 0] == 0).all()
    steps = ids.diff(dim=-1)
    assert ((steps == 0) | (steps == 1)).all()
    start, end = parts.block_bounds()
    pos = torch.arange(50)
    assert ((start <= pos) & (pos < end) & (start >= 0) & (end <= 50)).all()
    # start/end are exactly where the block id changes.
    assert (ids.gather(-1, start) == ids).all() and (ids.gather(-1, end - 1) == ids).all()
    assert (torch.where(start > 0, ids.gather(-1, (start - 1).clamp(min=0)), -1) != ids).all()
    # Bounds of some positions only (any order, repeats), and one head alone, agree with the full scan.
    some = torch.tensor([49, 0, 17, 17, 3])
    s2, e2 = parts.bounds_at(some, parts.cut_table() if scheme == "cut" else None)
    assert s2.dtype == torch.int64 and torch.equal(s2, start[..., some]) and torch.equal(e2, end[..., some])
    for h in range(5):
        assert torch.equal(parts.head(h).block_ids()[0], ids[h])
    assert torch.equal(parts.max_block_size(), parts.block_sizes().amax(-1))
    masks = parts.dense_masks()
    assert masks.dtype == torch.bool and masks.shape == (5, 7, 50, 50)
    torch.testing.assert_close(parts.mean_mask(), masks.double().mean(1))
    # Slope 0 is one block; slope 30 (q = 1e-13) is all singletons at this size.
    assert (ids[0] == 0).all() and (parts.max_block_size()[0] == 50).all()
    assert (ids[4] == pos).all()


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_edge_cases(scheme):
    one = sample_partitions(1, [0.0, 0.5, 100.0], 3, scheme=scheme)
    assert one.block_ids().tolist() == [[[0]] * 3] * 3
    assert one.mean_mask().tolist() == [[[1.0]]] * 3
    assert (one.max_block_size() == 1).all()
    flat = sample_partitions(1000, 0.0, 4, scheme=scheme)
    assert (flat.block_ids() == 0).all()
    steep = sample_partitions(1000, 60.0, 4, scheme=scheme)
    assert (steep.block_ids() == torch.arange(1000)).all()
    # Tiny but positive slopes: (almost surely) one block, and no overflow in the representation.
    tiny = sample_partitions(1000, [1e-20, 1e-300], 4, scheme=scheme, generator=torch.Generator().manual_seed(0))
    assert (tiny.block_ids() == 0).all()


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_reproducible(scheme):
    def draw(seed):
        p = sample_partitions(300, [0.1, 1.0], 5, scheme=scheme, generator=torch.Generator().manual_seed(seed))
        return p.block_ids()

    assert torch.equal(draw(42), draw(42))
    assert not torch.equal(draw(42), draw(43))


def test_grid_sampling_is_fast_at_a_million():
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / 32) for h in range(32)], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    sample_partitions(10, slopes, 16, generator=gen)  # warm-up (first-call overheads)
    t = time.perf_counter()
    parts = sample_partitions(1_000_000, slopes, 16, generator=gen)
    largest = parts.max_block_size()
    elapsed = time.perf_counter() - t
    print(f"\ngrid sampling + largest blocks at n = 1e6, H = 32, r = 16: {elapsed * 1e3:.2f} ms")
    assert parts.widths.shape == (32, 16) and largest.shape == (32, 16)
    assert elapsed < 1.0, f"grid sampling at n = 1e6, H = 32, r = 16 took {elapsed:.3f} s"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(slopes=[-0.5]), ValueError, "^slopes must"),
    (dict(slopes=[0.5, float("nan")]), ValueError, "^slopes must"),
    (dict(slopes=[float("inf")]), ValueError, "^slopes must"),
    (dict(slopes=[[0.5, 0.25]]), ValueError, "^slopes must"),
    (dict(slopes=torch.ones(2, 2)), ValueError, "^slopes must"),
    (dict(slopes="steep"), TypeError, "^slopes must"),
    (dict(samples=0), ValueError, "^samples must"),
    (dict(samples=-2), ValueError, "^samples must"),
    (dict(samples=2.0), TypeError, "^samples must"),
    (dict(samples=True), TypeError, "^samples must"),
    (dict(n=0), ValueError, "^n must"),
    (dict(n=-5), ValueError, "^n must"),
    (dict(n=8.0), TypeError, "^n must"),
    (dict(scheme="lsh"), ValueError, "^scheme must"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(n=8, slopes=[0.5], samples=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sample_partitions(args.pop("n"), args.pop("slopes"), args.pop("samples"), **args)
