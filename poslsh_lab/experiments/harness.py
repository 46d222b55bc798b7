"""What every long experiment's run needs: one clock with a deadline and per-phase budgets, log lines
stamped with the time since the start, the JSON document saved after every step (atomically, so a
killed run leaves a loadable, partial file), and failures recorded as one line instead of ending
the run.

    run = Run("pareto", out / "pareto.json", config, results, deadline_s=config.budget_s)
    run.log("reference done")              # [pareto   12.3s] reference done   (on stderr)
    if run.late(): ...                     # the deadline has passed: record the rest as skipped
    end = run.end(budget_s=30, reserve_s=5)  # when a phase starting now must stop
    doc = run.save()                       # {"environment", "config", "results"}, results["seconds"] set

Seeds of the draws come from ``poslsh.seeds``; what is measured (errors, slopes, times, keys per
query) from ``metrics``. The config helpers below are what the experiments' Configs share: ``--tiny``
sizes (``effective``) and a config back from its JSON document (``config_from``); the ranges of their
fields are declared on the fields (``poslsh_lab.util.flags.Bounds``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ..util import save_results

__all__ = ["Run", "describe_failure", "effective", "config_from"]

C = TypeVar("C")


class Run:
    """One run's clock, log lines and JSON document.

    Args:
        name: the experiment's name, the prefix of every log line.
        path: the JSON file, rewritten by ``save``.
        config: what ``save`` records as the config (a dataclass or a dict).
        results: the results dict the run fills; ``save`` writes it (with ``seconds``, the elapsed time,
            unless ``seconds_key`` is None).
        deadline_s: seconds from now after which the run is ``late`` (0: never).
        stream: where log lines go (None: stdout); stamp: the format of the
            elapsed seconds in them (each experiment keeps the lines it always printed).
    """

    def __init__(self, name: str, path: str | Path, config: Any, results: dict[str, Any], *, deadline_s: float = 0.0,
                 stream: TextIO | None = None, stamp: str = "5.0f", seconds_key: str | None = "seconds") -> None:
        self.name, self.path, self.config, self.results = name, Path(path), config, results
        self.stream, self.stamp, self.seconds_key = stream, stamp, seconds_key
        self.start = time.perf_counter()
        self.deadline = self.start + deadline_s if deadline_s > 0 else math.inf

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def late(self) -> bool:
        """Whether the deadline has passed (nothing new should start)."""
        return time.perf_counter() > self.deadline

    def end(self, budget_s: float = 0.0, reserve_s: float = 0.0) -> float:
        """When a phase starting now must stop, as a ``time.perf_counter()`` value: after its own
        ``budget_s`` (0: none), and ``reserve_s`` before the deadline. math.inf when neither limits it."""
        own = time.perf_counter() + budget_s if budget_s > 0 else math.inf
        return min(own, self.deadline - reserve_s)

    def log(self, text: str) -> None:
        print(f"[{self.name} {self.elapsed():{self.stamp}}s] {text}", file=self.stream, flush=True)

    def save(self) -> dict[str, Any]:
        """Write the document (atomically: beside, then renamed) and return it."""
        results = self.results if self.seconds_key is None else {**self.results, self.seconds_key: self.elapsed()}
        return save_results(self.path, self.config, results)


def describe_failure(err: BaseException) -> str:
    """A failure as it is recorded in the JSON and the log: ``Type: first line of the message``."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"


def effective(config: C, tiny: dict[str, Any]) -> C:
    """The config actually run: with ``config.tiny`` set, the ``tiny`` sizes replace the fields left at
    their defaults (so ``--tiny --contexts 64`` keeps 64)."""
    if not config.tiny:
        return config
    defaults = type(config)()
    return dataclasses.replace(config, **{k: v for k, v in tiny.items() if getattr(config, k) == getattr(defaults, k)})


def config_from(stored: dict[str, Any], config_cls: type[C]) -> C:
    """A Config dataclass from its dict in a JSON document: lists back to tuples, keys the class no
    longer has left out (a document written by an older version still loads)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known})
