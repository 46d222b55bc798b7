"""Held-out perplexity of the ALiBi LM per attention method, time per token, and per-layer error.

Methods are ``poslsh.method.MethodSpec`` (text forms ``exact``, ``window:EPS``, ``lsh:R:SCHEME:SAMPLING``,
``hybrid:R:SCHEME:SAMPLING:EPS``), shared with ``poslsh eval-hf`` and the transformers patch.

Perplexity at context N: windows of N + 1 tokens slide over the held-out stream with stride
S = ceil(score_fraction * N); each window scores only its last S predictions, so every scored token
sees at least N - S tokens of context and each token is scored once. ``first_target`` places the
windows so that the scored tokens start at that stream position: with one ``first_target`` (at least
the largest context) and a scored count that every stride divides, every context scores the very same
tokens, and losses at different contexts differ only by the context, not by the text.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from poslsh.method import MethodSpec
from ..util import synchronize
from .model import ALiBiLM

__all__ = ["sliding_windows", "check_common_scoring", "perplexity", "layer_errors"]


def sliding_windows(num_tokens: int, context: int, score_fraction: float = 0.5,
                    max_scored: int | None = None, first_target: int | None = None) -> tuple[list[int], int]:
    """Start offsets of the (context + 1)-token windows and the number S scored per window.

    ``first_target``: place the windows so that the first scored token is at that stream position
    (default: the first window starts at 0).
    """
    if num_tokens < context + 1:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of context {context} + 1")
    stride = max(1, math.ceil(score_fraction * context))
    first = 0
    if first_target is not None:
        # A window starting at s scores the targets s + context + 1 - stride .. s + context.
        first = first_target - (context + 1 - stride)
        if first < 0 or first + context >= num_tokens:
            raise ValueError(f"first_target={first_target} does not fit context {context} in {num_tokens} tokens "
                             f"(needs {context + 1 - stride} tokens before it and {stride} from it on)")
    starts = list(range(first, num_tokens - context, stride))
    if max_scored is not None:
        starts = starts[:max(1, math.ceil(max_scored / stride))]
    return starts, stride


def check_common_scoring(scored_tokens: int, contexts, score_fraction: float = 0.5) -> None:
    """ValueError unless ``scored_tokens`` is a positive multiple of every context's stride, the
    condition for every context to score the very same tokens (``sliding_windows``' first_target)."""
    strides = {n: max(1, math.ceil(score_fraction * n)) for n in contexts}
    if scored_tokens < 1 or any(scored_tokens % s for s in strides.values()):
        raise ValueError(f"scored_tokens must be a positive multiple of every context's stride {strides} "
                         f"(so that every context scores the same tokens), got {scored_tokens}")


def perplexity(forward: Callable[[Tensor], Tensor], tokens: np.ndarray, context: int, *, device: torch.device | str,
               batch_size: int = 1, score_fraction: float = 0.5, max_scored: int | None = 65536,
               first_target: int | None = None, warmup: bool = True,
               progress: Callable[[Any, int], Any] | None = None) -> dict[str, Any]:
    """Sliding-window perplexity of ``forward`` (idx int64 [B, N] -> logits [B, N, V]) on a token stream.

    ``warmup``: run the first batch once untimed, so that compilation (FlexAttention, Triton) and
    lazily built partitions are not counted in the time per token. ``progress(iterable, total)``
    wraps the loop over batches (e.g. ``poslsh_lab.util.progress``, for lines on stderr).

    Returns:
        {"context", "loss" (nats/token), "ppl", "bits_per_token", "scored_tokens", "windows",
        "seconds" (forward time), "time_per_token" (forward seconds per processed token),
        "tokens_per_second"}.
    """
    starts, stride = sliding_windows(tokens.size, context, score_fraction, max_scored, first_target)
    nll, scored, seconds = 0.0, 0, 0.0
    with torch.no_grad():
        batches = range(0, len(starts), batch_size)
        for i in (progress(batches, len(batches)) if progress else batches):
            batch = np.stack([tokens[s:s + context + 1].astype(np.int64) for s in starts[i:i + batch_size]])
            w = torch.from_numpy(batch).to(device)
            if warmup and i == 0:
                forward(w[:, :-1])
            synchronize(device)
            t0 = time.perf_counter()
            logits = forward(w[:, :-1])
            synchronize(device)
            seconds += time.perf_counter() - t0
            tail = logits[:, -stride:].float()
            nll += float(torch.nn.functional.cross_entropy(tail.reshape(-1, tail.shape[-1]),
                                                           w[:, -stride:].reshape(-1), reduction="sum"))
            scored += tail.shape[0] * tail.shape[1]
    loss = nll / scored
    processed = len(starts) * context
    return {"context": context, "loss": loss, "ppl": math.exp(loss), "bits_per_token": loss / math.log(2),
            "scored_tokens": scored, "windows": len(starts), "seconds": seconds,
            "time_per_token": seconds / processed, "tokens_per_second": processed / seconds if seconds else None}


@torch.no_grad()
def layer_errors(model: ALiBiLM, idx: Tensor, specs: list[MethodSpec], seeds: list[int] | tuple[int, ...] = (0,),
                 backend: str = "auto", deadline: float | None = None) -> dict[str, list[float]]:
    """Per-layer relative error of the attention output (before the output projection) against exact.

    Every layer is fed the *exact* model's input to that layer, so the error is the layer's own, not
    accumulated through depth: ||O_method - O_exact||_F / ||O_exact||_F over the batch, averaged over
    ``seeds`` for the methods that draw partitions.

    Args:
        idx: int64 [B, N] tokens.
        backend: attention backend for every call, the exact reference included (e.g. "fused": no
            compilation per shape, and float32 throughout).
        deadline: a ``time.perf_counter()`` value; specs not started by then are left out.

    Returns:
        {spec.label: [error of layer 0, ..., error of layer L-1]} for the specs that ran, in order.
    """
    model.eval()  # every layer then runs on its fixed partitions
    before = (model.attention_spec, model.attention_seed, model.attention_backend)
    attns = model.attention_modules()
    inputs: list[Tensor | None] = [None] * len(attns)
    outputs: list[Tensor | None] = [None] * len(attns)
    hooks = []
    for i, attn in enumerate(attns):
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
        hooks.append(attn.out_proj.register_forward_pre_hook(lambda m, a, i=i: outputs.__setitem__(i, a[0])))
    try:
        model.set_attention("exact", backend=backend)
        model(idx, sdpa=False)
        exact = [o.float() for o in outputs]
        result: dict[str, list[float]] = {}
        for spec in specs:
            if deadline is not None and time.perf_counter() > deadline:
                break
            errs = np.zeros(len(attns))
            runs = seeds if spec.random else seeds[:1]
            for seed in runs:
                model.set_attention(spec, seed=seed, backend=backend)
                for i, attn in enumerate(attns):
                    attn(inputs[i])
                    errs[i] += float((outputs[i].float() - exact[i]).norm() / exact[i].norm())
            result[spec.label] = (errs / len(runs)).tolist()
        return result
    finally:
        for h in hooks:
            h.remove()
        model.set_attention(before[0], seed=before[1], backend=before[2])
