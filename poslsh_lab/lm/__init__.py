"""A small ALiBi language model trained here, to validate positional-LSH attention on real text.

* ``data``: corpus from local text files (default: this interpreter's ``.py`` files), byte tokenizer,
  unigram baseline.
* ``model``: pre-LN decoder-only transformer on ``poslsh.nn.ALiBiAttention``; ``set_attention`` (a
  ``poslsh.method.MethodSpec``, or a method name and options) switches every layer's method.
* ``train``: AdamW, warmup + cosine, bf16 autocast on CUDA, safetensors checkpoints.
* ``evaluate``: sliding-window perplexity, time per token, per-layer attention error.
* ``cli``: ``poslsh lm train`` and ``poslsh lm eval``.
"""

from .data import ByteTokenizer, build_corpus, unigram_baseline
from .model import ALiBiLM, LMConfig, load_checkpoint, save_checkpoint

__all__ = ["ByteTokenizer", "build_corpus", "unigram_baseline", "ALiBiLM", "LMConfig", "load_checkpoint",
           "save_checkpoint"]
