"""``poslsh eval-hf``: perplexity and tokens/s of a local transformers ALiBi checkpoint per attention method.

    poslsh eval-hf --model ./bloom-560m --text ./wiki.txt --context 1024 4096 \\
        --methods native exact window lsh:8 lsh:32:cut hybrid:8:grid:qmc --out reports/eval-hf

"native" is the model's own attention (unpatched); the others go through ``poslsh.attention`` as
``poslsh.method`` describes them (every method and sampling mode). Everything loads from local paths
(no model hub is contacted); the model folder, the text, the contexts and the packages are checked
before any scoring.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

NAME = "eval-hf"


def register(subparsers: argparse._SubParsersAction) -> None:
    from poslsh.method import GRAMMAR
    from .util import add_threads_flag

    text = "Measure perplexity and tokens per second of a local ALiBi checkpoint (BLOOM, MPT, Falcon) per method."
    p = subparsers.add_parser(NAME, help=text, description=text)
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="Local checkpoint folder with its tokenizer (nothing is downloaded).")
    p.add_argument("--text", required=True, type=Path, metavar="FILE", help="UTF-8 text file to score.")
    p.add_argument("--context", required=True, type=int, nargs="+", metavar="N",
                   help="Window lengths in tokens, one set of rows each.")
    p.add_argument("--methods", nargs="+", default=["native", "exact", "window", "lsh:8"], metavar="METHOD",
                   help=f"Attention methods: native (the model's own) or one of {GRAMMAR}. "
                        "Default: native exact window lsh:8.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="Partition seeds; rows of lsh and hybrid average them. Default: 0.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="Dtype to load the model in. Default: float32. One of: float32, bfloat16, float16.")
    p.add_argument("--device", default="auto", help="Device, e.g. auto, cpu or cuda. Default: auto.")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="Windows per forward call. Default: 1.")
    p.add_argument("--max-scored", type=int, default=32768, metavar="N",
                   help="Stop after this many scored tokens per row. Default: 32768.")
    p.add_argument("--score-fraction", type=float, default=0.5, metavar="F",
                   help="Each window scores its last fraction F of tokens (the stride). Default: 0.5.")
    p.add_argument("--out", type=Path, default=Path("reports") / NAME, metavar="DIR",
                   help=f"Folder for {NAME}.json. Default: reports/{NAME}.")
    add_threads_flag(p)
    p.set_defaults(handler=main)


def _load_tokenizer(path: Path):
    import transformers

    from .util import RequirementError

    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:  # its message spans lines; the command shows one
        raise RequirementError(f"--model {path}: its tokenizer does not load (a checkpoint folder needs the files "
                               f"tokenizer.save_pretrained writes): {' '.join(str(err).split())}") from None


def _load_model(path: Path, dtype_name: str, device: str):
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{key: dtype})
    return model.to(device).eval()


def check_inputs(model_path: Path, text_path: Path, contexts: list[int], device: str) -> None:
    """What eval-hf needs, before loading anything: the packages, the CUDA device if asked, a model
    folder with a config.json, a text file, positive contexts."""
    from .util import RequirementError, require_cuda, require_file, require_package

    require_package("transformers", "poslsh eval-hf", "hf")
    require_cuda(device, f"--device {device}")
    require_file(model_path, "--model", folder=True)
    if not (model_path / "config.json").is_file():
        raise RequirementError(f"--model {model_path} has no config.json: not a saved transformers checkpoint")
    require_file(text_path, "--text")
    if min(contexts) < 1:
        raise ValueError(f"--context must be positive, got {contexts}")


def evaluate_hf(model_path: Path, text_path: Path, contexts: list[int], methods: list[str], *, seeds: list[int],
                dtype: str = "float32", device: str = "auto", batch_size: int = 1, max_scored: int = 32768,
                score_fraction: float = 0.5, log=print) -> dict[str, Any]:
    """Score ``text_path`` with the checkpoint under each method and context.

    Returns:
        {"model", "family", "transformers", "tokens", "rows": [{"context", "method", "loss", "ppl",
        "bits_per_token", "tokens_per_second", "time_per_token", "scored_tokens", "seeds"}]}; a row
        that failed (e.g. MPT's own attention beyond its max_seq_len) has {"context", "method",
        "error": message} instead.
    """
    import numpy as np
    import torch

    from .lm.evaluate import perplexity
    from poslsh.method import parse_method
    from .util import progress

    specs = [None if m == "native" else parse_method(m) for m in methods]  # bad methods fail before loading
    check_inputs(model_path, text_path, contexts, device)
    import transformers  # after check_inputs, which names the install command when it is missing

    from poslsh.integrations.hf import model_family, patch_model, unpatch_model
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    ids = np.asarray(_load_tokenizer(model_path)(text_path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int64)
    if ids.size < max(contexts) + 1:  # before the model loads
        raise ValueError(f"{text_path} has {ids.size} tokens, fewer than one window of context {max(contexts)} + 1: "
                         "give a longer --text or a shorter --context")
    model = _load_model(model_path, dtype, str(dev))
    family = model_family(model)
    log(f"{model_path}: {family}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
        f"{ids.size} tokens of text")
    forward = lambda x: model(x, use_cache=False).logits  # noqa: E731
    rows = []
    for n in contexts:
        for name, spec in zip(methods, specs):
            runs = seeds if spec is not None and spec.random else seeds[:1]
            label = spec.label if spec else "native"
            results, error = [], None
            for seed in runs:
                if spec is None:
                    unpatch_model(model)
                else:
                    patch_model(model, spec, seed=seed)
                try:
                    ticker = lambda it, total: progress(it, f"eval-hf {n} {label}", total)  # noqa: E731
                    results.append(perplexity(forward, ids, n, device=dev, batch_size=batch_size,
                                              score_fraction=score_fraction, max_scored=max_scored, progress=ticker))
                except (RuntimeError, ValueError) as err:  # e.g. MPT's own attention beyond max_seq_len
                    error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    log(f"  context {n}, {label}: failed: {error}")
                    break
                finally:
                    unpatch_model(model)
            if error is not None:
                rows.append({"context": n, "method": label, "error": error})
                continue
            loss = sum(r["loss"] for r in results) / len(results)
            tpt = sum(r["time_per_token"] for r in results) / len(results)
            row = {"context": n, "method": label, "loss": loss, "ppl": math.exp(loss),
                   "bits_per_token": loss / math.log(2), "time_per_token": tpt, "tokens_per_second": 1 / tpt,
                   "scored_tokens": results[0]["scored_tokens"], "seeds": list(runs[:len(results)])}
            rows.append(row)
            log(f"  context {n:>6}  {row['method']:<16} ppl {row['ppl']:10.4f}  {row['tokens_per_second']:10.0f} tok/s")
    return {"model": str(model_path), "family": family, "transformers": transformers.__version__,
            "tokens": int(ids.size), "dtype": dtype, "device": str(dev), "rows": rows}


def main(args: argparse.Namespace) -> int:
    """Run, save the JSON, print the table; exit 1 when some rows failed (they are in the JSON)."""
    from .util import markdown_table, save_results

    results = evaluate_hf(args.model, args.text, args.context, args.methods, seeds=args.seeds, dtype=args.dtype,
                          device=args.device, batch_size=args.batch_size, max_scored=args.max_scored,
                          score_fraction=args.score_fraction, log=lambda s: print(s, file=sys.stderr, flush=True))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("handler",)}
    path = args.out / f"{NAME}.json"
    save_results(path, config, results)
    ok = [r for r in results["rows"] if "error" not in r]
    print(markdown_table(["context", "method", "ppl", "tokens/s"],
                         [[r["context"], r["method"], r["ppl"], r["tokens_per_second"]] for r in ok]))
    print(f"results: {path}")
    failed = len(results["rows"]) - len(ok)
    if failed:
        print(f"poslsh eval-hf: {failed} of {len(results['rows'])} rows failed (see above and {path})", file=sys.stderr)
        return 1
    return 0
