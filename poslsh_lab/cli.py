"""The ``poslsh`` command: one subcommand per experiment, and ``demo`` running them all into one report
(with the committed GPU results of ``COMMITTED`` re-plotted from their JSON).

Each experiment's ``Config`` dataclass fields become its flags, their help from the Config docstring
(``poslsh_lab.util.flags``). Every command takes ``--threads`` (torch CPU threads, default 1: on a
shared or small machine one thread per process is the fastest for these sizes; 0 keeps torch's
default) and checks what it needs (CUDA, files, optional packages) before any work, failing with
one line and exit status 2; so does a bad flag (argparse's errors, without the usage block, and the
ranges the Config fields declare). A flag that the chosen run will not read (``unused``) is named in
a warning line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

from poslsh import __version__
from .util import (DEFAULT_THREADS, add_config_flags, add_threads_flag, committed_results_dir, install_hint,
                   config_from_args, environment, load_results, require_cuda, require_file, require_package)

# Subcommand -> (module under poslsh_lab.experiments, run by ``demo``, help sentence), in report order.
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
    "generate-bench": ("generate_bench", False, "Generate text with an ALiBi model of a published shape (random "
                                                "weights): prefill, time per token, memory and KV cache against the "
                                                "context, transformers' own attention against the poslsh patch."),
    "cp-bench": ("cp_bench", False, "Shard one sequence over N processes: check, time, memory, bytes per rank."),
}
# Results measured elsewhere (on a GPU, or over several processes) and committed: ``poslsh demo`` redraws their plots from the JSON
# alone (no GPU needed) into its report. Subcommand -> file in the results folder (``demo --results``,
# by default the checkout's bench/results); the module provides ``replot(doc, out_dir)`` besides
# ``summarize``.
COMMITTED: dict[str, str] = {"lm-validation": "lm-validation.json", "lsh-native": "lsh-native.json",
                             "cp-bench": "cp_cpu/cp-bench.json", "generate-bench": "generate_bench/generate-bench.json"}


def _module(name: str):
    return importlib.import_module(f"poslsh_lab.experiments.{EXPERIMENTS[name][0]}")


def _available(name: str) -> bool:
    try:
        _module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("poslsh_lab.experiments"):
            return False
        raise
    return True


# ----------------------------------------------------------------------------- requirements


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


def unused_flags(name: str, config) -> dict[str, str]:
    """The flags given (set to other than their default) that this run will not read, each with why:
    with ``--replot`` every one but ``--out``; else what the experiment's ``unused(config)`` names
    (e.g. scaling's ``--samples`` when ``--methods`` has no LSH)."""
    mod = _module(name)
    defaults = type(config)()
    if getattr(config, "replot", ""):
        fields = {f.name: "--replot only redraws the saved run's plots" for f in dataclasses.fields(config)
                  if f.name not in ("replot", "plots")}
    else:
        fields = getattr(mod, "unused", lambda _: {})(config)
    return {"--" + f.replace("_", "-"): why for f, why in fields.items() if getattr(config, f) != getattr(defaults, f)}


def _warn_unused(name: str, config) -> None:
    """One warning line per reason, naming the flags it covers."""
    by_reason: dict[str, list[str]] = {}
    for flag, why in unused_flags(name, config).items():
        by_reason.setdefault(why, []).append(flag)
    for why, flags in by_reason.items():
        print(f"poslsh {name}: warning: {', '.join(flags)} {'is' if len(flags) == 1 else 'are'} ignored: {why}",
              file=sys.stderr)


# ----------------------------------------------------------------------------- reports


def committed_sections(out_dir: Path, results_dir: Path | None = None) -> list[str]:
    """Report sections of the committed results found in ``results_dir`` (default: the checkout's
    bench/results; none outside a checkout), their PNGs redrawn into out_dir."""
    results_dir = committed_results_dir() if results_dir is None else Path(results_dir)
    sections = []
    if results_dir is None:
        return sections
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
    env = environment()
    head = (f"# {title}\n\nGenerated {env['date']} by `{env['command']}` on {env['device']} "
            f"(torch {env['torch']}, triton {env['triton']}, {env['cpu_threads']} CPU threads).\n")
    path = out_dir / "report.md"
    path.write_text("\n\n".join([head] + sections) + "\n")
    return path


# ----------------------------------------------------------------------------- the command


class _Parser(argparse.ArgumentParser):
    """argparse's parser with a help line that is a sentence too, and a usage error in one line (no usage
    block, which for an experiment runs to a screenful); subcommands inherit the class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self.add_argument("-h", "--help", action="help", help="Show this help and exit.")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="poslsh", description="Near-linear ALiBi attention by positional LSH: "
                     "the experiments behind every claim, and tools for ALiBi models.")
    parser.add_argument("--version", action="version", version=f"poslsh {__version__}",
                        help="Show poslsh's version and exit.")
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
    demo.add_argument("--results", type=Path, default=None, metavar="DIR",
                      help="Folder of the committed GPU results whose plots the report redraws. Default: the "
                           "checkout's bench/results (none when poslsh is installed without its repository).")
    add_threads_flag(demo)

    for name, (_, _, text) in EXPERIMENTS.items():
        if not _available(name):
            continue
        mod = _module(name)
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--out", type=Path, default=Path("reports") / name, metavar="DIR",
                       help=f"Folder for {mod.NAME}.json, the PNG plots and report.md. Default: reports/{name}.")
        add_config_flags(p, mod.Config)
        if not any(f.name == "threads" for f in dataclasses.fields(mod.Config)):
            add_threads_flag(p)

    for _, register in _extra_commands():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 2
    try:
        import torch

        threads = getattr(args, "threads", DEFAULT_THREADS)  # the parser refused one below 0
        if threads > 0:
            torch.set_num_threads(threads)
        return _dispatch(args)
    except (ValueError, RuntimeError, OSError, ImportError) as err:  # one line, not a traceback
        lines = str(err).strip().splitlines() or [type(err).__name__]
        hint = install_hint(err.name) if isinstance(err, ModuleNotFoundError) else None
        print(f"poslsh {args.command}: error: {lines[0]}" + (f": {hint}" if hint else ""), file=sys.stderr)
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
            sections += committed_sections(args.out, args.results)
        report = _write_report(args.out, sections, "poslsh demo report")
        print(f"report: {report}")
        return 0
    if args.command in EXPERIMENTS:
        mod = _module(args.command)
        config = config_from_args(mod.Config, args)
        _check_experiment(args.command, config)
        _warn_unused(args.command, config)
        args.out.mkdir(parents=True, exist_ok=True)
        results = mod.run(config, args.out)
        report = _write_report(args.out, [mod.summarize(results, args.out)], f"poslsh {args.command}")
        print(f"report: {report}")
        failed = [] if getattr(config, "replot", "") else getattr(mod, "failures", lambda _: [])(results)
        if failed:  # recorded in the JSON and the report; the exit status says so too
            print(f"poslsh {args.command}: {len(failed)} measurement(s) failed, the first: {failed[0]} "
                  f"(all in {report})", file=sys.stderr)
            return 1
        return 0
    return args.handler(args)


def _extra_commands():
    """Subcommands that are not experiments (``lm``, ``eval-hf``), registered by their own modules."""
    found = []
    for module, attr in (("poslsh_lab.lm.cli", "register"), ("poslsh_lab.eval_hf", "register")):
        try:
            found.append((module, getattr(importlib.import_module(module), attr)))
        except ModuleNotFoundError as err:
            if not (err.name and module.startswith(err.name)):
                raise
    return found


if __name__ == "__main__":
    sys.exit(main())
