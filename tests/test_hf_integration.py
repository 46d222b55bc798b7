"""poslsh.integrations.hf on tiny randomly initialised BLOOM, MPT and Falcon(alibi) checkpoints,
saved with save_pretrained and reloaded from disk (no network)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import functools  # noqa: E402
import warnings  # noqa: E402

from poslsh.attention import attention  # noqa: E402
from poslsh.attention.public import attention_with_widths  # noqa: E402
from poslsh import layer_partitions  # noqa: E402
from poslsh.hashing import Partitions  # noqa: E402
from poslsh.layer_partitions import LayerPartitions  # noqa: E402
from poslsh.integrations import hf  # noqa: E402
from poslsh.integrations.hf import cache as hf_cache, masks as hf_masks, prefill as hf_prefill  # noqa: E402
from poslsh.integrations.hf import versions as hf_versions  # noqa: E402
from poslsh.integrations.hf import cache_report, patch_model, unpatch_model  # noqa: E402

VOCAB = 128
FAMILIES = ("bloom", "mpt", "falcon")


# Its tests give one set of method options to every method they loop over: the fair use that
# IgnoredOptionWarning does not flag as an error, and whose warnings would bury the log's others.
pytestmark = pytest.mark.filterwarnings("ignore::poslsh.method.IgnoredOptionWarning")


def _config(family: str):
    # A wide initialisation makes the random models' logits depend strongly on attention, so the
    # comparisons below are not trivially satisfied by near-uniform outputs.
    if family == "bloom":
        return transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                                        initializer_range=0.3)
    if family == "mpt":
        return transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                                      initializer_range=0.3)
    # Multi-query Falcon (one KV head) exercises grouped KV in the patched attention.
    return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     alibi=True, multi_query=True, new_decoder_architecture=False, bias=False,
                                     initializer_range=0.3)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    family = request.param
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(family)
    transformers.AutoModelForCausalLM.from_config(_config(family)).save_pretrained(path)
    m = transformers.AutoModelForCausalLM.from_pretrained(path).float()
    m.eval()
    assert hf.model_family(m) == family
    return m


def _padded_batch(n: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, -5:] = 0  # right padding
    return ids, mask


@torch.no_grad()
def test_exact_reproduces_unpatched_logits(model):
    ids, mask = _padded_batch()
    keep = mask.bool()
    ref, ref_pad = model(ids).logits, model(ids, attention_mask=mask).logits
    with patch_model(model, method="exact"):
        out, out_pad = model(ids).logits, model(ids, attention_mask=mask).logits
    assert (out - ref).abs().max() < 1e-4
    assert (out_pad - ref_pad)[keep].abs().max() < 1e-4
    # The padded rows differ from the unpadded ones, so padding was really exercised.
    assert (ref_pad[1, 4:] - ref[1, 4:]).abs().max() > 1e-2
    assert torch.equal(model(ids).logits, ref)  # unpatched again: the model's own code, bit for bit


@torch.no_grad()
def test_unpatch_model_and_repatch(model):
    ids, _ = _padded_batch()
    ref = model(ids).logits
    patch_model(model, method="lsh", samples=2)
    lsh = model(ids).logits
    patch_model(model, method="exact")  # replaces the previous patch
    assert (model(ids).logits - ref).abs().max() < 1e-4
    unpatch_model(model)
    assert not hasattr(model, "_poslsh_patch")
    assert torch.equal(model(ids).logits, ref)
    assert (lsh - ref).abs().max() > 1e-3  # r = 2 is an approximation, visibly


@pytest.mark.parametrize("scheme", ["grid", "cut"])
@torch.no_grad()
def test_lsh_padded_rows_equal_unpadded_rows(model, scheme):
    """Positions are the model's (padding does not count), so a padded row sees the partitions of the
    same tokens unpadded."""
    ids, mask = _padded_batch()
    with patch_model(model, method="lsh", samples=4, scheme=scheme, seed=3):
        batch = model(ids, attention_mask=mask).logits
        left = model(ids[1:2, 4:]).logits
        right = model(ids[2:3, :-5]).logits
    assert (batch[1, 4:] - left[0]).abs().max() < 1e-5
    assert (batch[2, :-5] - right[0]).abs().max() < 1e-5


@pytest.mark.parametrize("method,scheme,sampling", [("lsh", "grid", "iid"), ("lsh", "cut", "iid"),
                                                     ("window", "grid", "iid"), ("lsh", "grid", "qmc"),
                                                     ("hybrid", "grid", "stratified")])
@torch.no_grad()
def test_greedy_generation_with_cache_equals_without(model, method, scheme, sampling):
    """Cached decoding attends like recomputation for every method and sampling mode (the hybrid's
    near-field widths are fixed per patch, not recomputed from the number of cached keys)."""
    ids, mask = _padded_batch(10)
    ids, mask = ids[:2], mask[:2]  # one unpadded and one left-padded prompt
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with patch_model(model, method=method, samples=4, scheme=scheme, seed=7, window_eps=0.05, sampling=sampling,
                     hybrid_eps=0.2):
        cached = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
        full = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, full)
    new = cached[:, ids.shape[1]:]
    assert new.shape[1] == 12 and len(set(new.flatten().tolist())) > 2  # not a degenerate constant stream


@torch.no_grad()
def test_lsh_logits_converge_to_exact(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 48), generator=g)
    with patch_model(model, method="exact"):
        exact = model(ids).logits
    err = {}
    for r in (4, 256):
        errs = []
        for seed in range(3):
            with patch_model(model, method="lsh", samples=r, seed=seed):
                errs.append(((model(ids).logits - exact).norm() / exact.norm()).item())
        err[r] = sum(errs) / len(errs)
    # The estimator's error falls like 1/sqrt(r): a factor 8 from r = 4 to 256; ask for 2.5.
    assert err[256] < err[4] / 2.5, err
    assert err[4] > 1e-3, err


def test_cut_partitions_are_consistent_across_lengths_and_chunks(monkeypatch):
    monkeypatch.setattr(layer_partitions, "CUT_CHUNK", 16)
    slopes = torch.tensor([0.5, 0.05], dtype=torch.float64)
    parts = LayerPartitions(slopes, 3, "cut", seed=0, layer=1)
    long = parts.get(70).block_ids()
    for n in (1, 15, 16, 17, 33, 69):
        assert torch.equal(parts.get(n).block_ids(), long[..., :n])
    # A fresh object with the same seed, asked for lengths in another order, gives the same cuts.
    other = LayerPartitions(slopes, 3, "cut", seed=0, layer=1)
    assert torch.equal(other.get(40).block_ids(), long[..., :40])
    assert not torch.equal(LayerPartitions(slopes, 3, "cut", seed=0, layer=2).get(70).block_ids(), long)


def test_cut_chunks_keep_the_cut_law(monkeypatch):
    """Every gap, including those at chunk boundaries, is cut with probability 1 - e^{-m}."""
    monkeypatch.setattr(layer_partitions, "CUT_CHUNK", 8)
    m, r = 0.5, 4000
    parts = LayerPartitions(torch.tensor([m], dtype=torch.float64), r, "cut", seed=1, layer=0).get(25)
    ids = parts.block_ids()[0]  # [r, n]
    cut_rate = (ids.diff(dim=-1) == 1).double().mean(0)  # gap (i-1, i) for i = 1..n-1
    p = 1 - torch.exp(torch.tensor(-m)).item()
    sigma = (p * (1 - p) / r) ** 0.5
    assert (cut_rate - p).abs().max() < 5 * sigma, cut_rate


@pytest.mark.parametrize("method,scheme", [("lsh", "grid"), ("lsh", "cut"), ("window", "grid"), ("hybrid", "grid")])
def test_unreachable_keys_do_not_change_future_outputs(method, scheme):
    """Masking every key that cache_report calls unreachable leaves all later queries unchanged, and
    the report is tight: the first reachable key is seen by the query at position T."""
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(_config("bloom")).eval()
    big_t, n, d = 40, 64, 8
    with patch_model(model, method=method, samples=4, scheme=scheme, seed=2, window_eps=0.01, hybrid_eps=0.3) as patch:
        starts = patch.reachable_starts(big_t)  # [L, H]
        report = cache_report(model, big_t)
        layer = 1
        parts = patch.partitions(layer, n)
        h = patch.slopes.numel()
        q, k, v = torch.randn(1, h, n - big_t, d), torch.randn(1, h, n, d), torch.randn(1, h, n, d)
        kw = dict(slopes=patch.slopes, method=method, partitions=parts, window_eps=0.01, backend="reference")
        attend = attention
        if method == "hybrid":  # the patch's fixed near-field widths
            assert patch.widths.min() < big_t  # a head whose reach is set by its blocks and near field
            attend = functools.partial(attention_with_widths, widths=patch.widths)
            kw.pop("window_eps")
        full = attend(q.double(), k.double(), v.double(), **kw)
        # Drop the unreachable keys of head h by masking them for that head only: run head by head.
        for head in range(h):
            s = int(starts[layer, head])
            sub = dict(kw, slopes=patch.slopes[head:head + 1])
            if method == "hybrid":
                attend = functools.partial(attention_with_widths, widths=patch.widths[head:head + 1])
            if parts is not None:
                sub["partitions"] = Partitions(n, parts.slopes[head:head + 1], "grid",
                                               parts.widths[head:head + 1], parts.offsets[head:head + 1]) \
                    if scheme == "grid" else _cut_head(parts, head)
            kpm = torch.arange(n)[None] >= s
            pruned = attend(q[:, head:head + 1].double(), k[:, head:head + 1].double(),
                               v[:, head:head + 1].double(), key_padding_mask=kpm, **sub)
            assert torch.allclose(pruned, full[:, head:head + 1], atol=1e-12), (head, s)
            near = big_t - int(patch.widths[head]) if method == "hybrid" else big_t  # the hybrid's near field reach
            if method in ("lsh", "hybrid") and 0 < s < near:  # set by the blocks
                # Tight: in some sample, key s shares the block of position T.
                ids = parts.block_ids()[head]
                assert bool((ids[:, s] == ids[:, big_t]).any())
                assert not bool((ids[:, s - 1] == ids[:, big_t]).any())
    assert starts.sum() > 0  # something is unreachable at all
    assert 0 < report["saved_bytes"] < report["total_bytes"]
    assert report["saved_bytes_rectangular"] <= report["saved_bytes"]


def _cut_head(parts: Partitions, head: int) -> Partitions:
    r = parts.num_samples
    ptr = parts.cut_pointers[head * r: (head + 1) * r + 1]
    return Partitions(parts.n, parts.slopes[head:head + 1], "cut",
                      cut_positions=parts.cut_positions[ptr[0]:ptr[-1]], cut_pointers=ptr - ptr[0])


def test_rejects_unsupported_models():
    rotary = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, alibi=False))
    with pytest.raises(ValueError, match="rotary"):
        patch_model(rotary)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="model types"):
        patch_model(gpt2)
    bloom = transformers.BloomForCausalLM(_config("bloom"))
    with pytest.raises(ValueError, match="method"):
        patch_model(bloom, method="fast")
    # Each was accepted before: evict="yes" as true, seed=2.7 as 2, a backend that does not exist until
    # the first forward (mid-generation) refused it.
    for kwargs, error, match in [(dict(evict="yes"), TypeError, "evict must be a bool"),
                                 (dict(seed=2.7), TypeError, "seed must be an int"),
                                 (dict(backend="magic"), ValueError, "backend must be 'auto' or one of")]:
        with pytest.raises(error, match=match):
            patch_model(bloom, method="window", **kwargs)
    assert not hasattr(bloom, "_poslsh_patch")


@pytest.mark.parametrize("method,scheme", [("lsh", "grid"), ("lsh", "cut"), ("window", "grid"), ("hybrid", "grid")])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_eviction_keeps_generation_identical_and_frees_memory(method, scheme):
    """With steep slopes (short blocks) most of the cache becomes unreachable during generation;
    evicting it changes no generated token, for a padded batch too."""
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(_config("bloom")).eval()
    ids, mask = _padded_batch(10)
    ids, mask = ids[:2], mask[:2]
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0)
    steep = [0.9, 0.6, 0.4, 0.3]
    opts = dict(method=method, samples=4, scheme=scheme, seed=1, slopes=steep, window_eps=0.01, hybrid_eps=0.1)
    with patch_model(model, **opts) as patch:
        full = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    with patch_model(model, **opts, evict=True) as patch:
        try:
            cache = transformers.DynamicCache(config=model.config)
        except (TypeError, AttributeError):  # transformers 4.x
            cache = transformers.DynamicCache()
        cached = model.generate(ids, attention_mask=mask, use_cache=True, past_key_values=cache, **kw)
        memory = patch.cache_memory(cache)
    assert torch.equal(cached, full)
    assert memory["saved_fraction"] > 0.3, memory
    assert all(row["stored"] + row["evicted"] == 49 for row in memory["layers"])  # 10 + 40 - 1 positions cached
    assert cache.get_seq_length() == 49


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_static_cache_is_refused():
    model = transformers.BloomForCausalLM(_config("bloom")).eval()
    ids, _ = _padded_batch(6)
    with patch_model(model, method="lsh", samples=2):
        try:
            cache = transformers.StaticCache(config=model.config, max_cache_len=32)
        except TypeError:  # 4.x signature
            cache = transformers.StaticCache(config=model.config, max_batch_size=3, max_cache_len=32)
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            model(ids, past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_eviction_that_cannot_act_warns_once():
    """evict=True with method exact warns at patch time; a forward without a DynamicCache (MPT's
    default use_cache=False) warns once, not per layer or call."""
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(_config("mpt")).eval()
    assert model.config.use_cache is False  # MPT's default: eviction has nothing to act on
    ids, _ = _padded_batch(6)
    with pytest.warns(UserWarning, match=r"evict=True has no effect with method='exact'"):
        patch_model(model, method="exact", evict=True)
    with patch_model(model, method="lsh", samples=2, evict=True):
        with pytest.warns(UserWarning, match=r"evict=True has no effect: this forward ran without a transformers "
                                             r"DynamicCache \(use_cache=False, MPT's default"):
            model(ids)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(ids)  # said once


@pytest.mark.parametrize("method", ["hybrid", "lsh"])
@torch.no_grad()
def test_every_method_and_sampling_mode_runs_and_converges(model, method):
    """hybrid and correlated sampling reach transformers models: more samples, closer to exact; the
    hybrid at a tiny hybrid_eps is exact (its near field covers the sequence)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (2, 40), generator=g)
    with patch_model(model, method="exact"):
        exact = model(ids).logits
    err = lambda **kw: ((model(ids).logits - exact).norm() / exact.norm()).item()  # noqa: E731
    with patch_model(model, method=method, samples=2, sampling="qmc", seed=1, hybrid_eps=0.5):
        few = err()
    with patch_model(model, method=method, samples=64, sampling="qmc", seed=1, hybrid_eps=0.5):
        many = err()
    assert many < few / 2 and few > 1e-3, (few, many)
    if method == "hybrid":
        with patch_model(model, method="hybrid", samples=2, hybrid_eps=1e-9):
            assert err() < 1e-5
    with pytest.raises(ValueError, match=r"scheme='cut' supports only sampling='iid'"):
        patch_model(model, method=method, scheme="cut", sampling="qmc")
    with pytest.raises(ValueError, match=r"hybrid_eps must be > 0"):
        patch_model(model, method=method, hybrid_eps=0)


def _falcon(tmp_path, attn_implementation: str):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config("falcon")).save_pretrained(tmp_path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=attn_implementation).float().eval()


@torch.no_grad()
def test_falcon_eager_is_patched_like_sdpa_and_warned_where_it_differs(tmp_path):
    """The patch reproduces Falcon's SDPA path (one ALiBi bias) for an eager Falcon too. transformers
    5.2-5.24's eager Falcon adds the bias twice: there the patch warns at the first forward (it learns the
    implementation from the mask registry call); 5.25's eager Falcon equals its SDPA path and no warning
    is given."""
    eager, sdpa = _falcon(tmp_path / "eager", "eager"), _falcon(tmp_path / "sdpa", "sdpa")
    ids, mask = _padded_batch()
    keep = mask.bool()
    ref = sdpa(ids, attention_mask=mask).logits
    own_eager = eager(ids, attention_mask=mask).logits
    twice = hf_versions._transformers_version() < hf_versions.FALCON_EAGER_BIAS_FIXED
    assert ((own_eager - ref)[keep].abs().max() > 1e-3) == twice  # the upstream bug is there iff we say so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patch_model(sdpa, method="exact"):
            sdpa(ids, attention_mask=mask)  # no warning for SDPA
        patch = patch_model(eager, method="exact")  # nor at patch time
    with patch:
        if twice:
            with pytest.warns(UserWarning, match=r"attn_implementation='eager'.*adds the ALiBi bias\s+twice"):
                out = eager(ids, attention_mask=mask).logits
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = eager(ids, attention_mask=mask).logits
    assert (out - ref)[keep].abs().max() < 1e-4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_falcon_beyond_256_positions(tmp_path, monkeypatch, attn_implementation):
    """Past 256 positions Falcon's own bias rounds m_h * j to bfloat16; with that rounding removed (the
    model's slopes are powers of two, so only the products round), the patched exact model equals
    Falcon's SDPA path at every one of 300 positions, from an eager or an SDPA model."""
    from transformers.models.falcon import modeling_falcon

    own = modeling_falcon.build_alibi_tensor
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(2))
    sdpa = _falcon(tmp_path / "sdpa", "sdpa")
    rounded = sdpa(ids).logits

    def unrounded(attention_mask, num_heads, dtype):
        slopes = own(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]  # bf16(m_h)
        positions = ((attention_mask.cumsum(-1) - 1) * attention_mask)[:, None, :].float()
        return (slopes[None, :, None] * positions).reshape(-1, 1, attention_mask.shape[-1]).to(dtype)

    monkeypatch.setattr(modeling_falcon, "build_alibi_tensor", unrounded)
    ref = sdpa(ids).logits
    assert (ref[0, :256] - rounded[0, :256]).abs().max() < 1e-5  # below 256 the rounding changes nothing
    assert (ref[0, 256:] - rounded[0, 256:]).abs().max() > 1e-4  # beyond it, it does: the test can see it
    model = sdpa if attn_implementation == "sdpa" else _falcon(tmp_path / "eager", "eager")
    with patch_model(model, method="exact"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an eager Falcon before 5.25 is warned about at its first forward
        out = model(ids).logits
    assert (out - ref).abs().max() < 1e-4


# ---------------------------------------------------------------------- no private upstream internals
def _private_uses(sources: dict[str, str]) -> tuple[set[str], list[tuple[str, int, str]]]:
    """(names the files define, [(file, line, name)] of every private name they reach on some object), for
    the files of one module or package (``sources``: file name -> source).

    The rule: an attribute ``x._name`` (or ``getattr(x, "_name")`` and friends, or ``from pkg import
    _name`` of another package) is another library's internal unless ``_name`` is
      * a dunder (``__dict__``, ``__name__``: Python's object model, not a library's internals),
      * prefixed ``_poslsh`` (a marker this module sets on objects it patches: our name on their object),
      * defined in one of these files (a function, class, method, field or ``self._x`` it assigns): our
        own private helpers, in the file that uses them or another file of its package.
        ``test_no_private_upstream_internals`` also checks that no such name occurs in
        the transformers source read here, so an allowed name cannot be one of transformers'.
    """
    import ast

    trees = {name: ast.parse(source, name) for name, source in sources.items()}
    defined: set[str] = set()
    for node in (node for tree in trees.values() for node in ast.walk(tree)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Name):
                        defined.add(sub.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        defined.add(sub.attr)

    def foreign(name: str) -> bool:
        return (name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
                and not name.startswith("_poslsh") and name not in defined)

    uses = []
    for file, node in ((file, node) for file, tree in trees.items() for node in ast.walk(tree)):
        if isinstance(node, ast.Attribute) and foreign(node.attr):
            uses.append((file, node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and foreign(node.args[1].value)):
            uses.append((file, node.lineno, node.args[1].value))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("poslsh"):
            uses += [(file, node.lineno, a.name) for a in node.names if foreign(a.name)]
    return defined, uses


def test_private_use_detector_sees_each_form():
    """The detector flags the forms it must (so the test below can fail) and spares ours."""
    source = (
        "from transformers.cache_utils import _private\n"
        "def _ours(x):\n    return x\n"
        "class A:\n    def f(self, m):\n        self._mine = 1\n"
        "        return m._split_heads, getattr(m.config, '_attn_implementation'), self._mine, self._ours,\n"
        "        m.__class__, m._poslsh_patch, hasattr(m, '_x')\n"
    )
    _, uses = _private_uses({"mod.py": source})
    assert sorted(name for _, _, name in uses) == ["_attn_implementation", "_private", "_split_heads", "_x"]
    # A package's files: a private name one file defines is ours in the others too.
    _, uses = _private_uses({"a.py": "def _helper(x):\n    return x\n", "b.py": "y = m._helper, m._other\n"})
    assert uses == [("b.py", 1, "_other")]


@pytest.mark.parametrize("module", ["hf", "hf_graph"])
def test_no_private_upstream_internals(module):
    """The hf package (every file of it) and hf_graph.py reach no private attribute or method of transformers
    (or torch) objects; the private names they do use are their own and appear nowhere in the transformers
    modules they work with."""
    import importlib
    import pathlib

    path = pathlib.Path(importlib.import_module(f"poslsh.integrations.{module}").__file__)
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    assert module != "hf" or len(files) > 5, files  # the package's files, not only its __init__
    defined, uses = _private_uses({p.name: p.read_text() for p in files})
    assert uses == [], f"private names of other libraries used in {module} (file, line, name): {uses}"
    root = pathlib.Path(transformers.__file__).parent
    upstream = "".join(p.read_text() for p in [*root.glob("*.py"), *root.glob("models/bloom/*.py"),
                                                 *root.glob("models/falcon/*.py"), *root.glob("models/mpt/*.py")])
    import re

    ours = {name for name in defined if name.startswith("_") and name != "_" and not name.startswith("__")}
    clashes = {name for name in ours if re.search(rf"\b{re.escape(name)}\b", upstream)}
    assert not clashes, f"{module}'s private names also used by transformers (rename ours): {clashes}"


def test_version_outside_the_tested_range_warns_once(monkeypatch):
    import sys

    low, high = hf_versions.TESTED_TRANSFORMERS
    model = transformers.BloomForCausalLM(_config("bloom")).eval()
    monkeypatch.setattr(hf_versions, "_RANGE_WARNED", set())  # where _check_transformers reads it
    # The module transformers' lazy import leaves in sys.modules (not always the object imported above).
    installed = sys.modules["transformers"]
    monkeypatch.setattr(installed, "__version__", f"{high[0]}.{high[1]}.0")
    pattern = rf"tested with transformers >={low[0]}\.{low[1]},<{high[0]}\.{high[1]}; found {high[0]}\.{high[1]}\.0"
    with pytest.warns(UserWarning, match=pattern):
        patch_model(model).unpatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model).unpatch()  # said once
    monkeypatch.setattr(installed, "__version__", f"{low[0]}.{low[1]}.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(model).unpatch()  # inside the range: silent
    monkeypatch.setattr(installed, "__version__", "4.51.3")
    with pytest.raises(RuntimeError, match=r"needs transformers >= 4\.54, found 4\.51\.3"):
        patch_model(model)


@pytest.mark.parametrize("layout", [dict(multi_query=False, new_decoder_architecture=False),
                                    dict(multi_query=False, new_decoder_architecture=True, num_kv_heads=2),
                                    dict(multi_query=True, new_decoder_architecture=True, num_kv_heads=1)])
@torch.no_grad()
def test_falcon_fused_qkv_layouts(layout):
    """Every Falcon QKV layout, split from the config alone, reproduces the model (grouped KV included)."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, bias=False, initializer_range=0.3, **layout)
    model = transformers.FalconForCausalLM(config).eval()
    ids, mask = _padded_batch()
    ref = model(ids, attention_mask=mask).logits
    with patch_model(model, method="exact") as patch:
        out = model(ids, attention_mask=mask).logits
    assert patch.layers[0].num_kv_heads == (4 if not layout["new_decoder_architecture"] else layout["num_kv_heads"])
    assert (out - ref)[mask.bool()].abs().max() < 1e-4


# ---------------------------------------------------------------------- prefill memory
def _blocks(model):
    base = model.base_model
    return base.blocks if hf.model_family(model) == "mpt" else base.h


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_prefill_builds_no_quadratic_mask(family):
    """The patched model builds no n x n tensor in prefill: the mask its base model hands every decoder
    block is linear in n (transformers' own is [B, 1, n, n], Falcon's [B, H, n, n] with the bias folded
    in), and no operation of the forward allocates as much as one float n x n tensor (torch.profiler's
    per-operation memory; transformers' masks do)."""
    from torch.profiler import ProfilerActivity, profile

    n, heads = 2048, 4
    torch.manual_seed(0)
    config = _config(family)
    if family == "mpt":
        config.max_seq_len = n
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    masks = []

    def record(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        masks.append(None if mask is None else mask.numel())

    hooks = [block.register_forward_pre_hook(record, with_kwargs=True) for block in _blocks(model)]
    ids = torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(0))
    try:
        with patch_model(model, method="window"):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(ids, attention_mask=torch.ones(1, n, dtype=torch.long))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(masks) == 2 and all(m is not None and m <= heads * n for m in masks), masks
    largest = max(prof.events(), key=lambda e: e.self_cpu_memory_usage)
    assert largest.self_cpu_memory_usage < n * n * 4, (largest.name, largest.self_cpu_memory_usage)


# ---------------------------------------------------------------------- eviction memory, chunked prefill
def _steep_bloom():
    torch.manual_seed(0)
    return transformers.BloomForCausalLM(_config("bloom")).eval()


def _cache_kw(model, cache):
    return {hf_prefill._cache_argument(model): cache, "use_cache": True}


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_evicting_cache_frees_the_prefix_and_appends_in_place():
    """evict=True: after a 200-token prefill the storage behind each layer's keys is at most 4x its
    stored (reachable) keys, not the prompt (a slice of DynamicLayer's cat kept the whole prompt alive);
    decoding appends into that buffer (DynamicLayer's torch.cat copied the whole cache every step) and
    the stored count stays that of the window."""
    model = _steep_bloom()
    steep = [0.9, 0.6, 0.4, 0.3]
    ids = torch.randint(1, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    with patch_model(model, method="window", window_eps=0.01, slopes=steep, evict=True) as patch:
        cache, logits = hf.chunked_prefill(model, ids, 200)
        layers = list(cache.layers)
        per_position = lambda layer: layer.keys[:, :, :1].numel() * layer.keys.element_size()  # noqa: E731
        stored = [layer.keys.shape[2] for layer in layers]
        assert all(s < 30 for s in stored), stored
        for layer, s in zip(layers, stored):
            assert layer.keys.untyped_storage().nbytes() <= 4 * s * per_position(layer)
        buffers, moved = [layer.keys.data_ptr() for layer in layers], 0
        token = logits.argmax(-1, keepdim=True)
        for step in range(20):
            out = model(input_ids=token, **_cache_kw(model, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            moved += sum(layer.buffer_keys.data_ptr() != b for layer, b in zip(cache.layers, buffers))
            buffers = [layer.buffer_keys.data_ptr() for layer in cache.layers]
            for layer in cache.layers:
                assert layer.keys.untyped_storage().nbytes() <= 4 * layer.keys.shape[2] * per_position(layer)
        assert moved <= 2 * len(layers) * 3, moved  # a few reallocations in 20 steps, not one per step
        assert [layer.keys.shape[2] for layer in cache.layers] == stored  # a window: the reach does not grow
        assert cache.get_seq_length() == 220
        memory = patch.cache_memory(cache)
        assert memory["evicted_bytes"] > memory["stored_bytes"]


def _greedy_after(model, cache, logits, mask, steps):
    tokens = []
    token = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        tokens.append(token)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, **_cache_kw(model, cache))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(tokens, dim=1)


@pytest.mark.parametrize("method,evict", [("exact", False), ("window", False), ("window", True), ("lsh", False),
                                          ("lsh", True), ("hybrid", True)])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_chunked_prefill_equals_one_shot(model, method, evict):
    """A prompt fed in chunks of 5 against the cache (a left-padded row included) leaves the cache and
    logits from which greedy decoding gives the tokens of a one-shot prefill, for every method, with
    and without eviction."""
    ids, mask = _padded_batch(23)
    ids, mask = ids[:2], mask[:2]
    steep = [0.9, 0.6, 0.4, 0.3]
    opts = dict(method=method, samples=4, seed=1, window_eps=0.01, hybrid_eps=0.1, evict=evict, slopes=steep)
    with patch_model(model, **opts):
        one_cache, one_logits = hf.chunked_prefill(model, ids, 23, attention_mask=mask)
        one = _greedy_after(model, one_cache, one_logits, mask, 8)
        cache, logits = hf.chunked_prefill(model, ids, 5, attention_mask=mask)
        chunked = _greedy_after(model, cache, logits, mask, 8)
    assert torch.allclose(logits, one_logits, atol=1e-4)
    assert torch.equal(chunked, one)
    assert len(set(one.flatten().tolist())) > 2
    if evict:
        assert cache.layers[0].evicted > 0


def test_chunked_prefill_checks_its_arguments():
    model = _steep_bloom()
    ids = torch.randint(1, VOCAB, (1, 8))
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1, got 0"):
        hf.chunked_prefill(model, ids, 0)
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, length\] integer tensor"):
        hf.chunked_prefill(model, ids[0], 4)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(1, 8\), got \(1, 7\)"):
        hf.chunked_prefill(model, ids, 4, attention_mask=torch.ones(1, 7))


class _HostReadCounter(torch.Tensor):
    """A mask standing for a device tensor: counts the operations that read its values (or values derived
    from it) on the host, each a host-device synchronisation on a GPU. A host copy (``.cpu()``, counted
    once) is an ordinary tensor: reading it costs no synchronisation."""
    reads = 0
    SYNCS = {"__bool__", "item", "tolist", "__int__", "__index__", "cpu", "numpy"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls.SYNCS:
            cls.reads += 1
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if name == "cpu" else out


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_decode_reads_the_mask_once_per_forward_not_per_layer(padded):
    """What the patch needs from the 2-D mask is read on the host once per model forward and reused by
    every layer: a decode step of a 6-layer model reads it as often as one of a 2-layer model (each read
    of a device tensor is a host-device synchronisation)."""
    ids, mask = _padded_batch(12)
    ids, mask = ids[:2], mask[:2] if padded else torch.ones(2, 12, dtype=torch.long)
    counts = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        config = _config("bloom")
        config.n_layer = layers
        model = transformers.BloomForCausalLM(config).eval()
        with patch_model(model, method="window", window_eps=0.05, evict=True):
            cache, logits = hf.chunked_prefill(model, ids, 12, attention_mask=mask)
            step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1).as_subclass(_HostReadCounter)
            _HostReadCounter.reads = 0
            model(input_ids=logits.argmax(-1, keepdim=True), attention_mask=step_mask, **_cache_kw(model, cache))
            counts[layers] = _HostReadCounter.reads
    assert counts[2] == counts[6], counts


def test_mask_registry_is_restored_and_other_models_untouched():
    """While a model is patched, another (unpatched) model builds its own mask as before; the last
    unpatch restores every registry entry; a patched model that is dropped is not kept alive."""
    import gc
    import weakref

    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as registry

    before = {key: registry[key] for key in registry}
    patched, other = _steep_bloom(), _steep_bloom()
    ids, mask = _padded_batch()
    with torch.no_grad():
        ref = other(ids, attention_mask=mask).logits
        with patch_model(patched):
            assert any(registry[key] is not before[key] for key in before)
            assert torch.equal(other(ids, attention_mask=mask).logits, ref)
    assert {key: registry[key] for key in registry} == before
    patch_model(patched)
    dropped = weakref.ref(patched)
    del patched
    gc.collect()
    assert dropped() is None
    assert hf_masks._patch_for_config(other.config) is None


def test_evicting_layer_equals_concatenation_with_drops():
    """InPlaceLayer against the plain reference (torch.cat, then slicing off the dropped prefix), over
    appends of 1 and several positions, drops that trigger in-place moves and reallocations, and a crop
    and a batch selection done by transformers' own DynamicLayer code (adopted at the next update)."""
    layer = hf_cache._in_place_layer_class()()
    g = torch.Generator().manual_seed(0)
    ref_k = ref_v = None
    evicted = 0
    steps = [("add", 9), ("drop", 6), ("add", 1), ("add", 1), ("add", 5), ("drop", 8), ("add", 1), ("add", 3),
             ("crop", 2), ("add", 2), ("drop", 1), ("select", 0), ("add", 4), ("drop", 3), ("add", 1)]
    for op, n in steps:
        if op == "add":
            batch = 2 if ref_k is None else ref_k.shape[0]
            k, v = torch.randn(batch, 3, n, 4, generator=g), torch.randn(batch, 3, n, 5, generator=g)
            ref_k = k if ref_k is None else torch.cat([ref_k, k], 2)
            ref_v = v if ref_v is None else torch.cat([ref_v, v], 2)
            keys, values = layer.update(k, v)
            assert torch.equal(keys, ref_k) and torch.equal(values, ref_v), (op, n)
        elif op == "drop":
            layer.drop(n)
            evicted += n
            ref_k, ref_v = ref_k[:, :, n:], ref_v[:, :, n:]
        elif op == "crop":
            layer.crop(-n)
            ref_k, ref_v = ref_k[:, :, :-n], ref_v[:, :, :-n]
        else:
            layer.batch_select_indices(torch.tensor([n]))
            ref_k, ref_v = ref_k[n:n + 1], ref_v[n:n + 1]
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v), (op, n)
        assert layer.get_seq_length() == evicted + ref_k.shape[2]
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(-ref_k.shape[2])  # would reach into the evicted prefix
    layer.crop(layer.get_seq_length() - 1)  # the older convention: the logical length to keep
    assert torch.equal(layer.keys, ref_k[:, :, :-1])
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.evicted == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a BLOOM-560m-shaped model at 16K-32K tokens")
@pytest.mark.parametrize("method", ["exact", "window"])
@torch.no_grad()
def test_cuda_prefill_peak_memory_is_linear_in_the_length(method):
    """A BLOOM-560m-shaped model (random weights, bf16): peak prefill memory above the weights grows at
    most ~2x from 16K to 32K tokens (transformers' n x n mask made it ~4x); chunked prefill of 32K with
    window + eviction peaks below one-shot."""
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)
    model = transformers.BloomForCausalLM(config).to("cuda", torch.bfloat16).eval()
    weights = torch.cuda.memory_allocated()

    def peak(n, chunk, evict=False):
        ids = torch.randint(1, 1000, (1, n), device="cuda")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with patch_model(model, method=method, evict=evict):
            cache, _ = hf.chunked_prefill(model, ids, chunk)
            del cache
        return torch.cuda.max_memory_allocated() - weights

    small, large = peak(1 << 14, 1 << 14), peak(1 << 15, 1 << 15)
    assert large < 2.2 * small, (small, large)
    if method == "window":
        chunked = peak(1 << 15, 1 << 12, evict=True)
        assert chunked < large / 2, (chunked, large)


@pytest.mark.parametrize("method", ["exact", "window", "lsh"])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_patched_cache_appends_in_place_without_eviction(model, method):
    """Without eviction too, a patched model's DynamicCache layers append in place (transformers'
    DynamicLayer concatenates: every step copied the whole cache, so a decode step's cost grew with it):
    after a chunked prefill, 30 greedy steps reallocate each layer's buffer a few times (1.5x growth), not
    at every step; the storage behind a layer's keys stays within 2x its stored keys; the tokens equal
    those of recomputing the whole sequence at every step and, for exact, those of transformers' own
    attention with its DynamicCache."""
    ids = torch.randint(1, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    steps = 30

    def recomputed():
        seq = ids
        for _ in range(steps):
            token = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, token], 1)
        return seq[:, ids.shape[1]:]

    if method == "exact":
        native_cache, native_logits = hf.chunked_prefill(model, ids, 7)  # unpatched: transformers' DynamicLayer
        native = _greedy_after(model, native_cache, native_logits, None, steps)
    with patch_model(model, method=method, samples=4, seed=2, window_eps=0.05):
        cache, logits = hf.chunked_prefill(model, ids, 7)
        layers = list(cache.layers)
        assert all(type(layer).__name__ == "InPlaceLayer" for layer in layers)
        buffers, moved = [layer.keys.untyped_storage().data_ptr() for layer in layers], 0
        tokens, token = [], logits.argmax(-1, keepdim=True)
        for _ in range(steps):
            tokens.append(token)
            out = model(input_ids=token, **_cache_kw(model, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            now = [layer.keys.untyped_storage().data_ptr() for layer in cache.layers]
            moved += sum(a != b for a, b in zip(now, buffers))
            buffers = now
            for layer in cache.layers:
                stored = layer.keys.shape[2] * layer.keys[:, :, :1].numel() * layer.keys.element_size()
                assert layer.keys.untyped_storage().nbytes() <= 2 * stored
        assert moved <= 3 * len(layers), moved  # DynamicLayer: one new tensor per layer and step
        assert cache.get_seq_length() == ids.shape[1] + steps
        cached = torch.cat(tokens, 1)
        assert torch.equal(cached, recomputed())
    assert len(set(cached.flatten().tolist())) > 2
    if method == "exact":
        assert torch.equal(cached, native)


@pytest.mark.parametrize("scheme", ["grid", "cut"])
def test_lsh_reach_start_equals_the_per_head_starts(scheme):
    """LSH's eviction point (``LayerPartitions.first_reachable``: for grid t - max (t + U) mod W) is the
    minimum over heads of ``_layer_starts`` (the block starts of position t), from the first positions
    (blocks clipped at 0) deep into the sequence, a slope-0 head (one block) included."""
    model = _steep_bloom()
    for slopes in ([0.9, 0.6, 0.4, 0.3], [0.9, 0.6, 0.4, 0.0]):
        with patch_model(model, method="lsh", samples=3, scheme=scheme, slopes=slopes, evict=True) as patch:
            info = patch.layers[1]
            starts = set()
            for t in list(range(0, 40)) + [1000, 4095, 4096, 4097, 9000]:
                patch.forward_rows = {}
                start = patch._reach_start(info, t)
                assert start == int(patch._layer_starts(info, t).min()), (slopes, t)
                starts.add(t - start)
            assert len(starts) > 3


def test_grid_first_reachable_kept_over_its_range():
    """A decode loop's ``first_reachable`` (kept until a block attaining it ends) equals t - max (t + U) mod W
    at every position, forward and back, and is computed again only a few times per hundred positions."""
    from poslsh.layer_partitions import LayerPartitions

    layer = LayerPartitions(torch.tensor([0.5, 0.1, 0.02, 0.0], dtype=torch.float64), 4, "grid", 0, 3)
    w, u = layer._grid
    computed = 0
    for t in list(range(2000, 2600)) + [10, 11, 5, 2599]:
        before = layer._first_reachable
        got = layer.first_reachable(t)
        computed += layer._first_reachable is not before
        assert got == max(0, t - int(torch.remainder(u + t, w).max())), t
    assert computed < 40


def test_window_reach_start_equals_the_per_head_starts():
    """The window's eviction point in closed form (t - the widest head's half-width) is the minimum over
    heads of ``_layer_starts``, before and past the widest window, a slope-0 head included."""
    model = _steep_bloom()
    for slopes in ([0.9, 0.6, 0.4, 0.3], [0.9, 0.6, 0.4, 0.0]):
        with patch_model(model, method="window", window_eps=0.01, slopes=slopes, evict=True) as patch:
            info = patch.layers[1]
            for t in (0, 1, 5, 15, 16, 17, 40, 1000):
                patch.forward_rows = {}
                assert patch._reach_start(info, t) == int(patch._layer_starts(info, t).min()), (slopes, t)
