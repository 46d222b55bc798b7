"""``poslsh lm train`` and ``poslsh lm eval``: train the small ALiBi LM, then score it per attention method.

    poslsh lm train --out runs/lm --steps 6000 --context 1024 --time-budget-s 840
    poslsh lm train --out runs/lm-lsh4 --attention lsh:4:grid --time-budget-s 300    # positional-LSH native
    poslsh lm eval --checkpoint runs/lm --context 1024 4096 --methods exact window lsh:8 lsh:8:cut
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poslsh.method import MethodSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    from poslsh.method import GRAMMAR
    from ..util import Bounds, add_config_flags, add_threads_flag
    from .train import TrainConfig

    count, context = Bounds(1).argtype(int), Bounds(2).argtype(int)

    text = "Train and evaluate the small ALiBi language model of poslsh_lab.lm."
    lm = subparsers.add_parser("lm", help=text, description=text)
    sub = lm.add_subparsers(dest="lm_command", required=True, metavar="COMMAND")
    text = "Train the model on local text (default: this interpreter's Python files) into a checkpoint folder."
    tr = sub.add_parser("train", help=text, description=text)
    tr.add_argument("--out", type=Path, required=True, metavar="DIR", help="Checkpoint folder to write.")
    add_config_flags(tr, TrainConfig)
    tr.add_argument("--attention", dest="train_attention", default=argparse.SUPPRESS, metavar="METHOD",
                    help="The same as --train-attention: sdpa or a method string (LSH trains with fresh partitions "
                         "every step).")
    add_threads_flag(tr)
    tr.set_defaults(handler=_train)

    text = "Measure held-out bits per byte and time per token of a checkpoint per attention method."
    ev = sub.add_parser("eval", help=text, description=text)
    ev.add_argument("--checkpoint", type=Path, required=True, metavar="DIR",
                    help="Checkpoint folder written by poslsh lm train.")
    ev.add_argument("--context", type=context, nargs="+", required=True, metavar="N",
                    help="Context lengths in tokens (bytes), one set of rows each, each at least 2.")
    ev.add_argument("--methods", nargs="+", default=["exact", "window", "lsh:8"], metavar="METHOD",
                    help=f"Attention methods, each one of {GRAMMAR}. Default: exact window lsh:8.")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                    help="Partition seeds; rows of lsh and hybrid average them. Default: 0.")
    ev.add_argument("--text", type=Path, metavar="FILE",
                    help="Score this UTF-8 file instead of the checkpoint's held-out set.")
    ev.add_argument("--max-scored", type=count, default=65536, metavar="N",
                    help="Stop after this many scored tokens per row. Default: 65536.")
    ev.add_argument("--batch-size", type=count, default=1, metavar="N", help="Windows per forward call. Default: 1.")
    ev.add_argument("--device", default="auto", help="Device, e.g. auto, cpu or cuda. Default: auto.")
    ev.add_argument("--out", type=Path, metavar="DIR",
                    help="Folder for lm-eval.json. Default: the checkpoint folder.")
    add_threads_flag(ev)
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    from ..util import config_from_args, require_cuda, require_file, require_package
    from .train import TrainConfig, train

    config = config_from_args(TrainConfig, args)
    require_cuda(config.device, f"--device {config.device}")
    require_package("safetensors", "poslsh lm train (its checkpoint)", "hf")
    for root in config.roots:
        require_file(Path(root), "--roots folder", folder=True)
    result = train(config, args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"held-out {result['heldout_bits_per_byte']:.3f} bits/byte "
          f"(unigram {result['unigram']['bits_per_token']:.3f}) after {result['steps']} steps, "
          f"{result['train_seconds']:.0f} s; checkpoint: {args.out}")
    return 0


def heldout_tokens(meta: dict[str, Any]):
    """Rebuild the held-out stream a checkpoint was trained against (same roots, cap and fraction)."""
    from .data import build_corpus

    t = meta["train"]
    corpus = build_corpus(t["roots"] or None, t["max_bytes"], t["heldout_fraction"])
    expected = meta.get("corpus", {}).get("heldout_tokens")
    if expected is not None and expected != corpus.heldout.size:
        print(f"warning: held-out set has {corpus.heldout.size} tokens, the checkpoint saw {expected} "
              "(different files on this machine)", file=sys.stderr)
    return corpus.heldout


def evaluate_checkpoint(model, tokens, contexts: list[int], methods: list[MethodSpec], seeds: list[int], *,
                        device, batch_size: int = 1, max_scored: int = 65536, first_target: int | None = None,
                        log=None) -> list[dict[str, Any]]:
    """Perplexity rows {"context", "method", "loss", "ppl", "bits_per_token", "time_per_token"} per method
    (``MethodSpec``; a row's "method" is its label).

    Rows of methods that draw partitions ("lsh", "hybrid") average ``seeds`` (each a different set of
    fixed partitions). ``first_target``: see ``poslsh_lab.lm.evaluate.perplexity``.
    """
    import torch

    from ..util import progress
    from .evaluate import perplexity
    from .train import autocast_for

    rows = []
    for n in contexts:
        for spec in methods:
            runs = seeds if spec.random else seeds[:1]
            res = []
            for seed in runs:
                model.set_attention(spec, seed=seed)

                def forward(x: torch.Tensor) -> torch.Tensor:
                    with autocast_for(torch.device(device)):
                        return model(x)

                ticker = (lambda it, total, label=f"lm eval {n} {spec.label}": progress(it, label, total)) if log \
                    else None
                res.append(perplexity(forward, tokens, n, device=device, batch_size=batch_size, max_scored=max_scored,
                                      first_target=first_target, progress=ticker))
            loss = sum(r["loss"] for r in res) / len(res)
            row = {"context": n, "method": spec.label, "loss": loss, "ppl": math.exp(loss),
                   "bits_per_token": loss / math.log(2),
                   "time_per_token": sum(r["time_per_token"] for r in res) / len(res),
                   "scored_tokens": res[0]["scored_tokens"], "seeds": list(runs)}
            rows.append(row)
            if log:
                log(f"context {n:>6}  {row['method']:<16} {row['bits_per_token']:.4f} bits/byte  "
                    f"{row['time_per_token'] * 1e6:9.2f} us/token")
    model.set_attention("exact")
    return rows


def _eval(args: argparse.Namespace) -> int:
    from poslsh.method import parse_method
    from ..util import markdown_table, require_cuda, require_file, require_package, save_results
    from .data import read_text_tokens
    from .model import load_checkpoint
    from .train import resolve_device

    specs = [parse_method(text) for text in args.methods]  # a bad method fails before any work
    if len(args.seeds) > 1 and not any(spec.random for spec in specs):
        print("poslsh lm eval: warning: --seeds is ignored: no method in --methods draws partitions (lsh, hybrid)",
              file=sys.stderr)
    require_cuda(args.device, f"--device {args.device}")
    require_package("safetensors", "poslsh lm eval (the checkpoint)", "hf")
    require_file(args.checkpoint / "config.json", "--checkpoint: the checkpoint file")
    require_file(args.checkpoint / "model.safetensors", "--checkpoint: the checkpoint file")
    if args.text:
        require_file(args.text, "--text")
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    tokens = read_text_tokens(args.text) if args.text else heldout_tokens(meta)
    if tokens.size < max(args.context) + 1:
        raise ValueError(f"the text has {tokens.size} tokens, fewer than one window of context {max(args.context)} "
                         "+ 1: give a longer --text or shorter --context")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = evaluate_checkpoint(model, tokens, args.context, specs, args.seeds, device=device,
                               batch_size=args.batch_size, max_scored=args.max_scored, log=log)
    unigram = meta.get("unigram")
    out = args.out or args.checkpoint
    config = {"checkpoint": str(args.checkpoint), "context": args.context, "methods": args.methods,
              "seeds": args.seeds, "text": str(args.text) if args.text else None, "max_scored": args.max_scored}
    path = Path(out) / "lm-eval.json"
    save_results(path, config, {"rows": rows, "unigram": unigram, "model": meta.get("model")})
    print(markdown_table(["context", "method", "bits/byte", "ppl", "us/token"],
                         [[r["context"], r["method"], r["bits_per_token"], r["ppl"], r["time_per_token"] * 1e6]
                          for r in rows]))
    if unigram:
        print(f"unigram baseline: {unigram['bits_per_token']:.3f} bits/byte")
    print(f"results: {path}")
    return 0
