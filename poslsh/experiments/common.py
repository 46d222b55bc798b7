"""What every experiment shares: its config as a dataclass, results as reloadable JSON with the
provenance of the run, a progress bar, Markdown tables, and matplotlib without a display.

An experiment module defines

    NAME = "mask-error"                  # the CLI subcommand and the JSON file's stem
    @dataclass class Config: ...         # every field becomes a --flag of the subcommand
    def run(config, out_dir) -> dict     # computes, writes out_dir/NAME.json and PNGs, returns the JSON
    def summarize(results, out_dir) -> str   # a Markdown section: tables and links to the PNGs

and the CLI and ``poslsh demo`` drive all of them the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["environment", "save_results", "load_results", "replot_saved", "progress", "markdown_table", "pyplot",
           "fmt", "config_to_dict", "torch_threads"]


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


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool | None = None,
             every_s: float | None = None):
    """Progress of a long loop on stderr: a tqdm bar on a terminal; otherwise (a log file, CI, a pipe)
    one plain line at most every ``every_s`` seconds (``POSLSH_PROGRESS_S``, default 5) and one at
    the end, e.g. ``[mask-error] 12/48 (25%), 31 s, about 93 s left``. ``POSLSH_PROGRESS=0`` (or
    ``enabled=False``) silences both."""
    if enabled is None:
        enabled = os.environ.get("POSLSH_PROGRESS", "1") != "0"
    if not enabled:
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    if every_s is None:
        every_s = float(os.environ.get("POSLSH_PROGRESS_S", "5"))
    return _progress_lines(iterable, desc, total if total is not None else _length(iterable), every_s)


def _length(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _progress_lines(iterable: Iterable, desc: str, total: int | None, every_s: float):
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last = now
            elapsed = now - start
            if total:
                left = f", about {elapsed / done * (total - done):.0f} s left" if done < total else ""
                print(f"[{desc}] {done}/{total} ({100 * done / total:.0f}%), {elapsed:.0f} s{left}",
                      file=sys.stderr, flush=True)
            else:
                print(f"[{desc}] {done} done, {elapsed:.0f} s", file=sys.stderr, flush=True)


def fmt(x: float | int | None, digits: int = 3) -> str:
    """Compact number for tables: 3 significant digits, scientific when small or large."""
    if x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    if x != x:
        return "nan"
    if x == 0:
        return "0"
    if 1e-2 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats go through ``fmt``."""
    cell = lambda v: fmt(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def gpu_time(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> tuple[float, str]:
    """Milliseconds per call of ``fn`` on the GPU and how they were measured: the median of
    ``triton.testing.do_bench``, or for calls over 0.2 s the median of 3 event-timed calls (the rule of
    the benchmark and the Pareto study)."""
    from triton.testing import do_bench

    fn()  # compile / warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    if est > 200:
        times = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times), "median of 3 event-timed calls"
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")), "do_bench median"
