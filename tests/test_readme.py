"""The README's results are generated from the committed JSON, never typed by hand."""

from poslsh import readme


def test_readme_results_match_committed_json():
    current = (readme.ROOT / "README.md").read_text()
    assert readme.updated(current) == current, "README.md is out of date: run python3 -m poslsh.readme"


def test_readme_starts_with_the_two_commands():
    lines = (readme.ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1: lines.index("```")]
    assert len(block) == 2 and "poslsh demo" in block[0] and "pytest" in block[1]
    ci = (readme.ROOT / ".ci" / "run").read_text()
    assert block[1].split("#")[0].strip() in ci


def test_readme_usage_example_runs():
    """The README's first Python example is executed as written (shapes and dtypes checked)."""
    import re

    text = (readme.ROOT / "README.md").read_text()
    scope: dict = {}
    exec(re.findall(r"```python\n(.*?)```", text, re.S)[0], scope)
    assert scope["out"].shape == scope["q"].shape and scope["lse"].shape == scope["q"].shape[:3]
    assert (scope["out"] - scope["ref"]).norm() > 0 and (scope["win"] - scope["ref"]).norm() < (scope["out"] - scope["ref"]).norm()
