"""generate-bench at its --tiny size on the CPU, through the command: every arm, chunked prefill, an arm
that runs out of memory (simulated) recorded and skipped at longer prompts or retried in chunks, greedy
tokens of the patched exact model equal to transformers' own, eviction changing no token, the JSON
round trip and --replot, the README sentence and the docs/RESULTS.md section from a JSON, the aims on
synthetic rows, the deadline, a local checkpoint and a config file in place of a shape, rounds of
alternating arm order and the paired per-round ratio to native's, and bad flags;
the GPU-only measurements (peak memory, CUDA events, kernel time) in a CUDA-only test."""

from __future__ import annotations

import re
import shutil
import statistics

import pytest
import torch

pytest.importorskip("transformers")

from poslsh_lab import readme  # noqa: E402
from poslsh_lab.cli import main  # noqa: E402
from poslsh_lab.experiments import generate_bench as gb  # noqa: E402
from poslsh_lab.experiments.generate_bench import measure  # noqa: E402
from poslsh_lab.util import load_results  # noqa: E402

CONTEXTS = (192, 256, 320)
# Steep enough truncation that the window with eviction drops keys at these prompt lengths (BLOOM's
# smallest slope, 2^-8, keeps ~1800 keys at the default 1e-3); r = 2 so that LSH evicts some too.
FLAGS = ["--tiny", "--contexts", *map(str, CONTEXTS), "--prefill-chunk", "128", "--window-eps", "0.3",
         "--samples", "2"]
OOM_AT = 256  # transformers' own attention "runs out of memory" from this prompt length on


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run shared by the tests: (out folder, document)."""
    out = tmp_path_factory.mktemp("generate_bench")
    real = measure.chunked_prefill

    def prefill(model, input_ids, chunk_size, attention_mask=None):
        if not hasattr(model, "_poslsh_patch") and input_ids.shape[1] >= OOM_AT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (simulated)")
        return real(model, input_ids, chunk_size, attention_mask)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure, "chunked_prefill", prefill)
        assert main(["generate-bench", *FLAGS, "--out", str(out)]) == 0
    return out, load_results(out / f"{gb.NAME}.json")


def _row(doc, arm, n):
    return next(r for r in doc["results"]["rows"] if r["arm"] == arm and r["context"] == n)


def test_every_arm_runs_and_is_measured(tiny_run):
    out, doc = tiny_run
    res = doc["results"]
    assert not res["partial"] and res["model"]["layers"] == 2 and res["model"]["family"] == "bloom"
    assert len(res["rows"]) == len(CONTEXTS) * len(gb.ARMS)
    assert set(res["warmup_s"]) == set(gb.ARMS)
    for r in res["rows"]:
        if r["arm"] == "native" and r["context"] >= OOM_AT:
            continue
        if r["arm"] in gb.GRAPHED:  # on the CPU: recorded as skipped, with the reason
            assert r == {"arm": r["arm"], "context": r["context"], "skipped": "needs CUDA: a CUDA graph records the "
                                                                              "decode step"}
            assert res["warmup_s"][r["arm"]] == "skipped: needs CUDA: a CUDA graph records the decode step"
            continue
        assert r["phase"] == "done", r
        assert len(r["tokens"]) == 4 + 2 and len(r["step_ms"]) == 4 and r["ms_per_token"] > 0
        assert r["prefill_s"] > 0 and r["kv"]["positions"] == r["context"] + 4 + 1  # the last token is not cached
        # Chunked prefill for the patched arms (every prompt is longer than a chunk), one call for native.
        assert r["prefill_chunk"] == (None if r["arm"] == "native" else 128)
        kv = r["kv"]
        if r["arm"] in ("window_evict", "lsh_evict"):
            assert kv["held_bytes"] <= kv["full_bytes"] and kv["evicted_bytes"] == kv["full_bytes"] - kv["held_bytes"]
            assert kv["per_head_reachable_bytes"] <= kv["held_bytes"]  # one prefix per layer keeps the most
            if r["context"] == CONTEXTS[-1]:  # the longest prompt outgrows what they keep
                assert kv["held_bytes"] < kv["full_bytes"], r
        else:
            assert kv["held_bytes"] == kv["full_bytes"] and "evicted_bytes" not in kv
    assert {p.name for p in out.iterdir()} == {f"{gb.NAME}.json", gb.PLOT, "report.md"}


def test_out_of_memory_is_recorded_and_skips_longer_prompts(tiny_run):
    _, doc = tiny_run
    oom = _row(doc, "native", 256)
    assert "out of memory" in oom["out_of_memory"] and oom["phase"] == "prefill"
    assert _row(doc, "native", 320) == {"arm": "native", "context": 320, "skipped": "out of memory at 256 tokens"}
    assert gb.failures(doc) == []  # running out of memory is a result, not a failure
    failed = {"results": {"rows": [{"arm": "exact", "context": 4096, "phase": "prefill", "error": "RuntimeError: x"}]}}
    assert gb.failures(failed) == ["exact at 4K: RuntimeError: x"]
    text = gb.summarize(doc, ".")
    assert "out of memory in prefill (one call)" in text and "skipped (out of memory at 256 tokens)" in text


def test_greedy_tokens_of_exact_equal_native_and_eviction_changes_none(tiny_run):
    """The patched exact model, its prompt read in chunks, generates transformers' own tokens; eviction
    changes no token of the window or LSH; where native did not run, exact is the reference."""
    _, doc = tiny_run
    rows = doc["results"]["rows"]
    exact, native = _row(doc, "exact", 192), _row(doc, "native", 192)
    assert exact["tokens"] == native["tokens"] and len(set(native["tokens"])) > 1
    assert gb.agreement(rows, exact) == {"with": "native", "equal": 6, "of": 6, "first_divergence": None}
    for n in CONTEXTS:
        for arm in ("window", "lsh"):
            assert _row(doc, f"{arm}_evict", n)["tokens"] == _row(doc, arm, n)["tokens"], (arm, n)
    assert gb.agreement(rows, _row(doc, "window", 320))["with"] == "exact"
    assert gb.agreement(rows, _row(doc, "exact", 320)) is None
    alone = [dict(_row(doc, "window", 320))]  # no native or exact row: nothing to compare with, not a reference
    assert gb.agreement(alone, alone[0]) is None and "| 320 | poslsh window |" in gb.table({"results": {"rows": alone}})
    assert "reference" not in gb.table({"results": {"rows": alone}})
    # The window at eps 0.3 is a coarse approximation: its tokens do differ (the comparison can fail).
    assert any(gb.agreement(rows, _row(doc, "window", n))["first_divergence"] is not None for n in CONTEXTS)


def test_chunked_prefill_equals_one_call():
    """The cache and last logits of a prompt read in chunks (including a ragged last chunk) equal those
    of one call."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(
        vocab_size=64, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.3)).eval()
    ids = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, logits = gb.chunked_prefill(model, ids, 50)
        parts, chunked = gb.chunked_prefill(model, ids, 16)
    torch.testing.assert_close(chunked, logits, rtol=1e-5, atol=1e-5)
    assert parts.get_seq_length() == whole.get_seq_length() == 50
    torch.testing.assert_close(parts.layers[1].keys, whole.layers[1].keys, rtol=1e-5, atol=1e-5)
    assert gb.cache_bytes(whole)["held_bytes"] == 2 * 2 * 50 * 32 * 4  # layers x (k, v) x positions x hidden x fp32
    with pytest.raises(ValueError, match="chunk_size"):
        gb.chunked_prefill(model, ids, 0)


@torch.no_grad()
def test_the_graphed_arm_measures_the_static_window_step(tmp_path):
    """window_graph's point, measured directly on the CPU (where the run skips it): GraphedDecoder's static
    step run eagerly gives window_evict's tokens; its KV cache is the window's buffers, whatever the prompt."""
    cfg = gb.effective(gb.Config(tiny=True, window_eps=0.3, device="cpu"))
    model, info = gb.build_model(cfg, torch.device("cpu"), torch.float32, 400)
    ids = measure._prompt(cfg, 320, info["vocab"], torch.device("cpu"))
    rows = {}
    for arm in ("window_evict", "window_graph"):
        rows[arm] = {"arm": arm, "context": 320}
        gb.measure_point(model, cfg, arm, ids, torch.device("cpu"), rows[arm], 128)
    graph, evict = rows["window_graph"], rows["window_evict"]
    assert graph["phase"] == "done" and graph["tokens"] == evict["tokens"] and len(set(graph["tokens"])) > 1
    assert len(graph["step_ms"]) == cfg.new_tokens and graph["prefill_chunk"] == 128
    kv = graph["kv"]
    assert kv["positions"] == evict["kv"]["positions"] == 320 + cfg.new_tokens + 1
    assert kv["full_bytes"] == evict["kv"]["full_bytes"]
    assert kv["held_bytes"] < kv["full_bytes"] and kv["evicted_bytes"] == kv["full_bytes"] - kv["held_bytes"]
    assert kv["per_head_reachable_bytes"] <= kv["held_bytes"]


def test_replot_and_json_round_trip(tiny_run, tmp_path):
    out, doc = tiny_run
    assert main(["generate-bench", "--replot", str(out / f"{gb.NAME}.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / gb.PLOT).is_file()
    assert gb.config_of(doc["results"]) == gb.effective(gb.Config(tiny=True, contexts=CONTEXTS, prefill_chunk=128,
                                                                  window_eps=0.3, samples=2))
    assert gb.table(load_results(out / f"{gb.NAME}.json")) == gb.table(doc)


def test_readme_sentence_and_results_section_from_a_committed_json(tiny_run, tmp_path, monkeypatch):
    """With a generate-bench JSON in a checkout's bench/results, docs/RESULTS.md gets its section and
    the README's block its sentence; without one, neither (the committed checkout has none yet)."""
    _, doc = tiny_run
    for name in ("ROOT", "RESULTS", "README", "RESULTS_MD"):
        monkeypatch.setattr(readme, name, getattr(readme, name))  # restored after the test
    readme.use_root(tmp_path)
    assert readme.generate_lines() == ""
    folder = tmp_path / "bench" / "results" / "generate_bench"
    folder.mkdir(parents=True)
    shutil.copy(tiny_run[0] / f"{gb.NAME}.json", folder / f"{gb.NAME}.json")
    line = readme.generate_lines()
    assert line.startswith("Generating text (`poslsh generate-bench`, bloom-560m's shape")
    assert "runs out of memory at 256" in line and "the patched model reads 320 tokens (chunks of 128)" in line
    page = readme.render_results()
    assert "## A model generating text" in page and "| 192 | poslsh exact |" in page and "7B model" not in page


def test_a_passed_deadline_skips_every_point_and_says_so(tmp_path):
    doc = gb.run(gb.Config(tiny=True, contexts=(64, 96), arms=("native", "exact"), budget_s=1e-6, device="cpu"),
                 tmp_path)
    res = doc["results"]
    assert not res["partial"] and res["warmup_s"] == {}
    assert [r.get("skipped") for r in res["rows"]] == ["deadline"] * 4
    assert "skipped (deadline)" in gb.table(doc)


def test_deadline_estimate_skips_what_would_not_finish():
    rows = [{"arm": "exact", "context": 1000, "seconds": 2.0, "phase": "done"},
            {"arm": "window", "context": 1000, "seconds": 2.0, "phase": "done"}]
    assert measure._estimate_s(rows, "exact", 4000) == 32.0  # quadratic prefill
    assert measure._estimate_s(rows, "window", 4000) == 8.0
    assert measure._estimate_s(rows, "lsh", 4000) is None


# The messages name the field or its flag: "contexts must be ..." from the run's checks, or "argument
# --contexts: must be ..." where the parser knows the field's range.
@pytest.mark.parametrize("flags,message", [
    (["--contexts", "1"], r"contexts:? must be (distinct integers )?>= 2"),
    (["--contexts", "64", "64"], r"contexts must be distinct integers >= 2"),
    (["--new-tokens", "0"], r"new[-_]tokens:? must be >= 1"),
    (["--window-eps", "0"], r"window[-_]eps:? must be in \(0, 1\)"),
    (["--samples", "0"], r"samples:? must be >= 1"),
    (["--prefill-chunk", "-1"], r"prefill[-_]chunk:? must be >= 0"),
    (["--budget-s", "-1"], r"budget[-_]s:? must be >= 0"),
    (["--rounds", "0"], r"rounds:? must be >= 1"),
    (["--rounds", "1.5"], r"rounds: invalid int value"),
    (["--model", "/no/such/folder"], r"model must be a checkpoint folder"),
    (["--config-file", "/no/such/config.json"], r"config_file must be a config.json"),
])
def test_bad_flags_give_one_line_errors(flags, message, tmp_path, capsys):
    assert main(["generate-bench", "--tiny", *flags, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("poslsh generate-bench: error:") and re.search(message, err) and "\n" not in err, err
    assert not (tmp_path / f"{gb.NAME}.json").exists()  # nothing ran


def test_unknown_arm_and_shape_are_refused_by_the_parser(capsys):
    for flags, name in ((["--arms", "flash"], "--arms"), (["--shape", "gpt2"], "--shape")):
        try:
            status = main(["generate-bench", *flags])
        except SystemExit as exit:  # argparse's own exit, where the command does not catch it
            status = exit.code
        assert status == 2 and name in capsys.readouterr().err


def test_shapes_are_the_published_sizes():
    cfg = gb.Config()
    family, kwargs = gb.design.model_config_kwargs(cfg, 1 << 20)
    assert family == "bloom" and (kwargs["n_layer"], kwargs["n_head"], kwargs["hidden_size"]) == (24, 16, 1024)
    big = gb.Config(shape="bloom-7b1", layers=4)
    assert gb.design.model_config_kwargs(big, 1 << 20)[1]["n_layer"] == 4  # the override
    _, mpt = gb.design.model_config_kwargs(gb.Config(shape="mpt-7b"), 1 << 20)
    assert mpt["max_seq_len"] == 1 << 20  # its precomputed bias covers the longest prompt


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory, CUDA-event timing and the profiler's kernel "
                                                         "time are measured on CUDA only")
def test_cuda_run_records_memory_and_kernel_time(tmp_path):
    doc = gb.run(gb.Config(tiny=True, device="cuda", contexts=(256, 512), prefill_chunk=128), tmp_path)
    rows = doc["results"]["rows"]
    assert doc["results"]["model"]["dtype"] == "bfloat16" and len(rows) == 2 * len(gb.ARMS)
    for r in rows:
        assert r["phase"] == "done", r
        assert 0 < r["start_bytes"] <= r["prefill_peak_bytes"] <= r["peak_bytes"]
        assert len(r["step_ms"]) == 4 and all(ms > 0 for ms in r["step_ms"])
        assert r["kernel_ms_per_token"] > 0
    assert "GiB" in gb.table(doc)


def test_a_local_checkpoint_runs_in_place_of_a_shape(tmp_path):
    """--model PATH: the checkpoint's config and weights (no tokenizer); size flags are refused beside it."""
    import transformers

    torch.manual_seed(0)
    path = tmp_path / "ckpt"
    transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=96, hidden_size=32, n_layer=3, n_head=4,
                                                           initializer_range=0.3)).save_pretrained(path)
    doc = gb.run(gb.Config(model=str(path), contexts=(40,), arms=("native", "exact"), new_tokens=2,
                           warmup_context=0, device="cpu"), tmp_path / "out")
    model = doc["results"]["model"]
    assert (model["layers"], model["vocab"], model["random_weights"]) == (3, 96, False)
    native, exact = doc["results"]["rows"]
    assert native["phase"] == exact["phase"] == "done" and exact["tokens"] == native["tokens"]
    assert f"the checkpoint {path}" in gb.readme_line(doc)
    with pytest.raises(ValueError, match="layers sizes a random model"):
        gb.run(gb.Config(model=str(path), layers=2, device="cpu"), tmp_path / "out2")


def _done(arm, n, ms, held=100, full=100, peak=None):
    row = {"arm": arm, "context": n, "phase": "done", "ms_per_token": ms, "tokens": [1, 2, 3], "prefill_s": 1.0,
           "kv": {"held_bytes": held, "full_bytes": full}}
    if peak is not None:
        row.update(start_bytes=1000, prefill_peak_bytes=1000 + peak, peak_bytes=1000 + peak)
    return row


def test_aims_are_decided_from_the_rows():
    """Native's longest completed context is the yardstick of the long-context aim; each bound is applied
    as the issue states it."""
    rows = [_done("native", 4096, 10.0), _done("exact", 4096, 11.0), _done("window", 4096, 13.0, peak=10),
            _done("native", 8192, 12.0), _done("exact", 8192, 12.0),
            {"arm": "native", "context": 16384, "phase": "prefill", "out_of_memory": "OutOfMemoryError: ..."},
            _done("window", 16384, 13.0, peak=40), _done("window", 65536, 13.0, peak=160),
            _done("window_evict", 65536, 5.0), _done("window_evict", 262144, 7.0, held=4, full=100),
            _done("lsh_evict", 262144, 9.0, held=6, full=100)]
    found = {a["aim"]: (a["value"], a["met"]) for a in gb.aims({"rows": rows})}
    assert found["poslsh exact at 4K: time per token over native's"] == (1.1, True)
    assert found["poslsh window at 4K: time per token over native's"] == (1.3, False)
    assert found["poslsh exact at 8K: time per token over native's"] == (1.0, True)
    assert found["window + eviction at 64K: time per token over native's at its longest (8K)"] == (5 / 12, True)
    assert found["window + eviction at 256K: time per token over native's at its longest (8K)"] == (7 / 12, False)
    assert found["poslsh window + eviction at 256K: KV cache held over a full cache"] == (0.04, True)
    assert found["poslsh LSH + eviction at 256K: KV cache held over a full cache"] == (0.06, False)
    slope, met = found["poslsh window: one-call prefill memory above the weights grows as n^k, k"]
    assert abs(slope - 1.0) < 1e-9 and met


def test_a_one_call_prefill_out_of_memory_is_retried_in_chunks(tmp_path, monkeypatch):
    """--oom-chunk: the arm's one-call prefill runs out of memory at 96 tokens (simulated), the point is
    measured again in chunks, and so are its longer prompts; native is not retried."""
    real = measure.chunked_prefill

    def prefill(model, input_ids, chunk_size, attention_mask=None):
        if input_ids.shape[1] >= 96 and chunk_size >= input_ids.shape[1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, input_ids, chunk_size, attention_mask)

    monkeypatch.setattr(measure, "chunked_prefill", prefill)
    doc = gb.run(gb.Config(tiny=True, contexts=(64, 96, 128), arms=("native", "window_evict"), oom_chunk=32,
                           new_tokens=2, device="cpu"), tmp_path)
    seen = [(r["arm"], r["context"], r.get("prefill_chunk"), "out_of_memory" in r, r.get("skipped"))
            for r in doc["results"]["rows"]]
    assert seen == [("native", 64, None, False, None), ("window_evict", 64, None, False, None),
                    ("native", 96, None, True, None), ("window_evict", 96, None, True, None),
                    ("window_evict", 96, 32, False, None),
                    ("native", 128, None, False, "out of memory at 96 tokens"), ("window_evict", 128, 32, False, None)]
    assert "out of memory in prefill (one call)" in gb.table(doc)


def test_a_config_file_gives_the_shape(tmp_path):
    """--config-file: a published config.json (here an MPT one) with random weights, the size flags applied;
    a config of another model type is refused by name."""
    import transformers

    transformers.MptConfig(d_model=48, n_heads=4, n_layers=3, vocab_size=80, max_seq_len=16).save_pretrained(tmp_path)
    doc = gb.run(gb.Config(config_file=str(tmp_path / "config.json"), layers=2, init_std=0.3, contexts=(40,),
                           arms=("native", "exact"), new_tokens=2, warmup_context=0, device="cpu"), tmp_path / "out")
    model = doc["results"]["model"]
    assert (model["family"], model["layers"], model["hidden"], model["random_weights"]) == ("mpt", 2, 48, True)
    native, exact = doc["results"]["rows"]  # 40 + 3 positions > max_seq_len 16: raised to cover the prompt
    assert native["phase"] == exact["phase"] == "done" and exact["tokens"] == native["tokens"]
    other = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1).save_pretrained(other)
    with pytest.raises(ValueError, match="'gpt2' model, not one of bloom, mpt, falcon"):
        gb.run(gb.Config(config_file=str(other), device="cpu"), tmp_path / "out2")


def test_warm_up_decodes_past_a_multiple_of_16(monkeypatch, tmp_path):
    """Each arm's warm-up decodes enough steps that the key count crosses a multiple of 16 (both of Triton's
    integer specialisations compile before the timings); session 7's GPU run warmed up with one step."""
    steps = []
    monkeypatch.setattr(measure, "_use_arm", lambda model, cfg, arm: None)
    monkeypatch.setattr(measure, "_read_prompt", lambda model, arm, ids, chunk, device: (None, None, None))
    monkeypatch.setattr(measure, "_greedy", lambda step, logits, n, device: steps.append(n))
    monkeypatch.setattr(measure, "_release", lambda held: None)
    cfg = gb.Config(tiny=True, arms=("exact", "window_evict"), warmup_context=48)
    results = {"warmup_s": {}}
    clock = measure.Run("generate-bench", tmp_path / "x.json", cfg, results)
    measure._warm(None, cfg, torch.device("cpu"), 64, clock, results)
    assert len(steps) == 2 and all(n >= 17 for n in steps), steps


def test_rounds_alternate_the_arm_order_and_fold_into_one_row(tmp_path, monkeypatch):
    """rounds=3: at each prompt length the arms run in the given order, reversed, then given again; a row keeps
    each round's time per token and their median, the first round's tokens and whether every round generated
    them; a round that runs out of memory gets a row of its own, and its arm is neither repeated nor measured
    at longer prompts. (measure_point replaced: each arm's rounds take 3, 9 and 1 ms per token.)"""
    calls = []
    per_round_ms = (3.0, 9.0, 1.0)  # median 3, mean 4.33

    profiled = []

    def point(model, cfg, arm, ids, device, row, chunk, profile=True):
        n = ids.shape[1]
        k = calls.count((arm, n))  # the arm's round at n, from 0
        calls.append((arm, n))
        profiled.append(profile == (k == 0))  # the kernels' profile: the first round only
        row.update(prefill_chunk=None, phase="prefill")
        if arm == "window" and k == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        tokens = [5, 6, 8 if arm == "exact" and k == 2 else 7]  # exact's third round generates another token
        row.update(phase="done", prefill_s=0.1 * (k + 1), prompt_tokens_per_s=n / (0.1 * (k + 1)), tokens=tokens,
                   step_ms=[per_round_ms[k]], ms_per_token=per_round_ms[k],
                   kv={"held_bytes": 1, "full_bytes": 1, "positions": n})

    monkeypatch.setattr(measure, "measure_point", point)
    arms = ("native", "exact", "window")
    doc = gb.run(gb.Config(tiny=True, contexts=(64, 96), arms=arms, rounds=3, warmup_context=0, plots=False,
                           device="cpu"), tmp_path)
    given, reversed_ = list(arms), list(arms[::-1])
    assert calls == ([(arm, 64) for arm in given + reversed_ + ["native", "exact"]]  # window out of memory in round 2
                     + [(arm, 96) for arm in ["native", "exact", "exact", "native", "native", "exact"]])
    native = _row(doc, "native", 64)
    assert (native["rounds"], native["rounds_ms_per_token"], native["ms_per_token"]) == (3, [3.0, 9.0, 1.0], 3.0)
    assert native["prefill_s"] == pytest.approx(0.2) and native["tokens_equal_across_rounds"] is True
    exact = _row(doc, "exact", 96)
    assert exact["tokens"] == [5, 6, 7] and exact["tokens_equal_across_rounds"] is False
    window = [r for r in doc["results"]["rows"] if r["arm"] == "window"]
    assert [r.get("phase") for r in window] == ["done", "prefill", None]
    assert (window[0]["rounds"], window[0]["rounds_ms_per_token"]) == (1, [3.0]) and "out_of_memory" in window[1]
    assert window[2] == {"arm": "window", "context": 96, "skipped": "out of memory at 64 tokens"}
    assert "rounds differ" in gb.table(doc)
    assert all(profiled) and len(profiled) == len(calls)


def test_two_rounds_through_the_command(tmp_path, monkeypatch):
    """generate-bench --rounds 2, really measured: native, exact, then exact, native at each prompt length;
    each completed row has two times per token and their median, both rounds generating the same tokens;
    native's point that runs out of memory (simulated) is not repeated."""
    calls = []
    real_point, real_prefill = measure.measure_point, measure.chunked_prefill

    def point(model, cfg, arm, ids, *rest):
        calls.append((arm, ids.shape[1]))
        real_point(model, cfg, arm, ids, *rest)

    def prefill(model, input_ids, chunk_size, attention_mask=None):
        if not hasattr(model, "_poslsh_patch") and input_ids.shape[1] >= 96:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_prefill(model, input_ids, chunk_size, attention_mask)

    monkeypatch.setattr(measure, "measure_point", point)
    monkeypatch.setattr(measure, "chunked_prefill", prefill)
    assert main(["generate-bench", "--tiny", "--contexts", "64", "96", "--arms", "native", "exact", "--rounds", "2",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    doc = load_results(tmp_path / f"{gb.NAME}.json")
    assert calls == [("native", 64), ("exact", 64), ("exact", 64), ("native", 64),
                     ("native", 96), ("exact", 96), ("exact", 96)]
    done = [r for r in doc["results"]["rows"] if r.get("phase") == "done"]
    assert len(done) == 3 and "out_of_memory" in _row(doc, "native", 96)
    for r in done:
        first, second = r["rounds_ms_per_token"]
        assert r["rounds"] == 2 and r["ms_per_token"] == statistics.median([first, second]) == (first + second) / 2
        assert r["tokens_equal_across_rounds"] is True and len(r["tokens"]) == 4 + 2
    assert _row(doc, "exact", 64)["tokens"] == _row(doc, "native", 64)["tokens"]
    assert "measured in 2 rounds" in gb.summarize(doc, tmp_path)


@pytest.mark.parametrize("rounds", [0, -1, 1.5, "2"])
def test_bad_rounds_are_refused_before_any_model_is_built(rounds, tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "build_model", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match=r"^rounds must be (an integer )?>= 1, got"):
        gb.run(gb.Config(tiny=True, rounds=rounds, device="cpu"), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def _rounds(arm, n, ms):
    """A completed row of several rounds, each round's ms per token given."""
    return {**_done(arm, n, statistics.median(ms)), "rounds": len(ms), "rounds_ms_per_token": ms}


def test_ratio_to_native_is_the_median_of_paired_round_ratios():
    """Against native at the same prompt length, round k over native's round k, the median over k: exact's
    rounds over native's are 1.1, 1.1 and 3, so 1.1 (the aim met), where the ratio of the medians is 22/10;
    rows of other round counts, without rounds (an older JSON) or of another prompt length keep the ratio of
    their times; the report's method says how the arms were measured."""
    native = _rounds("native", 4096, [10.0, 20.0, 10.0])
    exact = _rounds("exact", 4096, [11.0, 22.0, 30.0])
    rows = [native, exact, _rounds("window", 4096, [11.0, 22.0]),  # two rounds against three
            _done("native", 8192, 10.0), _rounds("exact", 8192, [12.0])]
    assert exact["ms_per_token"] / native["ms_per_token"] == pytest.approx(2.2)
    found = {a["aim"]: (a["value"], a["met"]) for a in gb.aims({"rows": rows})}
    assert found["poslsh exact at 4K: time per token over native's"] == (pytest.approx(1.1), True)
    assert found["poslsh window at 4K: time per token over native's"] == (pytest.approx(1.65), False)
    assert found["poslsh exact at 8K: time per token over native's"] == (pytest.approx(1.2), True)
    # paired 3, 0.1, 0.1 (median 0.1), but rounds of 64K and 4K did not run close in time: 2 / 10
    assert gb.time_ratio(_rounds("window_evict", 65536, [30.0, 2.0, 1.0]), native) == pytest.approx(0.2)
    doc = {"results": {"rows": rows, "model": {}, "effective_config": {"new_tokens": 4, "window_eps": 1e-3,
                                                                         "samples": 8, "rounds": 3}},
           "environment": {}}
    assert "measured in 3 rounds" in gb.readme_section(doc) and "paired per-round ratios" in gb.readme_section(doc)
    del doc["results"]["effective_config"]["rounds"]  # a run from before rounds: one round, nothing said
    assert "rounds" not in gb.readme_section(doc)
