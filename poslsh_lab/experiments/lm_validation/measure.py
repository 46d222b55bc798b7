"""lm-validation, measuring: train (or load) the model, the per-layer errors, the perplexity rows; the
JSON document is rewritten after every step (``experiments.harness.Run``)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poslsh.method import parse_method
from ...util import load_results, replot_saved
from ..harness import Run, describe_failure
from .design import NAME, RESERVE_S, Config, check, effective, jobs
from .report import replot


def run(config: Config, out_dir: str | Path) -> dict[str, Any]:
    """Train (or load ``checkpoint``), measure, write ``lm-validation.json`` and the PNGs; or, with
    ``replot``, only redraw the PNGs of that JSON. Returns the JSON document."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = effective(config)
    check(cfg)
    results: dict[str, Any] = {"partial": True, "effective_config": dataclasses.asdict(cfg), "timing": {},
                               "rows": [], "layer_errors": None}
    clock = Run(NAME, out / f"{NAME}.json", config, results, deadline_s=cfg.deadline_s)
    log, save = clock.log, clock.save

    model, heldout, device = _train_or_load(cfg, out, clock, results, log)
    save()
    t = time.perf_counter()
    _measure_layer_errors(model, heldout, cfg, device, clock, results, log)
    results["timing"]["errors_s"] = time.perf_counter() - t
    save()
    t = time.perf_counter()
    _evaluate(model, heldout, cfg, device, clock, results, log, save)
    results["timing"]["eval_s"] = time.perf_counter() - t
    results["partial"] = False
    doc = save()
    replot(doc, out)
    log(f"done; timing {', '.join(f'{k} {v:.0f}' for k, v in results['timing'].items())} s")
    return doc


def _train_or_load(cfg: Config, out: Path, clock: Run, results: dict, log) -> tuple[Any, np.ndarray, torch.device]:
    """Corpus, then the trained (or loaded) model; fills results' training, history, unigram, corpus."""
    from ...lm.data import build_corpus, unigram_baseline
    from ...lm.model import load_checkpoint
    from ...lm.train import TrainConfig, resolve_device, train

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    corpus = build_corpus(None, cfg.max_bytes, cfg.heldout_fraction)
    results["corpus"] = corpus.stats()
    results["timing"]["corpus_s"] = time.perf_counter() - t
    log(f"corpus {corpus.stats()} in {results['timing']['corpus_s']:.1f} s")
    t = time.perf_counter()
    if cfg.checkpoint:
        model, meta = load_checkpoint(cfg.checkpoint, device)
        results["training"] = meta.get("summary", {})
        history = Path(cfg.checkpoint) / "history.json"
        results["history"] = load_results(history) if history.exists() else []
        results["unigram"] = meta.get("unigram") or unigram_baseline(corpus.train, corpus.heldout)
        results["checkpoint"] = str(cfg.checkpoint)
    else:
        ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.resolve().with_name(out.resolve().name
                                                                                          + "_checkpoint")
        # Training gets what the deadline leaves once the later phases' budgets are set aside.
        end = clock.end(cfg.train_budget_s, reserve_s=cfg.error_budget_s + cfg.eval_budget_s + RESERVE_S)
        budget = 0.0 if end == math.inf else max(1.0, end - time.perf_counter())
        tc = TrainConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, context=cfg.train_context,
                         batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup,
                         eval_every=cfg.eval_every, seed=cfg.seed, max_bytes=cfg.max_bytes,
                         heldout_fraction=cfg.heldout_fraction, device=str(device), time_budget_s=budget,
                         eval_windows=16 if cfg.tiny else 64)
        log(f"training (budget {budget:.0f} s), checkpoint in {ckpt}" if budget else f"training, checkpoint in {ckpt}")
        result = train(tc, ckpt, corpus=corpus, log=log)
        model = result.pop("model")
        results["history"] = result.pop("history")
        results["training"] = result
        results["unigram"] = result["unigram"]
        results["checkpoint"] = str(ckpt)
    results["timing"]["train_s"] = time.perf_counter() - t
    return model, corpus.heldout, device


def _measure_layer_errors(model, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run,
                          results: dict, log) -> None:
    """Per-layer error of every non-exact method (in tier order) at ``error_context``, float32, "fused"."""
    from ...lm.evaluate import layer_errors

    n = min(cfg.error_context, heldout.size // cfg.error_batch)
    windows = np.stack([heldout[i * n:(i + 1) * n].astype(np.int64) for i in range(cfg.error_batch)])
    idx = torch.from_numpy(windows).to(device)
    labels = [m for _, m in jobs(cfg, [n]) if m != "exact"]
    end = clock.end(cfg.error_budget_s, reserve_s=RESERVE_S)
    entry = {"context": n, "batch": cfg.error_batch, "seeds": list(cfg.error_seeds), "backend": "fused",
             "errors": {}, "skipped": []}
    try:
        # float32 (no autocast): bf16 rounding (~3e-3) would hide the window's error.
        entry["errors"] = layer_errors(model, idx, [parse_method(m) for m in labels], seeds=list(cfg.error_seeds),
                                       backend="fused", deadline=None if end == math.inf else end)
    except Exception as err:  # the perplexity rows still run
        entry["error"] = describe_failure(err)
        log(f"per-layer errors failed: {entry['error']}")
    entry["skipped"] = [m for m in labels if m not in entry["errors"]]
    results["layer_errors"] = entry
    for m, errs in entry["errors"].items():
        log(f"layer errors {m:<18} " + " ".join(f"{e:.2e}" for e in errs))
    if entry["skipped"]:
        log(f"layer errors skipped (budget): {entry['skipped']}")


def _evaluate(model, heldout: np.ndarray, cfg: Config, device: torch.device, clock: Run, results: dict,
              log, save) -> None:
    """Perplexity rows in ``jobs`` order until the budget ends, saving the JSON after each."""
    from ...lm.cli import evaluate_checkpoint

    contexts = sorted(cfg.contexts)
    while contexts and heldout.size < contexts[-1] + cfg.scored_tokens:  # the largest sets the first target
        dropped = contexts.pop()
        log(f"held-out set ({heldout.size} tokens) too short for context {dropped} and {cfg.scored_tokens} scored")
    if not contexts:
        return
    first_target = contexts[-1]  # every context has its full window before the first scored token
    results["scored_from"] = first_target
    end = clock.end(cfg.eval_budget_s, reserve_s=RESERVE_S)
    for n, m in jobs(cfg, contexts):
        if time.perf_counter() > end:
            results["rows"].append({"context": n, "method": m, "skipped": "eval budget"})
            continue
        batch = max(1, min(16, cfg.eval_batch_tokens // n))  # same batch for every method of a context
        try:
            results["rows"] += evaluate_checkpoint(model, heldout, [n], [parse_method(m)], list(cfg.seeds),
                                                   device=device, batch_size=batch, max_scored=cfg.scored_tokens,
                                                   first_target=first_target, log=log)
        except Exception as err:  # one failing row (a kernel that fails, out of memory) must not lose the rest
            results["rows"].append({"context": n, "method": m, "error": describe_failure(err)})
            log(f"context {n} {m}: failed: {results['rows'][-1]['error']}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    model.set_attention("exact")
