"""The mask-error experiment end to end on a tiny config: JSON that reloads, PNGs, Markdown."""

from __future__ import annotations

import dataclasses
import json

import pytest

from poslsh import theory
from poslsh_lab.experiments import mask_error
from poslsh_lab.util import load_results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("mask-error")
    # n = 600 > DENSE_MAX_N exercises the structured path, n = 32 the dense one.
    config = mask_error.Config(lengths=(32, 600), slopes=(2.0, 0.25), samples=(1, 4, 16), seeds=2)
    doc = mask_error.run(config, out)
    return config, doc, out


def test_json_reloads_with_provenance(tiny):
    config, doc, out = tiny
    saved = load_results(out / f"{mask_error.NAME}.json")
    assert saved["config"] == json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists
    assert {"date", "torch", "command"} <= set(saved["environment"])
    records = saved["results"]["records"]
    assert len(records) == 2 * 2 * 2 * 2 * 3  # lengths x slopes x schemes x seeds x samples
    assert records == doc["results"]["records"]
    for rec in records:
        assert 0 < rec["max"] <= 1
        # ||E||_2 lies between max|E_ij| and the row-sum norm for symmetric E.
        assert rec["max"] <= rec["spectral"] * (1 + 1e-6) and rec["spectral"] <= rec["row_sum"] * (1 + 1e-9)
        assert 1 <= rec["largest_block"] <= rec["n"]
        assert rec["mean_block"] <= rec["mean_largest_block"] + 1e-9
    th = {(t["n"], t["slope"], t["samples"]): t for t in saved["results"]["theory"]}
    t = th[(600, 0.25, 16)]
    assert t["max_eps"] == pytest.approx(theory.max_norm_eps(600, 16, config.delta))
    assert t["spectral_eps"] == pytest.approx(theory.spectral_eps(600, 0.25, 16, config.delta))
    assert t["block_bound"] == theory.block_size_bound(600, 0.25, 16, config.delta)


def test_pngs_exist(tiny):
    _, _, out = tiny
    for name in mask_error.design.PLOTS.values():
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_summary_markdown(tiny):
    _, doc, out = tiny
    text = mask_error.summarize(doc, out)
    assert text.startswith("## ")
    assert "| n | slope | scheme |" in text
    assert text.count("\n| 600 |") == 4 and text.count("\n| 32 |") == 4  # one row per slope and scheme
    for name in mask_error.design.PLOTS.values():
        assert f"]({name})" in text


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="^samples must"):
        mask_error.run(mask_error.Config(lengths=(8,), samples=(0, 2)), tmp_path)
