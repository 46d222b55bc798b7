"""``poslsh.attention.rent``: when "auto" may take a backend that builds per shape (cuDNN's graphs, the
compiled flex backends), and the plan's memory of that choice in a decode loop."""

from __future__ import annotations

import pytest
import torch

import poslsh
from poslsh.attention import resolve_spec
from poslsh.attention.rent import ASSUMED_FLOP_RATE, BuildRent, call_seconds


def spec_for(nq: int, nk: int, h: int = 32, **kw):
    q, k = torch.empty(1, h, nq, 128), torch.empty(1, h, nk, 128)
    return q, resolve_spec(q, k, k, **kw)


def test_call_seconds_counts_the_pairs_a_call_weighs():
    q, spec = spec_for(16384, 16384, causal=True)
    fwd = call_seconds(q, spec, training=False)
    assert fwd == pytest.approx(4 * 32 * 128 * 16384 * 16385 / 2 / ASSUMED_FLOP_RATE)  # the causal half
    assert call_seconds(q, spec, training=True) == pytest.approx(3.5 * fwd)
    q, spec = spec_for(1, 65536, causal=True)  # a decode step: one row over every key
    assert call_seconds(q, spec, False) == pytest.approx(4 * 32 * 128 * 65536 / ASSUMED_FLOP_RATE)
    q, spec = spec_for(100, 300, causal=False)
    assert call_seconds(q, spec, False) == pytest.approx(4 * 32 * 128 * 100 * 300 / ASSUMED_FLOP_RATE)
    q, spec = spec_for(65536, 65536, causal=True, method="window", window_eps=1e-3)
    band = sum(min(65536, w + 1) for w in spec.window.tolist())  # one side per head, causal
    assert call_seconds(q, spec, False) == pytest.approx(4 * 128 * 65536 * band / ASSUMED_FLOP_RATE)
    assert call_seconds(q, spec, False) < fwd  # far below exact's at this length


def test_build_rent_pays_per_key_and_forgets_the_oldest():
    rent = BuildRent(1.0, entries=2)
    assert [rent.paid_for("a", 0.4) for _ in range(3)] == [False, False, True]
    assert not rent.paid_for("b", 0.5)  # its own count
    rent.paid_for("c", 0.1)  # "a" is the least recently used of three: dropped
    assert not rent.paid_for("a", 0.0)
    rent.clear()
    assert not rent.paid_for("b", 0.5)


def test_compiled_flex_is_taken_once_a_shape_paid_for_its_compile():
    """``compile_ready``: a refusing backend is "ready" (its refusal decides, nothing is deferred); else a
    shape is ready once its calls' estimated work reaches COMPILE_AFTER_S, per shape and per pass."""
    from poslsh.attention.flex.backend import COMPILE_AFTER_S, clear_cache, compile_ready

    clear_cache()
    assert compile_ready("x", lambda q, spec: False)(*spec_for(8, 8))
    ready = compile_ready("x", lambda q, spec: True)
    q, spec = spec_for(16384, 16384, causal=True)
    calls = COMPILE_AFTER_S / call_seconds(q, spec, False)
    answers = [ready(q, spec) for _ in range(int(calls) + 1)]
    assert not any(answers[:-1]) and answers[-1]
    q2, spec2 = spec_for(16385, 16385, causal=True)
    assert not ready(q2, spec2)  # a new length: a new compile
    with torch.enable_grad():
        assert not ready(q.requires_grad_(), spec)  # training compiles its own kernels
    q1, spec1 = spec_for(1, 65536, causal=True)
    assert not any(ready(q1, spec1) for _ in range(3))  # a decode step's work is far below a compile
    clear_cache()


def test_a_deferred_backend_does_not_make_decoding_ask_again(monkeypatch):
    """A plan keeps its decode-regime choice although a faster backend was deferred (its shapes never repeat
    there, so asking again every step only costs host time), and asks again for prefill."""
    from poslsh.attention import dispatch, plan as plan_module

    asked = []
    real = dispatch.select_backend

    def deferring(q, spec, backend="auto", grad=None, deferred=None):
        asked.append(q.shape[2])
        if deferred is not None:
            deferred.append("somewhere-faster")
        return real(q, spec, backend, grad)

    monkeypatch.setattr(plan_module, "select_backend", deferring)
    plan = poslsh.AttentionPlan(num_heads=4, causal=True)
    k = torch.randn(1, 4, 64, 16)
    for n in (40, 41, 42):
        plan(torch.randn(1, 4, 1, 16), k[:, :, :n], k[:, :, :n])
    assert asked == [1]
    for _ in range(2):
        plan(torch.randn(1, 4, 32, 16), k[:, :, :40], k[:, :, :40])
    assert asked == [1, 32, 32]


def test_a_backend_that_never_serves_the_call_defers_nothing():
    """"auto" asks ``ready`` only of backends whose declared capabilities cover the call: a backend of exact
    ALiBi alone, not ready, is no reason for an LSH plan to ask again at every call (failed before: every
    backend with ``ready`` was named in ``deferred``, so a plan never kept its choice once flex_fa4 was
    installed)."""
    from poslsh.attention import dispatch
    from poslsh.attention.public_plans import clear_public_plans
    from poslsh.attention.reference import reference_attention
    from poslsh.attention.registry import register_backend

    asked = []
    register_backend("exact-only-slow", reference_attention, priority=1000, methods=("exact",),
                     ready=lambda q, spec: asked.append(spec.method) or False)
    try:
        q = torch.randn(1, 4, 32, 16)
        lsh = resolve_spec(q, q, q, method="lsh", samples=2, generator=torch.Generator().manual_seed(0))
        deferred = []
        assert dispatch.select_backend(q, lsh, "auto", False, deferred).name != "exact-only-slow"
        assert deferred == [] and asked == []
        exact = resolve_spec(q, q, q)
        dispatch.select_backend(q, exact, "auto", False, deferred)
        assert deferred == ["exact-only-slow"] and asked == ["exact"]
    finally:
        dispatch.BACKENDS.pop("exact-only-slow")
        clear_public_plans()
