"""The ``poslsh`` command: one subcommand per experiment, and ``demo`` running them all into one report
(with the committed GPU results of ``COMMITTED`` re-plotted from their JSON).

Each experiment's ``Config`` dataclass fields become its flags (``--samples 1 2 4`` for a tuple field,
``--no-causal`` for a bool that defaults to True).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
import typing
from pathlib import Path

# Subcommand -> module under poslsh.experiments, in report order. ``demo`` runs those marked True.
EXPERIMENTS: dict[str, tuple[str, bool]] = {
    "mask-error": ("mask_error", True),
    "attn-error": ("attn_error", True),
    "scaling": ("scaling", True),
    "pareto": ("pareto", True),
    "bench": ("gpu_bench", False),
    "lm-validation": ("lm_validation", False),
    "lsh-native": ("lsh_native", False),
}


# Results measured elsewhere (on a GPU) and committed: ``poslsh demo`` redraws their plots from the JSON
# alone (no GPU needed) into its report. Subcommand -> file in ``RESULTS_DIR``; the module provides
# ``replot(doc, out_dir)`` besides ``summarize``.
COMMITTED: dict[str, str] = {"lm-validation": "lm-validation.json", "lsh-native": "lsh-native.json"}
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


def _module(name: str):
    return importlib.import_module(f"poslsh.experiments.{EXPERIMENTS[name][0]}")


def _available(name: str) -> bool:
    try:
        _module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("poslsh.experiments"):
            return False
        raise
    return True


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = hints[field.name]
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif origin in (tuple, list):
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, type=item, nargs="+", default=default, help=f"default: {default}")
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if origin else kind
            parser.add_argument(flag, type=base, default=default, help=f"default: {default}")


def _config_from_args(config_cls: type, args: argparse.Namespace):
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def committed_sections(out_dir: Path, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Report sections of the committed results found in ``results_dir``, their PNGs redrawn into out_dir."""
    from .experiments.common import load_results

    sections = []
    for name, filename in COMMITTED.items():
        path = results_dir / filename
        if path.exists() and _available(name):
            mod = _module(name)
            doc = load_results(path)
            mod.replot(doc, out_dir)
            sections.append(mod.summarize(doc, out_dir) + f"\n\n<sub>Committed result `{path.name}`, "
                            f"command `{doc['environment']['command']}`; plots redrawn from it.</sub>")
    return sections


def _write_report(out_dir: Path, sections: list[str], title: str) -> Path:
    from .experiments.common import environment

    env = environment()
    head = (f"# {title}\n\nGenerated {env['date']} by `{env['command']}` on {env['device']} "
            f"(torch {env['torch']}, triton {env['triton']}, {env['cpu_threads']} CPU threads).\n")
    path = out_dir / "report.md"
    path.write_text("\n\n".join([head] + sections) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poslsh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every CPU-sized experiment into one report folder")
    demo.add_argument("--out", type=Path, default=Path("reports/demo"))
    demo.add_argument("--only", nargs="+", choices=[k for k, (_, d) in EXPERIMENTS.items() if d],
                      help="run only these experiments (and leave out the committed GPU results)")

    for name in EXPERIMENTS:
        if not _available(name):
            continue
        mod = _module(name)
        p = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        p.add_argument("--out", type=Path, default=Path("reports") / name)
        _add_config_flags(p, mod.Config)

    for name, register in _extra_commands():
        register(sub)

    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ValueError, RuntimeError) as err:  # bad flags or a missing device: a message, not a traceback
        print(f"poslsh {args.command}: error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        names = args.only or [k for k, (_, d) in EXPERIMENTS.items() if d and _available(k)]
        args.out.mkdir(parents=True, exist_ok=True)
        sections = []
        for name in names:
            mod = _module(name)
            start = time.perf_counter()
            print(f"[poslsh demo] {name} ...", file=sys.stderr, flush=True)
            results = mod.run(mod.Config(), args.out)
            sections.append(mod.summarize(results, args.out))
            print(f"[poslsh demo] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if not args.only:
            sections += committed_sections(args.out)
        report = _write_report(args.out, sections, "poslsh demo report")
        print(f"report: {report}")
        return 0
    if args.command in EXPERIMENTS:
        mod = _module(args.command)
        args.out.mkdir(parents=True, exist_ok=True)
        results = mod.run(_config_from_args(mod.Config, args), args.out)
        report = _write_report(args.out, [mod.summarize(results, args.out)], f"poslsh {args.command}")
        print(f"report: {report}")
        return 0
    return args.handler(args)


def _extra_commands():
    """Subcommands that are not experiments (``lm``, ``eval-hf``), registered by their own modules."""
    found = []
    for module, attr in (("poslsh.lm.cli", "register"), ("poslsh.integrations.cli", "register")):
        try:
            found.append((module, getattr(importlib.import_module(module), attr)))
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
    return found


if __name__ == "__main__":
    sys.exit(main())
