"""The "split" backend (lsh only): r passes of plain block-local attention on a pluggable primitive,
merged by their log-sum-exps (``backend.py``). ``primitives.py``: the primitives (sdpa, flex, any
callable), each held to its plain ``torch_attention`` in tests/test_split.py; ``merge.py``: the plain
torch merge, which the Triton merge kernel (``triton/split_merge.py``) is held to in
tests/test_split_triton_merge.py. The backend is held to the reference in tests/test_split.py.
"""

from .backend import SplitPlan, plan_split, sample_partition, split_attention, split_bytes, supports_split

__all__ = ["split_attention", "supports_split", "SplitPlan", "plan_split", "split_bytes", "sample_partition"]
