"""Train the small ALiBi language model on a local corpus.

AdamW (weight decay on matrices only), linear warmup then cosine decay to ``min_lr_ratio * lr``,
gradient clipping, bf16 autocast on CUDA, a held-out loss every ``eval_every`` steps on fixed
held-out windows, a checkpoint (safetensors + config.json) at every evaluation, a loss-curve PNG and
a tqdm bar. ``time_budget_s`` fits the number of steps to a wall-clock budget: the step time is
measured (device synchronised) over steps 10..50 and again at every held-out evaluation (which then
counts the evaluations and checkpoints too), and ``steps`` is lowered (never raised) so the cosine
schedule ends in time; should the estimate still be short, training stops at the budget.

``train_attention`` picks the attention the model trains with: "sdpa" (exact ALiBi through SDPA with a
dense bias, the default) or a method string of ``poslsh.method.parse_method``: "exact", "window[:EPS]",
"lsh:R[:grid|cut[:iid|stratified|qmc]]" or "hybrid[...]". The positional-LSH methods train *natively*:
fresh partitions at every optimizer step, per layer and head, drawn from ``seed_for(partition_seed,
"train", layer, step)`` (``ALiBiLM.set_partition_schedule``), so a run is reproducible from its seeds;
its held-out loss is measured with the same method and fixed partitions (as every evaluation).
``init_checkpoint`` starts from a trained model's weights (fine-tuning, e.g. an exact-ALiBi model with LSH).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poslsh.method import MethodSpec, parse_method
from ..util import (Count, CountOrZero, Fraction, NonNegative, Positive, TwoOrMore, check_fields, progress, pyplot,
                    save_figure, synchronize)
from .data import ByteTokenizer, Corpus, build_corpus, unigram_baseline
from .model import ALiBiLM, LMConfig, load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "train", "resolve_device", "heldout_windows", "batch_loss", "autocast_for", "lr_at"]


@dataclass
class TrainConfig:
    """Model, data and optimisation settings (defaults: the H200 run of the validation experiment).

    Attributes:
        d_model: Model width.
        n_layers: Transformer layers.
        n_heads: Attention heads, with Press slopes.
        context: Training context in tokens (bytes).
        batch_size: Batch size in sequences.
        steps: Training steps (fewer when the time budget runs out).
        lr: Peak learning rate (cosine decay after the warm-up).
        min_lr_ratio: Final learning rate as a fraction of the peak.
        warmup: Learning-rate warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip.
        eval_every: Steps between held-out evaluations (and checkpoints).
        eval_windows: Held-out windows per evaluation.
        seed: Seed of initialisation and batches.
        max_bytes: Most bytes of corpus read.
        heldout_fraction: Fraction of the corpus's files held out.
        roots: Folders of text to train on (none: this interpreter's Python files).
        device: Device, e.g. auto, cpu or cuda.
        time_budget_s: Training budget in seconds (0: no limit).
        train_attention: Attention while training: sdpa (exact ALiBi through a dense mask, fast) or a method string such as exact, window:EPS or lsh:R:SCHEME:SAMPLING (LSH draws fresh partitions every step).
        partition_seed: Seed of the training and evaluation partitions (None: seed).
        init_checkpoint: Start from this checkpoint folder's weights, of the same model shape (empty: from scratch).
        compile: Compile the model with torch.compile.
    """

    d_model: Count = 512
    n_layers: Count = 8
    n_heads: Count = 8
    context: TwoOrMore = 1024
    batch_size: Count = 32
    steps: Count = 6000
    lr: NonNegative = 1e-3  # 0 is allowed: a fine-tuning probe that must leave the weights as loaded
    min_lr_ratio: NonNegative = 0.1
    warmup: CountOrZero = 200
    weight_decay: NonNegative = 0.1
    grad_clip: Positive = 1.0
    eval_every: Count = 500
    eval_windows: Count = 64
    seed: int = 0
    max_bytes: Count = 256 * 2**20
    heldout_fraction: Fraction = 0.05
    roots: tuple[str, ...] = ()
    device: str = "auto"
    time_budget_s: NonNegative = 0.0
    train_attention: str = "sdpa"
    partition_seed: int | None = None
    init_checkpoint: str = ""
    compile: bool = False


def train_method(config: TrainConfig) -> MethodSpec:
    """The attention ``config`` trains with ("sdpa" is exact ALiBi); ValueError naming the field otherwise."""
    if config.train_attention == "sdpa":
        return MethodSpec("exact")
    try:
        return parse_method(config.train_attention)
    except ValueError as err:
        raise ValueError(f"train_attention must be 'sdpa' or a method string: {err}") from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def lr_at(step: int, config: TrainConfig, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from lr to min_lr_ratio * lr at ``total``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = min(1.0, (step - config.warmup) / max(1, total - config.warmup))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def heldout_windows(tokens: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced windows of ``length`` tokens (fewer if the stream is short): int64 [W, length]."""
    if tokens.size < length:
        raise ValueError(f"held-out stream has {tokens.size} tokens, fewer than one window of {length}")
    starts = np.linspace(0, tokens.size - length, num=min(count, tokens.size // length)).astype(np.int64)
    return np.stack([tokens[s:s + length].astype(np.int64) for s in starts])


@torch.no_grad()
def batch_loss(model: ALiBiLM, windows: np.ndarray, batch_size: int, device: torch.device,
               sdpa: bool | None = None) -> float:
    """Mean next-token loss (nats) over windows int64 [W, L+1], each scoring its L predictions."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i:i + batch_size]).to(device)
        with autocast_for(device):
            loss = model.loss(w[:, :-1], w[:, 1:], sdpa=sdpa)
        total += float(loss) * w.shape[0]
        count += w.shape[0]
    model.train(was_training)
    return total / count


def _load_weights(model: ALiBiLM, path: str | Path) -> None:
    """Copy a checkpoint's weights into ``model``; ValueError when the shapes differ."""
    init, _ = load_checkpoint(path)
    if init.config.d_model != model.config.d_model or init.config.n_layers != model.config.n_layers or \
            init.config.n_heads != model.config.n_heads:
        raise ValueError(f"init_checkpoint {path} has d_model={init.config.d_model}, n_layers={init.config.n_layers}, "
                         f"n_heads={init.config.n_heads}; the config asks for {model.config.d_model}, "
                         f"{model.config.n_layers}, {model.config.n_heads}")
    model.load_state_dict(init.state_dict())


def _optimizer(model: ALiBiLM, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), **kw)


def plot_curve(history: list[dict], unigram_nats: float, path: Path) -> Path:
    """Train and held-out loss against step, with the unigram baseline, in bits per byte (the history
    stores nats per token; tokens are bytes), the unit of every LM table and plot."""
    plt = pyplot()
    bits = 1 / math.log(2)
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history if "train_loss" in h]
    ax.plot(steps, [h["train_loss"] * bits for h in history if "train_loss" in h], lw=0.8, label="train (batch)")
    ev = [h for h in history if "heldout_loss" in h]
    ax.plot([h["step"] for h in ev], [h["heldout_loss"] * bits for h in ev], "o-", label="held-out")
    ax.axhline(unigram_nats * bits, color="gray", ls="--", label="unigram baseline")
    ax.set_title("Training curve: loss in bits per byte against step", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (bits per byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=120)


def _seconds_per_step(device: torch.device, mark: tuple[float, int], done: int) -> float:
    """Mean wall time per step since ``mark`` = (time, steps done then), once the device has caught up."""
    synchronize(device)
    return (time.perf_counter() - mark[0]) / (done - mark[1])


def _fit(total: int, done: int, per_step: float, seconds_left: float, say: Any) -> int:
    """The step count that ends the schedule within ``seconds_left`` (never more than ``total``), with 3 %
    to spare: step times drift, and the hard stop at the budget would cut the cosine decay short."""
    fit = done + max(1, int(0.97 * seconds_left / per_step))
    if fit < total:
        say(f"time budget: {per_step * 1e3:.1f} ms/step, {fit} steps instead of {total}")
        return fit
    return total


def train(config: TrainConfig, out_dir: str | Path, corpus: Corpus | None = None,
          log: Any = None) -> dict[str, Any]:
    """Train from scratch; write the checkpoint, ``history.json`` and ``loss.png`` into out_dir.

    Args:
        config: ``TrainConfig``.
        out_dir: checkpoint folder.
        corpus: a prebuilt corpus (default: ``build_corpus(config.roots, config.max_bytes, ...)``).
        log: callable taking a string for progress lines (default: silent).

    Returns:
        {"model": ALiBiLM (eval mode, attention set to the training method), "history", "heldout_loss",
        "initial_heldout_loss", "unigram", "corpus", "parameters", "steps", "tokens" (steps * batch_size *
        context), "train_attention" (the method's label), "train_seconds", "tokens_per_second", "device"}.
    """
    say = log or (lambda s: None)
    check_fields(config)
    spec = train_method(config)  # a bad method fails before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if corpus is None:
        corpus = build_corpus(config.roots or None, config.max_bytes, config.heldout_fraction)
    if corpus.train.size < config.context + 2:
        raise ValueError(f"the train stream has {corpus.train.size} tokens, too few for context {config.context}")
    unigram = unigram_baseline(corpus.train, corpus.heldout)
    say(f"corpus: {corpus.stats()}; unigram baseline {unigram['bits_per_token']:.3f} bits/byte")

    sdpa = config.train_attention == "sdpa"
    model = ALiBiLM(LMConfig(vocab_size=ByteTokenizer.vocab_size, d_model=config.d_model, n_layers=config.n_layers,
                             n_heads=config.n_heads, train_attention="sdpa" if sdpa else "poslsh")).to(device)
    if config.init_checkpoint:
        _load_weights(model, config.init_checkpoint)
    partition_seed = config.seed if config.partition_seed is None else config.partition_seed
    model.set_attention(spec, seed=partition_seed)  # eval partitions: fixed from the same seed
    say(f"model: {model.num_parameters() / 1e6:.2f} M parameters on {device}, training attention {spec.label}"
        + (f" (from {config.init_checkpoint})" if config.init_checkpoint else ""))
    step_fn = torch.compile(model) if config.compile else model
    opt = _optimizer(model, config, device)
    train_tokens = torch.from_numpy(corpus.train.astype(np.int32)).to(device)
    windows = heldout_windows(corpus.heldout, config.context + 1, config.eval_windows)
    # Offsets drawn where the tokens are: a CPU tensor copied to CUDA would wait for the queue every step.
    gen = torch.Generator(device=device).manual_seed(config.seed)
    arange = torch.arange(config.context + 1, device=device)

    meta = {"train": asdict(config), "corpus": corpus.stats(), "unigram": unigram}
    initial = batch_loss(model, windows, config.batch_size, device, sdpa=sdpa)
    history: list[dict] = [{"step": 0, "heldout_loss": initial, "elapsed": 0.0}]
    say(f"step 0: held-out loss {initial:.4f}")
    total = config.steps
    budget = config.time_budget_s
    start = time.perf_counter()
    mark: tuple[float, int] | None = None  # (time, steps done) where the step timing starts
    bar = progress(range(config.steps), desc="lm train", total=config.steps)
    done = 0
    model.train()
    for step in bar:
        if step >= total:
            break
        if budget > 0 and time.perf_counter() - start > budget:
            say(f"time budget {budget:.0f} s reached after {step} of {total} steps: stopping")
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config, total)
        if spec.random:  # fresh partitions, seeded by (partition_seed, layer, step)
            model.set_partition_schedule(partition_seed, step)
        offsets = torch.randint(0, train_tokens.numel() - config.context - 1, (config.batch_size,), generator=gen,
                                device=device)
        batch = train_tokens[offsets[:, None] + arange].long()
        with autocast_for(device):
            logits = step_fn(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        done = step + 1
        if step % 10 == 0 or done == total:
            entry = {"step": done, "train_loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                     "elapsed": time.perf_counter() - start}
            history.append(entry)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}")
        evaluate = done % config.eval_every == 0 or done == total
        if budget > 0 and done == 10:  # the first steps pay for allocation and kernel selection
            synchronize(device)
            mark = (time.perf_counter(), done)
        if budget > 0 and mark is not None and done == mark[1] + 40:
            # A held-out evaluation costs about a third of a step per batch of windows (forward only).
            per_step = _seconds_per_step(device, mark, done)
            per_step *= 1 + max(1, len(windows) // config.batch_size) / (3 * config.eval_every)
            total = _fit(total, done, per_step, budget - (time.perf_counter() - start), say)
        if evaluate:
            held = batch_loss(model, windows, config.batch_size, device, sdpa=sdpa)
            history.append({"step": done, "heldout_loss": held, "elapsed": time.perf_counter() - start})
            say(f"step {done}/{total}: train {float(loss.detach()):.4f}, held-out {held:.4f} nats "
                f"({held / math.log(2):.3f} bits/byte), {time.perf_counter() - start:.0f} s")
            save_checkpoint(model, out, {**meta, "steps_done": done})
            if budget > 0 and mark is not None and done > mark[1] + 40 and done < total:
                # Re-measured over everything since the mark (evaluations and checkpoints included).
                per_step = _seconds_per_step(device, mark, done)
                total = _fit(total, done, per_step, budget - (time.perf_counter() - start), say)
    seconds = time.perf_counter() - start
    if "heldout_loss" not in history[-1]:  # stopped by the budget between evaluations
        history.append({"step": done, "heldout_loss": batch_loss(model, windows, config.batch_size, device,
                                                                 sdpa=sdpa), "elapsed": seconds})
    final = history[-1]["heldout_loss"]
    steps_done = done
    summary = {"heldout_loss": final, "heldout_bits_per_byte": final / math.log(2), "initial_heldout_loss": initial,
               "unigram": unigram, "corpus": corpus.stats(), "parameters": model.num_parameters(),
               "steps": steps_done, "tokens": steps_done * config.batch_size * config.context,
               "train_attention": spec.label, "train_seconds": seconds,
               "tokens_per_second": steps_done * config.batch_size * config.context / seconds, "device": str(device)}
    save_checkpoint(model, out, {**meta, "steps_done": steps_done, "summary": summary})
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_curve(history, unigram["nats_per_token"], out / "loss.png")
    model.eval()
    return {"model": model, "history": history, **summary}
