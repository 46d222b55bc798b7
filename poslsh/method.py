"""One description of an attention method and its options, checked once where it is built.

``MethodSpec`` is what ``poslsh.nn.ALiBiAttention``, the LM (``ALiBiLM.set_attention``), the
transformers patch, ``poslsh eval-hf``, ``poslsh lm`` and the LM experiments pass around: each builds
it once (``as_method`` from a name and options, ``parse_method`` from text) and trusts it afterwards.
``label`` writes it back as text (the two round-trip), and ``attention_kwargs()`` gives the keyword
arguments of ``poslsh.attention``, whose own checks of raw arguments use the same rules (``checks``,
``hashing.check_scheme``).

The text form, one per method (fields after the name may be left off from the right; defaults in
brackets):

    exact
    window[:EPS]                          EPS [1e-3]: largest dropped weight relative to the diagonal
    lsh[:R[:SCHEME[:SAMPLING]]]           R samples [8], SCHEME grid|cut [grid], SAMPLING iid|stratified|qmc [iid]
    hybrid[:R[:SCHEME[:SAMPLING[:EPS]]]]  as lsh, EPS [1e-2]: the near field's target error (hybrid_eps)

What each method's weights are (an exact band, collisions beyond it, the Triton kernel id) is one
``MethodRule`` per name in ``METHOD_RULES``: backends read ``spec.rule``, never the name.

Correlated sampling (stratified, qmc) needs the grid scheme (``hashing.check_scheme`` says why). Labels leave out trailing defaults
(``lsh:8:grid``, ``hybrid:8:grid:qmc``), as the committed results were labelled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from .checks import as_float, as_int
from .hashing import check_scheme

__all__ = ["METHODS", "METHOD_OPTIONS", "MethodRule", "METHOD_RULES", "method_rule", "IgnoredOptionWarning", "MethodSpec", "as_method", "method_options", "parse_method", "parse_methods", "GRAMMAR",
           "DEFAULT_WINDOW_EPS", "DEFAULT_HYBRID_EPS"]



@dataclass(frozen=True)
class MethodRule:
    """What a method's weights are, declared once here and read by every backend (reference, fused,
    Flex, split, Triton, the plan, the dispatcher, distributed, the transformers patch) instead of
    comparing method names. The weight of key j for the query at position p is, per head h:

        exact ALiBi weight          where |p - j| lies in the head's band  (``exact_band``)
        positional-LSH collisions   beyond the band (every key when there is no band)  (``collisions``)
        0                           elsewhere

    Attributes:
        name: the method's name ("exact", "window", "lsh", "hybrid").
        exact_band: whether the exact weight is kept inside a per-head band of keys.
        bounded: whether that band has per-head widths (``AttentionSpec.window``; window, hybrid);
            False with ``exact_band``: the band is every key (exact).
        collisions: whether positional-LSH collision counts weight the keys beyond the band (hybrid)
            or every key (lsh); such a method draws partitions, so its results depend on the seed.
        options: the ``MethodSpec`` options the method reads (the others mean nothing to it), in the
            order of its text form's fields.
        kernel_id: the method's id in the Triton kernels (their ``METHOD`` constexpr).
    """

    name: str
    exact_band: bool
    bounded: bool
    collisions: bool
    options: tuple[str, ...]
    kernel_id: int

    @property
    def all_exact(self) -> bool:
        """Every key at its exact weight (the exact method: no band, no collisions)."""
        return self.exact_band and not self.bounded

    @property
    def band_only(self) -> bool:
        """Exact weights inside a bounded band and none beyond (the window method)."""
        return self.bounded and not self.collisions

    @property
    def only_collisions(self) -> bool:
        """Every key weighted by collision counts alone (the lsh method: no exact band)."""
        return self.collisions and not self.exact_band

    @property
    def near_far(self) -> bool:
        """An exact band and collisions beyond it (the hybrid method)."""
        return self.exact_band and self.collisions


_LSH_OPTIONS = ("samples", "scheme", "sampling")
METHOD_RULES = {rule.name: rule for rule in (
    MethodRule("exact", exact_band=True, bounded=False, collisions=False, options=(), kernel_id=0),
    MethodRule("window", exact_band=True, bounded=True, collisions=False, options=("window_eps",), kernel_id=1),
    MethodRule("lsh", exact_band=False, bounded=False, collisions=True, options=_LSH_OPTIONS, kernel_id=2),
    MethodRule("hybrid", exact_band=True, bounded=True, collisions=True, options=_LSH_OPTIONS + ("hybrid_eps",),
               kernel_id=3),
)}
METHODS = tuple(METHOD_RULES)


def method_rule(method: "str | MethodSpec | MethodRule") -> MethodRule:
    """The ``MethodRule`` of a method name, its text form ("lsh:8:grid") or a ``MethodSpec`` (a rule is
    returned as is); ValueError naming the methods for an unknown name."""
    if isinstance(method, MethodRule):
        return method
    if isinstance(method, MethodSpec):
        return METHOD_RULES[method.method]
    if isinstance(method, str) and ":" in method:
        return parse_method(method).rule
    rule = METHOD_RULES.get(method) if isinstance(method, str) else None
    if rule is None:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return rule

DEFAULT_WINDOW_EPS = 1e-3  # poslsh.attention's defaults (a test holds them equal)
DEFAULT_HYBRID_EPS = 1e-2
GRAMMAR = "exact, window[:EPS], lsh[:R[:grid|cut[:iid|stratified|qmc]]] or hybrid[:R[:SCHEME[:SAMPLING[:EPS]]]]"


@dataclass(frozen=True)
class MethodSpec:
    """An attention method and its options, checked (and numbers coerced: numpy scalars, 0-d tensors)
    at construction: a wrong type raises TypeError, a bad value or combination ValueError.

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
        check_scheme(self.scheme, self.sampling)
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("samples", as_int(self.samples, "samples", minimum=1))
        set_("window_eps", as_float(self.window_eps, "window_eps", above=0, below=1))
        set_("hybrid_eps", as_float(self.hybrid_eps, "hybrid_eps", above=0))

    @property
    def rule(self) -> MethodRule:
        """What the method's weights are (``MethodRule``)."""
        return METHOD_RULES[self.method]

    @property
    def random(self) -> bool:
        """Whether the method draws partitions (so its results depend on the seed)."""
        return self.rule.collisions

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
        return {"method": self.method, **{name: getattr(self, name) for name in METHOD_OPTIONS[self.method]}}



OPTIONS = ("samples", "scheme", "sampling", "window_eps", "hybrid_eps")
_DEFAULTS = {name: getattr(MethodSpec, name) for name in OPTIONS}


class IgnoredOptionWarning(UserWarning):
    """An option was given beside a method name that does not read it (``method_options``)."""


# The options each method reads; the others mean nothing to it (given beside its name: a warning,
# ``method_options``).
METHOD_OPTIONS = {name: rule.options for name, rule in METHOD_RULES.items()}


def as_method(method: str | MethodSpec = "exact", **options: Any) -> MethodSpec:
    """The MethodSpec of a module's or a model's arguments: ``method`` itself when it is one, or parsed
    when it is its text form ("lsh:8:grid"; then no option may be given besides it), else the method
    named ``method`` with the given ``options`` (``samples``, ``scheme``, ``sampling``, ``window_eps``,
    ``hybrid_eps``; None: the default)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError(f"unknown method options {sorted(unknown)}; the options are {OPTIONS}")
    given = {name: value for name, value in options.items() if value is not None}
    if isinstance(method, str) and ":" in method:
        if given:
            raise TypeError(f"method={method!r} holds its options: give {sorted(given)} in it, not beside it")
        return parse_method(method)
    if isinstance(method, MethodSpec):
        if given:
            raise TypeError(f"method is a MethodSpec, which holds its options: give {sorted(given)} in it "
                            "(dataclasses.replace), not beside it")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name {METHODS} or a MethodSpec, got {type(method).__name__}")
    return MethodSpec(method, **given)


def ignored_options(method, **options: Any) -> list[str]:
    """The options given (not None) beside a method name that the method does not read; [] for a spec,
    its text form or a name that is not a method's (the dispatcher reports that)."""
    if not isinstance(method, str) or method not in METHOD_OPTIONS:
        return []
    return [name for name, value in options.items() if value is not None and name not in METHOD_OPTIONS[method]]


def method_options(method: str | MethodSpec = "exact", **options: Any) -> dict[str, Any]:
    """The method and every option of ``poslsh.attention`` (and ``context_parallel_attention``), from
    what the caller gave: a method name with options beside it (None: the default), a ``MethodSpec``
    or its text form ("lsh:8:grid:qmc"), which hold their options (then none may be given beside).
    A name is checked later by the dispatcher, as it always was; a spec was checked when it was built.
    An option the named method does not read (``method="window", samples=8``) is ignored with an
    ``IgnoredOptionWarning`` naming both (not an error: one set of options shared by a loop over methods
    is a fair use, which the library's own experiments and tests make; a lone call that sets an option
    its method ignores is most likely a mistake, which the warning shows)."""
    given = {name: value for name, value in options.items() if value is not None}
    if not _DEFAULTS.keys() >= given.keys():
        raise TypeError(f"unknown method options {sorted(set(given) - set(OPTIONS))}; the options are {OPTIONS}")
    ignored = ignored_options(method, **given)
    if ignored:
        uses = ", ".join(METHOD_OPTIONS[method]) or "none"
        warnings.warn(f"method={method!r} ignores {', '.join(ignored)} (its options: {uses})",
                      IgnoredOptionWarning, stacklevel=3)
    if isinstance(method, str) and ":" in method:
        method = parse_method(method)
    if isinstance(method, MethodSpec):
        if given:
            raise TypeError(f"method={method.label!r} holds its options: give {sorted(given)} in it, not beside it")
        given = {name: getattr(method, name) for name in OPTIONS}
        method = method.method
    return {"method": method, **_DEFAULTS, **given}


def parse_method(text: str) -> MethodSpec:
    """A method string (module docstring) -> MethodSpec; ValueError naming the grammar otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"a method must be given as text ({GRAMMAR}), got {type(text).__name__}")
    parts = text.strip().split(":")
    name, fields = parts[0], parts[1:]
    rule = METHOD_RULES.get(name)
    if rule is None or len(fields) > len(rule.options):  # the text form: one field per option, in order
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


def parse_methods(texts, name: str) -> list[MethodSpec]:
    """``parse_method`` of each text of a config field; the ValueError names the field."""
    try:
        return [parse_method(text) for text in texts]
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
