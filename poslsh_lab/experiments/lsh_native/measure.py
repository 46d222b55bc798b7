"""lsh-native, measuring: train the arms, evaluate them, time the attention calls, compile the Triton
kernels ahead; the JSON document is rewritten after every step (``experiments.harness.Run``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poslsh.method import parse_method
from ...util import replot_saved
from ..harness import Run, describe_failure
from ..metrics import gpu_time
from .design import NAME, RESERVE_S, Config, arms, check, effective, eval_batch, fill_methods, jobs, main_methods
from .report import replot, verdict


# ---------------------------------------------------------------------------- the run
def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Train the arms, evaluate them, write ``lsh-native.json`` and the PNGs; or, with ``replot``, only
    redraw the PNGs of that JSON. Returns the JSON document."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = effective(config)
    check(cfg)
    results: dict[str, Any] = {"partial": True, "effective_config": dataclasses.asdict(cfg), "timing": {},
                               "arms": [], "rows": [], "timings": [], "layer_errors": {}, "precompile": None}
    clock = Run(NAME, out / f"{NAME}.json", config, results, deadline_s=cfg.deadline_s)
    log, save = clock.log, clock.save

    from ...lm.data import build_corpus
    from ...lm.train import resolve_device

    device = resolve_device(cfg.device)
    t = time.perf_counter()
    corpus = build_corpus(None, cfg.max_bytes, cfg.heldout_fraction)
    results["corpus"] = corpus.stats()
    results["timing"]["corpus_s"] = time.perf_counter() - t
    log(f"corpus {corpus.stats()} in {results['timing']['corpus_s']:.1f} s")
    workers = _start_precompile(cfg, device, log)
    try:
        t = time.perf_counter()
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.resolve().with_name(out.resolve().name
                                                                                          + "_checkpoint")
        models = _train_arms(cfg, corpus, ckpt, device, clock, results, log, save)
        results["timing"]["train_s"] = time.perf_counter() - t
        save()
        t = time.perf_counter()
        _evaluate(models, corpus.heldout, cfg, device, clock, results, log, save, workers)
        results["timing"]["eval_s"] = time.perf_counter() - t
    finally:
        results["precompile"] = _finish_precompile(workers, log)
    results["partial"] = False
    doc = save()
    replot(doc, out)
    for line in verdict(results, cfg):
        log(line)
    log(f"done; timing {', '.join(f'{k} {v:.0f}' for k, v in results['timing'].items())} s")
    return doc


def _train_arms(cfg: Config, corpus, ckpt: Path, device: torch.device, clock: Run, results: dict, log,
                save) -> dict[str, Any]:
    """Train every arm in ``arms`` order within what the deadline leaves before ``eval_reserve_s``; fill
    ``results["arms"]``. Returns {arm name: model in eval mode} for the arms that trained."""
    from ...lm.train import TrainConfig, train

    plan = arms(cfg)
    end = clock.end(0, reserve_s=cfg.eval_reserve_s + RESERVE_S)  # when training must be over
    # Planned cost of each arm in units of (a)'s training time: an LSH arm may take slower_arm_factor times.
    weight = {a.name: 1.0 if a.kind == "baseline" else cfg.slower_arm_factor * (
        cfg.finetune_fraction if a.kind == "finetune" else 1.0) for a in plan}
    models: dict[str, Any] = {}
    base: dict[str, Any] = {}  # arm (a)'s steps and seconds
    for i, arm in enumerate(plan):
        entry: dict[str, Any] = {"name": arm.name, "kind": arm.kind, "train_attention": arm.train,
                                 "optional": arm.optional}
        results["arms"].append(entry)
        left = end - time.perf_counter()
        later = sum(weight[a.name] for a in plan[i + 1:] if not a.optional)  # the required arms still to come
        if arm.kind == "baseline":
            steps = cfg.max_steps
            budget = min(cfg.train_budget_s or math.inf, left / (1 + later))  # leave the others their share
        elif not base:
            entry["skipped"] = "arm (a) did not train"
            continue
        else:
            steps = base["steps"] if arm.kind == "native" else max(1, round(cfg.finetune_fraction * base["steps"]))
            need = weight[arm.name] * base["seconds"]  # what this arm may take
            budget = left - later * base["seconds"]  # what the deadline leaves it
            if budget < (need if arm.optional else 0.5 * need / cfg.slower_arm_factor):
                entry["skipped"] = (f"deadline: needs up to {need:.0f} s, {max(budget, 0):.0f} s left for it before "
                                    "the evaluation reserve")
                log(f"arm {arm.name}: skipped ({entry['skipped']})")
                continue
            if cfg.train_budget_s or budget < math.inf:  # no budgets at all (--tiny): no cap either
                budget = min(budget, need)
        ft = arm.kind == "finetune"
        tc = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, context=cfg.train_context,
                         batch_size=cfg.batch_size, steps=steps, lr=cfg.lr * (cfg.finetune_lr_ratio if ft else 1.0),
                         warmup=max(1, steps // 10) if ft else cfg.warmup, eval_every=cfg.eval_every,
                         eval_windows=16 if cfg.tiny else 64, seed=cfg.seed + (1 if ft else 0),  # ft: new batches
                         partition_seed=cfg.seed, max_bytes=cfg.max_bytes, heldout_fraction=cfg.heldout_fraction,
                         device=str(device), time_budget_s=0.0 if budget == math.inf else max(1.0, budget),
                         train_attention=arm.train, init_checkpoint=str(ckpt / "exact") if ft else "")
        entry["planned_steps"] = steps
        entry["time_budget_s"] = tc.time_budget_s
        log(f"arm {arm.name}: training with {arm.train} for up to {steps} steps"
            + (f", budget {tc.time_budget_s:.0f} s" if tc.time_budget_s else ""))
        try:
            result = train(tc, ckpt / _slug(arm.name), corpus=corpus, log=log)
        except Exception as err:  # one failing arm (a kernel, memory) must not lose the others
            entry["error"] = describe_failure(err)
            log(f"arm {arm.name}: failed: {entry['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        models[arm.name] = result.pop("model")
        history = result.pop("history")
        entry.update({k: result[k] for k in ("steps", "tokens", "parameters", "train_seconds", "tokens_per_second",
                                             "heldout_bits_per_byte")})
        entry["initial_heldout_bits_per_byte"] = result["initial_heldout_loss"] / math.log(2)
        entry["planned_tokens"] = steps * cfg.batch_size * cfg.train_context
        entry["token_budget_met"] = result["steps"] == steps or arm.kind == "baseline"
        entry["history"] = [{"step": h["step"], **{f"{k.split('_')[0]}_bits_per_byte": h[k] / math.log(2)
                                                   for k in ("train_loss", "heldout_loss") if k in h}}
                            for h in history]
        results.setdefault("unigram", result["unigram"])
        if arm.kind == "baseline":
            base.update(steps=result["steps"], seconds=result["train_seconds"])
        save()
    return models


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("+", "_then_")


def _evaluate(models: dict, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run, results: dict,
              log, save, workers: list | None = None) -> None:
    """Every job of ``jobs`` while its expected cost (``_expected_seconds``) fits before the deadline, saving
    the JSON after each; what does not run is recorded with the reason."""
    first_target = max(cfg.contexts)  # every context has its full window before the first scored token
    if heldout.size < first_target + cfg.scored_tokens:
        raise ValueError(f"held-out set ({heldout.size} tokens) too short for context {first_target} and "
                         f"{cfg.scored_tokens} scored tokens")
    results["scored_from"] = first_target
    end = clock.end(0, reserve_s=RESERVE_S)
    trained = {a["name"]: a for a in results["arms"]}
    error_share = cfg.error_budget_s / max(1, len(models))
    compiled: set[tuple] = set()  # kernels this process has run
    for job in jobs(cfg):
        kind, arm = job[0], (job[1] if job[0] != "time" else None)
        record = ({"arm": arm, "context": job[2], "method": job[3]} if kind == "row" else
                  {"context": job[1], "method": job[2]} if kind == "time" else {})
        if arm is not None and arm not in models:
            why = trained[arm].get("skipped") or trained[arm].get("error") or "not trained"
            _store(results, job, {**record, "skipped": f"arm not trained ({why})"})
            continue
        key = _kernel(job, device)
        need = _expected_seconds(job, key, compiled, _precompiled(workers), error_share)
        if time.perf_counter() + need > end:
            _store(results, job, {**record, "skipped": f"deadline (expected {need:.0f} s)"})
            continue
        t = time.perf_counter()
        try:
            if kind == "row":
                _store(results, job, _row(models[arm], heldout, arm, job[2], job[3], cfg, device, first_target))
                r = results["rows"][-1]
                log(f"{arm:<18} {job[2]:>6} {job[3]:<18} {r['bits_per_token']:.4f} bits/byte  "
                    f"{r['time_per_token'] * 1e6:7.3f} us/token forward  ({r['wall_seconds']:.1f} s)")
            elif kind == "time":
                _store(results, job, _attention_time(job[1], job[2], cfg, device))
                r = results["timings"][-1]
                log(f"attention {job[1]:>6} {job[2]:<18} {r['attention_us_per_token']:.4f} us/token ({r['backend']})")
            else:
                cap = min(end, time.perf_counter() + error_share) if error_share else end
                _store(results, job, _layer_errors(models[arm], heldout, arm, cfg, device, cap))
                log(f"layer errors {arm}: " + ", ".join(f"{m} {np.mean(v):.3g}" for m, v in
                                                         results["layer_errors"][arm]["errors"].items()))
            compiled.add(key)
        except Exception as err:  # one failing job (a kernel that fails, out of memory) must not lose the rest
            _store(results, job, {**record, "error": describe_failure(err), "wall_seconds": time.perf_counter() - t})
            log(f"{job}: failed: {describe_failure(err)}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    for model in models.values():
        model.set_attention("exact")


def _store(results: dict, job: tuple, entry: dict) -> None:
    """A job's outcome (measurement, skip or error) where the JSON keeps its kind."""
    if job[0] == "errors":
        results["layer_errors"][job[1]] = entry
    else:
        results["rows" if job[0] == "row" else "timings"].append(entry)


# Compile seconds of a kernel's first launch, read off the lm-validation H200 log of the previous LSH kernel
# (a row's wall time at its first context minus its time at a context that reused the kernel): the kernel
# unrolls its per-sample loops, about 0.4 s per sample (grid) and 1.2 s (cut, which loads block bounds).
# Exact and window (one sample's worth of code) take the r = 1 figure. A compiled row costs at most ~2 s.
ROW_S = 2.0


def _kernel(job: tuple, device: torch.device) -> tuple:
    """What a row or timing job compiles on its first launch on CUDA: the Triton kernel of (method, r,
    scheme), one for every context and arm (``eval_batch``); () elsewhere."""
    if device.type != "cuda" or job[0] == "errors":
        return ()
    spec = parse_method(job[-1])
    return _kernel_key(spec.method, spec.samples if spec.random else 1, spec.scheme if spec.random else "-")


def _kernel_key(method: str, r: int, scheme: str) -> tuple:
    return ("triton", method, r, scheme)


def _expected_seconds(job: tuple, key: tuple, compiled: set, precompiled: set, error_share: float) -> float:
    """A job's expected wall time: a compiled row's, plus the compile when its kernel is new to the process
    and not in Triton's disk cache yet (``precompiled``); the per-layer errors take their share."""
    if job[0] == "errors":
        return error_share
    if not key:
        return 0.0
    if key in compiled:
        return ROW_S
    if key in precompiled:
        return ROW_S + 1.0
    _, method, r, scheme = key
    return ROW_S + (1.0 + (1.2 if scheme == "cut" else 0.4) * r) * (1.5 if method == "hybrid" else 1.0)


def _row(model, heldout: np.ndarray, arm: str, n: int, method: str, cfg: Config, device: torch.device,
         first_target: int) -> dict[str, Any]:
    """One perplexity row (``poslsh_lab.lm.cli.evaluate_checkpoint``) with the arm, batch and wall seconds."""
    from ...lm.cli import evaluate_checkpoint

    t = time.perf_counter()
    batch = eval_batch(n, cfg)
    [row] = evaluate_checkpoint(model, heldout, [n], [parse_method(method)], [cfg.seed], device=device,
                                batch_size=batch, max_scored=cfg.scored_tokens, first_target=first_target)
    return {"arm": arm, **row, "batch": batch, "wall_seconds": time.perf_counter() - t}


@torch.no_grad()
def _attention_time(n: int, method: str, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Time of one ``poslsh.attention`` call as a layer of the model makes it at context n (its eval batch,
    heads, head dim and layout, bf16 on CUDA, fixed partitions of layer 0), times the layers, per token."""
    from poslsh.alibi import alibi_slopes
    from poslsh.attention import attention
    from poslsh.attention.dispatch import resolve_spec, select_backend
    from poslsh.layer_partitions import LayerPartitions
    spec = parse_method(method)
    b, h, d = eval_batch(n, cfg), cfg.n_heads, cfg.d_model // cfg.n_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    # [B, N, H, D] viewed as [B, H, N, D]: the strides of the model's projections.
    q, k, v = (torch.randn(b, n, h, d, generator=g, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    parts = None
    if spec.random:
        parts = LayerPartitions(alibi_slopes(h), spec.samples, spec.scheme, cfg.seed, 0,
                                sampling=spec.sampling).get(n, device)
    kw = dict(spec.attention_kwargs(), partitions=parts)  # the options the method reads, no others
    backend = select_backend(q, resolve_spec(q, k, v, **kw), "auto").name

    def call() -> torch.Tensor:
        return attention(q, k, v, backend="auto", **kw)

    if device.type == "cuda":
        ms, how = gpu_time(call, warmup_ms=5, rep_ms=20)
    else:
        call()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        ms, how = 1e3 * float(np.median(times)), "median of 3 calls (wall)"
    return {"context": n, "method": method, "batch": b, "backend": backend, "ms_per_call": ms, "timed": how,
            "attention_us_per_token": cfg.n_layers * ms * 1e3 / (b * n)}


def _layer_errors(model, heldout: np.ndarray, arm: str, cfg: Config, device: torch.device,
                  end: float) -> dict[str, Any]:
    """Per-layer error of every non-exact main method (and, for arm (a), the fill methods) at
    ``error_context``, float32, "fused" backend, until ``end``."""
    from ...lm.evaluate import layer_errors

    n = min(cfg.error_context, heldout.size // cfg.error_batch)
    windows = np.stack([heldout[i * n:(i + 1) * n].astype(np.int64) for i in range(cfg.error_batch)])
    idx = torch.from_numpy(windows).to(device)
    labels = [m for m in main_methods(cfg) if m != "exact"] + (fill_methods(cfg) if arm == "exact" else [])
    errs = layer_errors(model, idx, [parse_method(m) for m in labels], seeds=[cfg.seed], backend="fused",
                        deadline=None if end == math.inf else end)
    return {"context": n, "batch": cfg.error_batch, "seeds": [cfg.seed], "backend": "fused", "errors": errs,
            "skipped": [m for m in labels if m not in errs]}


# ---------------------------------------------------------------------------- Triton kernels compiled ahead
def precompile_specs(cfg: Config) -> list[dict[str, Any]]:
    """The Triton kernels the run will launch, as ``warm_kernels`` specs: the training kernels (forward and
    backward at the training batch) of every LSH arm, and the eval forwards of every method (exact, window,
    each r and scheme, the hybrid) at a batch of the eval batches' class (2: not 1, not a multiple of 16)."""
    shape = dict(heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, n=cfg.train_context)

    def spec(text: str, batch: int, backward: bool) -> dict[str, Any]:
        s = parse_method(text)
        return dict(shape, method=s.method, r=s.samples if s.random else 1, scheme=s.scheme if s.random else "-",
                    window_eps=s.window_eps, batch=batch, backward=backward)

    specs = [spec(m, cfg.batch_size, True) for m in (*cfg.native, cfg.finetune, *cfg.optional_native) if m]
    specs += [spec(m, 2, False) for m in main_methods(cfg) + fill_methods(cfg)]
    unique = {json.dumps(s, sort_keys=True): s for s in specs}  # qmc and iid share a kernel
    return list(unique.values())


def warm_kernels(specs: list[dict[str, Any]], device: str = "cuda", report=None) -> list[dict[str, Any]]:
    """Launch the Triton kernel once per spec (``precompile_specs``) on random inputs, so that it is
    compiled into Triton's disk cache; returns [{"spec", "seconds"} or {"spec", "error"}], each also passed
    to ``report`` as it completes. Run by the worker processes of ``_start_precompile`` (or directly, e.g.
    under TRITON_INTERPRET=1 on the CPU)."""
    from poslsh.alibi import alibi_slopes
    from poslsh.attention import attention
    from poslsh.hashing import sample_partitions

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    done = []
    for spec in specs:
        t = time.perf_counter()
        try:
            b, n, h, d = spec["batch"], spec["n"], spec["heads"], spec["head_dim"]
            # [B, N, H, D] viewed as [B, H, N, D], as the model's projections are: the same strides' class.
            q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_(spec["backward"])
                       for _ in range(3))
            parts = None
            if spec["method"] in ("lsh", "hybrid"):
                parts = sample_partitions(n, alibi_slopes(h), spec["r"], scheme=spec["scheme"],
                                          generator=torch.Generator().manual_seed(0), device=dev)
            with torch.set_grad_enabled(spec["backward"]):
                eps = {"window_eps": spec["window_eps"]} if spec["method"] == "window" else {}
                out = attention(q, k, v, method=spec["method"], partitions=parts, backend="triton", **eps)
                if spec["backward"]:
                    out.float().sum().backward()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            done.append({"spec": spec, "seconds": time.perf_counter() - t})
        except Exception as err:  # a kernel that does not compile here will compile (or fail) in the run
            done.append({"spec": spec, "error": describe_failure(err)})
        if report is not None:
            report(done[-1])
    return done


# A worker: one JSON line per kernel as it completes, so the run knows what is in the disk cache already.
_WORKER = ("import json, sys; from poslsh_lab.experiments.lsh_native.measure import warm_kernels; "
           "warm_kernels(json.loads(sys.argv[1]), sys.argv[2], lambda r: print(json.dumps(r), flush=True))")


def _start_precompile(cfg: Config, device: torch.device, log) -> list[tuple[subprocess.Popen, Path]]:
    """On CUDA with ``precompile_workers`` > 0: start that many processes running ``warm_kernels`` on the
    specs, dealt out in turn. Returns [(process, the file its lines go to)]."""
    if device.type != "cuda" or cfg.precompile_workers <= 0:
        return []
    return _spawn_workers(precompile_specs(cfg), cfg.precompile_workers, str(device), log)


def _spawn_workers(specs: list[dict], count: int, device: str, log) -> list[tuple[subprocess.Popen, Path]]:
    # The training kernels first (an LSH arm starts ~100 s in, evaluation later), then the costliest.
    specs = sorted(specs, key=lambda s: (not s["backward"], -s["r"] * (3 if s["scheme"] == "cut" else 1)))
    shares: list[list[dict]] = [[] for _ in range(min(count, len(specs)))]
    for i, spec in enumerate(specs):
        shares[i % len(shares)].append(spec)
    workers = []
    for share in shares:
        fd, path = tempfile.mkstemp(prefix="poslsh-precompile-", suffix=".jsonl")
        with os.fdopen(fd, "a") as sink:  # appends: the worker's lines never overwrite each other
            proc = subprocess.Popen([sys.executable, "-c", _WORKER, json.dumps(share), device], stdout=sink,
                                    stderr=subprocess.DEVNULL)
        workers.append((proc, Path(path)))
    log(f"precompiling {len(specs)} Triton kernels in {len(workers)} processes")
    return workers


def _reports(workers: list[tuple[subprocess.Popen, Path]] | None) -> list[dict]:
    """The kernels the workers have reported so far."""
    out = []
    for _, path in workers or []:
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written
                pass
    return out


def _precompiled(workers: list | None) -> set[tuple]:
    """Keys (``_kernel``) of the eval kernels that are in Triton's disk cache by now."""
    return {_kernel_key(r["spec"]["method"], r["spec"]["r"], r["spec"]["scheme"]) for r in _reports(workers)
            if "seconds" in r and not r["spec"]["backward"]}


def _finish_precompile(workers: list[tuple[subprocess.Popen, Path]], log) -> dict[str, Any] | None:
    """The workers' reports; a worker still running is ended (its kernels compile, if needed, in the run)."""
    if not workers:
        return None
    unfinished = 0
    for proc, _ in workers:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            unfinished += 1
    report = {"workers": len(workers), "kernels": _reports(workers), "unfinished": unfinished}
    for _, path in workers:
        path.unlink(missing_ok=True)
    failed = sum("error" in k for k in report["kernels"])
    log(f"precompile: {len(report['kernels'])} kernels compiled ahead ({failed} failed), {unfinished} workers "
        "ended unfinished")
    return report
