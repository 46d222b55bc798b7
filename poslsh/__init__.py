"""poslsh: near-linear ALiBi attention by positional locality-sensitive hashing."""

from . import _aliases  # noqa: F401 - first: the old names of moved modules keep working (deprecated)
from .alibi import alibi_bias, alibi_kernel, alibi_slopes
from .hashing import Partitions, sample_partitions
from .method import MethodSpec, parse_method
from .attention import attention  # the function; the subpackage stays importable as poslsh.attention.<module>
from .attention.plan import AttentionPlan
from .flash import flash_attn_func, flash_attn_varlen_func
from . import positional_kernels, mask_errors, nn, theory

__version__ = "0.1.0"
__all__ = ["alibi_slopes", "alibi_kernel", "alibi_bias", "Partitions", "sample_partitions", "MethodSpec", "parse_method",
           "attention", "AttentionPlan", "flash_attn_func", "flash_attn_varlen_func", "nn", "positional_kernels", "mask_errors", "theory"]


def __getattr__(name: str):
    """The old attribute names of renamed modules (deprecated, see ``_aliases.MOVED``)."""
    return _aliases.old_attribute(__name__, name)
