"""Held-out perplexity of the ALiBi LM per attention method, time per token, and per-layer error.

Method strings (shared with ``poslsh eval-hf``): ``exact``, ``window`` or ``window:EPS``,
``lsh:R`` or ``lsh:R:SCHEME`` (R samples, SCHEME grid|cut; plain ``lsh`` means R = 8, grid).

Perplexity at context N: windows of N + 1 tokens slide over the held-out stream with stride
S = ceil(score_fraction * N); each window scores only its last S predictions, so every scored token
sees at least N - S tokens of context and each token is scored once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .model import ALiBiLM

__all__ = ["MethodSpec", "parse_method", "sliding_windows", "perplexity", "layer_errors", "synchronize"]


@dataclass(frozen=True)
class MethodSpec:
    """One attention configuration to evaluate."""

    method: str
    samples: int = 8
    scheme: str = "grid"
    window_eps: float = 1e-3

    @property
    def label(self) -> str:
        if self.method == "lsh":
            return f"lsh:{self.samples}:{self.scheme}"
        if self.method == "window":
            return f"window:{self.window_eps:g}"
        return self.method

    def options(self, seed: int = 0) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "scheme": self.scheme, "seed": seed,
                "window_eps": self.window_eps}


def parse_method(text: str) -> MethodSpec:
    """'exact' | 'window[:EPS]' | 'lsh[:R[:SCHEME]]' -> MethodSpec (ValueError with the grammar otherwise)."""
    parts = text.strip().split(":")
    try:
        if parts[0] == "exact" and len(parts) == 1:
            return MethodSpec("exact")
        if parts[0] == "window" and len(parts) <= 2:
            eps = float(parts[1]) if len(parts) == 2 else 1e-3
            if not 0 < eps < 1:
                raise ValueError
            return MethodSpec("window", window_eps=eps)
        if parts[0] == "lsh" and len(parts) <= 3:
            r = int(parts[1]) if len(parts) >= 2 else 8
            scheme = parts[2] if len(parts) == 3 else "grid"
            if r < 1 or scheme not in ("grid", "cut"):
                raise ValueError
            return MethodSpec("lsh", samples=r, scheme=scheme)
    except ValueError:
        pass
    raise ValueError(f"bad method {text!r}: use exact, window[:EPS] or lsh[:R[:grid|cut]]")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sliding_windows(num_tokens: int, context: int, score_fraction: float = 0.5,
                    max_scored: int | None = None) -> tuple[list[int], int]:
    """Start offsets of the (context + 1)-token windows and the number S scored per window."""
    if num_tokens < context + 1:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one window of context {context} + 1")
    stride = max(1, math.ceil(score_fraction * context))
    starts = list(range(0, num_tokens - context, stride))
    if max_scored is not None:
        starts = starts[:max(1, math.ceil(max_scored / stride))]
    return starts, stride


def perplexity(forward: Callable[[Tensor], Tensor], tokens: np.ndarray, context: int, *, device: torch.device | str,
               batch_size: int = 1, score_fraction: float = 0.5, max_scored: int | None = 65536) -> dict[str, Any]:
    """Sliding-window perplexity of ``forward`` (idx int64 [B, N] -> logits [B, N, V]) on a token stream.

    Returns:
        {"context", "loss" (nats/token), "ppl", "bits_per_token", "scored_tokens", "windows",
        "seconds" (forward time), "time_per_token" (forward seconds per processed token),
        "tokens_per_second"}.
    """
    starts, stride = sliding_windows(tokens.size, context, score_fraction, max_scored)
    nll, scored, seconds = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            batch = np.stack([tokens[s:s + context + 1].astype(np.int64) for s in starts[i:i + batch_size]])
            w = torch.from_numpy(batch).to(device)
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
def layer_errors(model: ALiBiLM, idx: Tensor, specs: list[MethodSpec], seeds: list[int] | tuple[int, ...] = (0,)
                 ) -> dict[str, list[float]]:
    """Per-layer relative error of the attention output (before the output projection) against exact.

    Every layer is fed the *exact* model's input to that layer, so the error is the layer's own, not
    accumulated through depth: ||O_method - O_exact||_F / ||O_exact||_F over the batch, averaged over
    ``seeds`` for "lsh".

    Args:
        idx: int64 [B, N] tokens.

    Returns:
        {spec.label: [error of layer 0, ..., error of layer L-1]}.
    """
    model.eval()
    options = dict(model.attention_options)
    attns = model.attention_modules()
    inputs: list[Tensor | None] = [None] * len(attns)
    outputs: list[Tensor | None] = [None] * len(attns)
    hooks = []
    for i, attn in enumerate(attns):
        hooks.append(attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
        hooks.append(attn.out_proj.register_forward_pre_hook(lambda m, a, i=i: outputs.__setitem__(i, a[0])))
    try:
        model.set_attention("exact")
        model(idx, sdpa=False)
        exact = [o.float() for o in outputs]
        result: dict[str, list[float]] = {}
        n = idx.shape[1]
        for spec in specs:
            errs = np.zeros(len(attns))
            runs = seeds if spec.method == "lsh" else seeds[:1]
            for seed in runs:
                model.set_attention(**spec.options(seed))
                for i, attn in enumerate(attns):
                    parts = model.layer_partitions(i, n, idx.device)
                    attn(inputs[i], partitions=parts)
                    errs[i] += float((outputs[i].float() - exact[i]).norm() / exact[i].norm())
            result[spec.label] = (errs / len(runs)).tolist()
        return result
    finally:
        for h in hooks:
            h.remove()
        model.set_attention(**options)
