"""Memory stays bounded by the tile budget, whatever Nq, Nk and the number of samples.

Memory is measured as the largest tensor storage any torch operation returns during the call
(a ``TorchDispatchMode`` sees every op, CPU or not; tracemalloc does not see torch's allocator).
A bounded largest allocation with a fixed number of live tiles bounds the peak; the inputs here
are kept far below the budget so the measure is the engine's own tiles.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import poslsh
from poslsh import alibi_slopes, sample_partitions
from poslsh.attention import EMPTY_LSE
from poslsh.attention.fused import tiled as tiled_mod

TILE_BYTES = tiled_mod.TILE_BYTES
MiB = 1 << 20


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) among the outputs of every torch op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > self.nbytes:
                self.nbytes, self.op = t.untyped_storage().nbytes(), str(func)
        return out


def largest_allocation(fn):
    with torch.no_grad(), LargestAllocation() as mode:
        result = fn()
    return mode.nbytes, mode.op, result


def test_the_measure_sees_a_large_allocation():
    nbytes, op, _ = largest_allocation(lambda: torch.zeros(1 << 22) + 1)
    assert nbytes == 16 * MiB, (nbytes, op)


# --------------------------------------------------------------------------------------------------
# Item 3: Nq << Nk (chunked prefill, a prompt continued against a cache)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,slope", [("exact", 0.1), ("window", 1e-6), ("lsh", 0.0), ("hybrid", 1e-6)])
def test_tile_bytes_bounded_when_nq_much_less_than_nk(method, slope):
    """64 queries against 2^17 keys: each method's key range is the whole prefix (exact, a window
    wider than Nk, one block at slope 0, an all-exact hybrid). The tile must stay within the budget
    (a 64 x 2^17 float32 score tile is 32 MiB)."""
    g = torch.Generator().manual_seed(0)
    nk = 1 << 17
    q = torch.randn(1, 1, 64, 4, generator=g)
    k, v = torch.randn(1, 1, nk, 4, generator=g), torch.randn(1, 1, nk, 4, generator=g)
    nbytes, op, out = largest_allocation(lambda: poslsh.attention(
        q, k, v, method=method, slopes=[slope], samples=2, window_eps=0.5, backend="fused",
        generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(out).all()
    assert nbytes <= TILE_BYTES, f"{method}: largest allocation {nbytes / MiB:.1f} MiB by {op}"


@pytest.mark.parametrize("method", ["exact", "window", "lsh", "hybrid"])
@pytest.mark.parametrize("causal", [True, False])
def test_key_chunks_match_reference(monkeypatch, method, causal):
    """With a budget of a few hundred elements every query tile is split into many key chunks,
    merged by their log-sum-exps: the result is the reference's (padding and an empty row included)."""
    monkeypatch.setattr(tiled_mod, "TILE_BYTES", 2048)  # 512 float32 / 256 float64 scores per tile
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 23, 5, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 61, 5, generator=g, dtype=torch.float64) for _ in range(2))
    kpm = torch.ones(2, 61, dtype=torch.bool)
    kpm[0, :45] = False  # with causal, the first query rows of batch 0 see no key
    kpm[1, 50:55] = False
    slopes = torch.tensor([0.3, 0.05, 0.0, 0.01], dtype=torch.float64)
    parts = sample_partitions(61, slopes, 3, generator=torch.Generator().manual_seed(3))
    kw = dict(slopes=slopes, causal=causal, method=method, window_eps=0.01, hybrid_eps=0.2,
              key_padding_mask=kpm, return_lse=True, partitions=parts if method in ("lsh", "hybrid") else None)
    t, c = tiled_mod.tile_shape(61.0, 2, 23, 0, torch.float64)
    assert t * c * 2 * 8 <= 2048 and c < 61  # several chunks per tile
    out, lse = poslsh.attention(q, k, v, backend="fused", **kw)
    ref, ref_lse = poslsh.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    if causal:
        assert (lse[0, :, 0] == EMPTY_LSE).all() and (out[0, :, 0] == 0).all()


def test_key_chunks_gradients_match_reference(monkeypatch):
    monkeypatch.setattr(tiled_mod, "TILE_BYTES", 2048)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 40, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 40, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return poslsh.attention(q, k, v, method="exact", slopes=[0.1, 0.0], backend="fused", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Item 4: many samples
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,samples", [("grid", 8192), ("cut", 2048)])
def test_many_samples_allocate_no_heads_x_samples_x_n(scheme, samples):
    """n = 512, H = 8: [H, r, n] int64 block bounds would be 256 MiB (grid, r = 8192) or 64 MiB
    (cut, r = 2048); the fused backend must stay within the tile budget, the partitions' own size
    aside (a cut partition stores its cuts: ~11 MB here)."""
    n, h = 512, 8
    parts = sample_partitions(n, alibi_slopes(h), samples, scheme=scheme, generator=torch.Generator().manual_seed(0))
    own = max(t.untyped_storage().nbytes() for t in (parts.widths, parts.offsets, parts.cut_positions)
              if t is not None)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, n, 4, generator=g) for _ in range(3))
    t0 = time.perf_counter()
    nbytes, op, out = largest_allocation(lambda: poslsh.attention(q, k, v, method="lsh", partitions=parts,
                                                                    backend="fused"))
    elapsed = time.perf_counter() - t0
    assert torch.isfinite(out).all()
    assert nbytes <= max(TILE_BYTES, own), f"largest allocation {nbytes / MiB:.1f} MiB by {op}"
    assert elapsed < 30, elapsed


def test_many_samples_fused_matches_reference():
    """Many samples (tiles of a few query rows) against the reference's collision means."""
    n, h, r = 70, 2, 3000
    slopes = torch.tensor([0.2, 0.02], dtype=torch.float64)
    for scheme in ("grid", "cut"):
        parts = sample_partitions(n, slopes, r, scheme=scheme, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(6)
        q, k, v = (torch.randn(1, h, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
        out = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="fused", causal=False)
        ref = poslsh.attention(q, k, v, method="lsh", partitions=parts, backend="reference", causal=False)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_mean_mask_allocates_only_its_output():
    n, h, r = 256, 4, 4096  # [H, r, n] int64 = 32 MiB; the [H, n, n] float64 output is 2 MiB
    parts = sample_partitions(n, alibi_slopes(h), r, generator=torch.Generator().manual_seed(0))
    nbytes, op, bhat = largest_allocation(parts.mean_mask)
    assert bhat.shape == (h, n, n)
    assert nbytes <= TILE_BYTES, f"largest allocation {nbytes / MiB:.1f} MiB by {op}"


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_request_that_cannot_fit_names_samples_before_any_work(scheme):
    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match=r"samples=10+ .*GB"):
        sample_partitions(512, alibi_slopes(8), 10**13, scheme=scheme)
    q = torch.randn(1, 8, 16, 4)
    with pytest.raises(MemoryError, match=r"samples=10+ "):
        poslsh.attention(q, q, q, method="lsh", samples=10**13)
    assert time.perf_counter() - t0 < 1.0
