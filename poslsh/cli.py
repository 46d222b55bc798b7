"""The ``poslsh`` command: one subcommand per experiment, and ``demo`` running them all into one report
(with the committed GPU results of ``COMMITTED`` re-plotted from their JSON).

Each experiment's ``Config`` dataclass fields become its flags (``--samples 1 2 4`` for a tuple field,
``--no-causal`` for a bool that defaults to True); the help of a flag is the field's entry in the
Config docstring's ``Attributes:`` list (or ``field(metadata={"help": ...})``), and a ``Literal``
annotation gives its choices. Every command takes ``--threads`` (torch CPU threads, default 1: on a
shared or small machine one thread per process is the fastest for these sizes; 0 keeps torch's
default) and checks what it needs (CUDA, files, optional packages) before any work, failing with
one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import re
import sys
import time
import typing
from pathlib import Path

# Subcommand -> (module under poslsh.experiments, run by ``demo``, help sentence), in report order.
EXPERIMENTS: dict[str, tuple[str, bool, str]] = {
    "mask-error": ("mask_error", True, "Measure how well the mean of r block masks approximates the ALiBi kernel "
                                       "(max and spectral norm, block sizes) against the bounds."),
    "attn-error": ("attn_error", True, "Measure the attention output error of positional LSH against exact ALiBi "
                                       "versus r, beside the window baseline."),
    "scaling": ("scaling", True, "Time exact, window and LSH attention on the CPU versus the sequence length, "
                                 "with peak memory."),
    "pareto": ("pareto", True, "Measure error against time and keys per query for the window, LSH per sampling "
                               "mode and the hybrid."),
    "bench": ("gpu_bench", False, "Benchmark the GPU kernels (Triton, FlexAttention) against exact ALiBi, dense "
                                  "SDPA and the window (--device cpu: a dry run at tiny sizes)."),
    "lm-validation": ("lm_validation", False, "Train a small ALiBi language model, then measure its held-out bits "
                                              "per byte per attention method, r and context."),
    "lsh-native": ("lsh_native", False, "Train language models with positional-LSH attention natively and compare "
                                        "them with exact ALiBi at one token budget."),
}
DEFAULT_THREADS = 1

# Results measured elsewhere (on a GPU) and committed: ``poslsh demo`` redraws their plots from the JSON
# alone (no GPU needed) into its report. Subcommand -> file in ``RESULTS_DIR``; the module provides
# ``replot(doc, out_dir)`` besides ``summarize``.
COMMITTED: dict[str, str] = {"lm-validation": "lm-validation.json", "lsh-native": "lsh-native.json"}
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"


class RequirementError(RuntimeError):
    """What a command needs is missing (a device, a file, a package): said in one line."""


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


# ----------------------------------------------------------------------------- Config -> flags


def field_help(config_cls: type) -> dict[str, str]:
    """Per-field help of a Config dataclass: ``field(metadata={"help": ...})``, else its entry in the
    class docstring's ``Attributes:`` list (``name: text``, continuation lines indented deeper)."""
    doc = config_cls.__doc__ or ""
    found: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    if "Attributes:" in [line.strip() for line in lines]:
        start = [line.strip() for line in lines].index("Attributes:") + 1
        name, indent = None, None
        for line in lines[start:]:
            if not line.strip():
                if name is not None:
                    name = None  # a blank line ends an entry (and, before any, nothing)
                continue
            depth = len(line) - len(line.lstrip())
            entry = re.match(r"\s*([a-z_][a-z0-9_]*): (.*)$", line)
            if entry and (indent is None or depth == indent):
                indent, name = depth, entry.group(1)
                found[name] = entry.group(2).strip()
            elif name is not None and indent is not None and depth > indent:
                found[name] += " " + line.strip()
            elif indent is not None and depth < indent:
                break
    for f in dataclasses.fields(config_cls):
        if "help" in f.metadata:
            found[f.name] = f.metadata["help"]
    return found


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _choices(kind) -> tuple | None:
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    return str(value) if value != "" else "none"


def _add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per Config field, its help from ``field_help`` ("Default: ..." and the choices added)."""
    hints = typing.get_type_hints(config_cls)
    helps = field_help(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind = hints[field.name]
        origin = typing.get_origin(kind)
        text = _sentence(helps.get(field.name, ""))
        if kind is bool:
            # default=None keeps argparse from appending "(default: ...)"; the real default is set below.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} Default: {'on' if default else 'off'}.")
            parser.set_defaults(**{field.name: default})
            continue
        if origin in (tuple, list):
            item = typing.get_args(kind)[0]
            choices = _choices(item)
            parser.add_argument(flag, type=type(choices[0]) if choices else item, nargs="+", default=default,
                                choices=choices, metavar=field.name.upper(),
                                help=f"{text} Default: {_show(default)}."
                                     + (f" Each one of: {', '.join(map(str, choices))}." if choices else ""))
            continue
        choices = _choices(kind)
        if choices:
            base = type(choices[0])
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if origin else kind
        parser.add_argument(flag, type=base, default=default, choices=choices, metavar=field.name.upper(),
                            help=f"{text} Default: {_show(default)}."
                                 + (f" One of: {', '.join(map(str, choices))}." if choices else ""))


def _config_from_args(config_cls: type, args: argparse.Namespace):
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` for a command whose Config has no ``threads`` field."""
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help=f"Torch CPU threads; 0 keeps torch's default (all cores). Default: {DEFAULT_THREADS}, "
                             "the fastest for these sizes on a shared or small machine.")


# ----------------------------------------------------------------------------- requirements


def require_cuda(device: str, what: str) -> None:
    """RequirementError unless ``device`` is not CUDA or a CUDA device is visible."""
    import torch

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RequirementError(f"{what} needs CUDA, and torch {torch.__version__} sees no CUDA device")


def require_package(module: str, why: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RequirementError(f"{why} needs the {module} package: pip install -e \".[{extra}]\"")


def require_file(path: Path, what: str, folder: bool = False) -> None:
    if folder and not Path(path).is_dir():
        raise RequirementError(f"{what} {path} is not a folder" if Path(path).exists() else f"{what} {path} does not exist")
    if not folder and not Path(path).is_file():
        raise RequirementError(f"{what} {path} is not a file" if Path(path).exists() else f"{what} {path} does not exist")


def _check_experiment(name: str, config) -> None:
    """What an experiment needs, checked before it starts."""
    device = getattr(config, "device", "cpu")
    require_cuda(device, f"--device {device}")
    if getattr(config, "plots", True):
        require_package("matplotlib", f"poslsh {name} (its plots)", "demo")
    if getattr(config, "replot", ""):
        require_file(Path(config.replot), "--replot")
    if name == "lm-validation":
        require_package("safetensors", "poslsh lm-validation (its checkpoint)", "hf")
        if getattr(config, "checkpoint", ""):
            require_file(Path(config.checkpoint), "--checkpoint", folder=True)


# ----------------------------------------------------------------------------- reports


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


# ----------------------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a help line that is a sentence too (subcommands inherit the class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self.add_argument("-h", "--help", action="help", help="Show this help and exit.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poslsh", description="Near-linear ALiBi attention by positional LSH: "
                     "the experiments behind every claim, and tools for ALiBi models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="Run every CPU-sized experiment into one report folder, with the committed "
                                       "GPU results re-plotted.", description="Run every CPU-sized experiment "
                                       "into one report folder, with the committed GPU results re-plotted.")
    demo.add_argument("--out", type=Path, default=Path("reports/demo"), metavar="DIR",
                      help="Folder for report.md, the JSON results and the PNG plots. Default: reports/demo.")
    choices = [k for k, (_, d, _) in EXPERIMENTS.items() if d]
    demo.add_argument("--only", nargs="+", choices=choices, metavar="EXPERIMENT",
                      help="Run only these experiments (and leave out the committed GPU results). Each one of: "
                           + ", ".join(choices) + ".")
    add_threads_flag(demo)

    for name, (_, _, text) in EXPERIMENTS.items():
        if not _available(name):
            continue
        mod = _module(name)
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--out", type=Path, default=Path("reports") / name, metavar="DIR",
                       help=f"Folder for {mod.NAME}.json, the PNG plots and report.md. Default: reports/{name}.")
        _add_config_flags(p, mod.Config)
        if not any(f.name == "threads" for f in dataclasses.fields(mod.Config)):
            add_threads_flag(p)

    for _, register in _extra_commands():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import torch

        threads = getattr(args, "threads", DEFAULT_THREADS)
        if threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 keeps torch's default), got {threads}")
        if threads > 0:
            torch.set_num_threads(threads)
        return _dispatch(args)
    except (ValueError, RuntimeError, OSError, ImportError) as err:  # one line, not a traceback
        lines = str(err).strip().splitlines() or [type(err).__name__]
        print(f"poslsh {args.command}: error: {lines[0]}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        names = args.only or [k for k, (_, d, _) in EXPERIMENTS.items() if d and _available(k)]
        configs = {name: _module(name).Config() for name in names}
        for name, config in configs.items():
            if any(f.name == "threads" for f in dataclasses.fields(config)):
                config.threads = args.threads
            _check_experiment(name, config)
        args.out.mkdir(parents=True, exist_ok=True)
        sections = []
        for name, config in configs.items():
            mod = _module(name)
            start = time.perf_counter()
            print(f"[poslsh demo] {name} ...", file=sys.stderr, flush=True)
            results = mod.run(config, args.out)
            sections.append(mod.summarize(results, args.out))
            print(f"[poslsh demo] {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        if not args.only:
            sections += committed_sections(args.out)
        report = _write_report(args.out, sections, "poslsh demo report")
        print(f"report: {report}")
        return 0
    if args.command in EXPERIMENTS:
        mod = _module(args.command)
        config = _config_from_args(mod.Config, args)
        _check_experiment(args.command, config)
        args.out.mkdir(parents=True, exist_ok=True)
        results = mod.run(config, args.out)
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
