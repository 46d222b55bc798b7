"""The split into the library ``poslsh`` and the lab ``poslsh_lab``: ``import poslsh`` (every library
module) needs no matplotlib and no lab; the old module names keep working, with a DeprecationWarning,
as the moved modules themselves. The attention backends moved into folders: the old module names that
are folders now export what the modules did, the others are aliases."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from test_layers import LIBRARY_LAYERS, MODULES, layer_of

ROOT = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: a finder refuses matplotlib (and records the attempt), then every library
# module is imported. A module whose optional dependency (transformers, a GPU library) is missing is
# skipped; one that asked for matplotlib is a failure however it handled the refusal.
_PROBE = """
import importlib, json, sys
asked = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            asked.append(name)
            raise ImportError("matplotlib is blocked")
sys.meta_path.insert(0, Refuse())
import poslsh
skipped = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except ImportError as err:
        skipped[name] = str(err)
print(json.dumps({"asked": asked, "skipped": skipped,
                  "lab": sorted(m for m in sys.modules if m.split(".")[0] == "poslsh_lab")}))
"""

LIBRARY = sorted(m for m in MODULES if layer_of(m) < LIBRARY_LAYERS and m != "poslsh._aliases")

OLD_NAMES = [("poslsh.lm", "poslsh_lab.lm"), ("poslsh.lm.model", "poslsh_lab.lm.model"),
             ("poslsh.experiments.pareto", "poslsh_lab.experiments.pareto"), ("poslsh.readme", "poslsh_lab.readme"),
             ("poslsh.cli", "poslsh_lab.cli"), ("poslsh.util", "poslsh_lab.util"),
             ("poslsh.integrations.cli", "poslsh_lab.eval_hf"), ("poslsh.kernels", "poslsh.positional_kernels"),
             ("poslsh.masks", "poslsh.mask_errors"), ("poslsh.attention.tiled", "poslsh.attention.fused.tiled"),
             ("poslsh.attention.primitives", "poslsh.attention.split.primitives"),
             ("poslsh.attention.split_merge", "poslsh.attention.split.merge")]

# Old attention modules that are backend folders now (their module is the folder's backend.py).
BACKEND_FOLDERS = ("reference", "fused", "flex", "split", "cudnn")


def test_the_library_imports_without_matplotlib_or_the_lab():
    import json
    out = subprocess.run([sys.executable, "-c", _PROBE, *LIBRARY], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    found = json.loads(out.splitlines()[-1])
    assert found["asked"] == [] and found["lab"] == []
    assert not any("matplotlib" in why for why in found["skipped"].values()), found["skipped"]
    assert "poslsh.attention.triton.launch" not in found["skipped"]  # the probe did import modules


def test_the_probe_can_fail():
    """An import of matplotlib after ``import poslsh`` is refused and recorded (the probe can see one)."""
    import json
    probe = _PROBE.replace("skipped = {}\n", "skipped = {}\ntry:\n    import matplotlib.pyplot\nexcept ImportError:\n    pass\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1])["asked"] == ["matplotlib"]


@pytest.mark.parametrize("old,new", OLD_NAMES)
def test_an_old_module_name_is_the_moved_module(monkeypatch, old, new):
    """``import poslsh.lm.model`` warns and gives the very module ``poslsh_lab.lm.model`` (same classes)."""
    moved = importlib.import_module(new)
    for name in list(sys.modules):
        if name == old or name.startswith(old + "."):
            monkeypatch.delitem(sys.modules, name)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}") as record:
        alias = importlib.import_module(old)
    assert alias is moved
    assert record[-1].filename == __file__  # the warning names the line that used the old name
    assert moved.__spec__.name == new  # its own spec still (relative imports resolve against its parent)


def test_the_old_attributes_warn(monkeypatch):
    import poslsh
    monkeypatch.delattr(poslsh, "kernels", raising=False)  # set by an earlier ``import poslsh.kernels``
    monkeypatch.delitem(sys.modules, "poslsh.kernels", raising=False)
    with pytest.warns(DeprecationWarning) as record:
        assert poslsh.kernels is importlib.import_module("poslsh.positional_kernels")
    assert record[-1].filename == __file__
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        poslsh.nonexistent  # noqa: B018


def test_python_m_with_an_old_name_runs_the_new_module():
    out = subprocess.run([sys.executable, "-m", "poslsh.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True)
    new = subprocess.run([sys.executable, "-m", "poslsh_lab.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == new.returncode == 0 and out.stdout == new.stdout and out.stdout.strip()
    assert "moved to poslsh_lab.cli" in out.stderr and "moved" not in new.stderr


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for _, new in OLD_NAMES:
            importlib.import_module(new)


@pytest.mark.parametrize("folder", BACKEND_FOLDERS)
def test_a_backend_folder_exports_what_its_old_module_did(folder):
    """``from poslsh.attention.fused import fused_attention`` works as before, without a warning: the
    folder's __init__ exports every public name of its backend module, the same objects."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        package = importlib.import_module(f"poslsh.attention.{folder}")
        backend = importlib.import_module(f"poslsh.attention.{folder}.backend")
    assert sorted(package.__all__) == sorted(backend.__all__)
    assert [name for name in backend.__all__ if getattr(package, name) is not getattr(backend, name)] == []


_MOVED_MERGE_PROBE = """
import importlib, json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from poslsh.attention.split_merge import merge_slots_into, merge_slots_torch, merge_slots_triton
kernel = importlib.import_module("poslsh.attention.triton.split_merge")
plain = importlib.import_module("poslsh.attention.split.merge")
try:
    plain.nonexistent
    missing = None
except AttributeError as err:
    missing = str(err)
print(json.dumps({"kernel": merge_slots_triton is kernel.merge_slots_triton and merge_slots_into is kernel.merge_slots_into,
                  "plain": merge_slots_torch is plain.merge_slots_torch, "missing": missing,
                  "warnings": [str(w.message) for w in caught if w.category is DeprecationWarning]}))
"""


def test_the_old_split_merge_names_reach_the_triton_merge():
    """``poslsh.attention.split_merge.merge_slots_triton``: the kernel's function in its new module,
    ``triton/split_merge.py``, with a warning naming it (a fresh interpreter: importing the Triton package
    here would decorate its kernels for a GPU before the interpreted tests ask for the interpreter)."""
    pytest.importorskip("triton")
    import json
    out = subprocess.run([sys.executable, "-c", _MOVED_MERGE_PROBE], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    found = json.loads(out.splitlines()[-1])
    assert found["kernel"] and found["plain"]
    assert "has no attribute 'nonexistent'" in found["missing"]
    assert any("poslsh.attention.split_merge moved to poslsh.attention.split.merge" in w for w in found["warnings"])
    for name in ("merge_slots_triton", "merge_slots_into"):
        assert any(f"{name} moved to poslsh.attention.triton.split_merge.{name}" in w for w in found["warnings"])
