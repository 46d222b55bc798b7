"""Context parallelism: ALiBi attention of one sequence sharded over the ranks of a process group.

``context_parallel_attention(q, k, v, method=...)`` on every rank of a ``torch.distributed`` group,
each holding a contiguous shard of the sequence; window, lsh and hybrid exchange only the halo of keys
each head reaches (traffic set by the reach, not by the sequence length), exact attention runs a ring.
``count_traffic()`` measures the bytes a rank sends; ``shard`` / ``gather`` lay tensors out.
See docs/CONTEXT_PARALLEL.md.
"""

from .context_parallel import HALO_MODES, context_parallel_attention, partitions_fingerprint
from .exchange import Traffic, count_traffic
from .layout import LAYOUTS, even_lengths, gather, shard, shard_positions

__all__ = ["context_parallel_attention", "count_traffic", "Traffic", "shard", "gather", "shard_positions",
           "even_lengths", "LAYOUTS", "HALO_MODES", "partitions_fingerprint"]
