"""Integrations of positional-LSH attention with other libraries.

* ``poslsh.integrations.hf``: run a transformers BLOOM, MPT or Falcon(alibi=True) checkpoint with
  ``poslsh.attention`` (``patch_model`` / ``unpatch_model``); needs the ``poslsh[hf]`` extra.
* ``poslsh.integrations.cli``: the ``poslsh eval-hf`` subcommand.

Nothing here is imported eagerly, so ``import poslsh`` never requires transformers.
"""

__all__ = ["hf"]
