"""The transformers releases the patch supports, and the checks ``patch_model`` runs on the installed one.

Supported: transformers >=5.2,<5.26 (``TESTED_TRANSFORMERS``; tested 5.2.0 and 5.25.0; ``patch_model``
warns once outside that range and refuses below 4.54). 5.2 is the first release in which all three
families build their 4-D mask through ``masking_utils.create_causal_mask`` and its public mask registry
(masks.py). Before it, BLOOM and Falcon build the mask in the private ``_update_causal_mask`` and MPT through
``_prepare_4d_causal_attention_mask``: the n x n mask could only be avoided there by overriding a
private method.
"""

from __future__ import annotations

import warnings

# The transformers versions this patch is tested with: [TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1]),
# major.minor (pyproject.toml's hf extra says the same). 5.2 is the first release in which BLOOM, MPT
# and Falcon all build their 4-D mask through ``masking_utils.create_causal_mask``, whose public mask
# registry lets the patch build no n x n mask; earlier releases build it in private model methods.
TESTED_TRANSFORMERS = ((5, 2), (5, 26))
# Below this the attention modules returned three values (4.51); the patch refuses to run there.
MIN_TRANSFORMERS = (4, 54)
# transformers 5.2 to 5.24 (read in their source): an eager Falcon adds the ALiBi bias to its logits
# and again through the mask that already holds it; 5.25 routes eager Falcon through the attention
# registry's ``eager_attention_forward``, which adds it once.
FALCON_EAGER_BIAS_FIXED = (5, 25)


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return major, minor


def _version_text(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


_RANGE_WARNED: set = set()  # installed versions already warned about (once per process)


def _check_transformers() -> tuple[int, int]:
    """The installed transformers (major, minor); RuntimeError below MIN_TRANSFORMERS, a warning (once)
    outside TESTED_TRANSFORMERS."""
    import transformers

    version = _transformers_version()
    if version < MIN_TRANSFORMERS:
        raise RuntimeError(f"poslsh.integrations.hf needs transformers >= {_version_text(MIN_TRANSFORMERS)}, "
                           f"found {transformers.__version__}")
    low, high = TESTED_TRANSFORMERS
    if not low <= version < high and transformers.__version__ not in _RANGE_WARNED:
        _RANGE_WARNED.add(transformers.__version__)
        warnings.warn(f"poslsh.integrations.hf is tested with transformers >={_version_text(low)},<{_version_text(high)}"
                      f"; found {transformers.__version__}: the patch may fail or build a quadratic attention mask",
                      stacklevel=3)
    return version
