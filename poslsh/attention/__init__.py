"""ALiBi attention, exact, windowed or estimated by positional LSH, behind one dispatcher.

``attention(q, k, v, method=..., backend=...)`` (``public``) is the entry point; see ``dispatch`` for the backend
registry (``register_backend``) and ``core`` for the conventions every backend follows.

Note: ``poslsh/__init__.py`` exports the *function* as ``poslsh.attention``, which hides this
package behind the attribute of the same name. Import its modules with ``from poslsh.attention
import dispatch`` or ``from poslsh.attention.dispatch import register_backend`` (both work);
``import poslsh.attention.dispatch as d`` does not.
"""

from .core import EMPTY_LSE, METHODS, AttentionSpec
from .dispatch import BACKENDS, Backend, available_backends, register_backend, resolve_spec, select_backend
from .public import attention
from .window import window_sizes

__all__ = ["attention", "AttentionSpec", "Backend", "BACKENDS", "register_backend", "available_backends",
           "resolve_spec", "select_backend", "window_sizes", "EMPTY_LSE", "METHODS"]
