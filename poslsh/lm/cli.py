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
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..cli import _add_config_flags  # the experiments' dataclass -> flags convention
    from .train import TrainConfig

    lm = subparsers.add_parser("lm", help="train and evaluate the small ALiBi language model (poslsh.lm)")
    sub = lm.add_subparsers(dest="lm_command", required=True)
    tr = sub.add_parser("train", help="train on local text (default: this interpreter's .py files)")
    tr.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    _add_config_flags(tr, TrainConfig)
    tr.add_argument("--attention", dest="train_attention", default=argparse.SUPPRESS,
                    help="the same as --train-attention: sdpa | exact | window[:EPS] | lsh:R[:grid|cut[:SAMPLING]] | "
                         "hybrid[...] (LSH trains with fresh partitions every step)")
    tr.set_defaults(handler=_train)

    ev = sub.add_parser("eval", help="held-out perplexity and time per token per attention method")
    ev.add_argument("--checkpoint", type=Path, required=True)
    ev.add_argument("--context", type=int, nargs="+", required=True)
    ev.add_argument("--methods", nargs="+", default=["exact", "window", "lsh:8"],
                    help="exact | window[:EPS] | lsh[:R[:grid|cut[:iid|stratified|qmc]]] | "
                         "hybrid[:R[:SCHEME[:SAMPLING]]]")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0])
    ev.add_argument("--text", type=Path, help="score this file instead of the checkpoint's held-out set")
    ev.add_argument("--max-scored", type=int, default=65536)
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--out", type=Path, help="JSON folder (default: the checkpoint folder)")
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["roots"] = tuple(values["roots"])
    result = train(TrainConfig(**values), args.out, log=lambda s: print(s, file=sys.stderr, flush=True))
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


def evaluate_checkpoint(model, tokens, contexts: list[int], methods: list[str], seeds: list[int], *,
                        device, batch_size: int = 1, max_scored: int = 65536, first_target: int | None = None,
                        log=None) -> list[dict[str, Any]]:
    """Perplexity rows {"context", "method", "loss", "ppl", "bits_per_token", "time_per_token"} per method.

    Rows of methods that draw partitions ("lsh", "hybrid") average ``seeds`` (each a different set of
    fixed partitions). ``first_target``: see ``poslsh.lm.evaluate.perplexity``.
    """
    import torch

    from .evaluate import parse_method, perplexity
    from .train import autocast_for

    specs = [parse_method(text) for text in methods]  # a bad method fails before any work
    rows = []
    for n in contexts:
        for spec in specs:
            runs = seeds if spec.random else seeds[:1]
            res = []
            for seed in runs:
                model.set_attention(**spec.options(seed))

                def forward(x: torch.Tensor) -> torch.Tensor:
                    with autocast_for(torch.device(device)):
                        return model(x)

                res.append(perplexity(forward, tokens, n, device=device, batch_size=batch_size, max_scored=max_scored,
                                      first_target=first_target))
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
    from ..experiments.common import markdown_table, save_results
    from .data import read_text_tokens
    from .model import load_checkpoint
    from .train import resolve_device

    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    tokens = read_text_tokens(args.text) if args.text else heldout_tokens(meta)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        rows = evaluate_checkpoint(model, tokens, args.context, args.methods, args.seeds, device=device,
                                   batch_size=args.batch_size, max_scored=args.max_scored, log=log)
    except ValueError as err:
        print(f"poslsh lm eval: {err}", file=sys.stderr)
        return 2
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
