"""One description of each method's weights (``poslsh.method.MethodRule``), read by every backend:
no library module outside ``poslsh/method.py`` compares a method name, and the Triton kernels' method
ids are the table's."""

import ast
from pathlib import Path

import pytest

from poslsh.method import METHOD_OPTIONS, METHOD_RULES, METHODS, MethodSpec, method_rule, parse_method

LIBRARY = Path(__file__).resolve().parent.parent / "poslsh"
_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)


def _names_compared(tree: ast.AST):
    """(line, name) of each method name that is an operand of ==, !=, in, not in (alone, or inside a
    tuple, list or set operand)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, _COMPARISONS) for op in node.ops):
            continue
        for operand in [node.left, *node.comparators]:
            items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            for item in items:
                if isinstance(item, ast.Constant) and item.value in METHODS:
                    yield node.lineno, item.value


def test_no_method_name_compared_outside_method_module():
    found = [f"{path.relative_to(LIBRARY.parent)}:{line}: {name!r}"
             for path in sorted(LIBRARY.rglob("*.py")) if path != LIBRARY / "method.py"
             for line, name in _names_compared(ast.parse(path.read_text(), str(path)))]
    assert not found, ("method names compared outside poslsh/method.py (read the method's MethodRule: "
                       "spec.rule, method_rule(name)):\n" + "\n".join(found))


def test_the_walk_finds_every_form_of_comparison():
    code = 'a == "lsh"\n"exact" != a\na in ("window", "hybrid")\na not in ["exact"]\na == "grid"\nb = "lsh"\n'
    assert sorted(_names_compared(ast.parse(code))) == [(1, "lsh"), (2, "exact"), (3, "hybrid"), (3, "window"),
                                                        (4, "exact")]


def test_rules_describe_each_method():
    assert METHODS == tuple(METHOD_RULES) and set(METHOD_OPTIONS) == set(METHODS)
    for name, rule in METHOD_RULES.items():
        assert rule.name == name and method_rule(name) is rule and METHOD_OPTIONS[name] == rule.options
        assert MethodSpec(name).rule is rule and method_rule(MethodSpec(name)) is rule
        assert MethodSpec(name).random == rule.collisions
        assert rule.all_exact == (not rule.bounded and not rule.collisions)  # exact keeps every key
        assert rule.exact_band or rule.collisions  # every method weighs some key
        assert parse_method(name).rule is rule
    assert len({rule.kernel_id for rule in METHOD_RULES.values()}) == len(METHODS)
    with pytest.raises(ValueError, match="method must be one of"):
        method_rule("dense")
    assert method_rule("hybrid:4:cut").name == "hybrid"  # the text form
    for name, fields in (("exact", "1"), ("window", "1e-3:1"), ("lsh", "8:grid:iid:1")):
        with pytest.raises(ValueError, match="bad method"):  # one field per option, no more
            parse_method(f"{name}:{fields}")


def test_triton_kernel_ids_are_the_tables():
    pytest.importorskip("triton")
    from poslsh.attention.triton import jit

    for name, rule in METHOD_RULES.items():
        assert getattr(jit, name.upper()).value == rule.kernel_id
