"""Plot conventions, on the committed results: lines run in order of their x, points carry their
parameters, language-model losses are in bits per byte, and every experiment redraws from its JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from poslsh_lab import cli  # noqa: E402
from poslsh_lab.experiments import lm_validation, pareto  # noqa: E402
from poslsh_lab.util import load_results, pyplot  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


@pytest.mark.parametrize("name", ["pareto_cpu", "pareto_h200_256k", "pareto_h100_256k"])
def test_pareto_lines_run_in_x_order_with_labelled_points(name):
    doc = load_results(RESULTS / name / "pareto.json")
    plt = pyplot()
    fig, ax = plt.subplots()
    pareto.report._plot_panel(ax, pareto.alibi_panels(doc["results"])[0], {"iid": "C0", "stratified": "C1", "qmc": "C2"})
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert lines and all(list(line.get_xdata()) == sorted(line.get_xdata()) for line in lines)
    texts = {t.get_text() for t in ax.texts}
    assert {"r=4", "r=8", "r=16", "r=32"} <= texts  # LSH points carry their r
    assert {"0.3", "0.001"} <= texts  # window (and hybrid) points their eps
    plt.close(fig)


def test_language_model_results_are_in_bits_per_byte():
    doc = load_results(RESULTS / "lm-validation.json")
    text = "\n".join(lm_validation.findings(doc["results"], lm_validation.config_of(doc["results"])))
    text += lm_validation.readme_section(doc)
    assert "nats" not in text and "bits per byte" in text


@pytest.mark.parametrize("name,path,pngs", [
    ("mask-error", "mask-error/mask-error.json", ["mask_error_max.png", "mask_error_spectral.png", "block_sizes.png"]),
    ("attn-error", "attn-error/attn-error.json", ["attn_error_vs_r.png"]),
    ("pareto", "pareto_cpu/pareto.json", ["pareto.png", "pareto_convergence.png"]),
    ("lm-validation", "lm-validation.json", ["lm_validation_gap.png", "lm_validation_training.png"]),
])
def test_every_experiment_redraws_from_its_json(tmp_path, name, path, pngs):
    out = tmp_path / name
    assert cli.main([name, "--replot", str(RESULTS / path), "--out", str(out)]) == 0
    assert all((out / png).stat().st_size > 10_000 for png in pngs)
    assert not (out / f"{name}.json").exists()  # nothing re-measured, nothing saved
