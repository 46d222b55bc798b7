"""The repository's imports point down its layers: a module may import its own layer and the layers
below, never one above. Every import counts, the lazy ones inside functions too (they are edges all the
same). Two packages: the installed library ``poslsh`` (layers 0-7) and the lab ``poslsh_lab`` above it
(layers 8-11), which uses the library as any user does; the library never imports the lab.

The layers, bottom first (a module belongs to the longest prefix listed):

=============== ==================================================================================
layer           modules
=============== ==================================================================================
0 base          poslsh.checks (argument coercion), poslsh.cache_keys (tensor identity + version), poslsh.seeds (stable seeds), poslsh._aliases (the
                old module names, deprecated; it imports nothing, and names the lab only as strings)
1 core math     alibi, positional_kernels, hashing, layer_partitions, mask_errors, theory, method
2 attention     what every attention backend shares: attention.core (AttentionSpec, conventions),
  base          .registry (register_backend), .speed (measured order), .rent (builds per shape), .ranges,
                .window
3 attention     one folder per backend: attention.reference, .fused, .flex, .split, .cudnn, .triton
  backends      (a backend may use another's pieces: split's flex primitive, its Triton merge)
4 attention     the dispatcher and the entry points: attention.dispatch, .plan, .public, the package's
  front         __init__; flash (FlashAttention's interface)
5 nn            nn (ALiBiAttention), distributed (context parallelism over torch.distributed)
6 integrations  integrations (the transformers patch)
7 library front poslsh's own __init__ (its public names)
8 lab base      poslsh_lab.util (results files, environment record, tables, plotting, Config -> flags)
9 lm            poslsh_lab.lm (the small language model: data, model, train, evaluate, its commands)
10 experiments  poslsh_lab.experiments (each claim as a measurement -> JSON -> report)
11 lab front    poslsh_lab.cli, poslsh_lab.eval_hf, poslsh_lab.readme, poslsh_lab.host_stub, poslsh_lab's __init__
=============== ==================================================================================
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("poslsh", "poslsh_lab")

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("poslsh.checks", "poslsh.seeds", "poslsh._aliases", "poslsh.cache_keys")),
    ("core math", ("poslsh.alibi", "poslsh.positional_kernels", "poslsh.hashing", "poslsh.layer_partitions",
                   "poslsh.mask_errors", "poslsh.theory", "poslsh.method")),
    ("attention base", ("poslsh.attention.core", "poslsh.attention.registry", "poslsh.attention.speed",
                        "poslsh.attention.rent", "poslsh.attention.ranges", "poslsh.attention.window")),
    ("attention backends", ("poslsh.attention.reference", "poslsh.attention.fused", "poslsh.attention.flex",
                            "poslsh.attention.split", "poslsh.attention.cudnn", "poslsh.attention.triton")),
    ("attention front", ("poslsh.attention", "poslsh.attention.dispatch", "poslsh.attention.plan",
                         "poslsh.attention.public_plans", "poslsh.attention.public", "poslsh.flash")),
    ("nn", ("poslsh.nn", "poslsh.distributed")),
    ("integrations", ("poslsh.integrations",)),
    ("library front", ("poslsh",)),
    ("lab base", ("poslsh_lab.util",)),
    ("lm", ("poslsh_lab.lm",)),
    ("experiments", ("poslsh_lab.experiments",)),
    ("lab front", ("poslsh_lab.cli", "poslsh_lab.eval_hf", "poslsh_lab.readme", "poslsh_lab.host_stub", "poslsh_lab")),
]
LIBRARY_LAYERS = 8  # LAYERS[:8] is the installed library

# The one library module allowed to name the lab: it serves the old names (poslsh.<lm, cli, ...>)
# of the modules that moved there, by import hook, so old code keeps working for a deprecation period.
ALIASES = ("poslsh._aliases",)

# Import cycles known today (each a set of modules that import each other, lazy imports included): none
# since the registry left the dispatcher (dispatch -> split -> primitives -> flex -> dispatch, issue 24).
# A new cycle fails test_no_new_import_cycle.
KNOWN_CYCLES: list[frozenset[str]] = []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest listed prefix of ``module`` (None: not ours, or unlisted)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported module of ours) for every import statement of ``module``, relative ones resolved;
    ``from pkg import name`` names the submodule pkg.name when there is one."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


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


def import_cycles(graph: dict[str, set[str]] | None = None) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (or a module importing itself) of the
    import graph (Tarjan's algorithm, iterative), each a set of modules, sorted."""
    if graph is None:
        graph = {m: {t for _, t in imports_of(m) if t in MODULES} for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph.get(node, ()):
                        found.append(frozenset(component))
    return sorted(found, key=sorted)


def test_every_module_has_a_layer():
    """A new module must be placed in the table above (so its imports are checked)."""
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_every_attention_module_is_named_in_the_table():
    """A module or folder directly under poslsh.attention is a shared piece or a backend named in its row
    (the "poslsh.attention" prefix would otherwise take a new loose module into the front silently)."""
    named = {p for _, prefixes in LAYERS for p in prefixes}
    top = {".".join(m.split(".")[:3]) for m in MODULES if m.startswith("poslsh.attention.")}
    assert sorted(top - named) == []


def test_a_loose_attention_module_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "loose.py"
    fake.write_text("")
    monkeypatch.setitem(MODULES, "poslsh.attention.loose", fake)
    with pytest.raises(AssertionError):
        test_every_attention_module_is_named_in_the_table()


def test_the_library_is_below_the_lab():
    assert all(p.startswith("poslsh.") or p == "poslsh" for _, ps in LAYERS[:LIBRARY_LAYERS] for p in ps)
    assert all(p.startswith("poslsh_lab") for _, ps in LAYERS[LIBRARY_LAYERS:] for p in ps)


def test_imports_point_down_the_layers():
    assert upward_edges() == []


def _names_the_lab(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "poslsh_lab" for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return not node.level and (node.module or "").split(".")[0] == "poslsh_lab"
    # a module name handed to importlib.import_module, __import__, runpy, ...
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and (
        node.value == "poslsh_lab" or node.value.startswith("poslsh_lab."))


def test_no_library_module_imports_the_lab():
    """Statically or by name: only the deprecated aliases name the lab (``import poslsh`` never needs it)."""
    bad = [f"{_shown(MODULES[m])}:{node.lineno}" for m in MODULES if layer_of(m) < LIBRARY_LAYERS
           and m not in ALIASES for node in ast.walk(ast.parse(MODULES[m].read_text())) if _names_the_lab(node)]
    assert bad == []


def test_no_new_import_cycle():
    assert import_cycles() == sorted(KNOWN_CYCLES, key=sorted)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert import_cycles(graph) == [frozenset("abc"), frozenset("e")]


def test_the_walker_sees_relative_lazy_and_submodule_imports():
    """The checker itself: it resolves ``from ..x import y`` inside a function and ``from .. import mod``."""
    assert layer_of("poslsh.attention.triton.launch") == 3 and layer_of("poslsh") == 7
    assert layer_of("poslsh_lab") == 11 and layer_of("poslsh_lab.experiments.pareto.measure") == 10
    assert "poslsh.hashing" in [t for _, t in imports_of("poslsh.method")]  # from .hashing import ...
    lazy = [t for _, t in imports_of("poslsh.hashing")]
    assert "poslsh.positional_kernels" in lazy  # ``from .positional_kernels import sample_widths`` in a function
    assert "poslsh.theory" in [t for _, t in imports_of("poslsh_lab.experiments.attn_error.measure")]  # from poslsh import theory


@pytest.mark.parametrize("target,upward", [("poslsh_lab.lm.model", "from ..experiments import pareto"),
                                           ("poslsh.attention.window", "from poslsh_lab.cli import main"),
                                           ("poslsh.attention.window", "from .fused import fused_attention"),
                                           ("poslsh.attention.fused.backend", "from ..dispatch import resolve_spec"),
                                           ("poslsh.attention.triton.launch", "from ..plan import AttentionPlan"),
                                           ("poslsh.hashing", "import poslsh.nn"),
                                           ("poslsh.nn", "import poslsh_lab.util")])
def test_an_upward_import_is_reported(tmp_path, monkeypatch, target, upward):
    """Written into a copy of a low module, an upward import is found (the check can fail)."""
    fake = tmp_path / "mod.py"
    fake.write_text(MODULES[target].read_text() + f"\n\ndef _late():\n    {upward}\n")
    monkeypatch.setitem(MODULES, target, fake)
    assert any(target in line for line in upward_edges())


def test_a_library_module_naming_the_lab_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "mod.py"
    fake.write_text(MODULES["poslsh.nn"].read_text() + "\n\nLATER = 'poslsh_lab.readme'\n")
    monkeypatch.setitem(MODULES, "poslsh.nn", fake)
    with pytest.raises(AssertionError):
        test_no_library_module_imports_the_lab()


def test_every_import_names_a_module_of_the_package():
    """A relative import one level off (``..lm`` from a subpackage of experiments) names no module: it
    would fail only when its function runs, so the walker refuses it here."""
    missing = [f"{_shown(MODULES[m])}:{line}: {target}" for m in MODULES for line, target in imports_of(m)
               if target not in MODULES]
    assert missing == []
