"""The Triton kernel package loaded under TRITON_INTERPRET=1 (its kernels then run on the CPU), for the
test modules that exercise the kernels without a GPU. Import this before anything of Triton's is used."""

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

MODULES = ["poslsh.attention.triton.jit", "poslsh.attention.triton.forward", "poslsh.attention.triton.backward",
           "poslsh.attention.triton.launch", "poslsh.attention.triton"]


def load_interpreted():
    """The package's modules, (re)imported so that their kernels are interpreted; returns ``launch``."""
    mods = [importlib.reload(sys.modules[n]) if n in sys.modules else importlib.import_module(n) for n in MODULES]
    return mods[3]
