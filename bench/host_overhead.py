"""Host time of one decoding step (B = 1, Nq = 1, a cache that grows by one key per call) per method,
through the three ways in: ``poslsh.attention.plan.AttentionPlan`` (resolved once), the public call
``poslsh.attention`` (which reuses plans of earlier identical resolutions) and the old path,
``resolve_spec`` + ``select_backend`` on every call.

On the CPU (the default):

* ``host``: the dispatch alone, µs per call (the fastest of 5 rounds of ``--reps`` calls), on a backend that computes nothing ("null": the output
  allocated, no attention), so what is measured is argument checks, resolution, partitions, slicing;
  ``resolve_spec`` alone (the old path's resolution) beside it;
* ``cpu``: the whole call on the torch backends, ms per call (fastest of 3 rounds of ``--reps``/50), at Nk and, for the window, at its band
  (the keys it reaches): a decode step should cost O(reach), not O(cache).

On CUDA (``--device cuda``): per call, the enqueue time (host, no synchronisation), the wall time
(``--reps`` calls then one synchronisation: the larger of host and GPU time), the GPU time between CUDA
events over those calls, and the time of one call captured in a CUDA graph and replayed (the kernels
alone, without launch overhead), for the plan call and the public call; bf16.

    python bench/host_overhead.py [--nk 65536] [--heads 32] [--dim 128] [--reps 200] [--device cpu|cuda]
        [--json PATH] [--profile]

On CUDA the plan call is also timed with every Triton launch through the JIT's own dispatch ("plan triton,
JIT launches", ``launch.PREBOUND = False``) beside the pre-bound launches, and with session 5's split-key
schedule ("plan triton, 2-wave splits", ``launch.SPLIT_WAVES = 2``) and with one launch ("plan triton, no split"),
the "triton" backend named (``auto`` may choose another); exact beside bias-free dense SDPA (the
yardstick of an exact decode); ``--profile`` prints where a plan call's host time goes.

``torch.set_num_threads(--threads)`` (default 1). Runs on a tree without ``AttentionPlan`` too (the
plan's rows are then left out): the before/after of a change.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import poslsh
from poslsh.attention import dispatch
from poslsh.attention.dispatch import register_backend, resolve_spec, select_backend
from poslsh.layer_partitions import LayerPartitions

try:
    from poslsh.attention.plan import AttentionPlan
except ImportError:  # a tree from before the plans
    AttentionPlan = None

METHODS = ("exact", "window", "lsh", "hybrid")
OPTIONS = {"exact": {}, "window": {"window_eps": 1e-3}, "lsh": {"samples": 8}, "hybrid": {"samples": 8}}


def _null(q, k, v, spec):
    """A backend that allocates the output and computes nothing: the dispatch's host work alone."""
    return q.new_empty(q.shape[:3] + (v.shape[3],)), q.new_empty(q.shape[:3], dtype=torch.float32)



def _calls(method: str, q, k, v, nk0: int, backend: str):
    """(name -> fn(i)) of the ways in, call i on the first nk0 + i keys."""
    h = q.shape[1]
    slopes = poslsh.alibi_slopes(h)
    opts = OPTIONS[method]
    layer = LayerPartitions(slopes, 8, "grid", 0, 0) if method in ("lsh", "hybrid") else None

    def kv(i):
        return k[:, :, :nk0 + i], v[:, :, :nk0 + i]

    def parts(n):
        return None if layer is None else layer.get(n, q.device)

    def old(i):
        ki, vi = kv(i)
        spec = resolve_spec(q, ki, vi, slopes=slopes, method=method, partitions=parts(ki.shape[2]), **opts)
        return select_backend(q, spec, backend)(q, ki, vi, spec)[0]

    def public(i):
        ki, vi = kv(i)
        return poslsh.attention(q, ki, vi, slopes=slopes, method=method, partitions=parts(ki.shape[2]),
                                backend=backend, **opts)

    def resolve_only(i):
        ki, vi = kv(i)
        return resolve_spec(q, ki, vi, slopes=slopes, method=method, partitions=parts(ki.shape[2]), **opts)

    out = {"resolve_spec": resolve_only, "old path": old, "public": public}
    if AttentionPlan is not None:
        spec = poslsh.MethodSpec(method, **opts)
        plan = AttentionPlan(spec, num_heads=h, num_kv_heads=k.shape[1], slopes=slopes, device=q.device,
                             partitions=layer, backend=backend)
        out["plan"] = lambda i: plan(q, *kv(i))
        if q.is_cuda:  # the plan call on the Triton kernels, variants
            from poslsh.attention.triton import launch

            def plan_jit(i):
                launch.PREBOUND = False
                try:
                    return tplan(q, *kv(i))
                finally:
                    launch.PREBOUND = True

            def plan_with_waves(plan, w):  # launch.SPLIT_WAVES = w for the call (0: one launch, no split)
                def call(i):
                    launch.SPLIT_WAVES = w
                    try:
                        return plan(q, *kv(i))
                    finally:
                        launch.SPLIT_WAVES = waves
                return call

            waves = launch.SPLIT_WAVES
            # the Triton kernels by name too: "auto" may pick another backend (Flex for exact decoding)
            tplan = AttentionPlan(spec, num_heads=h, num_kv_heads=k.shape[1], slopes=slopes, device=q.device,
                                  partitions=layer, backend="triton")
            out["plan triton"] = lambda i: tplan(q, *kv(i))
            out["plan triton, JIT launches"] = plan_jit
            out["plan triton, 2-wave splits"] = plan_with_waves(tplan, 2)
            out["plan triton, no split"] = plan_with_waves(tplan, 0)
    if q.is_cuda and method == "exact" and q.shape[1] == k.shape[1]:  # the yardstick: bias-free dense SDPA
        out["sdpa, no bias"] = lambda i: torch.nn.functional.scaled_dot_product_attention(q, *kv(i))
    return out


def _per_call_us(fn, reps: int, warm: int = 3, rounds: int = 5) -> float:
    """µs per call: the fastest of ``rounds`` rounds of ``reps`` calls (the least disturbed by other
    processes on a shared machine), call i on the first nk + i keys."""
    for i in range(warm):
        fn(i)
    best = math.inf
    for r in range(rounds):  # every call a new length, as in decoding (no cache of a length helps)
        first = warm + r * reps
        start = time.perf_counter()
        for i in range(first, first + reps):
            fn(i)
        best = min(best, (time.perf_counter() - start) / reps * 1e6)
    return best


def cpu_rows(args) -> list[dict]:
    h, d, nk = args.heads, args.dim, args.nk
    extra = 5 * args.reps + 8  # one new key per call
    g = torch.Generator().manual_seed(0)
    rows = []
    q = torch.randn(1, h, 1, d, generator=g)
    k, v = (torch.randn(1, h, nk + extra, d, generator=g) for _ in range(2))
    for method in args.methods:
        for name, fn in _calls(method, q, k, v, nk, "null").items():
            rows.append({"device": "cpu", "what": "host", "method": method, "way": name, "nk": nk,
                         "us_per_call": _per_call_us(fn, args.reps)})
        reps = max(1, args.reps // 50)
        for name, fn in _calls(method, q, k, v, nk, "auto").items():
            if name == "resolve_spec":
                continue
            rows.append({"device": "cpu", "what": "cpu", "method": method, "way": name, "nk": nk,
                         "us_per_call": _per_call_us(fn, reps, warm=1, rounds=3)})
        if method == "window":  # the same call on the keys the window reaches
            band = int(dispatch.window_sizes(poslsh.alibi_slopes(h), 1e-3, nk).max()) + 1
            for name, fn in _calls(method, q, k, v, band, "auto").items():
                if name != "resolve_spec":
                    rows.append({"device": "cpu", "what": "cpu", "method": method, "way": name, "nk": band,
                                 "us_per_call": _per_call_us(fn, reps, warm=1, rounds=3), "note": "band keys only"})
    return rows


def cuda_rows(args) -> list[dict]:
    h, d, nk = args.heads, args.dim, args.nk
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, h, 1, d, generator=g, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, h, nk + 2 * args.reps + 8, d, generator=g, device=dev, dtype=torch.bfloat16)
            for _ in range(2))
    rows = []
    for method in args.methods:
        for name, fn in _calls(method, q, k, v, nk, "auto").items():
            if name == "resolve_spec":
                continue
            for i in range(3):
                fn(i)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(args.reps):
                fn(i)
            host = (time.perf_counter() - start) / args.reps * 1e6
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / args.reps * 1e6
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for i in range(args.reps, 2 * args.reps):
                fn(i)
            end.record()
            torch.cuda.synchronize()
            events = begin.elapsed_time(end) / args.reps * 1e3
            graph_us = math.nan
            if name.startswith("plan") and "JIT" not in name:  # static shapes: one length captured, replayed
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):
                        fn(0)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn(0)
                    graph.replay()
                    torch.cuda.synchronize()
                    begin.record()
                    for _ in range(args.reps):
                        graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    graph_us = begin.elapsed_time(end) / args.reps * 1e3
                except RuntimeError as err:  # reported, not fatal: the other numbers stand
                    print(f"{method} {name}: graph capture failed: {err}")
            rows.append({"device": torch.cuda.get_device_name(), "method": method, "way": name, "nk": nk,
                         "enqueue_us": host, "wall_us": wall, "events_us": events, "graph_us": graph_us})
            if name == "plan" and args.profile:
                _profile(fn, args.reps, f"{method} plan call, nk={nk}")
    return rows


def _profile(fn, reps: int, title: str) -> None:
    """Print where the host time of ``reps`` calls goes (cProfile, top functions by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(reps):
        fn(i)
    prof.disable()
    torch.cuda.synchronize()
    print(f"--- profile: {title}, {reps} calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nk", type=int, default=65536)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true", help="CUDA: print a cProfile of each method's plan call")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    register_backend("null", _null, priority=-100, methods=METHODS, kernels=True, slope_grad=True)
    try:
        rows = cpu_rows(args) if args.device == "cpu" else cuda_rows(args)
    finally:  # the registry as it was (the benchmark may run inside a test session)
        dispatch.BACKENDS.pop("null", None)
    for row in rows:
        if args.device == "cpu":
            unit = "us" if row["what"] == "host" else "ms"
            value = row["us_per_call"] if unit == "us" else row["us_per_call"] / 1e3
            print(f"{row['what']:4s} {row['method']:7s} {row['way']:12s} nk={row['nk']:<7d} {value:9.2f} {unit} per call"
                  + (f"  ({row['note']})" if "note" in row else ""))
        else:
            print(f"{row['method']:7s} {row['way']:27s} nk={row['nk']} enqueue {row['enqueue_us']:7.1f} us  wall "
                  f"{row['wall_us']:7.1f} us  events {row['events_us']:7.1f} us  graph {row['graph_us']:7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
