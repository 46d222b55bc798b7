"""The LM validation experiment at its --tiny size: the whole pipeline on the CPU in seconds, a run
killed mid-evaluation, the evaluation budget, re-plotting from the JSON alone, the README block and
the demo report's section."""

from __future__ import annotations

import math
import shutil

import pytest

pytest.importorskip("safetensors")

from poslsh_lab.experiments import lm_validation as lv  # noqa: E402
from poslsh_lab.util import load_results  # noqa: E402

# A smaller grid for the runs that test the bookkeeping rather than the numbers.
SMALL = dict(tiny=True, samples=(1, 4), schemes=("grid",), extra_methods=())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One full --tiny run shared by the tests below: (out folder, checkpoint folder, document)."""
    root = tmp_path_factory.mktemp("lm_validation")
    doc = lv.run(lv.Config(tiny=True, checkpoint_dir=str(root / "ckpt")), root / "out")
    return root / "out", root / "ckpt", doc


def test_tiny_validation_runs_end_to_end(tiny_run):
    out, ckpt, doc = tiny_run
    res = doc["results"]
    assert not res["partial"] and res["seconds"] < 60
    cfg = lv.effective(lv.Config(tiny=True))
    methods = lv.methods(cfg)
    assert len(methods) == 2 + 2 * 6 + 2 and "hybrid:8:grid:qmc" in methods and "lsh:8:grid:qmc" in methods
    rows = res["rows"]
    assert all(math.isfinite(r["loss"]) for r in rows) and len(rows) == 2 * len(methods)
    assert sorted({r["context"] for r in rows}) == [64, 256]
    # Run in tier order: exact and window at every context before any LSH row.
    assert {r["method"] for r in rows[:4]} == {"exact", "window:0.001"}
    # Every context scores the same tokens, so their losses compare.
    assert {r["scored_tokens"] for r in rows} == {cfg.scored_tokens} and res["scored_from"] == 256
    # Training happened, lowered the held-out loss, and its history is in the JSON.
    assert res["training"]["heldout_loss"] < res["training"]["initial_heldout_loss"] - 0.5
    assert any("train_loss" in h for h in res["history"]) and "heldout_loss" in res["history"][-1]
    errs = res["layer_errors"]["errors"]
    assert set(errs) == set(methods[1:]) and all(len(v) == 2 for v in errs.values())
    # Per-layer error falls with r (averaged over layers and both schemes: r = 32 vs r = 1), and the
    # hybrid (exact near field) is far below plain LSH at the same r.
    mean = lambda m: sum(errs[m]) / len(errs[m])  # noqa: E731
    assert sum(mean(f"lsh:32:{s}") for s in cfg.schemes) < sum(mean(f"lsh:1:{s}") for s in cfg.schemes) / 2.5
    assert mean("hybrid:8:grid:qmc") < mean("lsh:8:grid:qmc") / 10
    # Small files only in --out; the weights are in the checkpoint folder.
    assert {p.name for p in out.iterdir()} == {f"{lv.NAME}.json", *lv.PLOTS.values()}
    assert (ckpt / "model.safetensors").is_file()
    text = lv.summarize(load_results(out / f"{lv.NAME}.json"), out)
    assert "| exact |" in text and "1/sqrt(r)" in text and "window baseline" in text and "unigram" in text
    assert "extrapolation" in text and "Partial" not in text


def test_interrupted_evaluation_leaves_loadable_partial_json(tmp_path, monkeypatch):
    """A run killed after its first evaluation row leaves a complete JSON with training and that row."""
    import poslsh_lab.lm.cli as lm_cli

    real = lm_cli.evaluate_checkpoint
    calls = []

    def first_row_then_killed(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_cli, "evaluate_checkpoint", first_row_then_killed)
    with pytest.raises(KeyboardInterrupt):
        lv.run(lv.Config(**SMALL, checkpoint_dir=str(tmp_path / "ckpt")), tmp_path / "out")
    doc = load_results(tmp_path / "out" / f"{lv.NAME}.json")
    res = doc["results"]
    assert res["partial"] and [r["method"] for r in res["rows"]] == ["exact"] and "loss" in res["rows"][0]
    assert res["training"]["steps"] == 40 and res["history"] and res["layer_errors"]["errors"]
    assert "Partial run" in lv.summarize(doc, tmp_path)
    assert {p.name for p in lv.replot(doc, tmp_path / "plots")} == set(lv.PLOTS.values())


def test_eval_budget_skips_rows_and_says_so(tmp_path):
    doc = lv.run(lv.Config(**SMALL, eval_budget_s=1e-9, checkpoint_dir=str(tmp_path / "ckpt")), tmp_path / "out")
    res = doc["results"]
    assert not res["partial"] and res["rows"] and all(r.get("skipped") == "eval budget" for r in res["rows"])
    assert {p.name for p in (tmp_path / "out").iterdir()} == {f"{lv.NAME}.json", lv.PLOTS["layers"],
                                                              lv.PLOTS["training"]}
    text = lv.summarize(doc, tmp_path)
    assert "did not run" in text and "skipped" in text and lv.PLOTS["gap"] not in text


def test_jobs_put_what_a_short_budget_must_keep_first():
    cfg = lv.Config()
    order = lv.jobs(cfg, list(cfg.contexts))
    assert len(order) == 4 * len(lv.methods(cfg)) == 4 * 16
    assert order[:8] == [(n, m) for n in cfg.contexts for m in ("exact", "window:0.001")]
    tier1 = order[8:8 + 4 * 6]
    assert {m for _, m in tier1} == {f"lsh:{r}:{s}" for r in (1, 8, 32) for s in ("grid", "cut")}
    assert [m for _, m in order[-8:]] == ["lsh:8:grid:qmc", "hybrid:8:grid:qmc"] * 4


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="scored_tokens"):
        lv.check(lv.Config(scored_tokens=1000))
    with pytest.raises(ValueError, match="bad method"):
        lv.check(lv.Config(extra_methods=("lsh:8:cut:qmc",)))
    with pytest.raises(ValueError, match="eval_budget_s"):
        lv.check(lv.Config(eval_budget_s=-1))
    assert lv.effective(lv.Config(tiny=True, contexts=(64,))).contexts == (64,)  # explicit values win over TINY


def test_replot_from_the_json_alone(tiny_run, tmp_path):
    from poslsh_lab.cli import main

    out, _, _ = tiny_run
    assert main(["lm-validation", "--replot", str(out / f"{lv.NAME}.json"), "--out", str(tmp_path)]) == 0
    assert all((tmp_path / name).is_file() for name in lv.PLOTS.values())
    assert "| lsh:32:cut |" in (tmp_path / "report.md").read_text()


def test_readme_section_links_the_committed_plots(tiny_run):
    _, _, doc = tiny_run
    text = lv.readme_section(doc)
    assert f"](../{lv.PLOT_DIR}/{lv.PLOTS['gap']})" in text and "unigram" in text  # linked from docs/RESULTS.md
    assert "mean over layers" in text and "| hybrid:8:grid:qmc |" in text


def test_demo_report_includes_the_committed_run(tiny_run, tmp_path):
    from poslsh_lab import cli

    out, _, _ = tiny_run
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(out / f"{lv.NAME}.json", results / "lm-validation.json")
    sections = cli.committed_sections(tmp_path / "demo", results_dir=results)
    assert len(sections) == 1 and "an ALiBi language model" in sections[0]
    assert all((tmp_path / "demo" / name).is_file() for name in lv.PLOTS.values())
    assert cli.committed_sections(tmp_path / "none", results_dir=tmp_path / "empty") == []
