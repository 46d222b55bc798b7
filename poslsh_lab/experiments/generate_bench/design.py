"""generate-bench, the design of the run: its Config (every field a flag), the model shapes (published
checkpoints' configs, built with random weights), the arms (transformers' own attention and the poslsh
patch's methods) and the order of the measured points, shared by measuring and reporting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from poslsh.method import MethodSpec, as_method
from ...util import Count, CountOrZero, Fraction, NonNegative, TwoOrMore, check_fields
from .. import harness

NAME = "generate-bench"

# The published configs of ALiBi checkpoints (their config.json as released; no download: the sizes are
# written here). shape -> (family, transformers config keyword arguments).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "bloom-560m": ("bloom", dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16, layer_norm_epsilon=1e-5,
                                 initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    "bloom-7b1": ("bloom", dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32, layer_norm_epsilon=1e-5,
                                initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    "mpt-7b": ("mpt", dict(vocab_size=50432, d_model=4096, n_layers=32, n_heads=32, expansion_ratio=4, no_bias=True,
                           layer_norm_epsilon=1e-5, initializer_range=0.02, attn_config={"alibi": True})),
    "falcon-rw-1b": ("falcon", dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                                    alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False,
                                    bias=True, layer_norm_epsilon=1e-5, initializer_range=0.02, bos_token_id=1,
                                    eos_token_id=2)),
}
Shape = Literal["bloom-560m", "bloom-7b1", "mpt-7b", "falcon-rw-1b"]
# The config keys of the size overrides, per family: (layers, hidden, heads, vocabulary).
SIZE_KEYS = {"bloom": ("n_layer", "hidden_size", "n_head", "vocab_size"),
             "mpt": ("n_layers", "d_model", "n_heads", "vocab_size"),
             "falcon": ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")}

# arm -> (label, method or None for transformers' own attention, evict)
ARMS: dict[str, tuple[str, str | None, bool]] = {
    "native": ("transformers' own attention", None, False),
    "exact": ("poslsh exact", "exact", False),
    "window": ("poslsh window", "window", False),
    "window_evict": ("poslsh window + eviction", "window", True),
    "lsh": ("poslsh LSH", "lsh", False),
    "lsh_evict": ("poslsh LSH + eviction", "lsh", True),
    "window_graph": ("poslsh window + eviction, CUDA graph", "window", True),
}
Arm = Literal["native", "exact", "window", "window_evict", "lsh", "lsh_evict", "window_graph"]
LABELS = {arm: label for arm, (label, _, _) in ARMS.items()}
# Arms that decode with ``poslsh.integrations.hf_graph.GraphedDecoder``: the prompt read as the patched
# arms read it, then each step replayed from one CUDA graph over a static window cache.
GRAPHED = ("window_graph",)
# Arms whose prefill costs grow with the square of the prompt (every query reads every earlier key):
# the deadline's estimate of a longer point scales their last time quadratically, the others linearly.
QUADRATIC = ("native", "exact")


@dataclass
class Config:
    """A model of a published ALiBi checkpoint's shape with random weights, generating greedily after
    prompts of each context length, with transformers' own attention and the poslsh patch's methods.

    Defaults: the GPU run (BLOOM-560m's shape, bf16). ``tiny=True`` replaces the sizes left at their
    defaults by a CPU dry run of seconds (see ``TINY``).

    Attributes:
        tiny: Replace the sizes left at their defaults by a CPU dry run of seconds.
        shape: Published checkpoint whose config the model takes (random weights).
        model: Local checkpoint folder (config and weights; no tokenizer needed) instead of a shape (empty: the shape).
        config_file: A config.json (or a folder holding one) of a BLOOM, MPT or Falcon (alibi) model, with random
            weights, instead of a shape; the size flags apply to it (empty: the shape).
        layers: Override the shape's layer count (0: the shape's).
        hidden: Override the shape's hidden size (0: the shape's).
        heads: Override the shape's attention head count (0: the shape's).
        vocab: Override the shape's vocabulary size (0: the shape's).
        init_std: Standard deviation of the random weights (0: the shape's initializer_range).
        contexts: Prompt lengths in tokens.
        arms: Attention of each measured arm: native (transformers' own), or the poslsh patch's exact, window,
            window_evict, lsh, lsh_evict, or window_graph (window_evict's prompt, then each step replayed from a
            CUDA graph over a static window cache; CUDA only).
        new_tokens: Greedy tokens timed per point (after one from the prompt's logits and one untimed step).
        rounds: Measurements of each arm per context, in rounds of alternating arm order (given, reversed,
            given, ...), so that a slow stretch of a shared host falls on every arm alike; a row's time per token
            is the median over rounds, and the report's ratio to native's the median of the per-round ratios.
        window_eps: Truncation level of the window arms.
        samples: Partitions r of the LSH arms.
        prefill_chunk: Feed prompts longer than this in chunks of this many tokens against the cache (0: one call);
            native's only with --chunk-native.
        chunk_native: Chunk transformers' own attention's prompts too (default: one call, as generate does).
        oom_chunk: After a one-call prefill runs out of memory, read that prompt and the arm's longer ones in
            chunks of this many tokens (0: skip the arm's longer prompts).
        warmup_context: Prompt length of each arm's untimed warm-up run (compiles kernels; 0: none).
        profile_steps: Decoding steps profiled per point for kernel time beside wall time (CUDA only; 0: none).
        budget_s: Nothing new starts after this many seconds, nor a point estimated to end after it (0: no limit).
        seed: Seed of the weights and the prompts.
        device: Device: auto (cuda when there is one, else cpu), cuda, or cpu.
        dtype: Weights and activations dtype (auto: bfloat16 on CUDA, float32 on the CPU).
        plots: Draw the PNG at the end (--no-plots: the JSON and report only; --replot draws it later).
        replot: Redraw the PNG of this saved JSON into --out; nothing else runs (empty: a normal run).
    """

    tiny: bool = False
    shape: Shape = "bloom-560m"
    model: str = ""
    config_file: str = ""
    layers: CountOrZero = 0
    hidden: CountOrZero = 0
    heads: CountOrZero = 0
    vocab: CountOrZero = 0
    init_std: NonNegative = 0.0
    contexts: tuple[TwoOrMore, ...] = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
    arms: tuple[Arm, ...] = tuple(ARMS)
    new_tokens: Count = 32
    rounds: Count = 1
    window_eps: Fraction = 1e-3
    samples: Count = 8
    prefill_chunk: CountOrZero = 0
    chunk_native: bool = False
    oom_chunk: CountOrZero = 0
    warmup_context: CountOrZero = 1024
    profile_steps: CountOrZero = 4
    budget_s: NonNegative = 0.0
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    plots: bool = True
    replot: str = ""


# What --tiny changes, in the fields left at their defaults (so ``--tiny --contexts 64`` keeps 64): a
# 2-layer model of the shape's family, wide random weights (the logits then depend on attention, so
# greedy tokens are a real comparison), two short prompts, 4 timed tokens.
TINY = dict(layers=2, hidden=64, heads=4, vocab=512, init_std=0.3, contexts=(192, 320), new_tokens=4,
            warmup_context=32)


def effective(config: Config) -> Config:
    """The config actually run: with ``tiny`` set, the TINY sizes replace the fields left at their defaults."""
    return harness.effective(config, TINY)


def check(cfg: Config) -> None:
    """ValueError naming the first bad field of an effective config (before any work)."""
    # rounds counts loop passes: 1.5 would pass the range check below, and "2" would fail it with a TypeError
    if not isinstance(cfg.rounds, int) or isinstance(cfg.rounds, bool):
        raise ValueError(f"rounds must be an integer >= 1, got {cfg.rounds!r}")
    check_fields(cfg)  # the declared ranges, as the parser checks them
    if cfg.shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {cfg.shape!r}")
    if not cfg.contexts or len(set(cfg.contexts)) != len(cfg.contexts):
        raise ValueError(f"contexts must be distinct integers >= 2, got {cfg.contexts}")
    if not cfg.arms or len(set(cfg.arms)) != len(cfg.arms) or any(a not in ARMS for a in cfg.arms):
        raise ValueError(f"arms must be distinct names among {', '.join(ARMS)}, got {cfg.arms}")
    for arm in cfg.arms:
        method_of(cfg, arm)  # window_eps and samples checked by the one method description


def method_of(cfg: Config, arm: str) -> tuple[MethodSpec | None, bool]:
    """(the patch's method, evict) of an arm; (None, False) for transformers' own attention."""
    _, method, evict = ARMS[arm]
    if method is None:
        return None, False
    # the one method description checks the options (its errors name window_eps and samples)
    options = {"window": dict(window_eps=cfg.window_eps), "lsh": dict(samples=cfg.samples)}.get(method, {})
    return as_method(method, **options), evict


def size_overrides(cfg: Config, family: str, max_positions: int) -> dict[str, Any]:
    """The config keys the size flags set for a model of ``family``; MPT's ``max_seq_len`` (the length of
    its precomputed bias) covers ``max_positions``."""
    changes = {key: value for key, value in zip(SIZE_KEYS[family], (cfg.layers, cfg.hidden, cfg.heads, cfg.vocab))
               if value}
    if cfg.init_std:
        changes["initializer_range"] = cfg.init_std
    if family == "mpt":
        changes["max_seq_len"] = max(max_positions, 2048)
    return changes


def model_config_kwargs(cfg: Config, max_positions: int) -> tuple[str, dict[str, Any]]:
    """(family, config keyword arguments) of the shape with the size flags applied."""
    family, base = SHAPES[cfg.shape]
    return family, {**base, **size_overrides(cfg, family, max_positions)}


def chunks(cfg: Config, arm: str, chunk: int) -> bool:
    """Whether an arm may read its prompts in chunks of ``chunk`` tokens (0: never); native only with
    ``chunk_native``."""
    return bool(chunk) and (arm != "native" or cfg.chunk_native)


def chunk_for(cfg: Config, arm: str, n: int) -> int:
    """Tokens per prefill call of an arm at prompt length n (n: one call)."""
    return min(cfg.prefill_chunk, n) if chunks(cfg, arm, cfg.prefill_chunk) else n


def unavailable(arm: str, device_type: str) -> str | None:
    """Why an arm cannot run on a device of this type (recorded as the row's ``skipped``), or None."""
    if arm in GRAPHED and device_type != "cuda":
        return "needs CUDA: a CUDA graph records the decode step"
    return None


def config_of(res: dict) -> Config:
    """The effective config stored in a results dict."""
    return harness.config_from(res["effective_config"], Config)

