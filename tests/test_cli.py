"""The ``poslsh`` command's front door: help that reads as sentences, --threads everywhere, requirements
checked before any work with one clear line and exit status 2, progress lines without a terminal."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from poslsh_lab import cli
from poslsh_lab.util import progress


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
    _one_line_error(capsys, ["mask-error", "--threads", "-1", "--out", str(tmp_path)],
                    r"^poslsh mask-error: error: argument --threads: must be >= 0, got -1 \(see poslsh mask-error --help\)$")
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



def test_version_prints_the_package_version(capsys):
    """``poslsh --version`` exited 2 (a missing COMMAND); the version is pyproject's."""
    import poslsh

    assert cli.main(["--version"]) == 0
    version = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"poslsh {version}" == f"poslsh {poslsh.__version__}"


@pytest.mark.parametrize("argv, message", [
    (["scaling", "--lengths", "-5"], "argument --lengths: must be >= 1, got -5"),  # was torch's negative dimension
    (["pareto", "--n", "256", "--samples", "0"], "argument --samples: must be >= 1, got 0"),  # ran, failed rows, exit 0
    (["pareto", "--window-eps", "2"], r"argument --window-eps: must be in \(0, 1\), got 2"),
    (["attn-error", "--seeds", "0"], "argument --seeds: must be >= 1, got 0"),
    (["mask-error", "--slopes", "-1"], "argument --slopes: must be > 0, got -1"),
    (["bench", "--device", "cpu", "--ns", "0"], "argument --ns: must be >= 1, got 0"),
    (["cp-bench", "--world-sizes", "0"], "argument --world-sizes: must be >= 1, got 0"),
    (["lm-validation", "--contexts", "1"], "argument --contexts: must be >= 2, got 1"),
    (["lm", "train", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["lm", "eval", "--checkpoint", "x", "--context", "0"], "argument --context: must be >= 2, got 0"),
    (["scaling", "--lengths", "x"], "argument --lengths: invalid int value: 'x'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    """A usage error is one line (argparse's usage block left out), exit status 2, before any work."""
    out = tmp_path / "out"
    argv = argv + (["--out", str(out)] if argv[:2] != ["lm", "eval"] and argv else [])
    _one_line_error(capsys, argv, rf"^poslsh[a-z -]*: error: {message} \(see poslsh[a-z -]* --help\)$")
    assert not out.exists()


def _configs():
    from poslsh_lab.lm.train import TrainConfig

    found = [TrainConfig]
    for name in cli.EXPERIMENTS:
        if cli._available(name):
            found.append(cli._module(name).Config)
    return found


def test_every_numeric_field_declares_its_range():
    """Counts, lengths, levels and budgets carry ``Bounds``, so the parser names a bad one before any
    work; a new numeric field without a range fails here."""
    from poslsh_lab.util.flags import _field_kinds

    for config in _configs():
        for name, (kind, item, bounds) in _field_kinds(config).items():
            base = item if item is not None else kind
            seeds = name.endswith("seed") or (name.endswith("seeds") and item is not None)  # any integer is a seed
            if base in (int, float) and not seeds:
                assert bounds is not None, f"{config.__module__}.{config.__name__}.{name} has no Bounds"


def test_a_config_built_in_python_is_checked_too(tmp_path):
    from poslsh_lab.experiments import attn_error, pareto, scaling

    for run, config, message in ((pareto.run, pareto.Config(n=(256,), samples=(0,)), "samples must be >= 1, got 0"),
                                 (scaling.run, scaling.Config(lengths=(-5,)), "lengths must be >= 1, got -5"),
                                 (attn_error.run, attn_error.Config(delta=1.5), r"delta must be in \(0, 1\), got 1.5")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            run(config, tmp_path / "o")
        assert not (tmp_path / "o").exists()


def test_a_fit_over_one_point_reads_n_a(tmp_path):
    """attn-error and pareto fitted a slope over the r the user asked for; with one r they ended in a
    TypeError after the work. The slope is now "n/a", saying why."""
    tiny = ["--threads", "1", "--heads", "2", "--head-dim", "4"]
    assert cli.main(["attn-error", "--samples", "4", "--seeds", "1", "--n", "16", "--logit-scales", "1",
                     "--schemes", "grid", "--plot-heads", "0", "--out", str(tmp_path / "a")] + tiny) == 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Fitted exponent a of the LSH error against r: n/a (the fit needs two or more r >= 4; this run has 4)" \
        in report and "| n/a |" in report
    assert cli.main(["pareto", "--n", "32", "--heavy-n", "0", "--conv-n", "16", "--conv-samples", "4",
                     "--conv-seeds", "1", "--samples", "4", "--samplings", "iid", "--window-eps", "0.1",
                     "--hybrid-eps", "0.1", "--seeds", "1", "--out", str(tmp_path / "p")] + tiny) == 0
    report = (tmp_path / "p" / "report.md").read_text()
    assert "n/a: the fit needs two or more r >= 8, this run has none" in report and "| iid | n/a | n/a | n/a |" in report


def test_every_fit_reads_n_a_with_one_point(tmp_path):
    """mask-error printed "nan" for its rates with one r, and scaling an empty list of growth exponents
    with one length."""
    assert cli.main(["mask-error", "--lengths", "16", "--slopes", "0.5", "--samples", "4", "--seeds", "1",
                     "--schemes", "grid", "--out", str(tmp_path / "m")]) == 0
    report = (tmp_path / "m" / "report.md").read_text()
    assert "nan" not in report and "| n/a |" in report
    assert cli.main(["scaling", "--lengths", "64", "--exact-max", "64", "--heads", "1", "--head-dim", "8",
                     "--methods", "exact", "window", "--out", str(tmp_path / "s")]) == 0
    assert "exact: n/a (one length); window: n/a (one length)." in (tmp_path / "s" / "report.md").read_text()


def test_a_run_with_failed_measurements_exits_1(tmp_path, capsys, monkeypatch):
    """pareto recorded failed points ("failed: ValueError" rows) and exited 0."""
    from poslsh_lab.experiments.pareto import measure

    real = measure._point

    def flaky(config, method, opts, *args):
        if method == "lsh":
            raise RuntimeError("out of memory (test)")
        return real(config, method, opts, *args)

    monkeypatch.setattr(measure, "_point", flaky)
    out = tmp_path / "p"
    assert cli.main(["pareto", "--n", "32", "--heavy-n", "0", "--no-convergence", "--samples", "4", "--samplings",
                     "iid", "--window-eps", "0.1", "--hybrid-eps", "0.1", "--seeds", "1", "--heads", "2",
                     "--head-dim", "4", "--no-plots", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("poslsh pareto: 1 measurement(s) failed, the first: ALiBi n=32: lsh iid r=4: "
                       f"RuntimeError('out of memory (test)') (all in {out / 'report.md'})"), err[-1]


def test_flags_a_run_ignores_are_named(tmp_path, capsys):
    """A flag the run will not read is named in a warning: with --replot every other one; scaling's LSH
    flags without an LSH method; pareto's convergence flags with --no-convergence."""
    from poslsh_lab.experiments import pareto, scaling

    assert cli.unused_flags("scaling", scaling.Config(methods=("exact",), samples=16, exact_max=64)) == {
        "--samples": "--methods has no lsh method"}
    assert cli.unused_flags("scaling", scaling.Config(samples=16)) == {}
    assert set(cli.unused_flags("pareto", pareto.Config(convergence=False, conv_n=64, heavy_n=0, heavy_p=2.0))) == {
        "--conv-n", "--heavy-p"}
    argv = ["lm", "eval", "--checkpoint", str(tmp_path), "--context", "8", "--methods", "window", "--seeds", "0", "1"]
    assert cli.main(argv) == 2  # no checkpoint there: the warning comes first, before that check
    assert capsys.readouterr().err.splitlines()[0] == ("poslsh lm eval: warning: --seeds is ignored: no method in "
                                                       "--methods draws partitions (lsh, hybrid)")
    saved = Path(cli.committed_results_dir() or "") / "pareto_cpu" / "pareto.json"
    if not saved.exists():
        pytest.skip("needs the checkout's committed pareto_cpu/pareto.json")
    assert cli.main(["pareto", "--replot", str(saved), "--n", "64", "--samples", "2", "--out", str(tmp_path)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["poslsh pareto: warning: --n, --samples are ignored: --replot only redraws the saved run's "
                        "plots"], warnings


def test_a_missing_optional_package_names_its_install_command(tmp_path, capsys, monkeypatch):
    """eval-hf without transformers said "No module named transformers"; it names the extra now, before
    and (for a module that fails to import mid-run) after the check."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bloom"}')
    (tmp_path / "t.txt").write_text("hello world")
    argv = ["eval-hf", "--model", str(model), "--text", str(tmp_path / "t.txt"), "--context", "8",
            "--out", str(tmp_path / "e")]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails, find_spec finds none
    _one_line_error(capsys, argv, r"^poslsh eval-hf: error: poslsh eval-hf needs the transformers package: "
                                  r"pip install -e \"\.\[hf\]\"$")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "transformers" else real(name, *a))
    _one_line_error(capsys, argv, r"^poslsh eval-hf: error: .*transformers.*: pip install -e \"\.\[hf\]\"$")


def test_a_folder_without_a_tokenizer_is_one_whole_line(tmp_path, capsys):
    """The tokenizer's error spans lines, and the command showed only its first, cut off."""
    pytest.importorskip("transformers")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bloom"}')
    (tmp_path / "t.txt").write_text("hello world")
    _one_line_error(capsys, ["eval-hf", "--model", str(model), "--text", str(tmp_path / "t.txt"), "--context", "8",
                             "--out", str(tmp_path / "e")],
                    r"^poslsh eval-hf: error: --model \S+: its tokenizer does not load \(.*\): \S.*\S$")
