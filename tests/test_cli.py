"""The ``poslsh`` command's front door: help that reads as sentences, --threads everywhere, requirements
checked before any work with one clear line and exit status 2, progress lines without a terminal."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from poslsh import cli
from poslsh.util import progress


def _parsers(parser: argparse.ArgumentParser, path=("poslsh",)):
    """Every (command path, parser) below the top-level parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def _commands():
    return [(path, p) for path, p in _parsers(cli.build_parser())
            if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)]


SENTENCE = re.compile(r"^[A-Z0-9].*\.$", re.S)
MARKUP = re.compile(r"``|:(func|class|meth|mod|attr):|`")


def test_every_help_line_is_a_sentence_with_choices_and_no_markup():
    commands = _commands()
    assert {" ".join(path) for path, _ in commands} >= {
        "poslsh demo", "poslsh mask-error", "poslsh attn-error", "poslsh scaling", "poslsh pareto", "poslsh bench",
        "poslsh lm-validation", "poslsh lm train", "poslsh lm eval", "poslsh eval-hf"}
    for path, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            what = f"{' '.join(path)} {action.option_strings or action.dest}"
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert SENTENCE.match(choice.help) and not MARKUP.search(choice.help), (what, choice.help)
                continue
            text = action.help or ""
            assert SENTENCE.match(text), (what, text)
            assert not MARKUP.search(text) and "%(" not in text, (what, text)
            if action.choices:
                assert all(str(c) in text for c in action.choices), (what, text)


def test_every_command_takes_threads():
    for path, parser in _commands():
        assert "--threads" in parser._option_string_actions, " ".join(path)


def test_literal_fields_become_choices():
    parser = dict((" ".join(p), x) for p, x in _commands())["poslsh pareto"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float8"])
    assert parser.parse_args(["--samplings", "iid", "qmc"]).samplings == ["iid", "qmc"]


def _one_line_error(capsys, argv, pattern):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (argv, err)
    assert len(err) == 1 and re.search(pattern, err[0]), (argv, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_checked_before_any_work(tmp_path, capsys):
    """pareto --device cuda used to run, print a long torch error and leave a partial JSON."""
    out = tmp_path / "p"
    _one_line_error(capsys, ["pareto", "--device", "cuda", "--out", str(out)],
                    r"^poslsh pareto: error: --device cuda needs CUDA, and torch \S+ sees no CUDA device$")
    assert not out.exists()
    _one_line_error(capsys, ["bench", "--out", str(out)], r"^poslsh bench: error: --device cuda needs CUDA")
    _one_line_error(capsys, ["lm", "train", "--out", str(out), "--device", "cuda"], r"--device cuda needs CUDA")


def test_missing_files_and_packages_are_one_line(tmp_path, capsys, monkeypatch):
    _one_line_error(capsys, ["pareto", "--replot", str(tmp_path / "none.json"), "--out", str(tmp_path)],
                    r"--replot \S*none.json does not exist")
    _one_line_error(capsys, ["lm", "eval", "--checkpoint", str(tmp_path), "--context", "8"],
                    r"--checkpoint: the checkpoint file \S*config.json does not exist")
    _one_line_error(capsys, ["lm", "eval", "--checkpoint", str(tmp_path), "--context", "8", "--methods", "lsh:0"],
                    r"bad method 'lsh:0': samples must be >= 1, got 0")
    _one_line_error(capsys, ["lm", "train", "--out", str(tmp_path), "--roots", str(tmp_path / "src")],
                    r"--roots folder \S*src does not exist")
    _one_line_error(capsys, ["mask-error", "--threads", "-1", "--out", str(tmp_path)], r"--threads must be >= 0")
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    _one_line_error(capsys, ["mask-error", "--out", str(tmp_path)],
                    r"poslsh mask-error \(its plots\) needs the matplotlib package: pip install -e \"\.\[demo\]\"")
    _one_line_error(capsys, ["demo", "--out", str(tmp_path)], r"needs the matplotlib package")


def test_threads_flag_sets_torch_threads(tmp_path):
    out = tmp_path / "m"
    try:
        assert cli.main(["mask-error", "--lengths", "16", "--slopes", "0.5", "--samples", "1", "2", "--schemes", "grid",
                         "--seeds", "1", "--threads", "2", "--out", str(out)]) == 0
        assert json.loads((out / "mask-error.json").read_text())["environment"]["cpu_threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_progress_prints_lines_without_a_terminal(capsys):
    """Not a terminal (as under CI or a log file): one plain line per step of every_s, and the last."""
    assert list(progress(range(3), "job", every_s=0.0)) == [0, 1, 2]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("[job] 3/3 (100%), ") and len(lines) == 3, lines
    list(progress(range(50), "quiet", every_s=3600))  # within the hour only the final line is due
    quiet = capsys.readouterr().err.strip().splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("[quiet] 50/50 (100%), "), quiet
    assert list(progress(iter(range(2)), "gen", every_s=0.0)) == [0, 1]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("[gen] 2 done, ")
