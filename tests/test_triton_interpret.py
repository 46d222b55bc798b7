"""The Triton LSH kernel (forward and backward) run through Triton's interpreter on the CPU
(TRITON_INTERPRET=1), held to a float64 dense reference built from ``Partitions.mean_mask()``.

The environment variable must be set before the kernels are decorated, so it is set here before
poslsh's Triton module is imported (and that module is reloaded if something imported it earlier).
The interpreter runs the kernels with 16 x 16 tiles, so these small sizes still exercise several
query and key tiles, boundary tiles, interior (fast-path) tiles and ragged ends.
"""

from __future__ import annotations

import importlib
import math
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from poslsh import alibi_slopes, sample_partitions  # noqa: E402

if "poslsh.attention.triton_lsh" in sys.modules:
    tl_mod = importlib.reload(sys.modules["poslsh.attention.triton_lsh"])
else:
    tl_mod = importlib.import_module("poslsh.attention.triton_lsh")

lsh_attention_triton_fn = tl_mod.lsh_attention_triton_fn


def test_kernels_really_interpreted():
    for k in (tl_mod._fwd_kernel, tl_mod._bwd_dkdv_kernel, tl_mod._bwd_dq_kernel):
        assert type(k).__name__ == "InterpretedFunction"


def reference(q, k, v, parts, causal, scale, q_offset):
    """Dense float64 estimator: softmax(scale q k^T + log B-hat) v, causal-masked; and its LSE."""
    nq, nk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    c = parts.mean_mask()[:, q_offset:q_offset + nq, :]
    s = scale * q.double() @ k.transpose(-1, -2) + c.log()
    if causal:
        i = torch.arange(nq)[:, None] + q_offset
        s = s.masked_fill(torch.arange(nk)[None] > i, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def rel(a, b):
    """||a - b|| / ||b||. A reference that is exactly 0 (dq when a query sees a single key: the
    softmax is constant) is compared absolutely instead (max |a| <= 1e-4 passes the 1e-5 bound):
    fp32 leaves ~1e-7 from dP - delta there."""
    a, b = a.detach().double(), b.detach().double()
    if float(b.norm()) == 0.0:
        return float(a.abs().max()) * 1e-1
    return float((a - b).norm() / b.norm())

def assert_matches(out, lse, ro, rl, inputs, ref_inputs, backward):
    """Kernel output, LSE and (if backward) q/k/v gradients within 1e-5 of the float64 reference."""
    assert lse.dtype == torch.float32 and lse.shape == out.shape[:3]
    assert rel(out, ro) <= 1e-5, rel(out, ro)
    assert rel(lse, rl) <= 1e-5, rel(lse, rl)
    if backward:
        do = torch.randn_like(out)
        g = torch.autograd.grad(out, inputs, do)
        rg = torch.autograd.grad(ro, ref_inputs, do.double())
        for name, a, b in zip("qkv", g, rg):
            assert rel(a, b) <= 1e-5, (name, rel(a, b))



def run_case(B, H, Hkv, Nq, Nk, D, r, causal, scheme, slopes=None, backward=True, seed=0, config=None):
    torch.manual_seed(seed)
    slopes = alibi_slopes(H) if slopes is None else torch.as_tensor(slopes, dtype=torch.float64)
    parts = sample_partitions(Nk, slopes, r, scheme=scheme, generator=torch.Generator().manual_seed(seed))
    q = torch.randn(B, H, Nq, D, requires_grad=backward)
    k = torch.randn(B, Hkv, Nk, D, requires_grad=backward)
    v = torch.randn(B, Hkv, Nk, D, requires_grad=backward)
    out, lse = lsh_attention_triton_fn(q, k, v, parts, causal=causal, config=config)
    qd, kd, vd = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ro, rl = reference(qd, kd, vd, parts, causal, 1 / math.sqrt(D), Nk - Nq)
    assert out.shape == (B, H, Nq, D) and out.dtype == q.dtype
    assert_matches(out, lse, ro, rl, (q, k, v), (qd, kd, vd), backward)
    return parts


@pytest.mark.parametrize(
    "B,H,Hkv,Nq,Nk,D,r,causal,scheme",
    [
        (1, 4, 2, 33, 33, 16, 4, True, "grid"),    # 2^5 + 1, grouped KV, several slopes
        (2, 2, 2, 17, 40, 32, 3, False, "grid"),   # bidirectional, Nq < Nk, batch 2
        (1, 3, 1, 31, 31, 16, 4, True, "cut"),     # 2^5 - 1, multi-query KV, cut scheme, H not 2^k
        (1, 2, 2, 20, 37, 16, 2, False, "cut"),    # bidirectional cut, Nq < Nk
    ],
)
def test_forward_backward_matches_float64(B, H, Hkv, Nq, Nk, D, r, causal, scheme):
    run_case(B, H, Hkv, Nq, Nk, D, r, causal, scheme)


@pytest.mark.parametrize("causal,scheme", [(True, "grid"), (False, "grid"), (True, "cut")])
def test_integer_position_path(causal, scheme):
    """Sequences of 2^23 positions or more compare positions as integers (float32 would round them);
    the same kernels with that path forced, against float64, LSH and hybrid."""
    config = {"float_positions": False}
    run_case(1, 4, 2, 33, 40, 16, 4, causal, scheme, config=config)
    run_hybrid_case(1, 2, 2, 40, 40, 16, 3, causal, scheme, [0.3, 0.1], [5, 20], both_fields=False, config=config)


@pytest.mark.parametrize("causal", [True, False])
def test_length_one_and_two(causal):
    run_case(1, 2, 2, 1, 1, 16, 2, causal, "grid")
    run_case(1, 2, 1, 1, 2, 16, 3, causal, "cut", backward=False)


def test_interior_tiles_and_unbounded_blocks():
    """Wide blocks (small slopes, a slope-0 head with W = 2^62) give fast-path tiles."""
    slopes = [0.0, 1e-3, 0.02]
    parts = run_case(1, 3, 3, 48, 48, 16, 1, True, "grid", slopes=slopes)
    tiles = tl_mod.tile_counts(parts, 48, True, 16, 16)
    assert tiles["interior"] > 0 and tiles["boundary"] > 0
    run_case(1, 3, 3, 40, 48, 16, 2, False, "grid", slopes=slopes, backward=False)


def test_head_dim_not_power_of_two():
    run_case(1, 2, 2, 18, 18, 24, 2, True, "grid", backward=False)


def test_float16_forward():
    torch.manual_seed(1)
    parts = sample_partitions(24, alibi_slopes(2), 2, generator=torch.Generator().manual_seed(1))
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    out, _ = lsh_attention_triton_fn(q.half(), k.half(), v.half(), parts, causal=True)
    ro, _ = reference(q, k, v, parts, True, 0.25, 0)
    assert out.dtype == torch.float16
    assert rel(out, ro) < 5e-3


def test_reference_is_sensitive():
    """The tolerances above would catch a kernel that used different blocks: perturbing one
    sample's offset moves the reference far beyond 1e-5."""
    torch.manual_seed(2)
    parts = sample_partitions(33, alibi_slopes(2), 2, generator=torch.Generator().manual_seed(2))
    w, u = parts.widths.clone(), parts.offsets.clone()
    u[0, 0] = (u[0, 0] + 1) % w[0, 0]
    moved = type(parts)(parts.n, parts.slopes, "grid", widths=w, offsets=u)
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    out, _ = lsh_attention_triton_fn(q, k, v, parts, causal=True)
    ro, _ = reference(q, k, v, moved, True, 0.25, 0)
    assert rel(out, ro) > 1e-4


def test_dispatch_backend_triton_trains():
    """poslsh.attention(..., backend="triton") runs the kernel and agrees with the reference backend."""
    from poslsh import attention

    torch.manual_seed(3)
    parts = sample_partitions(21, alibi_slopes(4), 3, generator=torch.Generator().manual_seed(3))
    q = torch.randn(1, 4, 21, 16, requires_grad=True)
    k = torch.randn(1, 2, 21, 16, requires_grad=True)
    v = torch.randn(1, 2, 21, 16, requires_grad=True)
    out, lse = attention(q, k, v, partitions=parts, backend="triton", return_lse=True)
    ref, ref_lse = attention(q.double(), k.double(), v.double(), partitions=parts, backend="reference",
                             return_lse=True)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_general_kernel_partitions():
    """Partitions drawn for a non-ALiBi kernel (heavy-tailed widths, some unbounded): same weights
    (collision counts), so the kernel must agree with the reference backend."""
    from poslsh import attention
    from poslsh.kernels import power_law

    torch.manual_seed(4)
    q = torch.randn(1, 2, 26, 16)
    k = torch.randn(1, 2, 26, 16)
    v = torch.randn(1, 2, 26, 16)
    g = torch.Generator().manual_seed(4)
    out, lse = attention(q, k, v, kernel=power_law(0.7), samples=3, generator=g, backend="triton",
                         causal=False, return_lse=True)
    g = torch.Generator().manual_seed(4)
    ref, ref_lse = attention(q.double(), k.double(), v.double(), kernel=power_law(0.7), samples=3, generator=g,
                             backend="reference", causal=False, return_lse=True)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5


# --------------------------------------------------------------------------------------------------
# method "hybrid": exact ALiBi weights for |i - j| <= w_h, collision means c_ij beyond
# --------------------------------------------------------------------------------------------------


def hybrid_reference(q, k, v, parts, slopes, window, causal):
    """The float64 reference backend on an explicit hybrid spec (any window, not only hybrid_widths')."""
    from poslsh.attention.core import AttentionSpec
    from poslsh.attention.reference import reference_attention

    nq, nk = q.shape[2], k.shape[2]
    spec = AttentionSpec(slopes=slopes, causal=causal, method="hybrid", scale=1 / math.sqrt(q.shape[-1]),
                         q_offset=nk - nq, partitions=parts, window=window)
    return reference_attention(q, k, v, spec)


def run_hybrid_case(B, H, Hkv, Nq, Nk, D, r, causal, scheme, slopes, window, backward=True, seed=0,
                    both_fields=True, config=None):
    torch.manual_seed(seed)
    slopes = torch.as_tensor(slopes, dtype=torch.float64)
    window = torch.as_tensor(window, dtype=torch.int64)
    parts = sample_partitions(Nk, slopes, r, scheme=scheme, generator=torch.Generator().manual_seed(seed))
    if both_fields:
        # Near pairs that no sample puts in one block (kept only by the near rule) and far pairs that
        # some sample does (kept only by the collision rule) must both occur.
        bhat = parts.mean_mask()[:, Nk - Nq:, :]
        dist = (torch.arange(Nk - Nq, Nk)[:, None] - torch.arange(Nk)[None, :]).abs()
        near = dist[None] <= window[:, None, None]
        if causal:
            bhat = bhat.masked_fill(torch.arange(Nk)[None, None, :] > torch.arange(Nk - Nq, Nk)[None, :, None], 0)
        assert (near & (bhat == 0)).any() and (~near & (bhat > 0)).any()
    q = torch.randn(B, H, Nq, D, requires_grad=backward)
    k = torch.randn(B, Hkv, Nk, D, requires_grad=backward)
    v = torch.randn(B, Hkv, Nk, D, requires_grad=backward)
    out, lse = lsh_attention_triton_fn(q, k, v, parts, causal=causal, slopes=slopes, window=window, config=config)
    qd, kd, vd = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ro, rl = hybrid_reference(qd, kd, vd, parts, slopes, window, causal)
    assert out.shape == (B, H, Nq, D)
    assert_matches(out, lse, ro, rl, (q, k, v), (qd, kd, vd), backward)


@pytest.mark.parametrize(
    "B,H,Hkv,Nq,Nk,D,r,causal,scheme,slopes,window",
    [
        # grouped KV, 2^5 + 1; w = 0 (diagonal only), inside one tile, across tiles, past the end
        (1, 4, 2, 33, 33, 16, 3, True, "grid", [0.8, 0.5, 0.3, 0.2], [0, 3, 20, 40]),
        # bidirectional, Nq < Nk, batch 2; a slope-0 head (one block) beside a steep one
        (2, 2, 2, 17, 40, 32, 3, False, "grid", [0.6, 0.0], [5, 18]),
        # multi-query KV, cut scheme, H not 2^k, 2^5 - 1
        (1, 3, 1, 31, 31, 16, 4, True, "cut", [0.9, 0.4, 0.7], [2, 9, 0]),
        # bidirectional cut, Nq < Nk
        (1, 2, 2, 20, 37, 16, 2, False, "cut", [0.7, 0.3], [1, 17]),
    ],
)
def test_hybrid_forward_backward_matches_float64(B, H, Hkv, Nq, Nk, D, r, causal, scheme, slopes, window):
    run_hybrid_case(B, H, Hkv, Nq, Nk, D, r, causal, scheme, slopes, window)


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_interior_tiles(causal):
    """Wide blocks (r = 1, small slopes, a slope-0 head) give interior tiles, where the kernel skips
    the counts (c_ij = 1) but must still apply the near field's e^{-m |i - j|} (0.67 at |i - j| = 20)."""
    slopes, window = [0.0, 0.004, 0.02], [7, 12, 20]
    parts = sample_partitions(48, slopes, 1, generator=torch.Generator().manual_seed(0))
    tiles = tl_mod.tile_counts(parts, 48, causal, 16, 16, window=torch.tensor(window))
    assert tiles["interior"] > 0 and tiles["boundary"] > 0
    run_hybrid_case(1, 3, 3, 48, 48, 16, 1, causal, "grid", slopes, window, backward=causal, both_fields=False)


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_near_field_plain_tiles(causal):
    """Near fields several tiles wide: tiles within w_h of every row skip the counts (their weight is
    the exact e^{-m |i - j|} whatever the samples say), which is what keeps the hybrid near a
    window's cost. tile_counts mirrors the kernel's ranges: with the near field there must be plain
    tiles where plain LSH (r = 4, narrow blocks) has none, and the result must still be exact."""
    # w_h = 46, 30 (14 mod 16) and 47 put the near field's edges on tile edges: off by one either way is caught
    slopes, window = [0.5, 0.25, 0.1], [46, 30, 47]
    parts = sample_partitions(100, slopes, 4, generator=torch.Generator().manual_seed(3))
    lsh_tiles = tl_mod.tile_counts(parts, 100, causal, 16, 16)
    tiles = tl_mod.tile_counts(parts, 100, causal, 16, 16, window=torch.tensor(window))
    assert lsh_tiles["interior"] == 0 and tiles["interior"] >= 10 and tiles["boundary"] > 0
    run_hybrid_case(1, 3, 3, 100, 100, 16, 4, causal, "grid", slopes, window, both_fields=False)


def test_hybrid_dispatch_and_refusals():
    """poslsh.attention(method="hybrid", backend="triton") with hybrid_widths' w_h agrees with the
    reference backend; the kernel refuses hybrid with general kernels and with key padding."""
    from poslsh import attention
    from poslsh.attention.dispatch import BACKENDS, resolve_spec
    from poslsh.kernels import power_law

    assert "hybrid" in BACKENDS["triton"].methods
    torch.manual_seed(5)
    slopes = [0.5, 0.25, 0.125, 0.0625]
    parts = sample_partitions(29, slopes, 3, generator=torch.Generator().manual_seed(5))
    q = torch.randn(1, 4, 23, 16, requires_grad=True)
    k = torch.randn(1, 2, 29, 16, requires_grad=True)
    v = torch.randn(1, 2, 29, 16, requires_grad=True)
    kw = dict(method="hybrid", partitions=parts, hybrid_eps=0.3, return_lse=True)
    out, lse = attention(q, k, v, backend="triton", **kw)
    ref, ref_lse = attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    assert rel(out, ref) <= 1e-5 and rel(lse, ref_lse) <= 1e-5
    lsh = attention(q, k, v, method="lsh", partitions=parts, backend="triton")
    assert rel(lsh, ref) > 1e-3  # the near field matters in this case
    window = resolve_spec(q, k, v, method="hybrid", partitions=parts, hybrid_eps=0.3).window
    lsh_tiles = tl_mod.tile_counts(parts, 23, True, 16, 16)
    hyb_tiles = tl_mod.tile_counts(parts, 23, True, 16, 16, window=window)
    assert hyb_tiles["interior"] == lsh_tiles["interior"] and hyb_tiles["boundary"] >= lsh_tiles["boundary"]
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    q2 = torch.randn(1, 2, 16, 16)
    pad = torch.ones(1, 16, dtype=torch.bool)
    refused = [resolve_spec(q2, q2, q2, method="hybrid", kernel=power_law(0.7), samples=2),
               resolve_spec(q2, q2, q2, method="hybrid", samples=2, key_padding_mask=pad)]
    for spec in refused:
        assert not BACKENDS["triton"].accepts(q2, spec)
    assert BACKENDS["triton"].accepts(q2, resolve_spec(q2, q2, q2, method="hybrid", samples=2))
