"""One description of an attention method and its options, checked once where it is built.

``MethodSpec`` is what the transformers patch, ``poslsh eval-hf``, ``poslsh lm eval`` and the LM
validation study pass around; ``parse_method`` reads it from text, ``label`` writes it back (the two
round-trip), and ``attention_kwargs()`` gives the keyword arguments of ``poslsh.attention``.

The text form, one per method (fields after the name may be left off from the right; defaults in
brackets):

    exact
    window[:EPS]                          EPS [1e-3]: largest dropped weight relative to the diagonal
    lsh[:R[:SCHEME[:SAMPLING]]]           R samples [8], SCHEME grid|cut [grid], SAMPLING iid|stratified|qmc [iid]
    hybrid[:R[:SCHEME[:SAMPLING[:EPS]]]]  as lsh, EPS [1e-2]: the near field's target error (hybrid_eps)

Correlated sampling (stratified, qmc) needs the grid scheme. Labels leave out trailing defaults
(``lsh:8:grid``, ``hybrid:8:grid:qmc``), as the committed results were labelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .attention.core import METHODS
from .hashing import SAMPLINGS, SCHEMES

__all__ = ["MethodSpec", "parse_method", "GRAMMAR", "DEFAULT_WINDOW_EPS", "DEFAULT_HYBRID_EPS"]

DEFAULT_WINDOW_EPS = 1e-3  # poslsh.attention's defaults (a test holds them equal)
DEFAULT_HYBRID_EPS = 1e-2
GRAMMAR = "exact, window[:EPS], lsh[:R[:grid|cut[:iid|stratified|qmc]]] or hybrid[:R[:SCHEME[:SAMPLING[:EPS]]]]"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class MethodSpec:
    """An attention method and its options; invalid combinations raise ValueError at construction.

    Attributes:
        method: "exact", "window", "lsh" or "hybrid".
        samples: r, partitions per head ("lsh", "hybrid").
        scheme: "grid" or "cut" ("lsh", "hybrid").
        sampling: "iid", "stratified" or "qmc" (grid only).
        window_eps: in (0, 1), the window's truncation level ("window").
        hybrid_eps: > 0, the hybrid near field's target error ("hybrid").
    """

    method: str = "exact"
    samples: int = 8
    scheme: str = "grid"
    sampling: str = "iid"
    window_eps: float = DEFAULT_WINDOW_EPS
    hybrid_eps: float = DEFAULT_HYBRID_EPS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.scheme == "cut" and self.sampling != "iid":
            raise ValueError(f"sampling {self.sampling!r} needs the grid scheme (the cut scheme draws its samples "
                             "independently)")
        if not _number(self.window_eps) or not 0 < self.window_eps < 1:
            raise ValueError(f"window_eps must be in (0, 1), got {self.window_eps!r}")
        if not _number(self.hybrid_eps) or not self.hybrid_eps > 0:
            raise ValueError(f"hybrid_eps must be a number > 0, got {self.hybrid_eps!r}")

    @property
    def random(self) -> bool:
        """Whether the method draws partitions (so its results depend on the seed)."""
        return self.method in ("lsh", "hybrid")

    @property
    def label(self) -> str:
        """The text form, trailing defaults left out; ``parse_method(spec.label) == spec``."""
        if self.method == "window":
            return f"window:{self.window_eps:g}"
        if not self.random:
            return self.method
        tail = [self.sampling] if self.sampling != "iid" else []
        if self.method == "hybrid" and self.hybrid_eps != DEFAULT_HYBRID_EPS:
            tail = [self.sampling, f"{self.hybrid_eps:g}"]
        return ":".join([self.method, str(self.samples), self.scheme] + tail)

    def attention_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``poslsh.attention`` (and ``patch_model``): the method and the options
        it uses."""
        kw: dict[str, Any] = {"method": self.method}
        if self.method == "window":
            kw["window_eps"] = self.window_eps
        if self.random:
            kw.update(samples=self.samples, scheme=self.scheme, sampling=self.sampling)
        if self.method == "hybrid":
            kw["hybrid_eps"] = self.hybrid_eps
        return kw

    def options(self, seed: int = 0) -> dict[str, Any]:
        """Keyword arguments of ``ALiBiLM.set_attention``: every option and the partitions' seed."""
        return {"method": self.method, "samples": self.samples, "scheme": self.scheme, "seed": seed,
                "window_eps": self.window_eps, "sampling": self.sampling, "hybrid_eps": self.hybrid_eps}


def parse_method(text: str) -> MethodSpec:
    """A method string (module docstring) -> MethodSpec; ValueError naming the grammar otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"a method must be given as text ({GRAMMAR}), got {type(text).__name__}")
    parts = text.strip().split(":")
    name, fields = parts[0], parts[1:]
    most = {"exact": 0, "window": 1, "lsh": 3, "hybrid": 4}.get(name)
    if most is None or len(fields) > most:
        raise ValueError(f"bad method {text!r}: use {GRAMMAR}")
    try:
        if name == "window":
            return MethodSpec("window", window_eps=float(fields[0]) if fields else DEFAULT_WINDOW_EPS)
        if name == "exact":
            return MethodSpec("exact")
        keys = ("samples", "scheme", "sampling", "hybrid_eps")
        kinds = (int, str, str, float)
        return MethodSpec(name, **{key: kind(value) for key, kind, value in zip(keys, kinds, fields)})
    except ValueError as err:
        raise ValueError(f"bad method {text!r}: {err} (use {GRAMMAR})") from None
