"""The old names of modules that moved, kept working for a while with a DeprecationWarning.

The lab (experiments, the small LM, the README generator, the command line, its helpers) moved out of
the installed library into the ``poslsh_lab`` package, two library modules were renamed for what
they hold, and three attention modules moved into their backend's folder. ``import poslsh.lm.model`` (any old name, submodules included) gives the moved module
itself, the same object as ``import poslsh_lab.lm.model`` (so classes, monkeypatching and pickling
agree), and ``python -m poslsh.readme`` / ``python -m poslsh.cli`` run the new module. Nothing here
imports the lab until an old name is asked for, so ``import poslsh`` does not need it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old name (a prefix: its submodules follow) -> new name
MOVED = {
    "poslsh.experiments": "poslsh_lab.experiments",
    "poslsh.lm": "poslsh_lab.lm",
    "poslsh.util": "poslsh_lab.util",
    "poslsh.readme": "poslsh_lab.readme",
    "poslsh.cli": "poslsh_lab.cli",
    "poslsh.integrations.cli": "poslsh_lab.eval_hf",
    "poslsh.kernels": "poslsh.positional_kernels",
    "poslsh.masks": "poslsh.mask_errors",
    # attention backends, each now in its own folder (poslsh.attention.fused, .flex, .split, .cudnn and
    # .reference are those folders, whose __init__ exports what the module of that name did)
    "poslsh.attention.tiled": "poslsh.attention.fused.tiled",
    "poslsh.attention.primitives": "poslsh.attention.split.primitives",
    "poslsh.attention.split_merge": "poslsh.attention.split.merge",
}


def new_name(name: str) -> str | None:
    """The module an old name now is (None: not an old name)."""
    best = max((old for old in MOVED if name == old or name.startswith(old + ".")), key=len, default=None)
    return None if best is None else MOVED[best] + name[len(best):]


def _warn(old: str, new: str) -> None:
    """The warning points at the import that used the old name (past the import machinery and this
    module), so Python's default filters show it for a script's own imports."""
    def machinery(frame) -> bool:
        name = frame.f_globals.get("__name__", "")
        return name.split(".")[0] == "importlib" or name in (__name__, __package__)

    def uncounted(frame) -> bool:  # frames warnings.warn itself skips when it counts stacklevel
        return "importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename

    level, frame = 1, sys._getframe(0)
    while frame is not None and machinery(frame):
        frame = frame.f_back
        while frame is not None and uncounted(frame):
            frame = frame.f_back
        level += 1
    warnings.warn(f"{old} moved to {new}; the old name will be removed", DeprecationWarning, stacklevel=level)


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the new module (one module object under both names)."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, self, is_package=False)
        spec.loader_state = new
        return spec

    def create_module(self, spec):
        _warn(spec.name, spec.loader_state)
        module = importlib.import_module(spec.loader_state)
        spec.moved_spec = module.__spec__  # the import system now sets spec as the module's __spec__
        return module

    def exec_module(self, module):
        # The new module ran when it was imported; give it back its own spec, which its relative imports resolve
        # against (under the old one they went through this alias; Python 3.13 warns "__package__ !=
        # __spec__.parent").
        module.__spec__ = module.__spec__.moved_spec

    def get_code(self, fullname):
        """``python -m OLD``: runs the new module as __main__."""
        new = new_name(fullname)
        return compile(f"import runpy, warnings\n"
                       f"warnings.warn({fullname!r} + ' moved to ' + {new!r} + ': run python -m ' + {new!r}, "
                       f"DeprecationWarning)\n"
                       f"runpy.run_module({new!r}, run_name='__main__', alter_sys=True)\n", f"<{fullname}>", "exec")

    def is_package(self, fullname):
        return False


def old_attribute(package: str, name: str):
    """``poslsh.kernels`` as an attribute (the package's ``__getattr__``): the renamed module, with a warning."""
    if new_name(f"{package}.{name}") is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return importlib.import_module(f"{package}.{name}")


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())  # before the path finder: an old name never loads a second copy
