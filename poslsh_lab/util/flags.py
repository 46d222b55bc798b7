"""The command line's conventions, shared by ``poslsh`` and the subcommands of ``poslsh_lab.lm`` and
``poslsh.integrations``: a Config dataclass as flags, ``--threads``, and requirement checks.

Each field of a Config dataclass becomes a flag (``--samples 1 2 4`` for a tuple field, ``--no-causal``
for a bool that defaults to True); the help of a flag is the field's entry in the Config docstring's
``Attributes:`` list (or ``field(metadata={"help": ...})``), a ``Literal`` annotation gives its
choices, and a ``Bounds`` annotation its range (``Count``: counts and lengths, at least 1; ``Fraction``:
strictly between 0 and 1; ...), checked by the parser so a bad value is refused naming its flag before
any work (``check_fields`` checks the same for a Config built in Python). What a command needs (CUDA,
files, optional packages) is checked before any work and reported as one ``RequirementError`` line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch

__all__ = ["field_help", "add_config_flags", "config_from_args", "add_threads_flag", "torch_threads",
           "DEFAULT_THREADS", "RequirementError", "require_cuda", "require_package", "require_file", "install_hint", "Bounds",
           "Count", "CountOrZero", "TwoOrMore", "Positive", "NonNegative", "Fraction", "check_fields"]

DEFAULT_THREADS = 1


class RequirementError(RuntimeError):
    """What a command needs is missing (a device, a file, a package): said in one line."""


@dataclass(frozen=True)
class Bounds:
    """The range a number must lie in: ``low`` and ``high`` (None: unbounded), each excluded when its
    ``*_open`` is set. Put in an ``Annotated`` type of a Config field (of a tuple field's items: every
    item is checked), or turned into an argparse ``type=`` by ``argtype``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """What is expected, as ">= 1", "> 0" or "in (0, 1)"."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, value: float, name: str) -> None:
        """ValueError naming ``name`` unless ``value`` is in range."""
        if not self.holds(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value}")

    def argtype(self, base: type) -> typing.Callable[[str], typing.Any]:
        """An argparse ``type=`` that converts with ``base`` and refuses a value out of range; argparse
        then names the flag ("argument --lengths: must be >= 1, got -5")."""
        def convert(text: str):
            value = base(text)  # a ValueError here is argparse's "invalid int value: 'x'"
            if not self.holds(value):
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
            return value

        convert.__name__ = base.__name__
        return convert


# The ranges Config fields declare (``samples: tuple[Count, ...]``, ``window_eps: Fraction``).
Count = Annotated[int, Bounds(1)]            # counts, lengths, sizes
CountOrZero = Annotated[int, Bounds(0)]      # the same where 0 means none, off or the default
TwoOrMore = Annotated[int, Bounds(2)]        # lengths that need two positions (a context to predict from)
Positive = Annotated[float, Bounds(0, low_open=True)]
NonNegative = Annotated[float, Bounds(0)]    # budgets in seconds, where 0 means no limit
Fraction = Annotated[float, Bounds(0, 1, low_open=True, high_open=True)]  # truncation levels, probabilities


def _unannotated(kind) -> tuple[typing.Any, Bounds | None]:
    """A type without its ``Annotated`` wrapper, and the ``Bounds`` it carried (or None)."""
    if typing.get_origin(kind) is Annotated:
        base, *extras = typing.get_args(kind)
        return base, next((x for x in extras if isinstance(x, Bounds)), None)
    return kind, None


def _field_kinds(config_cls: type) -> dict[str, tuple[typing.Any, typing.Any, Bounds | None]]:
    """Per field: its type without annotations, its item type (tuple fields; else None), its Bounds."""
    out = {}
    for name, kind in typing.get_type_hints(config_cls, include_extras=True).items():
        kind, bounds = _unannotated(kind)
        item = None
        if typing.get_origin(kind) in (tuple, list):
            item, bounds = _unannotated(typing.get_args(kind)[0])
        out[name] = (kind, item, bounds)
    return out


def check_fields(config) -> None:
    """ValueError naming the first field of a Config dataclass (or item of a tuple field) outside its
    declared ``Bounds``: the parser's check, for a Config built in Python."""
    for name, (_, item, bounds) in _field_kinds(type(config)).items():
        if bounds is None:
            continue
        value = getattr(config, name)
        for x in (value if item is not None else (value,)):
            bounds.check(x, name)


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


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per Config field, its help from ``field_help`` ("Default: ..." and the choices added)."""
    kinds = _field_kinds(config_cls)
    helps = field_help(config_cls)
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kind, item, bounds = kinds[field.name]
        origin = typing.get_origin(kind)
        text = _sentence(helps.get(field.name, ""))
        convert = (lambda base, b=bounds: b.argtype(base)) if bounds else (lambda base: base)
        if bounds:
            text += f" {'Each must' if item is not None else 'Must'} be {bounds.describe()}."
        if kind is bool:
            # default=None keeps argparse from appending "(default: ...)"; the real default is set below.
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} Default: {'on' if default else 'off'}.")
            parser.set_defaults(**{field.name: default})
            continue
        if item is not None:
            choices = _choices(item)
            parser.add_argument(flag, type=type(choices[0]) if choices else convert(item), nargs="+", default=default,
                                choices=choices, metavar=field.name.upper(),
                                help=f"{text} Default: {_show(default)}."
                                     + (f" Each one of: {', '.join(map(str, choices))}." if choices else ""))
            continue
        choices = _choices(kind)
        if choices:
            base = type(choices[0])
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if origin else kind
        parser.add_argument(flag, type=base if choices else convert(base), default=default, choices=choices,
                            metavar=field.name.upper(),
                            help=f"{text} Default: {_show(default)}."
                                 + (f" One of: {', '.join(map(str, choices))}." if choices else ""))


def config_from_args(config_cls: type, args: argparse.Namespace):
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """``--threads N`` for a command whose Config has no ``threads`` field."""
    parser.add_argument("--threads", type=Bounds(0).argtype(int), default=DEFAULT_THREADS, metavar="N",
                        help=f"Torch CPU threads; 0 keeps torch's default (all cores). Default: {DEFAULT_THREADS}, "
                             "the fastest for these sizes on a shared or small machine.")


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch CPU threads (0 keeps the current count), then restore.

    Small CPU operations on a shared 2-core machine run many times faster on one thread than with
    OpenMP barriers between two, so CPU-sized experiments default to one."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA): before reading a clock or memory counter."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- requirements


def require_cuda(device: str, what: str) -> None:
    """RequirementError unless ``device`` is not CUDA or a CUDA device is visible."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RequirementError(f"{what} needs CUDA, and torch {torch.__version__} sees no CUDA device")


# Optional packages -> the extra of pyproject.toml that installs them.
EXTRAS = {"matplotlib": "demo", "triton": "triton", "transformers": "hf", "safetensors": "hf", "scipy": "test"}


def install_hint(module: str | None) -> str | None:
    """The command that installs an optional package (or the package of a submodule), None if not one."""
    extra = EXTRAS.get((module or "").split(".")[0])
    return f'pip install -e ".[{extra}]"' if extra else None


def require_package(module: str, why: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise RequirementError(f"{why} needs the {module} package: pip install -e \".[{extra}]\"")


def require_file(path: Path, what: str, folder: bool = False) -> None:
    if folder and not Path(path).is_dir():
        raise RequirementError(f"{what} {path} is not a folder" if Path(path).exists() else f"{what} {path} does not exist")
    if not folder and not Path(path).is_file():
        raise RequirementError(f"{what} {path} is not a file" if Path(path).exists() else f"{what} {path} does not exist")
