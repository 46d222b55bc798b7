"""poslsh.nn.ALiBiAttention: shapes, grouped KV, partitions in train/eval, gradients."""

from __future__ import annotations

import math

import pytest
import torch

import poslsh
from poslsh.nn import ALiBiAttention


def manual_exact(m: ALiBiAttention, x: torch.Tensor) -> torch.Tensor:
    """The module's computation written out: projections, dense ALiBi softmax per head, out_proj."""
    b, n, _ = x.shape
    h, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    q = (x @ m.q_proj.weight.T).view(b, n, h, d)
    k = (x @ m.k_proj.weight.T).view(b, n, hkv, d)
    v = (x @ m.v_proj.weight.T).view(b, n, hkv, d)
    out = torch.empty(b, n, h, d, dtype=x.dtype)
    pos = torch.arange(n)
    for head in range(h):
        kv = head // (h // hkv)
        bias = -m.slopes[head] * (pos[:, None] - pos[None, :]).abs()
        bias = bias.masked_fill(pos[None, :] > pos[:, None], float("-inf")).to(x.dtype)
        s = q[:, :, head] @ k[:, :, kv].transpose(-1, -2) / math.sqrt(d) + bias
        out[:, :, head] = s.softmax(-1) @ v[:, :, kv]
    return out.reshape(b, n, h * d) @ m.out_proj.weight.T


def test_exact_module_matches_manual_computation():
    torch.manual_seed(0)
    m = ALiBiAttention(24, 6, num_kv_heads=2, method="exact").double()
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    torch.testing.assert_close(m(x), manual_exact(m, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_lsh_partitions_fresh_in_training_fixed_in_eval(scheme):
    torch.manual_seed(0)
    m = ALiBiAttention(16, 4, method="lsh", samples=2, scheme=scheme, seed=7)
    x = torch.randn(1, 64, 16)
    assert not torch.equal(m(x), m(x))  # new partitions each training forward
    m.eval()
    y = m(x)
    assert torch.equal(y, m(x))
    other = ALiBiAttention(16, 4, method="lsh", samples=2, scheme=scheme, seed=7)
    other.load_state_dict(m.state_dict())
    other.eval()
    assert torch.equal(y, other(x))  # eval partitions depend on the seed only
    parts = m.partitions_for(64, x.device)
    assert torch.equal(y, m(x, partitions=parts))


def test_gqa_padding_backward_and_window():
    torch.manual_seed(1)
    m = ALiBiAttention(32, 8, num_kv_heads=2, method="window", bias=True)
    x = torch.randn(3, 21, 32, requires_grad=True)
    kpm = torch.ones(3, 21, dtype=torch.bool)
    kpm[0, :4] = False
    y = m(x, key_padding_mask=kpm)
    assert y.shape == (3, 21, 32) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.k_proj.weight.shape == (8, 32)  # 2 kv heads x head dim 4


def test_half_module_keeps_float64_slopes():
    m = ALiBiAttention(18, 3).half()
    assert m.slopes.dtype == torch.float64
    torch.testing.assert_close(m.slopes, poslsh.alibi_slopes(3))


@pytest.mark.parametrize("kwargs,match", [
    ({"embed_dim": 10, "num_heads": 4}, "embed_dim=10 must be divisible by num_heads=4"),
    ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3}, "num_heads=4 must be divisible by num_kv_heads=3"),
    ({"embed_dim": 16, "num_heads": 4, "method": "fast"}, "method must be one of"),
    ({"embed_dim": 16, "num_heads": 4, "scheme": "hex"}, "scheme must be one of"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ALiBiAttention(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"x must be \[B, N, 16\]"):
        ALiBiAttention(16, 4)(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"x must be \[B, N, 16\], got list"):
        ALiBiAttention(16, 4)([[0.0] * 16])
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got torch.int64"):
        ALiBiAttention(16, 4)(torch.ones(2, 5, 16, dtype=torch.long))


def test_hybrid_module_uses_fixed_partitions_in_eval():
    """Eval-mode hybrid attention is deterministic (fixed partitions), and differs from exact."""
    torch.manual_seed(0)
    m = ALiBiAttention(32, 4, method="hybrid", samples=4, hybrid_eps=0.3, seed=3).eval()
    x = torch.randn(2, 40, 32)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)
    assert m.partitions_for(40, x.device) is not None


def test_default_method_is_exact():
    """Nothing is approximated unless asked: the default module is exact ALiBi (as poslsh.attention)."""
    torch.manual_seed(2)
    m = ALiBiAttention(16, 4).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    assert m.method == "exact" and m.partitions_for(11, x.device) is None
    torch.testing.assert_close(m(x), manual_exact(m, x), atol=1e-12, rtol=0)


def test_method_spec_is_the_description():
    """A MethodSpec, or a name and options, build the same module; options beside a spec are refused;
    set_method switches without touching the weights."""
    from poslsh.method import parse_method

    torch.manual_seed(3)
    x = torch.randn(1, 50, 16)
    a = ALiBiAttention(16, 4, method=parse_method("lsh:3:cut"), seed=5).eval()
    b = ALiBiAttention(16, 4, method="lsh", samples=3, scheme="cut", seed=5).eval()
    b.load_state_dict(a.state_dict())
    assert a.spec == b.spec and torch.equal(a(x), b(x))
    with pytest.raises(TypeError, match="MethodSpec, which holds its options"):
        ALiBiAttention(16, 4, method=parse_method("lsh:3"), samples=4)
    before = [p.clone() for p in a.parameters()]
    exact = a.set_method("exact")(x)
    assert a.spec.label == "exact" and a.eval_partitions is None
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))
    c = ALiBiAttention(16, 4).eval()
    c.load_state_dict(a.state_dict())
    assert torch.equal(exact, c(x))


def test_eval_partitions_are_the_layer_partitions():
    """Eval-mode partitions are LayerPartitions(slopes, r, scheme, seed, layer): the fixed partitions
    the LM and the transformers patch use, the same for a prefix of every longer length."""
    from poslsh.layer_partitions import LayerPartitions

    m = ALiBiAttention(16, 4, method="lsh", samples=3, scheme="cut", seed=9, layer=2).eval()
    ref = LayerPartitions(m.slopes, 3, "cut", 9, 2)
    for n in (7, 5000, 40):
        assert torch.equal(m.partitions_for(n, torch.device("cpu")).block_ids(), ref.get(n).block_ids())
    long, short = m.partitions_for(5000, torch.device("cpu")), m.partitions_for(40, torch.device("cpu"))
    assert torch.equal(long.block_ids()[..., :40], short.block_ids())
