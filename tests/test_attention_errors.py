"""Bad input raises an error that names the offending argument."""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh import sample_partitions


def qkv(b=1, h=4, hkv=2, nq=8, nk=10, d=4, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


def parts(n=10, heads=4, samples=2):
    return sample_partitions(n, poslsh.alibi_slopes(heads), samples, generator=torch.Generator().manual_seed(0))


Q, K, V = qkv()

BAD = [
    # (q, k, v, kwargs, exception, message)
    (Q[0], K, V, {}, ValueError, r"q must be 4-D"),
    (Q[0, 0, 0], K, V, {}, ValueError, r"q must be 4-D"),  # (an IndexError of the plans' key before)
    ([1.0], K, V, {}, TypeError, r"q must be a torch.Tensor"),  # (an AttributeError before)
    (Q, K, V[..., :3, :], {}, ValueError, r"k and v must share heads and length"),
    (Q, K[..., :3], V, {}, ValueError, r"q and k must share the head dim"),
    (Q, K[:1].expand(2, -1, -1, -1), V, {}, ValueError, r"batch size"),
    (torch.randn(1, 3, 8, 4), K, V, {}, ValueError, r"H=3 must be divisible by .*Hkv=2"),
    (torch.randn(1, 4, 11, 4), K, V, {}, ValueError, r"Nq=11 must be <= key length Nk=10"),
    (Q.double(), K, V, {}, TypeError, r"q, k, v must share a dtype"),
    (Q.int(), K.int(), V.int(), {}, TypeError, r"q must be float16, bfloat16, float32 or float64"),
    (Q, K, V, {"method": "linear"}, ValueError, r"method must be one of"),
    (Q, K, V, {"backend": "cuda-magic"}, ValueError, r"backend must be 'auto' or one of"),
    (Q, K, V, {"backend": ["fused"]}, ValueError, r"backend must be 'auto' or one of"),  # (unhashable, before)
    (Q, K, V, {"slopes": [0.5, 0.25]}, ValueError, r"slopes must have one value per query head \(4\)"),
    (Q, K, V, {"slopes": [0.5, float("nan"), 0.1, 0.1]}, ValueError, r"slopes must be finite"),
    (Q, K, V, {"slopes": [0.5, -0.1, 0.1, 0.1]}, ValueError, r"slopes must be >= 0"),
    (Q, K, V, {"method": "lsh", "samples": 0}, ValueError, r"samples must be >= 1"),
    (Q, K, V, {"method": "lsh", "scheme": "hex"}, ValueError, r"scheme must be one of"),
    (Q, K, V, {"method": "lsh", "partitions": parts(n=12)}, ValueError, r"partitions must cover the Nk=10 key positions"),
    (Q, K, V, {"method": "lsh", "partitions": parts(heads=2)}, ValueError, r"partitions must have one set per query head \(4\)"),
    (Q, K, V, {"method": "lsh", "partitions": parts(), "slopes": [0.1] * 4}, ValueError, r"partitions were drawn for slopes"),
    (Q, K, V, {"method": "lsh", "partitions": parts(), "samples": 8}, ValueError,
     r"samples=8, but the partitions given hold 2 samples"),  # (ran with 2, silently)
    (Q, K, V, {"method": "hybrid", "partitions": parts(), "scheme": "cut"}, ValueError,
     r"scheme='cut', but the partitions given are of scheme 'grid'"),
    (Q, K, V, {"method": "lsh", "partitions": parts(), "samples": "2"}, TypeError, r"samples must be an int"),
    (Q, K, V, {"return_lse": "yes"}, TypeError, r"return_lse must be a bool"),  # (taken as true before)
    (Q, K, V, {"method": "lsh", "partitions": parts(), "scheme": "hex"}, ValueError, r"scheme must be one of"),
    (Q, K, V, {"partitions": parts(), "method": "exact"}, ValueError, r"partitions are only used by method='lsh'"),
    (Q, K, V, {"method": "lsh", "partitions": "grid"}, TypeError, r"partitions must be a poslsh.Partitions"),
    (Q, K, V, {"method": "window", "window_eps": 1.5}, ValueError, r"window_eps must be in \(0, 1\)"),
    (Q, K, V, {"scale": float("inf")}, ValueError, r"scale must be finite"),
    (Q, K, V, {"key_padding_mask": torch.ones(1, 10)}, TypeError, r"key_padding_mask must be a bool tensor"),
    (Q, K, V, {"key_padding_mask": torch.ones(1, 8, dtype=torch.bool)}, ValueError,
     r"key_padding_mask must have shape \[B, Nk\] = \(1, 10\)"),
    (Q, K, V, {"causal": "yes"}, TypeError, r"causal must be a bool"),
    # Another library's keyword names the poslsh argument to use.
    (Q, K, V, {"softmax_scale": 0.5}, TypeError, r"no argument 'softmax_scale': use scale="),
    (Q, K, V, {"attn_mask": torch.ones(8, 10, dtype=torch.bool)}, TypeError, r"'attn_mask': use key_padding_mask="),
    (Q, K, V, {"dropout_p": 0.1}, TypeError, r"'dropout_p': use nothing: poslsh.attention applies no dropout"),
    (Q, K, V, {"alibi_slopes": [0.5] * 4}, TypeError, r"'alibi_slopes': use slopes=.*poslsh.flash_attn_func"),
    (Q, K, V, {"window_size": (4, 0), "method": "lsh"}, ValueError, r"window_size sets the window itself; method='lsh'"),
    (Q, K, V, {"window_size": (4, 0), "method": "window"}, ValueError, r"window_size sets the window itself"),
    (Q, K, V, {"window_size": (4, 1.5)}, TypeError, r"window_size entries must be an int or H ints"),
    (Q, K, V, {"window_size": (4, [1, 2])}, ValueError, r"window_size needs one size per query head \(4\), got 2"),
    (Q, K, V, {"window_size": (-3, 0)}, ValueError, r"window_size sizes must be >= 0 or -1"),
    (Q, K, V, {"window_size": torch.tensor([1, 2, 3])}, TypeError, r"window_size must be a pair \(left, right\)"),
    (Q, K, V, {"is_causal": True, "causal": True}, TypeError, r"pass is_causal .* or causal .*, not both"),
    (Q, K, V, {"samplez": 3}, TypeError, r"unexpected keyword argument 'samplez'"),
]


@pytest.mark.parametrize("q,k,v,kwargs,exc,match", BAD, ids=[m for *_, m in BAD])
def test_bad_input_raises_clear_error(q, k, v, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        poslsh.attention(q, k, v, **kwargs)


def test_split_rejects_non_lsh():
    with pytest.raises(ValueError, match=r"backend 'split' does not support this call \(method='exact'"):
        poslsh.attention(Q, K, V, method="exact", backend="split")


def test_mixed_devices_on_meta():
    """Device checks without a GPU: the meta device is a second device on any machine."""
    with pytest.raises(ValueError, match=r"q, k, v must be on one device"):
        poslsh.attention(Q, K.to("meta"), V)
    with pytest.raises(ValueError, match=r"key_padding_mask must be on q's device"):
        poslsh.attention(Q, K, V, key_padding_mask=torch.ones(1, K.shape[2], dtype=torch.bool, device="meta"))


def test_is_causal_is_sdpa_name_and_causal_its_alias():
    """is_causal (SDPA's name) and causal compute the same; the default is causal; method defaults to exact."""
    exact_causal = poslsh.attention(Q, K, V, method="exact")
    assert torch.equal(poslsh.attention(Q, K, V), exact_causal)
    assert torch.equal(poslsh.attention(Q, K, V, is_causal=True), exact_causal)
    assert torch.equal(poslsh.attention(Q, K, V, is_causal=False), poslsh.attention(Q, K, V, causal=False))
    assert not torch.equal(poslsh.attention(Q, K, V, is_causal=False), exact_causal)


def test_flash_layout_warns_and_sdpa_layout_does_not():
    """[B, N, H, D] tensors read as [B, H, N, D]: 64 "heads" of 8 "positions" warn with the fix named;
    SDPA-layout calls (decoding, short prompts with few heads, a prompt as long as the head count) do not."""
    import warnings

    from poslsh.attention.public import LayoutWarning

    q, k, v = qkv(h=64, hkv=64, nq=8, nk=8)
    with pytest.warns(LayoutWarning, match=r"transpose\(1, 2\).*poslsh.flash_attn_func"):
        poslsh.attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)
        for shape in (dict(h=32, hkv=8, nq=1, nk=300), dict(h=32, hkv=32, nq=1, nk=300),
                      dict(h=8, hkv=8, nq=4, nk=4), dict(h=16, hkv=16, nq=16, nk=16), dict(h=4, hkv=4, nq=1, nk=1)):
            poslsh.attention(*qkv(**shape))


MISSING_BACKENDS = """
import sys
sys.modules["triton"] = None  # neither triton nor the cuDNN frontend importable: a CPU install without extras
sys.modules["cudnn"] = None
import torch, poslsh
q = torch.randn(1, 2, 8, 4)
for name in ("triton", "cudnn"):
    try:
        poslsh.attention(q, q, q, backend=name)
    except ValueError as err:
        print(err)
"""


def test_an_optional_backend_that_is_absent_says_what_to_install():
    """backend="triton" without triton (or "cudnn" without its frontend) names what is missing, not only
    the backends there are (before: "backend must be 'auto' or one of [...], got 'triton'")."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MISSING_BACKENDS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith("backend 'triton' is not available here: the triton package is not installed "
                               "(pip install 'poslsh[triton]'); use 'auto' or one of ["), lines[0]
    assert lines[1].startswith("backend 'cudnn' is not available here: needs the nvidia-cudnn-frontend package"), lines[1]
