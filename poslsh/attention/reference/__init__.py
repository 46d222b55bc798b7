"""The "reference" backend: the dense O(Nq * Nk) definition of every method (exact, window, lsh,
hybrid; general positional kernels too), any dtype, float64 included (``backend.py``). It is the plain
version every fast backend is checked against (tests/test_attention_correctness.py, test_split.py,
test_flex.py, test_triton_interpret.py); it is itself held to test_conformance.py's independent oracle.
"""

from .backend import dense_attention, dense_log_weights, reference_attention, supports_reference

__all__ = ["dense_attention", "dense_log_weights", "reference_attention", "supports_reference"]
