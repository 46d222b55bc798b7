"""The README and docs/RESULTS.md are generated from the committed JSON, never typed by hand; the README's
commands are the ones CI runs, and its first example runs as written."""

import re

from poslsh_lab import readme


def test_readme_results_match_committed_json():
    current = (readme.ROOT / "README.md").read_text()
    assert readme.updated(current) == current, "README.md is out of date: run python3 -m poslsh_lab.readme"


def test_results_page_matches_committed_json():
    assert readme.RESULTS_MD.read_text() == readme.render_results(), \
        "docs/RESULTS.md is out of date: run python3 -m poslsh_lab.readme"
    assert readme.main(["--check"]) == 0


def test_results_speak_plain_words():
    """No issue numbers, no raw target keys, one unit (bits per byte) for language models."""
    for path in (readme.README, readme.RESULTS_MD):
        text = path.read_text()
        assert not re.search(r"\bissues?\s*#?\d|#\d", text, re.I), path
        assert "fwd_256K" not in text and "floor_fraction" not in text and "nats" not in text, path
    headings = re.findall(r"^## (.*)$", readme.RESULTS_MD.read_text(), re.M)
    assert headings == [s.heading for s in readme.SECTIONS if (readme.RESULTS / s.path).exists()]
    assert all("json" not in h for h in headings)


def test_every_results_link_resolves():
    for path in (readme.README, readme.RESULTS_MD):
        for target in re.findall(r"\]\(([^)#]+)\)", path.read_text()):
            if not target.startswith("http"):
                assert (path.parent / target).exists(), (path.name, target)


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
    assert tests.endswith(".venv/bin/python -m pytest -q -n auto --dist loadfile") and '".[test]"' in tests


def test_ci_runs_the_readme_test_command_exactly():
    """CI sees what a fresh machine sees: .ci/run's one command is the README's second, character for
    character, after its shell preamble (comments, set -euo pipefail, cd to the checkout)."""
    ci = [line.strip() for line in (readme.ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[:2] == ["set -euo pipefail", 'cd "$(dirname "$0")/.."'], commands
    assert commands[2:] == [_readme_commands()[1]], commands


def test_readme_usage_example_runs():
    """The README's first Python example is executed as written (shapes, dtypes, and what it claims:
    the window is closer to exact than LSH, the FlashAttention call agrees with poslsh.attention)."""
    import torch

    import poslsh

    text = (readme.ROOT / "README.md").read_text()
    scope: dict = {}
    exec(re.findall(r"```python\n(.*?)```", text, re.S)[0], scope)
    q, ref, win, out, hyb, fa = (scope[k] for k in ("q", "ref", "win", "out", "hyb", "fa"))
    assert out.shape == q.shape and scope["lse"].shape == q.shape[:3] and fa.shape == q.transpose(1, 2).shape
    assert 0 < (win - ref).norm() < (hyb - ref).norm() < (out - ref).norm()
    widths = torch.tensor([64, 64, 128, 128, 256, 256, 512, 512])
    from poslsh.attention.public import attention_with_widths

    k, v = scope["k"], scope["v"]
    torch.testing.assert_close(fa.transpose(1, 2), attention_with_widths(q, k, v, widths, slopes=poslsh.alibi_slopes(8)))
    assert isinstance(scope["layer"], poslsh.nn.ALiBiAttention)


def test_the_checkout_is_a_parameter(tmp_path, monkeypatch):
    """--root names the checkout (its README, docs/RESULTS.md and bench/results); the default is the
    checkout poslsh runs from, whatever the current folder."""
    import shutil

    from poslsh_lab.util import checkout_root, committed_results_dir

    home = readme.ROOT
    assert checkout_root() == home and committed_results_dir() == home / "bench" / "results"
    copy = tmp_path / "clone"
    shutil.copytree(home / "bench" / "results", copy / "bench" / "results")
    (copy / "docs").mkdir()
    shutil.copy(home / "README.md", copy / "README.md")
    shutil.copy(home / "docs" / "RESULTS.md", copy / "docs" / "RESULTS.md")
    monkeypatch.chdir(tmp_path)
    try:
        assert readme.main(["--check", "--root", str(copy)]) == 0
        (copy / "docs" / "RESULTS.md").write_text("stale\n")
        assert readme.main(["--check", "--root", str(copy)]) == 1  # it read the copy, not the checkout
    finally:
        readme.use_root(home)
    assert readme.main(["--check"]) == 0


def test_method_advice_is_computed_from_the_pareto_run():
    """The advice said the hybrid "beats the window at equal time" at coarse accuracy while the committed
    256K run says otherwise (hybrid eps 0.1: 6.22 ms, error 0.232; window eps 1e-2: 5.75 ms, 0.050). It is
    generated now: a point that does beat the window is named, and without one none is claimed."""
    import copy

    from poslsh_lab.experiments.pareto import alibi_panels, comparison

    doc = readme._committed(readme.README_TABLE)
    advice = readme.readme_advice(doc)
    panel = alibi_panels(doc["results"])[0]
    assert not comparison(panel, "seconds")[1] and "no LSH or hybrid point is as accurate as the window" in advice
    assert "beats the window" not in (readme.ROOT / "README.md").read_text()
    better = copy.deepcopy(doc)
    fast = {"method": "hybrid", "sampling": "qmc", "samples": 8, "hybrid_eps": 0.5, "error": 0.01, "errors": [0.01],
            "seconds": 4.5e-3, "timing": "test", "pairs": 100.0, "backend": "triton"}
    alibi_panels(better["results"])[0]["points"].append(fast)
    changed = readme.readme_advice(better)
    assert "at equal time, hybrid qmc r=8 eps=0.5 is at least as accurate as the window" in changed
    assert "At equal time hybrid qmc r=8 eps=0.5 is at least as accurate as the window" in changed


def test_in_short_is_short_sentences_with_units():
    """It was one run-on paragraph with an arm "(b)" never defined and "0.0174 us" without a unit on the
    number beside it."""
    summary = readme.readme_summary()
    bullets = [line for line in summary.splitlines() if line.startswith("* ")]
    assert len(bullets) >= 5 and all(b.endswith(".") for b in bullets), bullets
    assert "(b)" not in summary and " us " not in summary
    for number in re.findall(r"\d[\d.]*(?= µs)|\d[\d.]*(?= \(the window)", summary):
        assert f"{number} µs" in summary, number


def test_readme_plan_example_runs():
    """The README's decoding example (its second Python block) runs as written on the first block's
    tensors (made small here) and gives what poslsh.attention gives for the same method."""
    import torch

    import poslsh

    text = (readme.ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    assert "AttentionPlan" in block
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 300, 64, generator=gen)
    k, v = torch.randn(2, 2, 300, 64, generator=gen), torch.randn(2, 2, 300, 64, generator=gen)
    scope: dict = {"torch": torch, "poslsh": poslsh, "q": q, "k": k, "v": v}
    exec(block, scope)
    expected = poslsh.attention(q[:, :, -1:], k, v, method="window:1e-3", backend="reference")
    torch.testing.assert_close(scope["out"], expected)


def test_an_older_headline_says_what_the_same_call_takes_now(tmp_path):
    """The headline table was an H200 run of 2026-12-01 whose window (6.92 ms at 256K) predated the kernels of
    2026-12-07 (5.62 ms on an H100): the README said nothing of it. Under such a headline the newer run's numbers,
    card and date are read from its JSON; a headline as new as that run (today's, 2026-12-08) gets no such
    sentence, and the README holds none."""
    import copy
    import json

    older = readme._committed("pareto_h200_256k/pareto.json")
    path = readme.RESULTS / readme.LATEST_WINDOW
    doc = json.loads(path.read_text())
    line = readme.newer_window_line(older, path)
    rows = {(r["column"], r["pass"]): r["ms"] for r in doc["results"]["rows"] if r["n"] == 262144 and r.get("ms")}
    for number in (rows[("triton", "fwd")], rows[("triton", "fwd+bwd")], rows[("flex", "fwd")]):
        assert f"{number:.3g} ms" in line or f"{number:.3g} and" in line, (number, line)
    assert doc["environment"]["device"] in line and doc["environment"]["date"][:10] in line
    headline = readme._committed(readme.README_TABLE)
    assert readme.newer_window_line(headline, path) == ""
    assert "the newest run of the window's public call" not in (readme.ROOT / "README.md").read_text()
    later = copy.deepcopy(older)
    later["environment"]["date"] = "2027-01-01T00:00:00+00:00"
    assert readme.newer_window_line(later, path) == ""
