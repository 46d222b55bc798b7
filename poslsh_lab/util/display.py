"""What people read while and after a run: progress lines, compact numbers, Markdown tables, and
matplotlib without a display."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

__all__ = ["progress", "fmt", "markdown_table", "pyplot", "legend_if_labelled", "save_figure"]


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
    """A GitHub Markdown table; floats go through ``fmt``, None (a value that could not be computed, such
    as a fit over fewer than two points) reads "n/a"."""
    cell = lambda v: fmt(v) if isinstance(v, float) else "n/a" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_if_labelled(ax, **kwargs) -> None:
    """``ax.legend(**kwargs)`` when something on the axes is labelled (a partial run may have drawn
    nothing yet, and an empty legend warns)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save_figure(fig, path: str | Path, dpi: int = 110, **tight_layout: Any) -> Path:
    """Lay out (``fig.tight_layout(**tight_layout)``), write the PNG at ``dpi``, close the figure; the path."""
    fig.tight_layout(**tight_layout)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)
