"""Seeds from labels, the same in every process and on every machine (Python's ``hash`` of a str is
salted per process, so it cannot seed anything that must reproduce).

``seed_for`` is the one to use. The two others are the formulas earlier experiments drew their
committed results with; they stay, unchanged, so that those results regenerate from their configs:

* ``seed_for``: blake2b of the labels joined by "/", 63 bits. Fixed partitions of every layer
  (``layer_partitions``: the transformers patch, the LM's evaluation, ``nn.ALiBiAttention`` in eval)
  and the LM's training partitions per (seed, layer, step): bench/results/lm-validation.json and
  lsh-native.json depend on it.
* ``crc32_seed``: crc32 of the labels' ``repr``, 32 bits. The draws of ``poslsh mask-error`` and
  ``poslsh attn-error`` (bench/results/mask-error/, attn-error/).
* ``blake2b_seed``: blake2b of the labels' ``repr``, modulo 2^62. The draws of ``poslsh pareto``
  (bench/results/pareto*/).
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

__all__ = ["seed_for", "crc32_seed", "blake2b_seed"]


def seed_for(*parts: Any) -> int:
    """A 63-bit seed from any labels: blake2b of their ``str`` joined by "/"."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def crc32_seed(*parts: Any) -> int:
    """A 32-bit seed: crc32 of ``repr(parts)`` (mask-error's and attn-error's committed draws)."""
    return zlib.crc32(repr(parts).encode())


def blake2b_seed(*parts: Any) -> int:
    """A 62-bit seed: blake2b of ``repr(parts)`` modulo 2^62 (the Pareto study's committed draws)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") % 2**62
