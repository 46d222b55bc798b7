"""The "cudnn" backend: exact causal ALiBi with the Press slopes through cuDNN's fused SDPA graph
(``backend.py``; CUDA, float16/bfloat16, the nvidia-cudnn-frontend package). Registered on import when
the frontend finds cuDNN 9; held to an oracle in tests/test_cudnn.py (a stand-in frontend on the CPU,
cuDNN itself on a GPU) and in test_conformance.py.
"""

from .backend import (MIN_BACKEND_VERSION, clear_cache, cudnn_attention, cudnn_available, explain_cudnn,
                      lse_gradient_rows, padding_lengths, probe_error, refusal, supports_cudnn)

__all__ = ["cudnn_attention", "supports_cudnn", "explain_cudnn", "refusal", "probe_error", "cudnn_available",
           "padding_lengths", "lse_gradient_rows", "clear_cache", "MIN_BACKEND_VERSION"]
