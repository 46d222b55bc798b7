"""General positional kernels (poslsh.positional_kernels): validation, the width law and its exact inverse,
unbiased partitions P[same block] = f(|i - j|) (a wrong width law is rejected by the same test),
heavy tails, and attention with a kernel against an independently built dense definition."""

from __future__ import annotations

import math
import time

import pytest
import torch
from scipy import stats

import poslsh
from poslsh import sample_partitions
from poslsh.hashing import UNBOUNDED_WIDTH, Partitions
from poslsh.positional_kernels import (Kernel, alibi, check_kernel, from_table, kerple_log, kerple_power, kernel_matrix,
                            power_law, sample_widths, width_survival)
from test_sampling_modes import ALPHA, chernoff_check, replicate_mean_mask

KERNELS = {
    "power_law(0.5)": power_law(0.5),
    "kerple_log(1.5, 0.3)": kerple_log(1.5, 0.3),
    "kerple_power(0.6, 0.5)": kerple_power(0.6, 0.5),
    "table_last": from_table([1.0, 0.6, 0.35, 0.2, 0.1]),  # atom 0.1 at W = inf
    "table_zero": from_table([1.0, 0.6, 0.3, 0.1], beyond="zero"),
}


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("values,match", [
    ([1.0, 0.5, 0.4, 0.1], r"not convex at d = 2"),
    ([1.0, 0.5, 0.6], r"increasing at d = 2"),
    ([0.9, 0.5, 0.2], r"f\(0\) must be 1"),
    ([1.0, -0.1], r"increasing|>= 0"),
])
def test_table_validation_names_the_offending_d(values, match):
    with pytest.raises(ValueError, match=match):
        from_table(values)


def test_zero_extension_must_stay_convex_at_the_junction():
    from_table([1.0, 0.6, 0.3])  # "last": always fine
    with pytest.raises(ValueError, match=r"not convex at d = 2"):
        from_table([1.0, 0.7, 0.45], beyond="zero")  # 0.7 - 0.9 + 0 < 0 at d = 2


def test_parametric_ranges_and_custom_kernels():
    with pytest.raises(ValueError, match="b <= 1"):
        kerple_power(1.0, 1.5)
    with pytest.raises(ValueError, match="r1"):
        kerple_log(-1.0, 1.0)
    bump = Kernel("gauss", lambda d: torch.exp(-0.1 * d * d), lambda d: torch.exp(-0.1 * d * d) - torch.exp(-0.1 * (d + 1) ** 2))
    with pytest.raises(ValueError, match="not convex at d = 1"):
        check_kernel(bump)
    with pytest.raises(ValueError, match="not convex"):
        sample_partitions(10, None, 2, kernel=bump)


# ----------------------------------------------------------------------------- the width law


@pytest.mark.parametrize("name", list(KERNELS))
def test_survival_is_the_summed_law(name):
    """S(w) in closed form equals 1 - sum_{v <= w} v Delta^2 f(v), and sum_w P(W = w) (1 - d/w)+ + f_inf = f(d)."""
    k = KERNELS[name]
    w = torch.arange(0, 400, dtype=torch.float64)
    f = k.f(torch.arange(0, 402, dtype=torch.float64))
    pmf = w[1:] * (f[:-3] - 2 * f[1:-2] + f[2:-1])  # P(W = v), v = 1..399
    surv = width_survival(k, w)
    assert torch.allclose(surv[1:], 1 - pmf.cumsum(0), atol=1e-12)
    # Collision law at d = 0..20 (tail beyond 399 adds surv(399) * (1 - d/W) which we bound).
    for d in range(21):
        got = float((pmf * (1 - d / w[1:]).clamp(min=0)).sum())
        assert got <= float(k.f(torch.tensor(float(d)))) + 1e-12
        assert got >= float(k.f(torch.tensor(float(d)))) - float(surv[-1]) - 1e-12


def test_alibi_survival_closed_form():
    m = 0.05
    w = torch.arange(0, 1000, dtype=torch.float64)
    qq, p = math.exp(-m), -math.expm1(-m)
    assert torch.allclose(width_survival(alibi(m), w), qq ** w * (1 + w * p), rtol=1e-12)


@pytest.mark.parametrize("name", ["power_law(0.5)", "table_last", "kerple_power(0.6, 0.5)"])
def test_sampled_widths_follow_the_law(name):
    """Chi-square of 20000 inverse-CDF widths against P(W = w) (bins with >= 5 expected, tail lumped,
    the atom at infinity its own bin); false-alarm rate ALPHA per kernel."""
    k, draws = KERNELS[name], 20_000
    u = 1.0 - torch.rand(1, draws, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    widths = sample_widths((k,), u, UNBOUNDED_WIDTH)[0]
    w = torch.arange(1, 5000, dtype=torch.float64)
    pmf = width_survival(k, w - 1) - width_survival(k, w)
    kmax = int((pmf * draws >= 5).nonzero().max()) + 1
    probs = torch.cat([pmf[:kmax], width_survival(k, torch.tensor([float(kmax)])) - k.limit,
                       torch.tensor([k.limit])])
    finite = widths != UNBOUNDED_WIDTH
    bins = torch.where(finite, widths.clamp(max=kmax + 1) - 1, torch.full_like(widths, kmax + 1))
    observed = torch.bincount(bins, minlength=kmax + 2).double()
    keep = probs > 0
    p = stats.chisquare(observed[keep].numpy(), (probs[keep] / probs[keep].sum() * draws).numpy()).pvalue
    assert observed[~keep].sum() == 0
    assert p > ALPHA, p


def test_heavy_tail_widths_are_exact_far_out():
    """power_law(0.5): S(w) ~ 1.5 w^-0.5, so a draw u = 1e-8 has W ~ 2e16; bisection finds the exact
    inverse there. Beyond MAX_FINITE_WIDTH = 2^60 (u < ~1.4e-9) W is stored as unbounded (documented)."""
    k = power_law(0.5)
    u = torch.tensor([[1e-6, 1e-8, 0.5, 1e-10]], dtype=torch.float64)
    w = sample_widths((k,), u, UNBOUNDED_WIDTH)[0]
    for ui, wi in zip(u[0, :3].tolist(), w[:3].tolist()):
        assert float(width_survival(k, torch.tensor([wi]))) < ui <= float(width_survival(k, torch.tensor([wi - 1])))
    assert w[1] > 10**16 and w[3] == UNBOUNDED_WIDTH


def test_sampling_heavy_tails_is_fast():
    ks = [power_law(0.5), kerple_log(1.0, 0.1)] * 16
    t0 = time.perf_counter()
    parts = sample_partitions(1_000_000, None, 16, kernel=ks, generator=torch.Generator().manual_seed(0))
    parts.max_block_size()
    assert time.perf_counter() - t0 < 2.0
    assert parts.num_heads == 32 and bool(torch.isnan(parts.slopes).all())


# ----------------------------------------------------------------------------- unbiased partitions


def wrong_survival_partitions(n: int, kernels, r: int, gen) -> Partitions:
    """WRONG: widths from S(w) = f(w) (the collision law itself taken as the width tail, a tempting
    shortcut): blocks too narrow."""
    from poslsh.hashing import unit_square_points

    pts = unit_square_points(len(kernels), r, "iid", gen)
    grid = torch.arange(1, 4097, dtype=torch.float64)  # widths < 4096 suffice for n = 30
    out = torch.empty(pts.shape[:2], dtype=torch.int64)
    for h, k in enumerate(kernels):
        # W = smallest w >= 1 with f(w) < u: searchsorted on the ascending -f.
        out[h] = torch.searchsorted(-k.f(grid), -(1 - pts[h, :, 0]), right=True) + 1
    off = torch.minimum(torch.floor(pts[..., 1] * out).long(), out - 1)
    return Partitions(n, torch.full((len(kernels),), math.nan, dtype=torch.float64), "grid", widths=out, offsets=off)


@pytest.mark.parametrize("sampling", ["iid", "qmc", "wrong"])
def test_kernel_partitions_are_unbiased(sampling):
    """P[same block] = f(|i - j|), every entry, n = 30, five kernels, 1500 replicate sets of r = 4,
    Chernoff check at family-wise false-alarm rate ALPHA; the wrong width law is rejected."""
    n, r, sets = 30, 4, 1500
    ks = list(KERNELS.values())
    gen = torch.Generator().manual_seed(21)
    if sampling == "wrong":
        parts = wrong_survival_partitions(n, ks * sets, r, gen)
    else:
        parts = sample_partitions(n, None, r, kernel=ks * sets, sampling=sampling, generator=gen)
    mean = replicate_mean_mask(parts, len(ks), sets)
    target = torch.stack([kernel_matrix(k, n) for k in ks])
    res = chernoff_check(mean, target, sets)
    assert res["ok"] == (sampling != "wrong"), res


def test_alibi_kernel_partitions_match_slopes_law():
    """kernel=alibi(m) and slopes=m with sampling="qmc" are the same sampler (same seed, same partitions)."""
    a = sample_partitions(50, [0.2, 0.02], 6, sampling="qmc", generator=torch.Generator().manual_seed(0))
    b = sample_partitions(50, None, 6, kernel=[alibi(0.2), alibi(0.02)], sampling="qmc",
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.widths, b.widths) and torch.equal(a.offsets, b.offsets)


def test_kernel_and_cut_or_slopes_conflict():
    with pytest.raises(ValueError, match="cut"):
        sample_partitions(20, None, 2, kernel=power_law(1.0), scheme="cut")
    with pytest.raises(ValueError, match="either slopes"):
        sample_partitions(20, [0.1], 2, kernel=power_law(1.0))


# ----------------------------------------------------------------------------- attention


def _dense_kernel_attention(q, k, v, kern, causal):
    """softmax(q k^T / sqrt(D) + log f(|i - j|)) @ v built from scratch, float64."""
    n = q.shape[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = kernel_matrix(kern, n)
    if causal:
        weights = weights.tril()
    p = torch.exp(logits - logits.amax(-1, keepdim=True)) * weights
    return (p / p.sum(-1, keepdim=True)) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_exact_kernel_attention_matches_dense(causal, backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 33, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kern = kerple_log(0.8, 0.5)
    out = poslsh.attention(q, k, v, kernel=kern, method="exact", causal=causal, backend=backend)
    assert (out - _dense_kernel_attention(q, k, v, kern, causal)).abs().max() < 1e-12


@pytest.mark.parametrize("method", ["window", "lsh", "hybrid"])
def test_kernel_backends_agree(method):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 41, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ks = [power_law(0.5), kerple_power(0.3, 0.7), from_table([1.0, 0.5, 0.3, 0.2])]
    kw = dict(kernel=ks, method=method, samples=4, window_eps=0.05, hybrid_eps=0.1, sampling="stratified")
    ref = poslsh.attention(q, k, v, backend="reference", generator=torch.Generator().manual_seed(2), **kw)
    fused = poslsh.attention(q, k, v, backend="fused", generator=torch.Generator().manual_seed(2), **kw)
    assert (ref - fused).abs().max() < 1e-12
    if method == "lsh":
        split = poslsh.attention(q, k, v, backend="split", generator=torch.Generator().manual_seed(2), **kw)
        assert (ref - split).abs().max() < 1e-12


def test_alibi_kernel_equals_slopes_in_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 25, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for method in ("exact", "window"):
        a = poslsh.attention(q, k, v, slopes=[0.3, 0.05], method=method)
        b = poslsh.attention(q, k, v, kernel=[alibi(0.3), alibi(0.05)], method=method)
        assert (a - b).abs().max() < 1e-12


def test_kernel_window_keeps_every_weight_above_eps():
    from poslsh.attention.window import kernel_window_sizes

    ks = [power_law(0.5), kerple_log(2.0, 1.0)]
    w = kernel_window_sizes(ks, 1e-2, 100_000).tolist()
    assert w[0] == 9999  # (1 + w)^-0.5 <= 1e-2 first at w = 9999: the heavy tail needs a long window
    assert float(ks[1](w[1])) <= 1e-2 < float(ks[1](w[1] - 1))


def test_backends_declare_kernel_support():
    """Flex scores ALiBi slopes, so it must refuse general kernels; the Triton kernel weights by
    collision counts, so it serves kernel partitions with method "lsh" but never "hybrid"."""
    import poslsh.attention.flex  # noqa: F401  (registers "flex")
    from poslsh.attention.dispatch import BACKENDS, resolve_spec

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    spec = resolve_spec(q, k, v, kernel=power_law(0.5), method="lsh", samples=2)
    assert not BACKENDS["flex"].accepts(q, spec)
    assert BACKENDS["split"].accepts(q, spec) and BACKENDS["fused"].accepts(q, spec)
    if "triton" in BACKENDS:
        assert BACKENDS["triton"].kernels
        hybrid = resolve_spec(q, k, v, kernel=power_law(0.5), method="hybrid", samples=2)
        assert not BACKENDS["triton"].accepts(q, hybrid)
