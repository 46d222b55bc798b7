"""The "flex" backend: PyTorch's FlexAttention (compiled on CUDA) with each method composed from small
score and mask mods and a BlockMask built from the analytic key ranges (``backend.py``); exact, window,
lsh, hybrid. Registered on import when FlexAttention exists; held to the reference's dense weights in
tests/test_flex.py and to the oracle in test_conformance.py. ``flash.py``: the same mods on
FlashAttention-4's kernels, the "flex_fa4" backend, registered where flash-attn-4 is installed.
"""

from . import flash  # noqa: F401  (registers "flex_fa4" where FlashAttention-4 is installed)
from .backend import (alibi_score, band_mask, causal_mask, clear_cache, collision_mask, compile_ready, cut_counts,
                      flex_attention_spec, flex_available, flex_mods, grid_counts, lsh_score, normalize_grid,
                      padding_mask, range_block_mask, supports_flex, where_score)

__all__ = ["flex_attention_spec", "flex_mods", "supports_flex", "compile_ready", "range_block_mask", "flex_available",
           "alibi_score", "lsh_score", "where_score", "band_mask", "causal_mask", "padding_mask",
           "collision_mask", "grid_counts", "cut_counts", "clear_cache", "normalize_grid"]
