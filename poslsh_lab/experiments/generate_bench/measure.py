"""generate-bench, measuring: build the model (random weights of a shape, or a local checkpoint), warm
each arm up, then for every context and arm: prefill (in one call or in chunks), greedy decoding timed
per token, peak memory and the KV cache held, in ``rounds`` rounds of alternating arm order folded into
one row per point (medians of the times); a point that runs out of memory is recorded as such and its
arm skipped at longer contexts. The JSON document is rewritten after every point and round
(``experiments.harness.Run``)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ...util import replot_saved, require_package, synchronize
from ..harness import Run, describe_failure
from .design import (GRAPHED, NAME, QUADRATIC, SIZE_KEYS, Config, check, chunk_for, chunks, effective, method_of,
                     model_config_kwargs, size_overrides, unavailable)
from .report import make_plots, replot

# Seconds kept free before the deadline for the plot and the last save.
RESERVE_S = 5.0


# ----------------------------------------------------------------------------- the model


@functools.cache
def _call_options(model_class: type) -> tuple[str, bool]:
    """(the keyword under which a model class's forward takes its KV cache: "cache" since transformers 5.2x,
    where "past_key_values" still works but warns; whether it takes ``logits_to_keep``), read once per
    class, not per decoding step."""
    parameters = inspect.signature(model_class.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


def _forward(model: torch.nn.Module, ids: Tensor, cache: Any, attention_mask: Tensor | None = None) -> Tensor:
    """One forward of ``ids`` [B, n] against ``cache`` (updated in place): the last position's logits [B, V]
    (only that position goes through the output layer: a 256K-token prompt's full logits would not fit)."""
    cache_keyword, keeps_logits = _call_options(type(model))
    kwargs: dict[str, Any] = {cache_keyword: cache, "use_cache": True}
    if keeps_logits:
        kwargs["logits_to_keep"] = 1
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    return model(input_ids=ids, **kwargs).logits[:, -1]


def _new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except (TypeError, AttributeError):  # transformers 4.x
        return DynamicCache()


def chunked_prefill(model: torch.nn.Module, input_ids: Tensor, chunk_size: int,
                    attention_mask: Tensor | None = None) -> tuple[Any, Tensor]:
    """``poslsh.integrations.hf.chunked_prefill`` (imported when called: transformers is optional):
    the prompt [B, n] read ``chunk_size`` tokens at a time against the cache -> (cache, logits [B, V])."""
    from poslsh.integrations.hf import chunked_prefill as prefill

    return prefill(model, input_ids, chunk_size, attention_mask)


def build_model(cfg: Config, device: torch.device, dtype: torch.dtype, max_positions: int
                ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model in eval mode on ``device`` and what it is (family, sizes, parameters, weight bytes):
    a local checkpoint (``cfg.model``), else the shape's config with random weights drawn on the device
    (drawing 7B weights on the CPU would take minutes)."""
    import transformers

    from poslsh.integrations.hf import model_family

    torch.manual_seed(cfg.seed)
    if cfg.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device)
        source = cfg.model
    else:
        if cfg.config_file:
            config = transformers.AutoConfig.from_pretrained(cfg.config_file)
            family = "falcon" if config.model_type in ("RefinedWeb", "RefinedWebModel") else config.model_type
            if family not in SIZE_KEYS:
                raise ValueError(f"config_file {cfg.config_file} is a {config.model_type!r} model, not one of "
                                 f"{', '.join(SIZE_KEYS)}")
            for key, value in size_overrides(cfg, family, max_positions).items():
                setattr(config, key, value)
            source = cfg.config_file
        else:
            family, kwargs = model_config_kwargs(cfg, max_positions)
            config = transformers.AutoConfig.for_model(family, **kwargs)
            source = cfg.shape
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = model.to(device)  # a no-op where the weights were drawn there, as they should be
    model.eval()
    family = model_family(model)  # ValueError for a checkpoint that is not BLOOM, MPT or Falcon with ALiBi
    if family == "mpt" and model.config.max_seq_len < max_positions:
        model.config.max_seq_len = max_positions  # MPT builds its bias this long on every forward
    c = model.config
    get = lambda *names: next(getattr(c, n) for n in names if getattr(c, n, None) is not None)  # noqa: E731
    heads = get("n_head", "n_heads", "num_attention_heads")
    hidden = get("hidden_size", "d_model")
    params = sum(p.numel() for p in model.parameters())
    info = {"source": source, "random_weights": not cfg.model, "family": family,
            "layers": get("n_layer", "n_layers", "num_hidden_layers"), "heads": heads, "hidden": hidden,
            "head_dim": hidden // heads, "vocab": c.vocab_size,
            "parameters": params, "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": getattr(c, "_attn_implementation", None)}
    return model, info


def _use_arm(model: torch.nn.Module, cfg: Config, arm: str) -> Any:
    """Patch the model for an arm (or restore transformers' own attention); the patch or None."""
    from poslsh.integrations.hf import patch_model, unpatch_model

    spec, evict = method_of(cfg, arm)
    if spec is None:
        unpatch_model(model)
        return None
    return patch_model(model, spec, seed=cfg.seed, evict=evict)


# ----------------------------------------------------------------------------- one point


def cache_bytes(cache: Any) -> dict[str, int]:
    """What a transformers cache holds: ``held_bytes`` (its key and value tensors), ``storage_bytes``
    (the memory behind them: an evicted prefix stays allocated while a view of it is held, until the
    next update copies), ``full_bytes`` (a cache of every position, none evicted) and ``positions``."""
    held = storage = full = positions = 0
    seen: set[int] = set()
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            continue
        for t in (keys, values):
            held += t.numel() * t.element_size()
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                storage += s.nbytes()
        per_position = (keys.numel() * keys.element_size() + values.numel() * values.element_size()) // keys.shape[-2]
        length = layer.get_seq_length()  # the logical length (stored + evicted) under the poslsh patch
        full += per_position * length
        positions = max(positions, length)
    return {"held_bytes": held, "storage_bytes": storage, "full_bytes": full, "positions": positions}


def graph_cache_bytes(decoder: Any) -> dict[str, int]:
    """``cache_bytes`` of a ``GraphedDecoder``'s static window cache: its buffers are held (and are the
    storage), a full cache would hold every position it has seen, the rest counts as evicted."""
    held = decoder.cache.nbytes()
    full = held // decoder.window * decoder.length
    return {"held_bytes": held, "storage_bytes": held, "full_bytes": full, "positions": decoder.length,
            "evicted_bytes": max(full - held, 0)}


Step = Callable[[Tensor], Tensor]  # a decoding step: token [1, 1] on the device -> the next token [1, 1]


def _read_prompt(model: torch.nn.Module, arm: str, ids: Tensor, chunk: int, device: torch.device
                 ) -> tuple[Tensor, Step, Any]:
    """Read a prompt as an arm does: (last logits [1, V], its decoding step, what holds its cache: the
    ``DynamicCache``, or the ``GraphedDecoder`` of a graphed arm, whose step replays its CUDA graph)."""
    if arm in GRAPHED:
        from poslsh.integrations.hf_graph import GraphedDecoder

        decoder = GraphedDecoder(model, graph=device.type == "cuda")
        logits = decoder.prefill(ids, chunk)
        return logits, lambda token: decoder.step().clone(), decoder  # clone: the next step overwrites it
    cache, logits = chunked_prefill(model, ids, chunk)
    return logits, lambda token: _forward(model, token, cache).argmax(-1, keepdim=True), cache


def _greedy(step: Step, logits: Tensor, steps: int, device: torch.device) -> tuple[list[int], list[float], float]:
    """Greedy decoding: the token of ``logits``, one untimed step (a graphed arm records its graph there),
    then ``steps`` timed steps.

    Returns:
        (every generated token, ms of each timed step (CUDA events on the GPU), wall ms per timed step
        from the first timed step's start to the last one's end, synchronised: kernel time included).
    """
    tokens = [logits.argmax(-1, keepdim=True)]  # [1, 1] on the device: no host read per step
    tokens.append(step(tokens[-1]))
    cuda = device.type == "cuda"
    marks: list[Any] = []

    def mark() -> None:
        if cuda:
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    synchronize(device)
    start = time.perf_counter()
    mark()
    for _ in range(steps):
        tokens.append(step(tokens[-1]))
        mark()
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    step_ms = [a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    return torch.cat(tokens, -1)[0].tolist(), step_ms, wall_ms


def _kernel_ms_per_token(step: Step, token: Tensor, steps: int) -> float:
    """Device (kernel and copy) time per decoding step, from the profiler: the sum the profiler's own
    table calls "Self CUDA time total", over ``steps`` more steps (not the timed ones: profiling slows the
    host)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step(token)
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.events()
             if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    return us / 1e3 / steps


def _release(cache: Any) -> None:
    """Drop a cache's tensors now: under eviction its layers sit in reference cycles (the patch wraps their
    methods), which only the cycle collector would free."""
    for layer in getattr(cache, "layers", []):
        layer.keys = layer.values = None


def _free(device: torch.device, collect: bool = False) -> None:
    """Return cached device memory to the allocator's pool; ``collect``: first collect reference cycles (after
    a failure: 0.1-0.3 s with transformers loaded, too slow for every point)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_point(model: torch.nn.Module, cfg: Config, arm: str, ids: Tensor, device: torch.device,
                  row: dict[str, Any], chunk: int, profile: bool = True) -> None:
    """Fill ``row`` with one arm at one prompt ``ids`` [1, n] read in chunks of ``chunk`` tokens (n: one
    call): prefill seconds and peak memory, greedy decoding times, tokens, KV cache held, and (``profile``,
    on CUDA) the kernels' time per token. ``row["phase"]`` says how far it got (an exception leaves it
    there)."""
    cuda = device.type == "cuda"
    patch = _use_arm(model, cfg, arm)
    n = ids.shape[1]
    row["prefill_chunk"] = chunk if chunk < n else None  # None: one call
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        row["start_bytes"] = torch.cuda.memory_allocated(device)
    row["phase"] = "prefill"
    synchronize(device)
    t = time.perf_counter()
    logits, step, held = _read_prompt(model, arm, ids, chunk, device)
    synchronize(device)
    row["prefill_s"] = time.perf_counter() - t
    row["prompt_tokens_per_s"] = n / row["prefill_s"]
    if cuda:
        row["prefill_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    row["phase"] = "decode"
    tokens, step_ms, wall_ms = _greedy(step, logits, cfg.new_tokens, device)
    del logits
    row.update(tokens=tokens, step_ms=step_ms, ms_per_token=wall_ms)
    if cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    row["kv"] = graph_cache_bytes(held) if arm in GRAPHED else cache_bytes(held)
    if patch is not None and patch.options.evict:
        from poslsh.integrations.hf import cache_report

        if arm not in GRAPHED:
            row["kv"]["evicted_bytes"] = patch.cache_memory(held)["evicted_bytes"]
        # what a cache evicting per KV head (not one prefix per layer) would hold: the keys some future
        # query of that head can reach
        report = cache_report(patch, row["kv"]["positions"], dtype=model.dtype)
        row["kv"]["per_head_reachable_bytes"] = report["total_bytes"] - report["saved_bytes"]
    row["phase"] = "done"
    if cuda and cfg.profile_steps and profile:
        last = torch.tensor([[tokens[-1]]], device=device)
        try:
            row["kernel_ms_per_token"] = _kernel_ms_per_token(step, last, cfg.profile_steps)
        except Exception as err:  # the profiler is an extra: the point's measurements stand without it
            row["kernel_time_error"] = describe_failure(err)
    _release(held)


# ----------------------------------------------------------------------------- the run


def _device_and_dtype(cfg: Config) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def _prompt(cfg: Config, n: int, vocab: int, device: torch.device) -> Tensor:
    """Random token ids [1, n], the same for every arm (seeded by the run's seed and n)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n)
    return torch.randint(0, vocab, (1, n), generator=g).to(device)


def _estimate_s(rows: list[dict], arm: str, n: int) -> float | None:
    """Seconds a point of ``arm`` at n should take, from its last measured point: scaled by (n/m)^2 for
    the arms whose prefill is quadratic, else n/m (None: nothing measured yet)."""
    done = [r for r in rows if r["arm"] == arm and "seconds" in r and r.get("phase") == "done"]
    if not done:
        return None
    last = done[-1]
    ratio = n / last["context"]
    return last["seconds"] * ratio ** (2 if arm in QUADRATIC else 1)


# Decoding steps of each arm's warm-up: Triton specialises integer arguments (key counts, offsets) on
# divisibility by 16, so a warm-up of fewer than 17 steps can leave a specialisation to compile inside the
# timed steps (session 7's H100 run: 32-105 ms per token at 4K, where the kernels took 1.6 ms).
WARMUP_STEPS = 17


def _warm(model: torch.nn.Module, cfg: Config, device: torch.device, vocab: int, clock: Run,
          results: dict) -> None:
    """Each arm once at ``warmup_context`` tokens (in chunks where the arm may chunk), then
    ``WARMUP_STEPS`` decoding steps: the kernels compile here, not inside the timings."""
    n = cfg.warmup_context
    if not n:
        return
    ids = _prompt(cfg, n, vocab, device)
    for arm in cfg.arms:
        if clock.late():
            break
        reason = unavailable(arm, device.type)
        if reason:
            results["warmup_s"][arm] = f"skipped: {reason}"
            clock.log(f"warm-up {arm}: skipped ({reason}); its points too")
            continue
        t = time.perf_counter()
        try:
            _use_arm(model, cfg, arm)
            # an arm that may chunk reads it in at least two calls (the second against a cache), of the
            # run's chunk size where the warm-up prompt holds two of them
            given = [c for c in (cfg.prefill_chunk, cfg.oom_chunk) if chunks(cfg, arm, c)]
            chunk = min([max(1, n // 2)] + given) if given else n
            logits, step, held = _read_prompt(model, arm, ids, chunk, device)
            _greedy(step, logits, WARMUP_STEPS, device)
            _release(held)
            results["warmup_s"][arm] = time.perf_counter() - t
        except Exception as err:  # measured again (and recorded) at the first context
            results["warmup_s"][arm] = describe_failure(err)
        _free(device, collect=not isinstance(results["warmup_s"][arm], float))
        clock.log(f"warm-up {arm}: {time.perf_counter() - t:.1f} s")


def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Build the model, measure every (context, arm), write ``generate-bench.json`` and the PNG; or, with
    ``replot``, only redraw the PNG of that JSON. Returns the JSON document."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = effective(config)
    check(cfg)
    require_package("transformers", "poslsh generate-bench", "hf")
    if cfg.config_file and not Path(cfg.config_file).exists():
        raise ValueError(f"config_file must be a config.json or a folder holding one, got {cfg.config_file!r}")
    if cfg.model:
        if cfg.config_file:
            raise ValueError("config_file and model both name the model: give one")
        if not Path(cfg.model).is_dir():
            raise ValueError(f"model must be a checkpoint folder, got {cfg.model!r}")
        given = [name for name in ("layers", "hidden", "heads", "vocab", "init_std") if getattr(config, name)]
        if given:
            raise ValueError(f"{given[0]} sizes a random model of --shape; --model {cfg.model} has its own")
    device, dtype = _device_and_dtype(cfg)
    results: dict[str, Any] = {"partial": True, "effective_config": dataclasses.asdict(cfg), "model": None,
                               "warmup_s": {}, "rows": [], "notes": []}
    clock = Run(NAME, out / f"{NAME}.json", config, results, deadline_s=cfg.budget_s, stream=sys.stderr)
    t = time.perf_counter()
    model, info = build_model(cfg, device, dtype, max(cfg.contexts) + cfg.new_tokens + 2 + cfg.profile_steps)
    info["build_s"] = time.perf_counter() - t
    results["model"] = info
    clock.log(f"model {info['source']}: {info['layers']} layers, {info['heads']} heads, hidden {info['hidden']}, "
              f"{info['parameters'] / 1e6:.0f} M parameters, {info['dtype']} on {device} "
              f"(built in {info['build_s']:.1f} s)")
    clock.save()
    with torch.inference_mode():
        _warm(model, cfg, device, info["vocab"], clock, results)
        clock.save()
        _measure_all(model, cfg, device, info["vocab"], clock, results)
    results["partial"] = False
    from poslsh.integrations.hf import unpatch_model

    unpatch_model(model)
    doc = clock.save()
    try:
        if cfg.plots:
            make_plots(doc, out)
    except Exception as err:  # the plot can be redrawn from the JSON with --replot
        results["notes"].append(f"plotting failed: {describe_failure(err)}")
        doc = clock.save()
    clock.log("done")
    return doc


def _measure(model: torch.nn.Module, cfg: Config, arm: str, ids: Tensor, device: torch.device,
             chunk: int, profile: bool = True) -> dict[str, Any]:
    """One round of one point: its row, a failure recorded there (the run going on)."""
    row: dict[str, Any] = {"arm": arm, "context": ids.shape[1]}
    t = time.perf_counter()
    try:
        measure_point(model, cfg, arm, ids, device, row, chunk, profile)
    except torch.OutOfMemoryError as err:
        row["out_of_memory"] = describe_failure(err)
    except Exception as err:
        row["error"] = describe_failure(err)
    # after the except block, where the traceback no longer holds the point's tensors
    _free(device, collect=row.get("phase") != "done")
    row["seconds"] = time.perf_counter() - t
    return row


def _attempt(model: torch.nn.Module, cfg: Config, arm: str, ids: Tensor, device: torch.device, chunk: int,
             clock: Run, rows: list[dict]) -> dict[str, Any]:
    """Measure a point's first round, add its row to the document (a completed one as a row of one round,
    which later rounds extend), log it, save the document."""
    row = _measure(model, cfg, arm, ids, device, chunk)
    if row.get("phase") == "done":
        row.update(rounds=1, rounds_ms_per_token=[row["ms_per_token"]], rounds_prefill_s=[row["prefill_s"]],
                   tokens_equal_across_rounds=True)
    rows.append(row)
    clock.log(_line(row))
    clock.save()
    return row


def _add_round(row: dict[str, Any], again: dict[str, Any]) -> None:
    """Fold a later round of a point into its row: time per token and prefill time become the medians over
    the rounds (each round's kept in ``rounds_ms_per_token`` and ``rounds_prefill_s``), peak memory the max,
    ``seconds`` the total; tokens, step and kernel times and the KV cache stay the first round's, and
    ``tokens_equal_across_rounds`` says whether every round generated those tokens."""
    row["rounds_ms_per_token"].append(again["ms_per_token"])
    row["rounds_prefill_s"].append(again["prefill_s"])
    row["rounds"] = len(row["rounds_ms_per_token"])
    row["ms_per_token"] = statistics.median(row["rounds_ms_per_token"])
    row["prefill_s"] = statistics.median(row["rounds_prefill_s"])
    row["prompt_tokens_per_s"] = row["context"] / row["prefill_s"]
    row["tokens_equal_across_rounds"] &= again["tokens"] == row["tokens"]
    for key in ("prefill_peak_bytes", "peak_bytes"):
        if key in row:
            row[key] = max(row[key], again[key])
    row["seconds"] += again["seconds"]


def _repeat(model: torch.nn.Module, cfg: Config, row: dict[str, Any], ids: Tensor, device: torch.device,
            clock: Run, rows: list[dict]) -> dict[str, Any]:
    """Measure a completed point once more (its arm, prompt and chunks), log the round, save the document.
    Returns the point's row with the round folded in, or the round's own row where it failed (added to
    the document beside the point's row, whose completed rounds stand)."""
    # the kernels' time per token is the first round's (``_add_round``): later rounds skip the profiler
    again = _measure(model, cfg, row["arm"], ids, device, row["prefill_chunk"] or ids.shape[1], profile=False)
    clock.log(f"{_line(again)}, round {row['rounds'] + 1}")
    if again.get("phase") != "done":
        rows.append(again)
        clock.save()
        return again
    _add_round(row, again)
    clock.save()
    return row


def _first_round(model: torch.nn.Module, cfg: Config, arm: str, ids: Tensor, device: torch.device, clock: Run,
                 rows: list[dict], out_of_memory: dict[str, int], chunked_after: dict[str, int]) -> dict[str, Any]:
    """An arm's first round at a prompt: skipped (``_skip``), or measured, in chunks after its one-call
    prefill ran out of memory (``chunked_after`` records where). Returns the row that stands for the point."""
    n = ids.shape[1]
    skip = unavailable(arm, device.type) or _skip(rows, arm, n, out_of_memory, clock)
    if skip:
        rows.append({"arm": arm, "context": n, "skipped": skip})
        clock.save()
        return rows[-1]
    chunk = min(cfg.oom_chunk, n) if arm in chunked_after else chunk_for(cfg, arm, n)
    row = _attempt(model, cfg, arm, ids, device, chunk, clock, rows)
    if ("out_of_memory" in row and row.get("phase") == "prefill" and chunk == n > cfg.oom_chunk
            and chunks(cfg, arm, cfg.oom_chunk)):
        chunked_after[arm] = n
        row = _attempt(model, cfg, arm, ids, device, cfg.oom_chunk, clock, rows)
    return row


def _measure_all(model: torch.nn.Module, cfg: Config, device: torch.device, vocab: int, clock: Run,
                 results: dict) -> None:
    """Every (context, arm), shortest contexts first, each arm ``cfg.rounds`` times per context in rounds
    of alternating order (the given order, reversed, given, ...): a slow stretch of a shared host then
    falls on every arm alike, and round k of each arm runs close in time to round k of the others. An arm
    that runs out of memory is not repeated and is skipped at longer contexts, unless its prefill was one
    call and ``oom_chunk`` is set: then the point is measured again with the prompt in chunks, and so are
    the arm's longer prompts."""
    rows = results["rows"]
    out_of_memory: dict[str, int] = {}  # arm -> the context where it ran out of memory
    chunked_after: dict[str, int] = {}  # arm -> the context where its one-call prefill ran out of memory
    for n in sorted(cfg.contexts):
        ids = _prompt(cfg, n, vocab, device)
        completed: dict[str, dict] = {}  # arm -> its row at n while every round so far completed
        for k in range(cfg.rounds):
            for arm in cfg.arms if k % 2 == 0 else cfg.arms[::-1]:
                if k == 0:
                    row = _first_round(model, cfg, arm, ids, device, clock, rows, out_of_memory, chunked_after)
                elif arm in completed and not clock.late():
                    row = _repeat(model, cfg, completed.pop(arm), ids, device, clock, rows)
                else:
                    continue
                if row.get("phase") == "done":
                    completed[arm] = row
                elif "out_of_memory" in row:
                    out_of_memory[arm] = n
        del ids


def _skip(rows: list[dict], arm: str, n: int, out_of_memory: dict[str, int], clock: Run) -> str | None:
    """Why an arm that can run is not measured at context n (out of memory at a shorter one, the
    deadline), or None."""
    estimate = _estimate_s(rows, arm, n)
    if arm in out_of_memory:
        return f"out of memory at {out_of_memory[arm]} tokens"
    if clock.late():
        return "deadline"
    if estimate is not None and time.perf_counter() + estimate > clock.deadline - RESERVE_S:
        return f"deadline (estimated {estimate:.0f} s)"
    return None


def _line(row: dict) -> str:
    head = f"{row['arm']:>12} at {row['context']:>7}:"
    if row.get("phase") != "done":
        what = row.get("out_of_memory") and "out of memory" or row.get("error", "")
        return f"{head} {what} during {row.get('phase')} ({row['seconds']:.1f} s)"
    peak = f", peak {row['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in row else ""
    return (f"{head} prefill {row['prefill_s']:.2f} s{peak}, {row['ms_per_token']:.2f} ms/token, "
            f"KV {row['kv']['held_bytes'] / 2**20:.1f} MiB ({row['seconds']:.1f} s)")
