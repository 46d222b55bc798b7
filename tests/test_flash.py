"""poslsh.flash_attn_func / flash_attn_varlen_func: FlashAttention-2's interface over poslsh.attention.

Held to an independent float64 oracle written here from FlashAttention's ``attention_ref`` semantics
(the bias -slope * |i + Nk - Nq - j|, the window mask p - left <= j <= p + right with p = i + Nk - Nq,
causal meaning right = 0, fully masked rows giving 0), and to poslsh.attention on transposed tensors.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import poslsh
from poslsh import flash_attn_func, flash_attn_varlen_func
from tolerances import low_precision_bound, rel_err


def fa_reference(q, k, v, *, causal=False, window=(-1, -1), slopes=None, scale=None):
    """FlashAttention's attention_ref in float64: q [B, Nq, H, D], k, v [B, Nk, Hkv, *]; slopes [H] or
    [B, H]; window (left, right) with left an int or H ints (per-head, poslsh's extension)."""
    q, k, v = q.double(), k.double(), v.double()
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    k, v = (t.repeat_interleave(h // hkv, dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * (d ** -0.5 if scale is None else scale)
    pos = torch.arange(nq)[:, None] + nk - nq  # query i sits at key position i + Nk - Nq
    col = torch.arange(nk)[None, :]
    if slopes is not None:
        s = torch.as_tensor(slopes, dtype=torch.float64).expand(b, h)
        scores = scores - s[:, :, None, None] * (pos - col).abs()
    left = torch.as_tensor(window[0]).expand(h)[None, :, None, None]
    right = torch.as_tensor(0 if causal else window[1]).expand(h)[None, :, None, None]
    masked = ((right >= 0) & (col > pos + right)) | ((left >= 0) & (col < pos - left))
    scores = scores.masked_fill(masked, float("-inf"))
    attn = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with every key masked gives 0
    return torch.einsum("bhij,bjhd->bihd", attn, v)


def make(b=2, nq=37, nk=37, h=4, hkv=2, d=8, dv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nq, h, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, nk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, nk, hkv, dv or d, generator=g, dtype=torch.float64).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


SLOPES = torch.tensor([0.5, 0.125, 0.03, 0.0], dtype=torch.float64)  # one head without decay
CASES = {  # (causal, window_size, slopes)
    "causal alibi": (True, (-1, -1), SLOPES),
    "bidirectional alibi": (False, (-1, -1), SLOPES),
    "no bias causal": (True, (-1, -1), None),
    "causal window": (True, (5, -1), SLOPES),  # right is ignored when causal, as in FlashAttention
    "window (w, 0) is causal": (False, (3, 0), SLOPES),
    "symmetric window": (False, (4, 4), SLOPES),
    "window 0": (True, (0, 0), SLOPES),
    "per-head causal windows": (True, ([1, 6, 40, -1], 0), SLOPES),
    "per-head symmetric windows": (False, ([2, 0, 9, -1], [2, 0, 9, -1]), SLOPES),
    "per-batch slopes": (True, (-1, -1), torch.tensor([[0.5, 0.25, 0.1, 0.0], [0.2, 0.2, 0.0, 1.0]])),
    "asymmetric window": (False, (3, 1), SLOPES),
    "right side only": (False, (-1, 2), SLOPES),
    "left side only": (False, (4, -1), SLOPES),
    "looking ahead": (False, (0, 5), SLOPES),
    "per-head asymmetric windows": (False, ([2, 0, 9, -1], [1, 3, -1, 0]), SLOPES),
    "window as a tensor": (False, torch.tensor([6, 2]), SLOPES),
    "sides as tensors": (False, (torch.tensor([1, 6, 0, 3]), torch.tensor(2)), SLOPES),
}


def _pair(window):
    """window_size as the oracle reads it: (left, right), each an int or H ints."""
    return tuple(w.tolist() if isinstance(w, torch.Tensor) else w for w in window)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("nq,nk", [(37, 37), (12, 37), (1, 33), (2, 2), (37, 12), (9, 1)])
def test_matches_flash_attention_reference(name, nq, nk):
    """Nq > Nk included: rows before the first key see nothing when causal (output 0)."""
    causal, window, slopes = CASES[name]
    q, k, v = make(nq=nq, nk=nk, dv=5)
    out = flash_attn_func(q, k, v, causal=causal, window_size=window, alibi_slopes=slopes)
    ref = fa_reference(q, k, v, causal=causal, window=_pair(window), slopes=slopes)
    assert out.shape == (2, nq, 4, 5) and out.is_contiguous() and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_same_as_poslsh_attention_in_sdpa_layout():
    """Exact ALiBi, causal and not, with a scale: the transposed poslsh.attention call, bit for bit."""
    q, k, v = make(nq=20, nk=29, dtype=torch.float32)
    for causal in (True, False):
        out = flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, alibi_slopes=SLOPES)
        sdpa = poslsh.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), slopes=SLOPES,
                                is_causal=causal, scale=0.3).transpose(1, 2)
        assert torch.equal(out, sdpa)
        torch.testing.assert_close(out.double(), fa_reference(q, k, v, causal=causal, slopes=SLOPES, scale=0.3),
                                   atol=2e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_follows_inputs(dtype):
    q, k, v = make(nq=33, nk=33, dtype=dtype)
    out = flash_attn_func(q, k, v, causal=True, window_size=(7, 0), alibi_slopes=SLOPES)
    assert out.dtype == dtype
    ref = fa_reference(q, k, v, causal=True, window=(7, 0), slopes=SLOPES)
    # fp32: its compute noise; bf16: 2x exact attention's own rounding (a 4 % slope error is 10x that)
    assert rel_err(out, ref) < (2e-6 if dtype == torch.float32 else low_precision_bound(ref, dtype))


def test_gradients_match_the_reference():
    """Autograd through q, k, v (grouped KV, per-head windows, Nq < Nk) equals the oracle's."""
    q, k, v = make(nq=11, nk=19, grad=True)
    window = ([2, 5, -1, 0], 0)
    out = flash_attn_func(q, k, v, causal=True, window_size=window, alibi_slopes=SLOPES)
    ref = fa_reference(q, k, v, causal=True, window=window, slopes=SLOPES)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def test_approximate_methods_through_keywords():
    """method="lsh"/"hybrid"/"window" are poslsh.attention's, given the same partitions or eps."""
    q, k, v = make(nq=30, nk=30)
    slopes = poslsh.alibi_slopes(4)
    parts = poslsh.sample_partitions(30, slopes, 4, generator=torch.Generator().manual_seed(1))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    for method in ("lsh", "hybrid"):
        out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, method=method, partitions=parts)
        ref = poslsh.attention(qt, kt, vt, method=method, partitions=parts).transpose(1, 2)
        assert torch.equal(out, ref)
    out = flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, method="window", window_eps=0.1)
    from poslsh.attention import window_sizes

    widths = window_sizes(slopes, 0.1, 30).tolist()
    torch.testing.assert_close(out, fa_reference(q, k, v, causal=True, window=(widths, 0), slopes=slopes),
                               atol=1e-12, rtol=0)


def test_calls_with_their_defaults_warn_nothing():
    """flash_attn_func's method options defaulted to values, not None, so poslsh.attention saw every
    option as given: each call of a method that reads none or few of them warned (exact: "ignores samples,
    scheme, sampling, window_eps, hybrid_eps"). A call sets only what it passes."""
    q, k, v = make(nq=9, nk=12)
    slopes = poslsh.alibi_slopes(4)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cuk = torch.tensor([0, 5, 12], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("exact", "window", "lsh", "hybrid"):
            flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, method=method,
                            generator=torch.Generator().manual_seed(0))
            flash_attn_varlen_func(q[0], k[0], v[0], cu, cuk, 5, 7, causal=True, alibi_slopes=slopes,
                                   method=method, generator=torch.Generator().manual_seed(0))


def test_right_padded_keys_align_to_the_last_valid_key_in_varlen():
    """FlashAttention's varlen aligns each sequence's queries to its last valid key; poslsh.attention
    with key_padding_mask keeps query i at Nk - Nq + i. Both are checked against the oracle, and they
    differ, which is why the two conventions are documented."""
    h, d, nq, valid = 4, 8, 3, [9, 14]
    nk = max(valid)
    seqs = [make(b=1, nq=nq, nk=n, seed=s) for s, n in enumerate(valid)]
    q = torch.cat([s[0][0] for s in seqs])
    k = torch.cat([s[1][0] for s in seqs])
    v = torch.cat([s[2][0] for s in seqs])
    cu_q = torch.tensor([0, nq, 2 * nq], dtype=torch.int32)
    cu_k = torch.tensor([0, valid[0], sum(valid)], dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, nq, nk, causal=True, alibi_slopes=SLOPES)
    for i, (qs, ks, vs) in enumerate(seqs):
        torch.testing.assert_close(out[i * nq:(i + 1) * nq], fa_reference(qs, ks, vs, causal=True, slopes=SLOPES)[0],
                                   atol=1e-12, rtol=0)
    # The same batch right-padded to Nk, through poslsh.attention: queries at Nk - Nq + i.
    kp = torch.zeros(2, h // 2, nk, d, dtype=torch.float64)
    vp = torch.zeros_like(kp)
    kpm = torch.zeros(2, nk, dtype=torch.bool)
    for i, (_, ks, vs) in enumerate(seqs):
        kp[i, :, :valid[i]], vp[i, :, :valid[i]], kpm[i, :valid[i]] = ks[0].transpose(0, 1), vs[0].transpose(0, 1), True
    qp = torch.stack([s[0][0] for s in seqs]).transpose(1, 2)
    padded = poslsh.attention(qp, kp, vp, slopes=SLOPES, key_padding_mask=kpm).transpose(1, 2)
    for i in range(2):  # oracle: keys zero-padded to Nk and masked, queries at Nk - Nq + i
        kf, vf = kp[i:i + 1].transpose(1, 2), vp[i:i + 1].transpose(1, 2)
        pos = torch.arange(nq)[:, None] + nk - nq
        bias = -SLOPES[None, :, None, None] * (pos - torch.arange(nk)[None]).abs()
        keep = kpm[i][None, None, None] & (torch.arange(nk)[None] <= pos)
        s = torch.einsum("bihd,bjhd->bhij", qp[i:i + 1].transpose(1, 2), kf.repeat_interleave(2, 2)) * d ** -0.5
        attn = torch.softmax((s + bias).masked_fill(~keep, float("-inf")), -1)
        torch.testing.assert_close(padded[i], torch.einsum("bhij,bjhd->bihd", attn, vf.repeat_interleave(2, 2))[0],
                                   atol=1e-12, rtol=0)
    assert (padded[0] - out[:nq]).abs().max() > 1e-2  # the shorter sequence: the conventions differ
    torch.testing.assert_close(padded[1], out[nq:], atol=1e-12, rtol=0)  # unpadded: they agree


def test_varlen_packs_sequences_with_per_sequence_slopes_and_windows():
    lengths_q, lengths_k = [5, 1, 0, 8], [7, 4, 3, 8]
    seqs = [make(b=1, nq=a, nk=b, seed=10 + i) for i, (a, b) in enumerate(zip(lengths_q, lengths_k))]
    q, k, v = (torch.cat([s[j][0] for s in seqs]) for j in range(3))
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    slopes = torch.rand(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = flash_attn_varlen_func(q, k, v, cu(lengths_q), cu(lengths_k), 8, 8, causal=False, window_size=(2, 2),
                                 alibi_slopes=slopes, softmax_scale=0.7)
    assert out.shape == (sum(lengths_q), 4, 8)
    start = 0
    for i, (qs, ks, vs) in enumerate(seqs):
        if lengths_q[i]:
            ref = fa_reference(qs, ks, vs, window=(2, 2), slopes=slopes[i], scale=0.7)[0]
            torch.testing.assert_close(out[start:start + lengths_q[i]], ref, atol=1e-12, rtol=0)
        start += lengths_q[i]


Q, K, V = make(nq=6, nk=6)
BAD = [
    (dict(dropout_p=0.1), NotImplementedError, r"dropout_p=0.1: poslsh applies no attention dropout"),
    (dict(softcap=30.0), NotImplementedError, r"softcap=30.0: logit soft-capping is not supported"),
    (dict(return_attn_probs=True), NotImplementedError, r"return_attn_probs=True"),
    (dict(window_size=3), TypeError, r"window_size must be a pair \(left, right\)"),
    (dict(window_size=([1, 2], 0)), ValueError, r"window_size needs one size per query head \(4\), got 2"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size sizes must be >= 0 or -1"),
    (dict(window_size=(1.5, 0)), TypeError, r"window_size entries must be an int or H ints"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \[H\] = \(4,\) or \[B, H\]"),
    (dict(alibi_slopes=torch.ones(4, requires_grad=True)), ValueError, r"alibi_slopes must not require grad"),
    (dict(method="lsh"), ValueError, r"method='lsh' approximates ALiBi attention: pass alibi_slopes"),
    (dict(method="window", alibi_slopes=SLOPES, window_size=(3, 0)), ValueError, r"window_size sets the window itself"),
    (dict(method="magic", alibi_slopes=SLOPES), ValueError, r"method must be one of"),
    (dict(causal="yes"), TypeError, r"causal must be a bool"),  # (both taken as true before)
    (dict(return_lse="yes"), TypeError, r"return_lse must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[m for *_, m in BAD])
def test_unsupported_or_bad_arguments_name_themselves(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_func(Q, K, V, **kwargs)


def test_bad_layouts_and_packing():
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, Nq, H, D\] \(FlashAttention's layout\)"):
        flash_attn_func(Q[0], K, V)
    with pytest.raises(ValueError, match=r"query heads H=4 must be divisible by key/value heads Hkv=3"):
        flash_attn_func(Q, *make(nq=6, nk=6, hkv=3)[1:])
    q, k, v = Q[0], K[0], V[0]
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen_q=5 is below the longest sequence \(6\)"):
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must start at 0, not decrease and end at the packed length 6"):
        flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 5]), 6, 6)
    with pytest.raises(NotImplementedError, match=r"block_table"):
        flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, block_table=torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"partitions cover one key length"):
        flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, alibi_slopes=SLOPES, method="lsh",
                               partitions=poslsh.sample_partitions(6, SLOPES, 2))


def fa_lse_reference(q, k, *, causal=False, window=(-1, -1), slopes=None):
    """FlashAttention's softmax_lse [B, H, Nq] in float64: logsumexp of the scaled, biased, masked
    scores; -inf for a row with every key masked."""
    q, k = q.double(), k.double()
    b, nq, h, d = q.shape
    nk = k.shape[1]
    k = k.repeat_interleave(h // k.shape[2], dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5
    pos = torch.arange(nq)[:, None] + nk - nq
    col = torch.arange(nk)[None, :]
    if slopes is not None:
        scores = scores - torch.as_tensor(slopes, dtype=torch.float64).expand(b, h)[:, :, None, None] * (pos - col).abs()
    left, right = window[0], 0 if causal else window[1]
    masked = ((right >= 0) & (col > pos + right)) | ((left >= 0) & (col < pos - left))
    return torch.logsumexp(scores.masked_fill(masked, float("-inf")), -1)


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (2, 1)), (False, (3, 0)), (False, (0, 0))])
def test_lse_with_rows_that_see_no_key(causal, window):
    """Nq > Nk: FlashAttention's LSE, -inf (not poslsh's finite EMPTY_LSE) where a row sees no key, and
    output 0 there; the varlen form gives the same rows in its [H, total_q] layout."""
    q, k, v = make(b=1, nq=13, nk=5)
    out, lse = flash_attn_func(q, k, v, causal=causal, window_size=window, alibi_slopes=SLOPES, return_lse=True)
    ref = fa_lse_reference(q, k, causal=causal, window=window, slopes=SLOPES)
    empty = torch.isneginf(ref)
    assert empty.any() and torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty], ref[~empty], atol=1e-12, rtol=0)
    assert (out.transpose(1, 2)[empty] == 0).all()
    cu_q, cu_k = torch.tensor([0, 13], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    vout, vlse = flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, 13, 5, causal=causal, window_size=window,
                                        alibi_slopes=SLOPES, return_lse=True)
    assert torch.equal(vout, out[0]) and torch.equal(vlse, lse[0])


def test_varlen_sequences_with_more_queries_than_keys():
    """Per sequence bottom-right alignment with Nq_b > Nk_b (and a sequence without keys: output 0)."""
    lengths_q, lengths_k = [6, 3, 2], [2, 5, 0]
    seqs = [make(b=1, nq=a, nk=max(b, 1), seed=20 + i) for i, (a, b) in enumerate(zip(lengths_q, lengths_k))]
    q = torch.cat([s[0][0] for s in seqs])
    k, v = (torch.cat([s[j][0][:n] for s, n in zip(seqs, lengths_k)]) for j in (1, 2))
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    for causal, window in ((True, (-1, -1)), (False, (1, 2))):
        out = flash_attn_varlen_func(q, k, v, cu(lengths_q), cu(lengths_k), 6, 5, causal=causal, window_size=window,
                                     alibi_slopes=SLOPES)
        start = 0
        for (qs, ks, vs), a, n in zip(seqs, lengths_q, lengths_k):
            ref = (fa_reference(qs, ks[:, :n], vs[:, :n], causal=causal, window=window, slopes=SLOPES)[0] if n
                   else torch.zeros_like(qs[0]))
            torch.testing.assert_close(out[start:start + a], ref, atol=1e-12, rtol=0)
            start += a


@pytest.mark.parametrize("window,is_causal", [((3, 1), None), ((0, 4), False), (([2, 0, 9, -1], [1, 3, -1, 0]), None),
                                              ((5, 0), None), ((5, 2), True), ((-1, -1), None), ((-1, -1), True)])
def test_poslsh_attention_takes_window_size(window, is_causal):
    """poslsh.attention(window_size=...) is FlashAttention's window (is_causal unset: the window decides,
    right = 0 being causal; is_causal=True sets right = 0), the same call flash_attn_func makes."""
    q, k, v = make(nq=12, nk=21)
    kw = {} if is_causal is None else {"is_causal": is_causal}
    out = poslsh.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), slopes=SLOPES,
                           window_size=window, **kw).transpose(1, 2)
    causal = bool(is_causal)
    ref = fa_reference(q, k, v, causal=causal, window=window, slopes=SLOPES)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.equal(out, flash_attn_func(q, k, v, causal=causal, window_size=window, alibi_slopes=SLOPES))
