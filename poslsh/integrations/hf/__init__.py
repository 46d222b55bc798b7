"""Run a transformers ALiBi checkpoint (BLOOM, MPT, Falcon with ``alibi=True``) with ``poslsh.attention``.

    from transformers import AutoModelForCausalLM
    from poslsh.integrations.hf import patch_model
    model = AutoModelForCausalLM.from_pretrained("path/to/bloom", dtype=torch.bfloat16)
    with patch_model(model, method="lsh", samples=8, scheme="grid", seed=0):
        out = model.generate(**inputs, max_new_tokens=50)

Every method and option of ``poslsh.attention`` is accepted ("exact", the default, "window",
"lsh", "hybrid"; ``sampling`` iid/stratified/qmc, ``window_eps``, ``hybrid_eps``), validated once
as a ``poslsh.method.MethodSpec``.

How it works. ``patch_model`` replaces the ``forward`` of every attention module (as an instance
attribute, so ``unpatch_model`` simply deletes it) by one that uses the module's own projection
weights and the model's own KV cache, but computes attention with ``poslsh.attention``. The 2-D
``attention_mask`` the user passes is captured by a pre-hook on the base model. No transformers
source is copied; the query/key/value layouts are those the checkpoints define.

Where each part lives (read them in this order: each file imports only files listed before it):

* ``versions.py``: the transformers releases the patch supports, and their checks;
* ``cache.py``: the model's KV cache: finding it among a forward's arguments, appending in place
  (``InPlaceLayer``), dropping an evicted prefix, and why static caches are refused;
* ``models.py``: BLOOM, MPT and Falcon: family, ALiBi slopes and scale, head counts, each family's
  attention forward (its QKV layout) and why a forward of our own is the hook;
* ``masks.py``: the 2-D mask captured by a pre-hook, and the 4-D mask answered through transformers'
  mask registry without building an n x n tensor;
* ``prefill.py``: ``chunked_prefill``, a prompt fed C tokens at a time against the cache;
* ``patch.py``: ``PoslshPatch`` (positions under padding, fixed partitions, eviction, ``cache_report``),
  ``patch_model`` and ``unpatch_model``.

Nothing here imports transformers at import time (each part imports it where it is used), so ``import
poslsh`` never needs it.
"""

from __future__ import annotations

from ...attention.plan import HYBRID_WIDTH_N
from ...layer_partitions import CUT_CHUNK
from .models import SUPPORTED_FAMILIES, model_family, model_slopes
from .patch import PoslshPatch, cache_report, patch_model, unpatch_model
from .prefill import chunked_prefill
from .versions import FALCON_EAGER_BIAS_FIXED, MIN_TRANSFORMERS, TESTED_TRANSFORMERS

__all__ = ["patch_model", "unpatch_model", "PoslshPatch", "cache_report", "chunked_prefill", "model_family", "model_slopes",
           "CUT_CHUNK", "SUPPORTED_FAMILIES", "HYBRID_WIDTH_N", "TESTED_TRANSFORMERS", "MIN_TRANSFORMERS",
           "FALCON_EAGER_BIAS_FIXED"]
