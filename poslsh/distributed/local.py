"""One attention call on a rank's local tensors, with the *global* positional parameters.

A shard's calls see keys [k0, k1) of the global sequence and queries q0.. inside them. Positional
weights depend only on relative positions, except two things that a call on the local tensors would
get wrong and are therefore fixed here: the LSH partitions are the global ones seen on [k0, k1)
(``Partitions.restrict``), and the window / hybrid half-widths are those of the global length N
(``hybrid_widths`` depends on N; ``window_sizes`` only caps at N - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..attention import AttentionSpec, resolve_spec, select_backend
from ..hashing import Partitions

__all__ = ["LocalCall"]


@dataclass(frozen=True)
class LocalCall:
    """The method's arguments, resolved for the global sequence (every rank holds the same)."""

    method: str
    slopes: Tensor
    causal: bool
    scale: float | None
    window_eps: float
    backend: str
    window: Tensor | None = None  # global half-widths [H] (window, hybrid)
    partitions: Partitions | None = None  # global partitions (lsh, hybrid), on the CPU

    def spec(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_offset: int,
             k0: int) -> AttentionSpec:
        """The ``AttentionSpec`` of queries at q_offset.. inside keys at global positions [k0, k0 + Nk)."""
        parts = None if self.partitions is None else self.partitions.restrict(k0, k0 + k.shape[2])
        # window and hybrid take the global widths (those of the local length would differ)
        return resolve_spec(q, k, v, slopes=self.slopes, causal=self.causal, method=self.method, partitions=parts,
                            window_eps=self.window_eps, scale=self.scale, key_padding_mask=key_padding_mask,
                            q_offset=q_offset, widths=self.window)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q0: int,
                 k0: int) -> tuple[Tensor, Tensor]:
        """(out [B, H, Nq, Dv], lse [B, H, Nq]) of queries at global q0.. against keys at global k0..
        (k0 <= q0 and q0 + Nq <= k0 + Nk), through ``poslsh.attention``'s backends."""
        spec = self.spec(q, k, v, key_padding_mask, q0 - k0, k0)
        return select_backend(q, spec, self.backend)(q, k, v, spec)
