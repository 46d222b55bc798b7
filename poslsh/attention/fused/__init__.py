"""The "fused" backend: one tiled pass of online softmax on the CPU or any device (``tiled.py``, the
engine), with each method's weights as a per-head rule (``backend.py``: band, collision counts, hybrid);
all four methods and positional kernels, trainable slopes. Held to the reference in
tests/test_attention_correctness.py and test_memory_bounds.py, and to the oracle in test_conformance.py.
"""

from .backend import (CollisionRule, GridLastRow, HybridRule, collision_rules, few_rows_attention, few_rows_log_weights,
                      fused_attention, last_row_attention, supports_fused, takes_few_rows)

__all__ = ["CollisionRule", "GridLastRow", "HybridRule", "collision_rules", "fused_attention", "few_rows_attention",
           "few_rows_log_weights", "last_row_attention", "supports_fused", "takes_few_rows"]
