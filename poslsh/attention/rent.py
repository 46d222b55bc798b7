"""When "auto" may take a backend that builds something for each new shape: cuDNN's graphs (50-80 ms each
on an H100), FlexAttention's compiled kernels (one torch.compile per shape: 0.5-2 s for the Triton
template, 1-8 s for FlashAttention-4's).

Such a backend can be the fastest at a shape and still the slowest choice for a workload whose shapes all
differ (prompts of many lengths, decoding steps whose key count grows by one). "auto" therefore takes it
for a shape only once the calls at that shape have done work worth about one build on the kernel it
would otherwise use (a ski-rental rule: either choice then loses at most a small factor of the better
one in hindsight): training at a fixed length after a few steps, a benchmark within its warm-up, a
decode loop never. ``BuildRent`` keeps that account per shape; ``call_seconds`` estimates a call's work.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

from torch import Tensor

from .core import AttentionSpec

__all__ = ["BuildRent", "call_seconds", "ASSUMED_FLOP_RATE", "TRAINING_WORK"]

# Triton's exact forward on an H100 runs at 130 (H = 16, D = 64) to 440 (H = 32, D = 128) TFLOP/s
# (bench/results/first_call): the estimate is within 2x of the time spent.
ASSUMED_FLOP_RATE = 2e14
TRAINING_WORK = 3.5  # forward + backward against the forward alone


def call_seconds(q: Tensor, spec: AttentionSpec, training: bool) -> float:
    """Estimated seconds of a call on the fallback kernel: 4 D flops per (query, key) pair it weighs, the
    pairs of exact attention (causal: keys up to each query) or, for the window, of each head's band.
    q: [B, H, Nq, D]; the keys are the first ``spec.q_offset + Nq``."""
    b, h, nq, d = q.shape
    nk = spec.q_offset + nq
    if spec.causal:  # query i sees q_offset + i + 1 keys
        per_head = nq * spec.q_offset + nq * (nq + 1) / 2
    else:
        per_head = float(nq * nk)
    if spec.rule.band_only and spec.window is not None:  # the window's band, not exact's keys
        sides = 1 if spec.causal else 2
        band = sum(min(float(nk), sides * float(w) + 1) for w in spec.window.tolist())
        pairs = min(per_head * h, nq * band)
    else:
        pairs = per_head * h
    return 4.0 * b * d * pairs / ASSUMED_FLOP_RATE * (TRAINING_WORK if training else 1.0)


class BuildRent:
    """Estimated work done per shape key, in seconds; a key is paid for once its work reaches
    ``build_after_s``. At most ``entries`` keys are kept (least recently used dropped)."""

    def __init__(self, build_after_s: float, entries: int = 256):
        self.build_after_s = build_after_s
        self.entries = entries
        self._work: OrderedDict[Hashable, float] = OrderedDict()

    def paid_for(self, key: Hashable, seconds: float) -> bool:
        """Add ``seconds`` of work at ``key``; whether the work so far reaches one build."""
        total = self._work.pop(key, 0.0) + seconds
        self._work[key] = total
        while len(self._work) > self.entries:
            self._work.popitem(last=False)
        return total >= self.build_after_s

    def clear(self) -> None:
        self._work.clear()
