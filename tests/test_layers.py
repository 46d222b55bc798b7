"""The package's imports point down its layers: a module may import its own layer and the layers below,
never one above. Every import counts, the lazy ones inside functions too (they are edges all the same).

The layers, bottom first (a module belongs to the longest prefix listed):

=============== ==================================================================================
layer           modules
=============== ==================================================================================
0 base          checks (argument coercion), seeds (stable seeds), util (results files, environment
                record, tables, progress lines, plotting, Config -> flags, --threads, requirements)
1 core math     alibi, kernels, hashing, layer_partitions, masks, theory, method
2 attention     attention (dispatch, backends, ranges, kernels), flash (FlashAttention's interface)
3 nn            nn (ALiBiAttention), distributed (context parallelism over torch.distributed)
4 lm            lm (the small language model: data, model, train, evaluate, its CLI commands)
5 integrations  integrations (transformers patch; eval-hf scores with lm's perplexity)
6 experiments   experiments (each claim as a measurement -> JSON -> report)
7 front         cli, readme, and the package's own __init__ (its public names)
=============== ==================================================================================
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "poslsh"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("poslsh.checks", "poslsh.seeds", "poslsh.util")),
    ("core math", ("poslsh.alibi", "poslsh.kernels", "poslsh.hashing", "poslsh.layer_partitions", "poslsh.masks",
                   "poslsh.theory", "poslsh.method")),
    ("attention", ("poslsh.attention", "poslsh.flash")),
    ("nn", ("poslsh.nn", "poslsh.distributed")),
    ("lm", ("poslsh.lm",)),
    ("integrations", ("poslsh.integrations",)),
    ("experiments", ("poslsh.experiments",)),
    ("front", ("poslsh.cli", "poslsh.readme", "poslsh")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest listed prefix of ``module`` (None: not a poslsh module, or unlisted)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported poslsh module) for every import statement of ``module``, relative ones resolved;
    ``from pkg import name`` names the submodule pkg.name when there is one."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "poslsh"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "poslsh":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent)) if path.is_relative_to(PACKAGE.parent) else str(path)


def upward_edges() -> list[str]:
    bad = []
    for module in MODULES:
        own = layer_of(module)
        for line, target in sorted(set(imports_of(module))):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                bad.append(f"{_shown(MODULES[module])}:{line}: {module} ({LAYERS[own][0]}) "
                           f"imports {target} ({LAYERS[theirs][0]})")
    return bad


def test_every_module_has_a_layer():
    """A new module must be placed in the table above (so its imports are checked)."""
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_imports_point_down_the_layers():
    assert upward_edges() == []


def test_the_walker_sees_relative_lazy_and_submodule_imports():
    """The checker itself: it resolves ``from ..x import y`` inside a function and ``from .. import mod``."""
    assert layer_of("poslsh.attention.triton.launch") == 2 and layer_of("poslsh") == 7
    assert "poslsh.hashing" in [t for _, t in imports_of("poslsh.method")]  # from .hashing import ...
    lazy = [t for _, t in imports_of("poslsh.hashing")]
    assert "poslsh.kernels" in lazy  # ``from .kernels import sample_widths`` inside a function
    assert "poslsh.theory" in [t for _, t in imports_of("poslsh.experiments.attn_error")]  # from .. import theory


@pytest.mark.parametrize("target,upward", [("poslsh.lm.model", "from ..experiments import pareto"),
                                           ("poslsh.attention.window", "from ..cli import main"),
                                           ("poslsh.hashing", "import poslsh.nn")])
def test_an_upward_import_is_reported(tmp_path, monkeypatch, target, upward):
    """Written into a copy of a low module, an upward import is found (the check can fail)."""
    fake = tmp_path / "mod.py"
    fake.write_text(MODULES[target].read_text() + f"\n\ndef _late():\n    {upward}\n")
    monkeypatch.setitem(MODULES, target, fake)
    assert any(target in line for line in upward_edges())


def test_every_import_names_a_module_of_the_package():
    """A relative import one level off (``..lm`` from a subpackage of experiments) names no module: it
    would fail only when its function runs, so the walker refuses it here."""
    missing = [f"{_shown(MODULES[m])}:{line}: {target}" for m in MODULES for line, target in imports_of(m)
               if target not in MODULES]
    assert missing == []
