"""``poslsh eval-hf``: perplexity and tokens/s of a local transformers ALiBi checkpoint per attention method.

    poslsh eval-hf --model ./bloom-560m --text ./wiki.txt --context 1024 4096 \\
        --methods native exact window lsh:8 lsh:32:cut --out reports/eval-hf

"native" is the model's own attention (unpatched); the others go through ``poslsh.attention`` (see
``poslsh.lm.evaluate.parse_method`` for the grammar). Everything loads from local paths.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

NAME = "eval-hf"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(NAME, help="perplexity and tokens/s of a local ALiBi checkpoint per attention method")
    p.add_argument("--model", required=True, type=Path, help="local checkpoint folder (with its tokenizer)")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    p.add_argument("--context", required=True, type=int, nargs="+", help="window length(s) in tokens")
    p.add_argument("--methods", nargs="+", default=["native", "exact", "window", "lsh:8"],
                   help="native | exact | window[:EPS] | lsh[:R[:grid|cut]]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="partition seeds (lsh rows are averaged)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-scored", type=int, default=32768, help="stop after this many scored tokens")
    p.add_argument("--score-fraction", type=float, default=0.5,
                   help="each window scores its last fraction of tokens (stride = that many)")
    p.add_argument("--out", type=Path, default=Path("reports") / NAME)
    p.set_defaults(handler=main)


def _load(path: Path, dtype_name: str, device: str):
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{key: dtype})
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer


def _hf_method(text: str):
    """``parse_method`` restricted to what ``patch_model`` computes: exact, window, lsh with iid samples."""
    from ..lm.evaluate import parse_method

    spec = parse_method(text)
    if spec.method not in ("exact", "window", "lsh") or spec.sampling != "iid":
        raise ValueError(f"method {text!r} is not available for transformers models: use native, exact, "
                         "window[:EPS] or lsh[:R[:grid|cut]]")
    return spec


def evaluate_hf(model_path: Path, text_path: Path, contexts: list[int], methods: list[str], *, seeds: list[int],
                dtype: str = "float32", device: str = "auto", batch_size: int = 1, max_scored: int = 32768,
                score_fraction: float = 0.5, log=print) -> dict[str, Any]:
    """Score ``text_path`` with the checkpoint under each method and context.

    Returns:
        {"model", "family", "transformers", "tokens", "rows": [{"context", "method", "loss", "ppl",
        "bits_per_token", "tokens_per_second", "time_per_token", "scored_tokens", "seeds"}]}.
    """
    import numpy as np
    import torch
    import transformers

    from ..lm.evaluate import perplexity
    from .hf import model_family, patch_model, unpatch_model

    specs = [None if m == "native" else _hf_method(m) for m in methods]  # bad methods fail before loading
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model, tokenizer = _load(model_path, dtype, str(dev))
    family = model_family(model)
    ids = np.asarray(tokenizer(text_path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    log(f"{model_path}: {family}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
        f"{ids.size} tokens of text")
    forward = lambda x: model(x, use_cache=False).logits  # noqa: E731
    rows = []
    for n in contexts:
        for name, spec in zip(methods, specs):
            runs = seeds if spec is not None and spec.method == "lsh" else seeds[:1]
            results = []
            for seed in runs:
                if spec is None:
                    unpatch_model(model)
                else:
                    patch_model(model, method=spec.method, samples=spec.samples, scheme=spec.scheme, seed=seed,
                                window_eps=spec.window_eps)
                try:
                    results.append(perplexity(forward, ids, n, device=dev, batch_size=batch_size,
                                              score_fraction=score_fraction, max_scored=max_scored))
                except (RuntimeError, ValueError) as err:  # e.g. MPT's own attention beyond max_seq_len
                    log(f"  context {n}, {name}: failed: {str(err).splitlines()[0]}")
                    break
                finally:
                    unpatch_model(model)
            if not results:
                rows.append({"context": n, "method": name, "error": True})
                continue
            loss = sum(r["loss"] for r in results) / len(results)
            tpt = sum(r["time_per_token"] for r in results) / len(results)
            row = {"context": n, "method": spec.label if spec else "native", "loss": loss, "ppl": math.exp(loss),
                   "bits_per_token": loss / math.log(2), "time_per_token": tpt, "tokens_per_second": 1 / tpt,
                   "scored_tokens": results[0]["scored_tokens"], "seeds": list(runs[:len(results)])}
            rows.append(row)
            log(f"  context {n:>6}  {row['method']:<16} ppl {row['ppl']:10.4f}  {row['tokens_per_second']:10.0f} tok/s")
    return {"model": str(model_path), "family": family, "transformers": transformers.__version__,
            "tokens": int(ids.size), "dtype": dtype, "device": str(dev), "rows": rows}


def main(args: argparse.Namespace) -> int:
    from ..experiments.common import markdown_table, save_results

    try:
        results = evaluate_hf(args.model, args.text, args.context, args.methods, seeds=args.seeds, dtype=args.dtype,
                              device=args.device, batch_size=args.batch_size, max_scored=args.max_scored,
                              score_fraction=args.score_fraction, log=lambda s: print(s, file=sys.stderr))
    except (OSError, ValueError) as err:
        print(f"poslsh eval-hf: {err}", file=sys.stderr)
        return 2
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("handler",)}
    path = args.out / f"{NAME}.json"
    save_results(path, config, results)
    ok = [r for r in results["rows"] if not r.get("error")]
    print(markdown_table(["context", "method", "ppl", "tokens/s"],
                         [[r["context"], r["method"], r["ppl"], r["tokens_per_second"]] for r in ok]))
    print(f"results: {path}")
    return 0
