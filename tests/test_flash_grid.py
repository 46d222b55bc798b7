"""FlashAttention-2's own output tests, ALiBi on, against poslsh.flash_attn_func / flash_attn_varlen_func.

The parametrisation of ``test_flash_attn_output`` and ``test_flash_attn_varlen_output`` (flash-attention,
tests/test_flash_attn.py): its pairs of (seqlen_q, seqlen_k) (Nq > Nk among them), head dims, causal or
not, local windows drawn as ``torch.randint(0, seqlen_k, (2,))`` (a tensor; left != right, causal
ignoring the right side), MHA / MQA / GQA (6 query heads, 6 / 1 / 2 KV heads), fp16 and bf16, ALiBi
slopes ``rand(B, H) * 0.3``; varlen with random padding of up to 20 positions per sequence. Dropout,
soft-capping and ``return_attn_probs`` are the only FlashAttention options poslsh refuses, so they are
left out.

FlashAttention's acceptance rule: the largest error of the output against a float64 reference is at
most twice that of the same reference computed in the test dtype (scores from q and k / sqrt(D),
FlashAttention's ``upcast=False, reorder_ops=True``), plus FlashAttention 3's absolute slack (twice
the dtype's rounding of out + 0.3 - 0.3); gradients within 3x likewise.

What runs where (the whole grid is 1320 cases per dtype; CI has 2 CPU cores):

* CPU, "reference" and "fused" (gradients too), varlen on "fused": every ``CPU_STRIDE``-th case of
  the grid in a fixed order (a stride coprime with every factor's size, so each value of each factor
  occurs; ``test_samples_cover_the_grid``), lengths divided by 4 until both are at most 256 (the
  same shapes: odd, one longer than the other);
* CPU, Triton under TRITON_INTERPRET=1, fp16 only (the interpreter's bf16 is broken): every
  ``INTERPRET_STRIDE``-th case, lengths divided by 8 until at most 64, head dims up to 64, forward
  and gradients;
* CUDA (skipped without it), "triton" and "flex": the same CPU sample at FlashAttention's full lengths.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before poslsh's Triton module is imported (as test_conformance does)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from poslsh import flash_attn_func, flash_attn_varlen_func  # noqa: E402

SEQLENS = [(113, 203), (128, 217), (113, 211), (108, 256), (256, 512), (512, 256), (1024, 1024), (1023, 1024),
           (1024, 1023), (2048, 2048)]
VARLEN_SEQLENS = [(1, 147)] + SEQLENS
HEAD_DIMS = [32, 40, 59, 64, 96, 111, 128, 160, 192, 224, 256]
MHA = {"mha": 6, "mqa": 1, "gqa": 2}  # KV heads for 6 query heads
DTYPES = [torch.float16, torch.bfloat16]
BATCH = 2  # FlashAttention uses 4; 2 keeps the CPU float64 reference small
CPU_STRIDE = 127
INTERPRET_STRIDE = 173


def grid(seqlens, dtypes=DTYPES):
    """Every case of FlashAttention's grid with ALiBi on: (seqlen_q, seqlen_k, d, causal, local, mha, dtype)."""
    return [(sq, sk, d, causal, local, mha, dtype) for (sq, sk), d, causal, local, mha, dtype
            in itertools.product(seqlens, HEAD_DIMS, (False, True), (False, True), MHA, dtypes)]


def subsample(cases, stride):
    """Every ``stride``-th case (stride coprime with the factors' sizes 2, 3, 10, 11, 12): deterministic."""
    return [cases[i] for i in range(0, len(cases), stride)]


def shrink(case, factor, max_n, max_d=256):
    """Lengths divided by ``factor`` until both are at most ``max_n`` (Nq > Nk stays so), d capped."""
    sq, sk, d, *rest = case
    while max(sq, sk) > max_n:
        sq, sk = max(1, round(sq / factor)), max(1, round(sk / factor))
    return (sq, sk, min(d, max_d), *rest)


def case_id(case):
    sq, sk, d, causal, local, mha, dtype = case
    return f"{sq}x{sk}-d{d}-{'causal' if causal else 'full'}{'-local' if local else ''}-{mha}-{str(dtype)[6:]}"


def reference(q, k, v, slopes, causal, window, key_len=None, query_len=None, upcast=True):
    """FlashAttention's attention_ref: float64 (upcast) or the test dtype with k / sqrt(D) (its
    ``reorder_ops``). q [B, Nq, H, D], k, v [B, Nk, Hkv, D]; slopes [B, H]; window (left, right) ints
    (-1 unbounded) or None; key_len, query_len: [B] valid lengths (varlen padding, right-padded) or
    None. Rows that see no key give 0; padded query rows give 0."""
    if upcast:
        q, k, v, slopes = q.double(), k.double(), v.double(), slopes.double()
    b, nq, h, d = q.shape
    nk, g = k.shape[1], h // k.shape[2]
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k if upcast else k / math.sqrt(d))
    if upcast:
        scores = scores / math.sqrt(d)
    dev = q.device
    sk = torch.full((b,), nk, device=dev) if key_len is None else key_len.to(dev)
    sq = torch.full((b,), nq, device=dev) if query_len is None else query_len.to(dev)
    pos = torch.arange(nq, device=dev)[None, :, None] + (sk - sq)[:, None, None]  # [B, Nq, 1]: i + Nk_b - Nq_b
    col = torch.arange(nk, device=dev)[None, None, :]
    scores = scores - (slopes.to(scores.dtype)[:, :, None, None] * (pos - col).abs()[:, None].to(scores.dtype))
    left, right = (-1, -1) if window is None else window
    right = 0 if causal else right
    masked = (col >= sk[:, None, None]) | ((right >= 0) & (col > pos + right)) | ((left >= 0) & (col < pos - left))
    scores = scores.masked_fill(masked[:, None], float("-inf"))
    attn = torch.softmax(scores.float() if not upcast else scores, -1).to(scores.dtype).nan_to_num(0.0)
    out = torch.einsum("bhij,bjhd->bihd", attn, v)
    return out.masked_fill((torch.arange(nq, device=dev)[None, :] >= sq[:, None])[:, :, None, None], 0.0)


def make_case(case, seed=0, device="cpu"):
    sq, sk, d, causal, local, mha, dtype = case
    g = torch.Generator().manual_seed(seed)
    h, hkv = 6, MHA[mha]
    q, k, v = (torch.randn(BATCH, n, heads, d, generator=g).to(device, dtype).requires_grad_()
               for n, heads in ((sq, h), (sk, hkv), (sk, hkv)))
    window = torch.randint(0, sk, (2,), generator=g) if local else None  # FlashAttention's draw: a tensor
    slopes = (torch.rand(BATCH, h, generator=g) * 0.3).to(device)
    return q, k, v, slopes, window


def slack(out_ref, dtype):
    """FlashAttention 3's absolute slack: twice the dtype's rounding of out + 0.3 - 0.3."""
    o = out_ref.detach().to(dtype)
    return 2 * float(((o + 0.3 - 0.3) - o).abs().max()) if o.numel() else 0.0


def max_err(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def check(out, out_ref, out_pt, dtype, what, grads=None):
    """FlashAttention's rule, output (2x + slack) and, with ``grads`` = (ours, float64's, dtype's), 3x."""
    err, bound = max_err(out, out_ref), 2 * max_err(out_pt, out_ref) + slack(out_ref, dtype)
    assert err <= bound, f"{what}: output error {err:.3g} > FlashAttention's bound {bound:.3g}"
    for name, ours, ref, pt in zip("qkv", *grads) if grads else ():
        err, bound = max_err(ours, ref), 3 * max_err(pt, ref) + slack(ref, dtype)
        assert err <= bound, f"{what}: d{name} error {err:.3g} > FlashAttention's bound {bound:.3g}"


def run_output_case(case, backend, with_grad, device="cpu"):
    sq, sk, d, causal, local, mha, dtype = case
    q, k, v, slopes, window = make_case(case, device=device)
    window_size = (-1, -1) if window is None else window
    out = flash_attn_func(q, k, v, causal=causal, window_size=window_size, alibi_slopes=slopes, backend=backend)
    pair = None if window is None else tuple(window.tolist())
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    out_ref = reference(*ins, slopes, causal, pair)
    out_pt = reference(*ins, slopes, causal, pair, upcast=False)
    grads = None
    if with_grad:
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        grads = (torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(out_ref, ins, do.double()),
                 torch.autograd.grad(out_pt, ins, do))
    check(out, out_ref, out_pt, dtype, f"{backend} {case_id(case)}", grads)


def run_varlen_case(case, backend, device="cpu"):
    """FlashAttention's varlen test: right-padded batches unpadded into packed sequences, each aligned
    bottom-right on its own valid keys (random lengths of at least max(1, N - 20))."""
    sq, sk, d, causal, local, mha, dtype = case
    q, k, v, slopes, window = make_case(case, seed=1, device=device)
    g = torch.Generator().manual_seed(2)
    lq, lk = (torch.randint(max(1, n - 20), n + 1, (BATCH,), generator=g) for n in (sq, sk))
    cu = lambda ls: torch.cat([torch.zeros(1, dtype=torch.int32), ls.cumsum(0).int()]).to(device)  # noqa: E731
    pack = lambda t, ls: torch.cat([t[i, :n] for i, n in enumerate(ls.tolist())])  # noqa: E731
    window_size = (-1, -1) if window is None else window
    out = flash_attn_varlen_func(pack(q, lq), pack(k, lk), pack(v, lk), cu(lq), cu(lk), sq, sk, causal=causal,
                                 window_size=window_size, alibi_slopes=slopes, backend=backend)
    pair = None if window is None else tuple(window.tolist())
    ins = [t.detach() for t in (q, k, v)]
    out_ref, out_pt = (reference(*ins, slopes, causal, pair, lk, lq, upcast=up) for up in (True, False))
    valid = (torch.arange(sq)[None, :] < lq[:, None]).to(device)
    check(out, out_ref[valid], out_pt[valid], dtype, f"varlen {backend} {case_id(case)}")


CPU_CASES = [shrink(c, 4, 256) for c in subsample(grid(SEQLENS), CPU_STRIDE)]
CPU_VARLEN_CASES = [shrink(c, 4, 256) for c in subsample(grid(VARLEN_SEQLENS), CPU_STRIDE)]
INTERPRET_CASES = [shrink(c, 8, 64, max_d=64) for c in subsample(grid(SEQLENS, [torch.float16]), INTERPRET_STRIDE)]


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("case", CPU_CASES, ids=case_id)
def test_flash_attn_output_cpu(case, backend):
    run_output_case(case, backend, with_grad=backend == "fused")


@pytest.mark.parametrize("case", CPU_VARLEN_CASES, ids=case_id)
def test_flash_attn_varlen_output_cpu(case):
    run_varlen_case(case, "fused")


def test_samples_cover_the_grid():
    """The deterministic samples hold every value of every factor, Nq > Nk and windows with left != right."""
    for cases, dtypes in ((CPU_CASES, DTYPES), (CPU_VARLEN_CASES, DTYPES)):
        for i, values in enumerate((HEAD_DIMS, (False, True), (False, True), list(MHA), dtypes)):
            assert {c[2 + i] for c in cases} == set(values)
        assert any(sq > sk for sq, sk, *_ in cases) and any(c[4] and not c[3] for c in cases)
    assert any(sq > sk and causal for sq, sk, _, causal, *_ in INTERPRET_CASES)  # rows that see no key
    assert any(c[4] and not c[3] for c in INTERPRET_CASES)


@pytest.fixture(scope="module")
def interpreted_triton():
    """The Triton backend under TRITON_INTERPRET=1 (set above when there is no CUDA)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the compiled kernels run in test_flash_attn_output_cuda")
    pytest.importorskip("triton")
    from poslsh.attention.triton import interpreting

    if not interpreting():
        pytest.skip("the Triton kernels were compiled before TRITON_INTERPRET=1 was set")


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
def test_flash_attn_output_triton_interpreted(case, interpreted_triton):
    run_output_case(case, "triton", with_grad=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton compiled, Flex compiled)")


@cuda
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("case", subsample(grid(SEQLENS), CPU_STRIDE), ids=case_id)
def test_flash_attn_output_cuda(case, backend):
    run_output_case(case, backend, with_grad=True, device="cuda")


@cuda
@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("case", subsample(grid(VARLEN_SEQLENS), 3 * CPU_STRIDE), ids=case_id)
def test_flash_attn_varlen_output_cuda(case, backend):
    """A third of the CPU's varlen sample: every packed sequence has its own lengths, hence its own
    compiled Flex kernel."""
    run_varlen_case(case, backend, device="cuda")
