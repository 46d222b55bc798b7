"""poslsh.integrations.hf_graph: greedy decoding over a static window cache (the step a CUDA graph records)
equals the patched model's own generation and recomputation, on tiny random BLOOM, MPT and Falcon(alibi)
models; it reads nothing on the host outside the operator; what it cannot serve is refused by name. The
CUDA test (graph replay against the eager step and model.generate) is skipped without a GPU."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from poslsh.integrations import hf  # noqa: E402
from poslsh.integrations.hf import patch_model  # noqa: E402
from poslsh.integrations.hf.prefill import _cache_argument  # noqa: E402
from poslsh.integrations.hf_graph import GraphedDecoder, StaticWindowCache, shift_in  # noqa: E402

VOCAB = 128
# Steep slopes with window_eps 0.01 give half-widths ceil(ln(100) / m) = 6, 8, 12, 16: a window of C = 17
# slots, so a 40-token prompt outgrows it and a 7-token one does not fill it.
STEEP = [0.9, 0.6, 0.4, 0.3]
WINDOW = dict(method="window", window_eps=0.01, slopes=STEEP)
C = 17
NEW = 30  # more than C: the window slides past every prompt position


def _model(family: str, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    if family == "bloom":
        config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3)
    elif family == "mpt":
        config = transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                                        initializer_range=0.3)
    else:  # multi-query: one KV head
        config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           alibi=True, multi_query=True, new_decoder_architecture=False, bias=False,
                                           initializer_range=0.3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wide weights: the greedy tokens depend on the context instead of settling on one
        for weight in model.parameters():
            if weight.ndim == 2:
                weight.normal_(0.0, 0.8)
    return model.to(device, dtype).eval()


def _prompt(n: int, device="cpu") -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)).to(device)


def _generate(model, ids, new):
    """The patched model's own greedy generation (DynamicCache), exactly ``new`` tokens."""
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=True,
                          eos_token_id=None)


def _recompute(model, ids, new):
    """Greedy decoding by recomputing the whole sequence at every step (no cache)."""
    seq = ids
    for _ in range(new):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
@pytest.mark.parametrize("n", [40, 7])
@pytest.mark.parametrize("evict", [False, True])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_static_window_decoding_equals_generate_and_recomputation(family, n, evict):
    """The static-cache step run eagerly (what the graph records) gives the tokens of the patched model's
    generate and of recomputation, for a prompt longer than the window and one shorter (front slots
    masked), read in one call or in chunks of 16."""
    model = _model(family)
    ids = _prompt(n)
    with patch_model(model, **WINDOW, evict=evict):
        decoder = GraphedDecoder(model)
        assert decoder.window == C and not decoder.graph
        static = decoder.generate(ids, NEW)
        chunked = decoder.generate(ids, NEW, chunk_size=16)  # the same buffers, a second prompt read
        reference = _generate(model, ids, NEW)
    with patch_model(model, **WINDOW):  # recomputation has no cache to evict
        recomputed = _recompute(model, ids, NEW)
    assert static.shape == (1, n + NEW)
    assert torch.equal(static, reference), (static[0, n:], reference[0, n:])
    assert torch.equal(static, recomputed)
    assert torch.equal(chunked, static)
    assert len(set(static[0, n:].tolist())) > 5  # the tokens depend on the context: a real comparison


@pytest.mark.parametrize("n", [40, 7])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_static_window_step_logits_equal_the_dynamic_caches(n):
    """Each step's logits over the static window equal those of the same token fed to the patched model with
    its DynamicCache (to float32 rounding, amplified by the model): the empty front slots after a short
    prompt weigh nothing."""
    model = _model("bloom")
    ids = _prompt(n)
    with patch_model(model, **WINDOW):
        decoder = GraphedDecoder(model)
        first = decoder.prefill(ids)
        cache, logits = hf.chunked_prefill(model, ids, n)
        assert torch.equal(decoder.logits, first) and torch.allclose(first, logits, atol=1e-5)
        for _ in range(NEW):
            token = decoder.token.clone()
            decoder.step()
            logits = model(input_ids=token, **{_cache_argument(model): cache, "use_cache": True}).logits[:, -1]
            # Two float32 paths (the padded static window through the careful path, the DynamicCache step
            # through SDPA with a weight mask): attention agrees to ~1e-7, which this wide-initialised
            # model amplifies to ~1e-4 relative in its logits.
            torch.testing.assert_close(decoder.logits, logits, rtol=1e-3, atol=1e-4)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_static_cache_keeps_its_shape_addresses_and_reported_length():
    """Every step writes into the same buffers [1, Hkv, C, D]; transformers sees a constant length C - 1."""
    model = _model("bloom")
    with patch_model(model, **WINDOW):
        decoder = GraphedDecoder(model)
        decoder.prefill(_prompt(40))
        cache = decoder.cache
        assert isinstance(cache, StaticWindowCache) and isinstance(cache, transformers.Cache)
        addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        token = decoder.token.data_ptr()
        for _ in range(C + 3):
            decoder.step()
            assert cache.get_seq_length() == C - 1
            assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses
            assert all(layer.keys.shape == (1, 4, C, 8) for layer in cache.layers)
            assert decoder.token.data_ptr() == token
        assert decoder.length == 40 + C + 3 and bool(cache.filled.all())
        assert cache.nbytes() == 2 * 2 * 4 * C * 8 * 4  # layers x (k, v) x heads x slots x head dim x fp32
        decoder.prefill(_prompt(7))  # a shorter prompt: only its 7 positions are marked
        assert cache.filled.sum().item() == 7 and bool(cache.filled[0, -7:].all())
        assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses


def test_shift_in_moves_every_slot_left_by_one():
    buffer = torch.arange(12.0).reshape(1, 2, 3, 2)
    expected = torch.cat([buffer[:, :, 1:], torch.full((1, 2, 1, 2), -1.0)], 2)
    shift_in(buffer, torch.full((1, 2, 1, 2), -1.0))
    assert torch.equal(buffer, expected)


class _HostRead(torch.Tensor):
    """A tensor standing for a device tensor: records where its values (or values derived from it) are
    read on the host, each a host-device synchronisation on a GPU (which a CUDA graph cannot record)."""
    SYNCS = {"__bool__", "item", "tolist", "__int__", "__index__", "__float__", "cpu", "numpy", "nonzero"}
    sites: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in cls.SYNCS:
            cls.sites.append([frame.filename for frame in traceback.extract_stack()])
        return super().__torch_function__(func, types, args, kwargs or {})

    @classmethod
    def watch(cls, decoder: GraphedDecoder) -> None:
        """Make the decoder's token and static cache record every host read of their values from now on."""
        decoder.token = decoder.token.as_subclass(cls)
        cache = decoder.cache
        cache.filled = cache.filled.as_subclass(cls)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.as_subclass(cls), layer.values.as_subclass(cls)
        cls.sites = []


@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_decode_step_reads_nothing_on_the_host_outside_the_operator(family):
    """With the token and the cache standing for device tensors, a decode step of transformers' layers, the
    patch and the static cache reads none of their values on the host. (The operator's CPU backend checks
    its keys for non-finite values; on a GPU the plan runs the Triton kernels, which read nothing: the
    CUDA test records the whole step.)"""
    model = _model(family)
    operator = str(Path(hf.__file__).parents[2] / "attention")  # poslsh/integrations/hf/__init__.py -> poslsh/attention
    with patch_model(model, **WINDOW):
        decoder = GraphedDecoder(model)
        decoder.prefill(_prompt(40))
        decoder.step()  # first calls (backend choice) done
        _HostRead.watch(decoder)
        decoder.step()
    assert type(decoder.token) is _HostRead  # the step's values did flow through the recording tensors
    outside = [files[-3:] for files in _HostRead.sites if not any(f.startswith(operator) for f in files)]
    assert outside == []


@torch.no_grad()
def test_what_a_fixed_window_cannot_serve_is_refused():
    model = _model("bloom")
    with pytest.raises(ValueError, match="patched by poslsh"):
        GraphedDecoder(model)
    for method, why in (("exact", "cache grows"), ("lsh", "absolute position"), ("hybrid", "absolute position")):
        with patch_model(model, method=method, samples=2):
            with pytest.raises(ValueError, match=f"method='window', got method='{method}': .*{why}"):
                GraphedDecoder(model)
    with patch_model(model, method="window", slopes=[0.5, 0.25, 0.125, 0.0]):
        with pytest.raises(ValueError, match="reaches every key"):
            GraphedDecoder(model)
    with patch_model(model, **WINDOW):
        decoder = GraphedDecoder(model)
        with pytest.raises(ValueError, match=r"graph=True .* CUDA device, got cpu"):
            GraphedDecoder(model, graph=True)
        with pytest.raises(RuntimeError, match="call prefill"):
            decoder.step()
        with pytest.raises(ValueError, match=r"input_ids must be \[1, length\].*batch 1.*\(2, 8\)"):
            decoder.prefill(torch.ones(2, 8, dtype=torch.long))
        mask = torch.ones(1, 8, dtype=torch.long)
        mask[0, :2] = 0
        with pytest.raises(ValueError, match="attention_mask must be all ones"):
            decoder.prefill(torch.ones(1, 8, dtype=torch.long), attention_mask=mask)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
            decoder.generate(torch.ones(1, 8, dtype=torch.long), 0)
    with patch_model(model, **WINDOW):  # a new patch: the decoder's plans are not its plans
        with pytest.raises(RuntimeError, match="patch changed"):
            decoder.prefill(torch.ones(1, 8, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: records the decode step in a CUDA graph")
@pytest.mark.parametrize("family", ["bloom", "mpt", "falcon"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
@pytest.mark.filterwarnings("ignore:.past_key_values. is deprecated")
def test_cuda_graph_replay_equals_the_eager_step_and_generate(family, dtype):
    """On a GPU: the tokens of graph replay equal those of the same step run eagerly (bit for bit: the same
    kernels) and of the patched model's generate, for a prompt longer than the window and a shorter one;
    the graph is recorded once and reused by a second prompt."""
    model = _model(family, dtype, "cuda")
    with patch_model(model, **WINDOW, evict=True):
        graphed, eager = GraphedDecoder(model), GraphedDecoder(model, graph=False)
        assert graphed.graph
        for n in (40, 7):
            ids = _prompt(n, "cuda")
            replayed = graphed.generate(ids, NEW, chunk_size=16)
            assert graphed.cuda_graph is not None
            assert torch.equal(replayed, eager.generate(ids, NEW, chunk_size=16)), n
            assert torch.equal(graphed.logits, eager.logits)  # the last replay's logits, read from the graph's output
            reference = _generate(model, ids, NEW)
            assert torch.equal(replayed, reference), (n, replayed[0, n:], reference[0, n:])
            assert len(set(replayed[0, n:].tolist())) > 5
