"""The README's results are generated from the committed JSON, never typed by hand."""

from poslsh import readme


def test_readme_results_match_committed_json():
    current = (readme.ROOT / "README.md").read_text()
    assert readme.updated(current) == current, "README.md is out of date: run python3 -m poslsh.readme"


def _readme_commands() -> list[str]:
    lines = (readme.ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    return [line.split("  #")[0].strip() for line in block]


def test_readme_starts_with_the_two_commands():
    """Both commands make and use a virtual environment in the checkout (many systems refuse a global
    pip install), the first runs the demo, the second the tests."""
    demo, tests = _readme_commands()
    for command in (demo, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e "), command
    assert demo.endswith(".venv/bin/poslsh demo") and '".[demo]"' in demo
    assert tests.endswith(".venv/bin/python -m pytest -q") and '".[test]"' in tests


def test_ci_runs_the_readme_test_command_exactly():
    """CI sees what a fresh machine sees: .ci/run's one command is the README's second, character for
    character, after its shell preamble (comments, set -euo pipefail, cd to the checkout)."""
    ci = [line.strip() for line in (readme.ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."'], commands
    assert commands[2:] == [_readme_commands()[1]], commands


def test_readme_usage_example_runs():
    """The README's first Python example is executed as written (shapes and dtypes checked)."""
    import re

    text = (readme.ROOT / "README.md").read_text()
    scope: dict = {}
    exec(re.findall(r"```python\n(.*?)```", text, re.S)[0], scope)
    assert scope["out"].shape == scope["q"].shape and scope["lse"].shape == scope["q"].shape[:3]
    assert (scope["out"] - scope["ref"]).norm() > 0 and (scope["win"] - scope["ref"]).norm() < (scope["out"] - scope["ref"]).norm()
