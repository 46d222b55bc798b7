"""Integrations of positional-LSH attention with other libraries.

* ``poslsh.integrations.hf``: run a transformers BLOOM, MPT or Falcon(alibi=True) checkpoint with
  ``poslsh.attention`` (``patch_model`` / ``unpatch_model``); needs the ``poslsh[hf]`` extra.
* ``poslsh.integrations.hf_graph``: greedy decoding of a model patched with method "window", each step
  replayed from one CUDA graph over a static window cache (``GraphedDecoder``).
* ``poslsh eval-hf``, which scores a checkpoint with the patch, is the lab's (``poslsh_lab.eval_hf``).

Nothing here is imported eagerly, so ``import poslsh`` never requires transformers.
"""

__all__ = ["hf", "hf_graph"]
