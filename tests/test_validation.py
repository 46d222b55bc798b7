"""Arguments: numbers accepted as numbers (numpy scalars, 0-d tensors), everything else refused with
an error that names the argument; slopes checked for dtype, range and gradients; ``Partitions``
checked when built; ``ALiBiAttention`` checked when built, with a bounded partition cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import poslsh
from poslsh import Partitions, sample_partitions
from poslsh.attention import BACKENDS, available_backends
from poslsh.nn import ALiBiAttention

G = torch.Generator().manual_seed(0)
Q = torch.randn(1, 2, 6, 4, generator=G)
K = torch.randn(1, 1, 8, 4, generator=G)
V = torch.randn(1, 1, 8, 4, generator=G)
SLOPES = [0.5, 0.1]


# --------------------------------------------------------------------------------------------------
# Numbers are numbers
# --------------------------------------------------------------------------------------------------

EQUIVALENT = [
    ("samples", np.int64(3), 3), ("samples", np.int32(3), 3), ("samples", torch.tensor(3), 3),
    ("scale", np.float32(0.5), 0.5), ("scale", np.float64(0.5), 0.5), ("scale", torch.tensor(0.5), 0.5),
    ("scale", 1, 1.0), ("scale", np.int64(2), 2.0),
    ("causal", np.bool_(False), False), ("causal", torch.tensor(True), True),
    ("window_eps", np.float32(0.25), 0.25), ("hybrid_eps", torch.tensor(0.3, dtype=torch.float64), 0.3),
]


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


@pytest.mark.parametrize("name,value,plain", EQUIVALENT, ids=[f"{n}-{type(v).__name__}" for n, v, _ in EQUIVALENT])
def test_numpy_scalars_and_0d_tensors_are_numbers(name, value, plain):
    method = {"window_eps": "window", "hybrid_eps": "hybrid"}.get(name, "lsh")
    kw = dict(slopes=SLOPES, method=method, backend="reference")
    a = poslsh.attention(Q, K, V, **kw, **{name: value}, generator=torch.Generator().manual_seed(1))
    b = poslsh.attention(Q, K, V, **kw, **{name: plain}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_sample_partitions_takes_numpy_integers():
    a = sample_partitions(np.int64(10), SLOPES, np.int32(3), generator=torch.Generator().manual_seed(2))
    b = sample_partitions(10, SLOPES, 3, generator=torch.Generator().manual_seed(2))
    assert a.n == 10 and type(a.n) is int and torch.equal(a.widths, b.widths) and torch.equal(a.offsets, b.offsets)


BAD = [
    # (kwargs, exception, message)
    ({"method": "lsh", "samples": 2.5}, TypeError, r"^samples must be an int, got float 2\.5"),
    ({"method": "lsh", "samples": True}, TypeError, r"^samples must be an int, got bool"),
    ({"method": "lsh", "samples": np.float64(3.0)}, TypeError, r"^samples must be an int, got numpy\.float64"),
    ({"method": "lsh", "samples": torch.tensor([3])}, TypeError, r"^samples must be an int, got a tensor of shape \(1,\)"),
    ({"method": "lsh", "samples": 0}, ValueError, r"^samples must be >= 1, got 0"),
    ({"method": "lsh", "samples": np.int64(-1)}, ValueError, r"^samples must be >= 1, got -1"),
    ({"causal": 1}, TypeError, r"^causal must be a bool, got int 1"),
    ({"causal": "yes"}, TypeError, r"^causal must be a bool, got str 'yes'"),
    ({"causal": np.int64(1)}, TypeError, r"^causal must be a bool, got numpy\.int64"),
    ({"causal": torch.tensor(1)}, TypeError, r"^causal must be a bool, got a tensor of dtype torch\.int64"),
    ({"scale": True}, TypeError, r"^scale must be a real number, got bool"),
    ({"scale": 1 + 2j}, TypeError, r"^scale must be a real number, got complex"),
    ({"scale": "0.5"}, TypeError, r"^scale must be a real number, got str"),
    ({"scale": torch.tensor([0.5, 0.5])}, TypeError, r"^scale must be a real number, got a tensor of shape \(2,\)"),
    ({"scale": torch.tensor(0.5, requires_grad=True)}, TypeError,
     r"^scale must be a real number, got a tensor that requires grad"),
    ({"scale": np.float32("inf")}, ValueError, r"^scale must be finite, got inf"),
    ({"scale": float("nan")}, ValueError, r"^scale must be finite, got nan"),
    ({"method": "window", "window_eps": np.float32(1.5)}, ValueError, r"^window_eps must be in \(0, 1\), got 1\.5"),
    ({"method": "window", "window_eps": True}, TypeError, r"^window_eps must be a real number, got bool"),
    ({"method": "hybrid", "hybrid_eps": 0.0}, ValueError, r"^hybrid_eps must be > 0, got 0\.0"),
    ({"method": "hybrid", "hybrid_eps": "big"}, TypeError, r"^hybrid_eps must be a real number, got str"),
    ({"generator": 5}, TypeError, r"^generator must be a torch\.Generator or None, got int"),
    ({"generator": np.random.default_rng(0)}, TypeError, r"^generator must be a torch\.Generator or None, got numpy"),
    # slopes
    ({"slopes": torch.tensor([True, False])}, TypeError, r"^slopes must be real numbers, got dtype torch\.bool"),
    ({"slopes": [True, False]}, TypeError, r"^slopes must be real numbers, got bool"),
    ({"slopes": torch.tensor([0.5 + 1j, 0.1])}, TypeError, r"^slopes must be real numbers, got dtype torch\.complex64"),
    ({"slopes": [0.5, 1j]}, TypeError, r"^slopes must be real numbers, got complex"),
    ({"slopes": np.array([0.5, 0.1], dtype=np.complex128)}, TypeError,
     r"^slopes must be real numbers, got dtype complex128"),
    ({"slopes": [1e39, 0.1]}, ValueError, r"^slopes must be at most 3\.4\d*e\+38"),
    ({"slopes": torch.tensor([0.5, 0.1], requires_grad=True), "method": "lsh"}, ValueError,
     r"^slopes require grad, but method='lsh' samples its partitions from them"),
    ({"slopes": torch.tensor([0.5, 0.1], requires_grad=True), "method": "hybrid"}, ValueError,
     r"^slopes require grad, but method='hybrid' samples its partitions from them"),
    # a method given as a MethodSpec or its text holds its options
    ({"method": "lsh:4", "samples": 8}, TypeError, r"^method='lsh:4:grid' holds its options: give \['samples'\] in it"),
    ({"method": poslsh.parse_method("window:0.1"), "window_eps": 0.1}, TypeError,
     r"^method='window:0\.1' holds its options: give \['window_eps'\]"),
    ({"method": "lsh:4:grid:sobol"}, ValueError, r"^bad method 'lsh:4:grid:sobol': sampling must be"),
    ({"method": "window:1:2"}, ValueError, r"^bad method 'window:1:2': use exact, window\[:EPS\]"),
]


BAD_IDS = [f"{i}-{m.split(',')[0].lstrip('^')}" for i, (_, _, m) in enumerate(BAD)]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=BAD_IDS)
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        poslsh.attention(Q, K, V, **{"slopes": SLOPES, **kwargs})


def test_method_as_a_spec_or_its_text_equals_the_name_with_options():
    """poslsh.attention takes the one method description the nn module, the LM, patch_model and the
    CLI take (``poslsh.MethodSpec``, or its text): the same call as the name with the options beside."""
    cases = [("window:0.05", dict(method="window", window_eps=0.05)),
             ("lsh:3:cut", dict(method="lsh", samples=3, scheme="cut")),
             ("hybrid:3:grid:qmc:0.2", dict(method="hybrid", samples=3, sampling="qmc", hybrid_eps=0.2)),
             ("exact", dict(method="exact"))]
    for text, kwargs in cases:
        want = poslsh.attention(Q, K, V, slopes=SLOPES, generator=torch.Generator().manual_seed(4), **kwargs)
        for method in (text, poslsh.parse_method(text)):
            got = poslsh.attention(Q, K, V, slopes=SLOPES, generator=torch.Generator().manual_seed(4), method=method)
            assert torch.equal(got, want), text


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"n": np.float64(8)}, TypeError, r"^n must be an int, got numpy\.float64"),
    ({"samples": np.float32(2)}, TypeError, r"^samples must be an int"),
    ({"generator": "seed"}, TypeError, r"^generator must be a torch\.Generator or None, got str"),
    ({"slopes": torch.tensor([1], dtype=torch.bool)}, TypeError, r"^slopes must be real numbers"),
    ({"slopes": torch.tensor([0.5], requires_grad=True)}, ValueError, r"^slopes require grad"),
])
def test_sample_partitions_bad_arguments(kwargs, exc, match):
    args = {"n": 8, "slopes": [0.5], "samples": 2, **kwargs}
    with pytest.raises(exc, match=match):
        sample_partitions(args.pop("n"), args.pop("slopes"), args.pop("samples"), **args)


# --------------------------------------------------------------------------------------------------
# Slopes: float32's range and gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("method", ["exact", "window"])
def test_huge_slopes_within_float32_range_attend_to_the_diagonal(backend, method):
    """A slope of 1e38 (finite in float32) leaves each query only its own key: out = v at its position."""
    q, k, v = (torch.randn(1, 2, 7, 4, generator=torch.Generator().manual_seed(s)) for s in range(3))
    out = poslsh.attention(q, k, v, slopes=[1e38, 3e38], method=method, window_eps=0.5, backend=backend,
                           causal=False)
    torch.testing.assert_close(out, v, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("method", ["exact", "window"])
@pytest.mark.parametrize("causal", [True, False])
def test_slope_gradients(backend, method, causal):
    """Trainable ALiBi slopes: d(out, lse)/d(slopes) by gradcheck, padding and grouped KV included."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 2, generator=g, dtype=torch.float64)
    kpm = torch.tensor([[True] * 7, [False, True, True, False, True, True, True]])
    slopes = torch.tensor([0.7, 0.2, 0.05, 0.01], dtype=torch.float64, requires_grad=True)

    def f(q, slopes):
        return poslsh.attention(q, k, v, slopes=slopes, method=method, causal=causal, window_eps=0.2,
                                key_padding_mask=kpm, backend=backend, return_lse=True)

    assert torch.autograd.gradcheck(f, (q, slopes), eps=1e-6, atol=1e-8)


def test_slope_gradients_agree_across_backends_in_float32():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, 40, 8, generator=g) for _ in range(3))
    grads = []
    for backend in ("reference", "fused"):
        slopes = torch.tensor([0.5, 0.05, 0.01], requires_grad=True)  # float32 on purpose
        poslsh.attention(q, k, v, slopes=slopes, method="exact", backend=backend).square().sum().backward()
        grads.append(slopes.grad)
    assert grads[0].dtype == torch.float32 and grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)


available_backends()  # registers the optional (GPU) backends, which must refuse trainable slopes too
SLOPE_GRAD_REFUSERS = [name for name in sorted(BACKENDS) if name not in ("reference", "fused")
                       and {"exact", "window"} & set(BACKENDS[name].methods)]  # lsh/hybrid: refused in resolve_spec


@pytest.mark.parametrize("name", SLOPE_GRAD_REFUSERS)
def test_other_backends_refuse_slopes_that_require_grad(name):
    """No backend but reference and fused differentiates slopes: a named one refuses, naming them."""
    methods = [m for m in BACKENDS[name].methods if m in ("exact", "window")]
    slopes = torch.tensor(SLOPES, requires_grad=True)
    with pytest.raises(ValueError, match=rf"backend '{name}' does not support this call .*slopes that require grad"):
        poslsh.attention(Q, K, V, slopes=slopes, method=methods[0], backend=name)


def test_auto_with_trainable_slopes_picks_a_differentiating_backend():
    slopes = torch.tensor(SLOPES, requires_grad=True)
    poslsh.attention(Q, K, V, slopes=slopes, method="exact").sum().backward()
    assert slopes.grad is not None and torch.isfinite(slopes.grad).all()


# --------------------------------------------------------------------------------------------------
# Partitions built by hand are checked
# --------------------------------------------------------------------------------------------------

S1 = torch.tensor([0.5], dtype=torch.float64)
W = torch.tensor([[3, 2]])
U = torch.tensor([[1, 0]])
CUTS, PTRS = torch.tensor([2, 5, 3]), torch.tensor([0, 2, 3])

# One head, two samples: grid (W, U) = (3, 1), (2, 0); cut {2, 5} and {3} of 0..7.
GOOD = {"grid": dict(n=8, slopes=S1, scheme="grid", widths=W, offsets=U),
        "cut": dict(n=8, slopes=S1, scheme="cut", cut_positions=CUTS, cut_pointers=PTRS)}
BAD_PARTITIONS = [("grid", *bad) for bad in [
    (dict(widths=torch.tensor([[0, 2]])), ValueError, r"^widths must be >= 1"),
    (dict(offsets=torch.tensor([[3, 0]])), ValueError, r"^offsets must lie in 0\.\.widths-1"),
    (dict(offsets=torch.tensor([[-1, 0]])), ValueError, r"^offsets must lie in 0\.\.widths-1"),
    (dict(widths=W.double()), TypeError, r"^widths must be an int64 tensor, got torch\.float64"),
    (dict(offsets=torch.tensor([[1, 0, 0]])), ValueError,
     r"^offsets must have the shape of widths \[H, r\] = \(1, 2\)"),
    (dict(widths=torch.tensor([[3, 2], [3, 2]]), offsets=torch.tensor([[1, 0], [1, 0]])), ValueError,
     r"^widths must have one row per head \(1\)"),
    (dict(widths=torch.zeros(1, 0, dtype=torch.int64), offsets=torch.zeros(1, 0, dtype=torch.int64)), ValueError,
     r"^partitions must hold at least one sample"),
    (dict(n=0), ValueError, r"^n must be >= 1"),
    (dict(n=8.0), TypeError, r"^n must be an int"),
    (dict(scheme="hex"), ValueError, r"^scheme must be one of"),
    (dict(slopes=torch.tensor([-0.5], dtype=torch.float64)), ValueError, r"^slopes must be >= 0"),
    (dict(cut_positions=CUTS, cut_pointers=PTRS), ValueError, r"^grid partitions take widths and offsets only"),
    (dict(widths=None), ValueError, r"^grid partitions need widths and offsets"),
]] + [("cut", *bad) for bad in [
    (dict(cut_pointers=torch.tensor([0])), ValueError, r"^cut_pointers must have H \* r \+ 1 entries"),
    (dict(cut_pointers=torch.tensor([1, 2, 3])), ValueError, r"^cut_pointers must start at 0"),
    (dict(cut_pointers=torch.tensor([0, 2, 2])), ValueError, r"^cut_pointers must end at len\(cut_positions\) = 3"),
    (dict(cut_pointers=torch.tensor([0, 3, 2]), cut_positions=torch.tensor([2, 5, 3])), ValueError,
     r"^cut_pointers must be non-decreasing"),
    (dict(cut_positions=torch.tensor([0, 5, 3])), ValueError, r"^cut_positions must lie in 1\.\.n-1 = 1\.\.7"),
    (dict(cut_positions=torch.tensor([2, 8, 3])), ValueError, r"^cut_positions must lie in 1\.\.n-1"),
    (dict(cut_positions=torch.tensor([5, 2, 3])), ValueError, r"^cut_positions must increase within each"),
    (dict(cut_positions=torch.tensor([2, 2, 3])), ValueError, r"^cut_positions must increase within each"),
    (dict(cut_positions=CUTS.int()), TypeError, r"^cut_positions must be an int64 tensor"),
]]


@pytest.mark.parametrize("scheme,kwargs,exc,match", BAD_PARTITIONS,
                         ids=[f"{s}-{m.lstrip('^')[:30]}" for s, _, _, m in BAD_PARTITIONS])
def test_bad_hand_built_partitions(scheme, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Partitions(**{**GOOD[scheme], **kwargs})


def test_good_hand_built_partitions_and_sampled_ones_pass():
    for good in GOOD.values():
        Partitions(**good)
    for scheme in ("grid", "cut"):
        p = sample_partitions(50, [0.3, 0.0, 2.0], 4, scheme=scheme, generator=torch.Generator().manual_seed(0))
        rebuilt = Partitions(p.n, p.slopes, p.scheme, p.widths, p.offsets, p.cut_positions, p.cut_pointers)
        assert rebuilt.num_samples == 4


# --------------------------------------------------------------------------------------------------
# ALiBiAttention: checked when built; a bounded eval cache
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"method": "window", "window_eps": 2.0}, ValueError, r"^window_eps must be in \(0, 1\), got 2\.0"),
    ({"method": "hybrid", "hybrid_eps": -1.0}, ValueError, r"^hybrid_eps must be > 0"),
    ({"method": "lsh", "samples": 0}, ValueError, r"^samples must be >= 1"),
    ({"method": "lsh", "samples": 2.5}, TypeError, r"^samples must be an int"),
    ({"sampling": "sobol"}, ValueError, r"^sampling must be one of"),
    ({"causal": "yes"}, TypeError, r"^causal must be a bool"),
    ({"backend": "cuda-magic"}, ValueError, r"^backend must be 'auto' or one of"),
    ({"seed": 1.5}, TypeError, r"^seed must be an int"),
    ({"num_heads": 4.0}, TypeError, r"^num_heads must be an int"),
    ({"num_kv_heads": 0}, ValueError, r"^num_kv_heads must be >= 1"),
    ({"scheme": "cut", "sampling": "qmc"}, ValueError, r"scheme='cut' supports only sampling='iid'"),
])
def test_module_checks_its_configuration_when_built(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ALiBiAttention(**{"embed_dim": 16, "num_heads": 4, **kwargs})


def test_module_takes_numpy_numbers():
    m = ALiBiAttention(np.int64(16), np.int64(4), num_kv_heads=np.int32(2), samples=np.int64(3),
                       causal=np.bool_(True), seed=np.int64(7))
    assert m(torch.randn(1, 5, 16)).shape == (1, 5, 16)
    assert type(m.samples) is int and type(m.causal) is bool


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_module_eval_cache_is_bounded_and_recent_first(scheme):
    m = ALiBiAttention(16, 4, method="lsh", samples=2, scheme=scheme).eval()
    bound = m.EVAL_CACHE_SIZE
    with torch.no_grad():
        first = m.partitions_for(300, torch.device("cpu"))
        for n in range(4, 4 + 3 * bound):
            m.partitions_for(n, torch.device("cpu"))
        assert len(m.eval_partitions.cached) <= bound and (300, "cpu") not in m.eval_partitions.cached
        again = m.partitions_for(300, torch.device("cpu"))  # evicted, then drawn again: same partitions
    assert again is not first
    assert torch.equal(again.block_ids(), first.block_ids())


def test_module_eval_cache_keeps_the_lengths_in_use():
    """The length asked for most recently survives: an LRU, not a clear-when-full."""
    m = ALiBiAttention(16, 4, method="lsh", samples=2).eval()
    keep = m.partitions_for(100, torch.device("cpu"))
    for n in range(1, 4 * m.EVAL_CACHE_SIZE):
        m.partitions_for(n, torch.device("cpu"))
        assert m.partitions_for(100, torch.device("cpu")) is keep  # touched every step: never evicted
    assert len(m.eval_partitions.cached) <= m.EVAL_CACHE_SIZE
