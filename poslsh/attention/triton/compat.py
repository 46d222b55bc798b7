"""Triton 3.6's interpreter turns a scalar into a Python int with ``int(ndarray)``, which NumPy >= 2.4
refuses for its shape-(1,) scalars (loop bounds fail with "only 0-dimensional arrays can be
converted"). ``patch_interpreter`` patches that one conversion; it is applied only under
TRITON_INTERPRET=1."""

from __future__ import annotations


def patch_interpreter() -> None:
    try:
        import triton.runtime.interpreter as interp
    except ImportError:  # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_poslsh_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._poslsh_patched = True
    interp._patch_lang_tensor = patched
