"""poslsh: near-linear ALiBi attention by positional locality-sensitive hashing."""

from .alibi import alibi_bias, alibi_kernel, alibi_slopes
from .hashing import Partitions, sample_partitions
from .method import MethodSpec, parse_method
from .attention import attention  # the function; the subpackage stays importable as poslsh.attention.<module>
from .attention.plan import AttentionPlan
from .flash import flash_attn_func, flash_attn_varlen_func
from . import kernels, masks, nn, theory

__version__ = "0.1.0"
__all__ = ["alibi_slopes", "alibi_kernel", "alibi_bias", "Partitions", "sample_partitions", "MethodSpec", "parse_method",
           "attention", "AttentionPlan", "flash_attn_func", "flash_attn_varlen_func", "nn", "kernels", "masks", "theory"]
