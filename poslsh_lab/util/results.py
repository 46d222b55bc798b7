"""A run's JSON document: ``{"environment", "config", "results"}``, written atomically, reloadable.

The environment records where and how the result was produced (date, the command as typed, versions,
device), so every number in a report can name its provenance. ``checkout_root`` finds the repository
checkout the package runs from (where the committed results live), for the defaults of ``poslsh
demo`` and ``python -m poslsh_lab.readme``; nothing else in the package assumes a repository around it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["environment", "config_to_dict", "save_results", "load_results", "replot_saved", "checkout_root",
           "committed_results_dir"]


def _program() -> str:
    """How the running command is typed: ``poslsh`` for the CLI however it was started."""
    name = Path(sys.argv[0]).name
    return "poslsh" if name in ("cli.py", "__main__.py", "poslsh") else name


def environment() -> dict[str, Any]:
    """Where and how a result was produced: date, command, versions, device."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([_program()] + sys.argv[1:]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def save_results(path: str | Path, config: Any, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``{"environment", "config", "results"}`` as JSON and return that document.

    The file is replaced atomically (written beside, then renamed), so a run killed while saving
    leaves the previous complete file, never a truncated one."""
    doc = {"environment": environment(), "config": config_to_dict(config), "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return doc


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def replot_saved(path: str, name: str, out_dir: str | Path, draw: Callable[[dict, Path], Any]) -> dict[str, Any]:
    """An experiment's ``--replot PATH``: load a saved result, redraw its PNGs into out_dir with
    ``draw(doc, out_dir)``, return the document (nothing is measured)."""
    if not Path(path).is_file():
        raise ValueError(f"replot must name a saved {name}.json, got {path!r} (no such file)")
    doc = load_results(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw(doc, out)
    return doc


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in JSON")


def checkout_root() -> Path | None:
    """The repository checkout the package runs from (an editable install, or ``python -m`` inside the
    clone): the folder holding this package and a pyproject.toml; None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "poslsh").is_dir() else None


def committed_results_dir() -> Path | None:
    """The checkout's ``bench/results`` (the committed JSON), None outside a checkout."""
    root = checkout_root()
    return None if root is None else root / "bench" / "results"
