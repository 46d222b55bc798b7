"""Every registered backend x every method it declares, held to an independent float64 oracle.

The suite is generated from ``poslsh.attention.BACKENDS`` (each ``Backend``'s ``methods`` and
``accepts``), so a backend is covered by registering it. For each (backend, method) it runs

* the standard cases (causal and bidirectional, grouped KV, Nq < Nk, padding left and right, a row
  with every key padded, odd lengths, lengths 1 and 2^k +- 1, D from 1 to 256) and seeded random
  ones (slopes including 0, 2^-12 and 8; float64, float32, bfloat16, float16);
* non-finite keys and values (NaN, +inf) placed so that some rows see them and others do not.

A call the backend's ``accepts`` refuses must be refused by ``poslsh.attention(..., backend=name)``
with a clear ValueError, never computed wrongly. Backends that only run on a GPU but whose function
also runs on the CPU are called directly (``DIRECT_ON_CPU``: FlexAttention runs eagerly there);
backends that take CUDA tensors only (``ON_CUDA``: cuDNN) run their cases on the GPU, and those that
compute ALiBi only with the Press slopes of the head count (``PRESS_SLOPES``) get those slopes. The
Triton backend runs under TRITON_INTERPRET=1 (set below, before the backend module is imported).

The oracle is written here from the definitions (FlashAttention's ``attention_ref`` conventions:
queries are the last Nq key positions, the bias is -m |p - j|, the window keeps |p - j| <= w):
block ids of the partitions are recomputed from the raw grid scalars (W, U) or the cut positions,
window widths from ceil(ln(1/eps) / m). Only the hybrid near-field widths come from the spec
(``hybrid_widths`` is an error target, tested in test_hybrid.py). The oracle's sum runs over the
pairs with non-zero weight only, so its non-finite pattern is the contract: a NaN or infinite key
or value reaches exactly the rows whose weight on it is non-zero.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TRITON_INTERPRET", "1")  # before poslsh's Triton module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

import poslsh  # noqa: E402
from poslsh.attention import BACKENDS, EMPTY_LSE, available_backends, resolve_spec  # noqa: E402
from tolerances import low_precision_bound, rel_err  # noqa: E402

TRITON_MODULES = ("poslsh.attention.triton.jit", "poslsh.attention.triton.forward", "poslsh.attention.triton.backward",
                  "poslsh.attention.triton.launch", "poslsh.attention.triton")
if any(name in sys.modules for name in TRITON_MODULES):
    # Imported before the variable was set (by another test module): its kernels would be compiled
    # for a GPU. Reloading re-decorates them for the interpreter; registration is by name.
    import importlib

    for name in TRITON_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
available_backends()  # imports the optional backend modules, so BACKENDS is complete at collection

# Backends whose ``supports`` is False on the CPU although their function runs there (too slowly
# for "auto"), with the dtypes they take on the GPU; they are called directly with the resolved
# spec, and cases in other dtypes run in float32 for them.
DIRECT_ON_CPU = {"flex": (torch.float16, torch.bfloat16, torch.float32)}  # FlexAttention runs eagerly
# Dtypes a CPU stand-in cannot compute: the Triton interpreter multiplies the bit patterns of
# bfloat16 operands in tl.dot (triton-lang/triton#11584), so its bfloat16 cases run in float16 (the
# H200 runs bfloat16: bench/results).
STAND_IN_DTYPES = {"triton": {torch.bfloat16: torch.float16},
                   "cudnn": {torch.float64: torch.bfloat16, torch.float32: torch.bfloat16}}  # fp16/bf16 only
# Backends that take CUDA tensors only (registered only where CUDA is): their inputs are moved to the GPU,
# their results compared on the CPU.
ON_CUDA = {"cudnn"}
# Backends whose ALiBi slopes are fixed by the head count (cuDNN derives Press's): their cases use
# ``alibi_slopes(H)`` (other slopes are refused, checked like any refusal); CAUSAL_ONLY: no bidirectional
# ALiBi (the non-finite bidirectional cases are skipped for them).
PRESS_SLOPES = {"cudnn"}
CAUSAL_ONLY = {"cudnn"}
# Interpreted or eager backends get small cases (the interpreter runs ~1e5 slower than a GPU).
SLOW = {"triton": 3, "flex": 4}  # random cases per method
FAST_CASES = 14
SMALL_N = 40  # largest Nk for the slow backends
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


# --------------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------------


def oracle_block_ids(parts) -> torch.Tensor:
    """Block id of every position: int64 [H, r, n], from the raw partition data.

    grid: h(i) = floor((i + U) / W); cut: the number of block starts (cut positions) <= i."""
    n, h, r = parts.n, parts.num_heads, parts.num_samples
    pos = torch.arange(n)
    ids = torch.empty(h, r, n, dtype=torch.int64)
    for head in range(h):
        for t in range(r):
            if parts.scheme == "grid":
                w, u = int(parts.widths[head, t]), int(parts.offsets[head, t])
                ids[head, t] = torch.tensor([(i + u) // w for i in range(n)])
            else:
                row = head * r + t
                cuts = parts.cut_positions[int(parts.cut_pointers[row]):int(parts.cut_pointers[row + 1])].cpu()
                ids[head, t] = (cuts[None, :] <= pos[:, None]).sum(1)
    return ids


def oracle_log_weights(method, slopes, causal, nq, nk, window_eps=None, parts=None, near=None):
    """log W: float64 [H, Nq, Nk], -inf where the weight is 0 (before key padding)."""
    p = torch.arange(nk - nq, nk, dtype=torch.float64)[:, None]
    j = torch.arange(nk, dtype=torch.float64)[None, :]
    dist = (p - j).abs()  # [Nq, Nk]
    exact = -slopes.double()[:, None, None] * dist  # [H, Nq, Nk]
    if method == "exact":
        logw = exact
    elif method == "window":
        w = torch.tensor([math.ceil(math.log(1 / window_eps) / float(m)) if m > 0 else math.inf for m in slopes],
                         dtype=torch.float64)
        logw = exact.masked_fill(dist > w[:, None, None], -math.inf)
    else:
        ids = oracle_block_ids(parts)[:, :, nk - nq:, None] == oracle_block_ids(parts)[:, :, None, :]
        logw = torch.log(ids.double().mean(1))  # [H, Nq, Nk]
        if method == "hybrid":
            logw = torch.where(dist <= near.double()[:, None, None], exact, logw)
    if causal:
        logw = logw.masked_fill(j > p, -math.inf)
    return logw


def oracle_attention(q, k, v, logw, scale, kpm=None):
    """float64 attention summed over the pairs with non-zero weight only (IEEE arithmetic on those).

    Returns (out [B, H, Nq, Dv], lse [B, H, Nq]); a row with no such pair (or whose every score is
    -inf) gives 0 and EMPTY_LSE."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    keep = torch.isfinite(logw)[None].expand(q.shape[0], -1, -1, -1)
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    s = torch.where(keep, scale * (q @ k.transpose(-1, -2)) + logw, -math.inf)
    m = s.amax(-1, keepdim=True)  # NaN if a seen score is NaN
    empty = m == -math.inf
    z = torch.exp(s - torch.where(empty, 0.0, m))
    terms = torch.where(keep[..., None], z[..., None] * v[:, :, None, :, :], 0.0)  # [B, H, Nq, Nk, Dv]
    den = z.sum(-1, keepdim=True)
    out = torch.where(empty, 0.0, terms.sum(-2) / den)
    lse = torch.where(empty, EMPTY_LSE, m + torch.log(den)).squeeze(-1)
    return out, lse


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    b: int = 1
    h: int = 2
    hkv: int = 2
    nq: int = 9
    nk: int = 9
    d: int = 8
    causal: bool = True
    dtype: torch.dtype = torch.float64
    slopes: list = field(default_factory=lambda: [0.5, 0.1])
    pad: tuple = ()  # per batch row: (left, right) keys padded out
    samples: int = 3
    scheme: str = "grid"
    seed: int = 0

    def padding_mask(self):
        if not self.pad:
            return None
        kpm = torch.ones(self.b, self.nk, dtype=torch.bool)
        for row, (left, right) in enumerate(self.pad):
            kpm[row, :left] = False
            kpm[row, self.nk - right:] = False
        return kpm


STANDARD = [
    Case("causal"),
    Case("bidirectional", causal=False),
    Case("gqa", h=4, hkv=2, slopes=[0.5, 0.25, 0.125, 0.0625]),
    Case("mqa_nq_lt_nk", h=3, hkv=1, nq=5, nk=17, slopes=[0.9, 0.2, 0.0]),
    Case("padding_left_right", b=2, nq=12, nk=12, pad=((3, 0), (0, 4)), causal=False),
    Case("padding_causal_left", b=2, nq=10, nk=10, pad=((4, 0), (1, 2))),
    Case("padding_causal_right", b=2, nq=11, nk=11, pad=((0, 3), (0, 0))),
    Case("all_keys_padded", b=2, nq=6, nk=8, pad=((8, 0), (0, 0)), causal=False),
    Case("length_1", nq=1, nk=1),
    Case("decode_1_of_33", nq=1, nk=33, causal=False),
    Case("length_2", nq=2, nk=2, causal=False),
    Case("pow2_minus_1", nq=31, nk=31, scheme="cut"),
    Case("pow2_plus_1", nq=17, nk=33, causal=False, scheme="cut"),
    Case("extreme_slopes", slopes=[8.0, 2.0 ** -12], nq=20, nk=25),
    Case("head_dim_1", d=1, causal=False),
    Case("head_dim_256", d=256, nq=6, nk=7),
    Case("float32", dtype=torch.float32, nq=14, nk=19, b=2, pad=((0, 2), (3, 0))),
    Case("bfloat16", dtype=torch.bfloat16, nq=16, nk=16, d=16),
    Case("float16", dtype=torch.float16, nq=16, nk=20, d=16, causal=False),
]


def random_case(rng: random.Random, i: int, max_n: int, slow: bool = False) -> Case:
    """A seeded random case: Nq <= Nk, grouped KV, D in 1..256, padding, slopes with extremes.
    ``slow``: small, and the head dims and dtypes GPU kernels take (so few cases are refused)."""
    nk = rng.choice([1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, rng.randint(1, max_n)])
    nk = min(nk, max_n)
    nq = rng.choice([nk, 1, rng.randint(1, nk)])
    hkv = rng.choice([1, 1, 2])
    h = hkv * rng.choice([1, 2, 3])
    d = rng.choice([16, 24, 32, 64] if slow else [1, 2, 3, 5, 8, 16, 17, 32, 64, 100, 128, 256])
    b = rng.choice([1, 1, 2])
    pool = [0.0, 2.0 ** -12, 8.0, 0.5, 0.1, 0.03, 1.0, 0.25]
    slopes = [rng.choice(pool) for _ in range(h)]
    pad = ()
    if rng.random() < (0.2 if slow else 0.4):
        pad = tuple((rng.randint(0, nk // 2), rng.randint(0, nk // 2)) for _ in range(b))
    dtype = rng.choices(DTYPES, weights=[1, 3, 1, 1] if slow else [4, 3, 1, 1])[0]
    if dtype in (torch.bfloat16, torch.float16):
        d = max(d, 16)
    return Case(f"random{i}", b=b, h=h, hkv=hkv, nq=nq, nk=nk, d=d, causal=rng.random() < 0.5, dtype=dtype,
                slopes=slopes, pad=pad, samples=rng.choice([1, 2, 5]), scheme=rng.choice(["grid", "cut"]),
                seed=rng.randint(0, 2**31))


def in_float32(case: Case) -> Case:
    return dataclasses.replace(case, name=case.name + "_f32", dtype=torch.float32, d=max(case.d, 16))


def cases_for(backend: str, method: str) -> list[Case]:
    """The standard cases (float64 ones also in float32), then seeded random ones, in dtypes the
    backend computes on this machine."""
    rng = random.Random(f"{backend}/{method}")
    if backend in SLOW:  # every other standard case, in float32 with D >= 16, at most SMALL_N keys
        small = [c for c in STANDARD if c.nk <= SMALL_N and c.d <= 64][::2]
        cases = [in_float32(c) if c.dtype == torch.float64 else c for c in small]
        cases += [random_case(rng, i, SMALL_N, slow=True) for i in range(SLOW[backend])]
    else:
        cases = STANDARD + [in_float32(c) for c in STANDARD if c.dtype == torch.float64][::3]
        cases += [random_case(rng, i, 70) for i in range(FAST_CASES)]
    if backend in DIRECT_ON_CPU:
        cases = [c if c.dtype in DIRECT_ON_CPU[backend] else in_float32(c) for c in cases]
    if backend in PRESS_SLOPES:
        cases = [dataclasses.replace(c, slopes=poslsh.alibi_slopes(c.h).tolist()) for c in cases]
    swap = STAND_IN_DTYPES.get(backend, {})
    return [dataclasses.replace(c, dtype=swap[c.dtype]) if c.dtype in swap else c for c in cases]


PAIRS = [(name, method) for name in sorted(BACKENDS) for method in BACKENDS[name].methods]
CASES = [(name, method, case) for name, method in PAIRS for case in cases_for(name, method)]


def inputs(case: Case):
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.b, case.h, case.nq, case.d, generator=g, dtype=torch.float64)
    k = torch.randn(case.b, case.hkv, case.nk, case.d, generator=g, dtype=torch.float64)
    v = torch.randn(case.b, case.hkv, case.nk, case.d, generator=g, dtype=torch.float64)
    return q.to(case.dtype), k.to(case.dtype), v.to(case.dtype)


def call_kwargs(case: Case, method: str) -> dict:
    kw = dict(slopes=torch.tensor(case.slopes, dtype=torch.float64), causal=case.causal, method=method,
              key_padding_mask=case.padding_mask(), window_eps=0.05, hybrid_eps=0.5)
    if method in ("lsh", "hybrid"):
        scheme = case.scheme if method == "lsh" else "grid"
        kw["partitions"] = poslsh.sample_partitions(case.nk, kw["slopes"], case.samples, scheme=scheme,
                                                    generator=torch.Generator().manual_seed(case.seed))
    return kw


def placed(name: str, q, k, v, kw: dict):
    """q, k, v and the call's tensors on the device the backend computes on (``ON_CUDA``: the GPU)."""
    if name not in ON_CUDA:
        return q, k, v, kw
    if not torch.cuda.is_available():
        pytest.skip(f"{name} takes CUDA tensors only")
    mask = kw.get("key_padding_mask")
    return q.cuda(), k.cuda(), v.cuda(), dict(kw, key_padding_mask=None if mask is None else mask.cuda())


def run_backend(name: str, q, k, v, kw: dict):
    """(out, lse) from the backend, on the CPU, or None when it refuses the call (checked to be a clean
    refusal)."""
    q, k, v, kw = placed(name, q, k, v, kw)
    backend = BACKENDS[name]
    spec = resolve_spec(q, k, v, **kw)
    if backend.accepts(q, spec):
        out, lse = poslsh.attention(q, k, v, backend=name, return_lse=True, **kw)
        return (out.cpu(), lse.cpu()), spec
    if name in DIRECT_ON_CPU and q.device.type == "cpu":
        return backend(q, k, v, spec), spec
    with pytest.raises(ValueError, match=rf"backend '{name}' does not support this call"):
        poslsh.attention(q, k, v, backend=name, **kw)
    return None, spec


def oracle_for(q, k, v, kw: dict, spec):
    logw = oracle_log_weights(kw["method"], kw["slopes"], kw["causal"], q.shape[2], k.shape[2],
                              window_eps=kw["window_eps"], parts=kw.get("partitions"), near=spec.window)
    return oracle_attention(q, k, v, logw, spec.scale, kw["key_padding_mask"])


def tolerance(dtype: torch.dtype, ref_out: torch.Tensor) -> float:
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return low_precision_bound(ref_out, dtype)


def assert_conforms(out, lse, ref_out, ref_lse, dtype, what=""):
    assert out.dtype == dtype and out.shape == ref_out.shape, what
    assert lse.shape == ref_lse.shape, what
    fin, ref_fin = torch.isfinite(out), torch.isfinite(ref_out)
    bad = (fin != ref_fin).nonzero().tolist()
    assert not bad, f"{what}: non-finite pattern differs from the oracle at [b, h, row, d] {bad[:6]}"
    err = rel_err(torch.where(fin, out.double(), 0.0), torch.where(ref_fin, ref_out, 0.0))
    assert err <= tolerance(dtype, torch.where(ref_fin, ref_out, 0.0)), f"{what}: out rel err {err:.3g}"
    lfin, ref_lfin = torch.isfinite(lse), torch.isfinite(ref_lse)
    assert torch.equal(lfin, ref_lfin), f"{what}: lse non-finite pattern differs"
    empty = ref_lse <= EMPTY_LSE / 2
    sentinel = torch.tensor(EMPTY_LSE, dtype=lse.dtype)  # -1e30 as the backend's LSE dtype rounds it
    assert bool((lse[empty] == sentinel).all()), f"{what}: empty rows need lse EMPTY_LSE"
    assert bool((out[empty[..., None].expand_as(out)] == 0).all()), f"{what}: empty rows must output 0"
    live = ref_lfin & ~empty
    lerr = (lse.double()[live] - ref_lse[live]).abs() / ref_lse[live].abs().clamp(min=1.0)
    ltol = 1e-10 if dtype == torch.float64 else 1e-5
    assert lerr.numel() == 0 or float(lerr.max()) <= ltol, f"{what}: lse err {float(lerr.max()):.3g}"


@pytest.mark.parametrize("name,method,case", CASES, ids=[f"{n}-{m}-{c.name}" for n, m, c in CASES])
def test_backend_matches_oracle(name, method, case):
    q, k, v = inputs(case)
    kw = call_kwargs(case, method)
    result, spec = run_backend(name, q, k, v, kw)
    if result is None:
        return  # refused cleanly (checked in run_backend)
    out, lse = result
    ref_out, ref_lse = oracle_for(q, k, v, kw, spec)
    assert_conforms(out, lse, ref_out, ref_lse, case.dtype, f"{name}/{method}/{case.name}")


def test_suite_covers_every_registered_pair():
    """The generated suite runs every (backend, method) some backend declares, and each on some case
    it accepts (or runs directly): a backend that refused everything would be tested for nothing."""
    assert {"reference", "fused", "split", "triton", "flex"} <= set(BACKENDS)
    for name, method in PAIRS:
        ran = 0
        for case in cases_for(name, method):
            q, k, v, kw = placed(name, *inputs(case), call_kwargs(case, method))
            spec = resolve_spec(q, k, v, **kw)
            ran += BACKENDS[name].accepts(q, spec) or name in DIRECT_ON_CPU
        assert ran >= 3, (name, method, ran)


def test_hybrid_cases_use_both_fields():
    """The hybrid cases have near-field widths below Nk - 1 (some far-field pairs) in most heads."""
    narrow = total = 0
    for case in cases_for("fused", "hybrid"):
        q, k, v = inputs(case)
        spec = resolve_spec(q, k, v, **call_kwargs(case, "hybrid"))
        narrow += int((spec.window < case.nk - 1).sum())
        total += spec.window.numel()
    assert narrow >= total // 3, (narrow, total)


def test_oracle_is_sensitive():
    """The oracle tells partitions apart: moving one grid offset by one changes the output far beyond
    the float32 tolerance (so a backend reading the wrong block would fail)."""
    case = Case("sens", nq=16, nk=16, slopes=[0.6, 0.3], samples=1)
    q, k, v = inputs(case)
    kw = call_kwargs(case, "lsh")
    parts = kw["partitions"]
    spec = resolve_spec(q, k, v, **kw)
    out, _ = oracle_for(q, k, v, kw, spec)
    moved = type(parts)(parts.n, parts.slopes, "grid", widths=parts.widths,
                        offsets=(parts.offsets + 1) % parts.widths)
    out2, _ = oracle_for(q, k, v, dict(kw, partitions=moved), spec)
    assert rel_err(out2, out) > 1e-3


# --------------------------------------------------------------------------------------------------
# Non-finite keys and values reach exactly the rows that weigh them
# --------------------------------------------------------------------------------------------------

NONFINITE = [(where, value) for where in ("k", "v") for value in (math.nan, math.inf)]
# Backends (outside this suite's owner's files) known to break the contract, each observed on the
# CPU, by (backend, poisoned tensor), (backend, poisoned tensor, value) or (backend, poisoned tensor,
# "causal" / "bidirectional"); the test holds each to the rows its mechanism allows (``leak_rows``) and
# fails when it no longer happens, so a fix shows up.
KNOWN_LEAKS = {
    ("triton", "v"): "P @ V multiplies 0 by the NaN/inf value of an excluded key in the same key tile: under "
                     "TRITON_INTERPRET=1 (16 x 16 tiles) a bad value at key 11 poisons every query tile whose "
                     "key loop loads keys 0-15",
    ("flex", "v"): "eager FlexAttention on the CPU computes the dense P @ V: a bad value poisons every row "
                   "(the compiled GPU kernel: within a key block, like Triton)",
    ("cudnn", "v"): "expected from its FlashAttention-style tiles, not yet observed: P @ V multiplies the zero "
                    "probability of a masked key by its NaN/inf value within a key tile (24 keys: one tile)",
    ("split", "v", "causal"): "causal block attention (P @ V of a dense primitive, the torch one here) multiplies "
                              "the zero probability of a later key in the query's block by its value: a NaN/inf "
                              "value reaches the earlier rows of its block (0 * NaN)",
}


def known_leak(name, method, causal, where, value) -> str | None:
    reason = KNOWN_LEAKS.get((name, where), KNOWN_LEAKS.get((name, where, value)))
    reason = reason or KNOWN_LEAKS.get((name, where, "causal" if causal else "bidirectional"))
    if where == "k" and method == "exact" and not causal:
        reason = None  # only the padded key is poisoned there (see the test): no row sees a bad score
    return reason


def leak_rows(name: str, spec, bad_key: int, n: int) -> torch.Tensor:
    """bool [H, n]: the rows a known leak's mechanism may poison besides those the oracle says."""
    h = spec.num_heads
    if name == "triton" and spec.method in ("exact", "window"):
        # every query tile (16 rows under the interpreter) whose key loop loads the bad key's tile; the
        # LSH kernels' loops (their block stretches) are not exposed here, so every row is allowed there
        from poslsh.attention.ranges import key_ranges

        r = key_ranges(spec, n, n, 16)  # lo, hi [H, tiles]
        tile = bad_key // 16
        loads = (r.lo // 16 <= tile) & ((r.hi - 1) // 16 >= tile) & (r.hi > r.lo)
        return loads.repeat_interleave(16, dim=1)[:, :n]
    if name == "split":  # earlier rows of a block holding the bad key, in some sample
        ids = spec.partitions.block_ids()  # [H, r, n]
        return (ids == ids[..., bad_key:bad_key + 1]).any(1) & (torch.arange(n) < bad_key)
    return torch.ones(h, n, dtype=torch.bool)  # flex on the CPU: the dense P @ V reaches every row


def nonfinite_case(name, method, causal, where, value):
    return pytest.param(name, method, causal, where, value,
                        id=f"{name}-{method}-{'causal' if causal else 'bidir'}-{where}-{value}")


NONFINITE_CASES = [nonfinite_case(name, method, causal, where, value) for name, method in PAIRS
                   for causal in (True, False) for where, value in NONFINITE]


def nonfinite_inputs(where: str, value: float, visible: bool = True):
    """Steep slopes and a narrow window, so most rows do not see the poisoned key: one poisoned key
    in the middle of the sequence (unless not ``visible``) and one in padding (which no row sees).
    D = 16 for every backend."""
    n = 24
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    k = k[:, :1].contiguous()  # one KV head for both query heads
    v = v[:, :1].contiguous()
    target = k if where == "k" else v
    if visible:
        target[0, 0, 11, 3] = value
    target[0, 0, 22, 5] = value  # padded out below (where the backend accepts padding)
    kpm = torch.ones(1, n, dtype=torch.bool)
    kpm[0, 22] = False
    return q, k, v, kpm


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("name,method,causal,where,value", NONFINITE_CASES)
def test_nonfinite_reaches_exactly_the_rows_that_see_it(name, method, causal, where, value):
    """Bidirectional exact attention weighs every key in every row: there only the padded key is
    poisoned (no row may see it)."""
    if not causal and name in CAUSAL_ONLY:
        pytest.skip(f"{name} computes causal ALiBi only")
    split_rows = causal or method != "exact"
    q, k, v, kpm = nonfinite_inputs(where, value, visible=split_rows)
    if name in STAND_IN_DTYPES:
        q, k, v = (t.to(STAND_IN_DTYPES[name].get(t.dtype, t.dtype)) for t in (q, k, v))
    slopes = poslsh.alibi_slopes(2) if name in PRESS_SLOPES else torch.tensor([1.5, 0.7], dtype=torch.float64)
    kw = dict(slopes=slopes, causal=causal, method=method, window_eps=0.05, hybrid_eps=0.5, key_padding_mask=kpm)
    if method in ("lsh", "hybrid"):
        kw["partitions"] = poslsh.sample_partitions(k.shape[2], slopes, 2, generator=torch.Generator().manual_seed(3))
    spec = resolve_spec(q, k, v, **kw)
    if not BACKENDS[name].accepts(q, spec) and name not in DIRECT_ON_CPU:
        kw["key_padding_mask"] = None  # e.g. Triton takes no padding mask: poison only key 11 then
        k[0, 0, 22] = 0.0
        v[0, 0, 22] = 0.0
    result, spec = run_backend(name, q, k, v, kw)
    assert result is not None, f"{name} refused a plain {method} call"
    out, lse = result
    ref_out, ref_lse = oracle_for(q, k, v, kw, spec)
    reached = ~torch.isfinite(ref_out).all(-1)
    assert bool(reached.any()) == split_rows and not bool(reached.all()), "rows reached and not, as designed"
    what = f"{name}/{method}/{where}={value}"
    reason = known_leak(name, method, causal, where, value)
    if reason is not None:
        # A documented leak: the bad value reaches more rows than the oracle's, but only those its
        # mechanism allows (``leak_rows``); every other row must conform. It must still happen: a fix
        # shows up here (then remove it from KNOWN_LEAKS).
        poisoned = ~torch.isfinite(out).all(-1)
        allowed = reached | leak_rows(name, spec, 11, q.shape[2])
        assert bool((poisoned & ~reached).any()), f"{what}: the known leak ({reason}) no longer happens"
        assert not bool((poisoned & ~allowed).any()), f"{what}: rows poisoned beyond the known leak ({reason})"
        out = torch.where(allowed[..., None], ref_out.to(out.dtype), out)  # what the leak may change
        lse = torch.where(allowed, ref_lse.to(lse.dtype), lse)
    assert_conforms(out, lse, ref_out, ref_lse, q.dtype, what)


@pytest.mark.parametrize("name", ["reference", "fused"])
@pytest.mark.parametrize("method", ["exact", "window", "lsh", "hybrid"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_nonfinite_gradients_stay_in_their_rows(name, method, where):
    """Backward too: a loss over the rows that do not see a NaN key or value has the gradients it has
    when the NaN is replaced by 0 (the loss does not depend on it), all finite: no NaN spreads
    through 0 * NaN in the backward pass."""
    q, k, v, kpm = nonfinite_inputs(where, math.nan)
    slopes = torch.tensor([1.5, 0.7], dtype=torch.float64)
    kw = dict(slopes=slopes, causal=True, method=method, window_eps=0.05, hybrid_eps=0.5, key_padding_mask=kpm)
    if method in ("lsh", "hybrid"):
        kw["partitions"] = poslsh.sample_partitions(k.shape[2], slopes, 2, generator=torch.Generator().manual_seed(3))
    clean = torch.isfinite(poslsh.attention(q, k, v, backend=name, **kw)).all(-1)  # [B, H, Nq]
    assert bool(clean.any()) and not bool(clean.all())

    def grads(q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = poslsh.attention(q, k, v, backend=name, **kw)
        out.masked_fill(~clean[..., None], 0.0).square().sum().backward()  # a loss over the clean rows only
        return q.grad, k.grad, v.grad

    poisoned = grads(q, k, v)
    replaced = grads(q, k.nan_to_num(0.0), v.nan_to_num(0.0))
    for name_, a, b in zip("qkv", poisoned, replaced):
        assert torch.isfinite(a).all(), name_
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name_)


@pytest.mark.parametrize("name", ["reference", "fused"])
def test_finite_values_whose_sum_overflows_are_exact(name):
    """The finiteness check sums each tensor: finite keys whose sum overflows float32 take the careful
    path, which must give the same result."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 1, 12, 4, generator=g) * 1e-38
    k = torch.full((1, 1, 12, 4), 3e38)
    k[0, 0, ::2] *= -1
    v = torch.randn(1, 1, 12, 4, generator=g)
    assert not torch.isfinite(k.sum()) and torch.isfinite(k).all()
    out, lse = poslsh.attention(q, k, v, method="window", slopes=[0.5], window_eps=0.1, backend=name, return_lse=True)
    logw = oracle_log_weights("window", torch.tensor([0.5]), True, 12, 12, window_eps=0.1)
    ref, ref_lse = oracle_attention(q, k, v, logw, 0.5)
    assert_conforms(out, lse, ref, ref_lse, torch.float32, name)
