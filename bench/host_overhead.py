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

``--launch-stub`` (CPU): the Triton backend's decode as on CUDA, its kernels replaced by stubs
(``poslsh_lab.host_stub``): CPU bf16 tensors take the pre-bound launch path with the CUDA
tile configurations and an H100's split schedule, so what is timed is the library's Python per call
(plan and spec lookups, checks, allocations, the split schedule, launch keys, argument tuples), for the
plan call and the public call, µs (the fastest of ``--rounds`` rounds of ``--reps`` calls). A stub measurement:
Triton's compiled launcher (its C argument parsing), the driver and the kernels are not in it, so the
GPU's figure must still be measured on a GPU; ``--profile`` prints where a stub call's time goes.

    python bench/host_overhead.py --launch-stub [--nk 65536] [--methods window lsh] [--rounds 5] [--profile]

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

A whole model (``--model tiny-bloom``): a BLOOM of random weights (``--layers`` layers, hidden 64, 4 heads,
vocabulary 512, float32, CPU), where compute is negligible, so its time per generated token is host work:
per context in ``--contexts``, each arm (``--arms``: transformers' own attention "native", and the poslsh
patch's exact, window, window_evict, lsh, lsh_evict) reads a random prompt (``hf.chunked_prefill``, chunks
of at most 1024) and greedily decodes ``--tokens`` tokens, timed one by one (a round's figure is the
median step); one round runs every arm in turn (so a load on the shared machine hits them alike), the
median over ``--rounds`` rounds is reported, with its ratio to
native's median (native is skipped above ``--native-max`` tokens: its prefill is quadratic), in wall time
and in this process's CPU time (``time.process_time``: on a shared machine the steadier measure of host
work). Each row also says whether the arm's tokens equal native's (exact must; the others need not).

    python bench/host_overhead.py --model tiny-bloom [--layers 4] [--contexts 256] [--tokens 32] [--rounds 5]
        [--arms native exact window window_evict lsh] [--json PATH]
    python bench/host_overhead.py --model tiny-bloom --contexts 1024 4096 16384 --arms window window_evict
        (the decode step's growth with the cache)

With ``--launch-stub`` the patched arms run the GPU's path (the Triton backend, its launches stubbed as
above) on the CPU: each decode step is the patch's host work as on a GPU host, against native's own
attention (CPU kernels of a tiny model: mostly host work too). A proxy for where both are host-bound on
a GPU (BLOOM-560m at 4K-8K context); tokens are not compared (the stubs compute nothing).

``torch.set_num_threads(--threads)`` (default 1). Runs on a tree without ``AttentionPlan`` too (the
plan's rows are then left out): the before/after of a change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

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

            def with_setting(name, value):  # the Triton plan's call with launch.<name> = value for its duration
                def call(i):
                    before = getattr(launch, name)
                    setattr(launch, name, value)
                    try:
                        return tplan(q, *kv(i))
                    finally:
                        setattr(launch, name, before)
                return call

            # the Triton kernels by name too: "auto" may pick another backend (Flex for exact decoding)
            tplan = AttentionPlan(spec, num_heads=h, num_kv_heads=k.shape[1], slopes=slopes, device=q.device,
                                  partitions=layer, backend="triton")
            out["plan triton"] = lambda i: tplan(q, *kv(i))
            out["plan triton, JIT launches"] = with_setting("PREBOUND", False)
            out["plan triton, 2-wave splits"] = with_setting("SPLIT_WAVES", 2)
            out["plan triton, no split"] = with_setting("SPLIT_WAVES", 0)  # one launch
    if q.is_cuda and method == "exact" and q.shape[1] == k.shape[1]:  # the yardstick: bias-free dense SDPA
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(i):  # flash / memory-efficient only: SDPA's cuDNN backend builds a graph for every new length
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return torch.nn.functional.scaled_dot_product_attention(q, *kv(i))

        out["sdpa, no bias"] = sdpa
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


def stub_rows(args) -> list[dict]:
    """``--launch-stub``: the Triton decode's host work on the CPU, kernels stubbed (module docstring)."""
    from poslsh_lab.host_stub import stub_launches

    h, d, nk = args.heads, args.dim, args.nk
    q = torch.zeros(1, h, 1, d, dtype=torch.bfloat16)
    # never read by the stubs: uninitialised, so a 1M-key cache costs no memory
    k, v = (torch.empty(1, h, nk + args.rounds * args.reps + 8, d, dtype=torch.bfloat16) for _ in range(2))
    rows = []
    with stub_launches():
        for method in args.methods:
            for name, fn in _calls(method, q, k, v, nk, "triton").items():
                if name not in ("plan", "public"):
                    continue
                rows.append({"device": "cpu", "what": "stub", "method": method, "way": name, "nk": nk,
                             "us_per_call": _per_call_us(fn, args.reps, rounds=args.rounds),
                             "note": "Triton launches stubbed: host Python only, no compiled launcher"})
                if args.profile:
                    _profile(fn, args.reps, f"{method} {name} call, stub launches, nk={nk}")
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
            # each row printed and saved as it is measured: session 9's call at 1M keys was cut inside the
            # hybrid's slow old path (its widths recomputed per call) and lost every finished row
            _print_cuda_row(rows[-1])
            if args.json:
                _save(rows, args.json)
            if name == "plan" and args.profile:
                _profile(fn, args.reps, f"{method} plan call, nk={nk}")
    return rows


def _print_cuda_row(row: dict) -> None:
    print(f"{row['method']:7s} {row['way']:27s} nk={row['nk']} enqueue {row['enqueue_us']:7.1f} us  wall "
          f"{row['wall_us']:7.1f} us  events {row['events_us']:7.1f} us  graph {row['graph_us']:7.1f} us", flush=True)


def _save(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def _profile(fn, reps: int, title: str) -> None:
    """Print where the host time of ``reps`` calls goes (cProfile, top functions by own time)."""
    import cProfile
    import pstats

    fn(0)  # warm: one-time work (first lookups, caches) is not a call's cost
    prof = cProfile.Profile()
    prof.enable()
    for i in range(reps):
        fn(i)
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    # per call, in µs: pstats prints seconds to 3 decimals, all 0.000 for calls of tens of µs
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda item: -item[1][2])[:18]
    print(f"--- profile: {title}, {reps} calls; per call: own µs, cumulative µs, calls, function")
    for (path, line, func), (_, ncalls, own, cumulative, _) in rows:
        where = f"{Path(path).name}:{line}" if line else path
        print(f"{own / reps * 1e6:9.2f} {cumulative / reps * 1e6:9.2f} {ncalls / reps:6.3g}  {func} ({where})")


# arm -> (method, evict) of the patch; None: transformers' own attention
MODEL_ARMS = {"native": None, "exact": ("exact", False), "window": ("window", False),
              "window_evict": ("window", True), "lsh": ("lsh", False), "lsh_evict": ("lsh", True)}
PREFILL_CHUNK = 1024


def tiny_bloom(layers: int):
    """A BLOOM of random weights, CPU float32, wide initialisation (its tokens depend on attention)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=512, hidden_size=64, n_layer=layers, n_head=4,
                                      initializer_range=0.3)
    return transformers.BloomForCausalLM(config).eval()


@torch.no_grad()
def _decode_ms(model, arm: str, ids, tokens: int, stub: bool = False) -> tuple[float, list[int]]:
    """(wall ms, process CPU ms, tokens) of greedy decoding: each time the median of ``tokens`` timed steps
    after a prefill and one untimed step (a burst of load on a shared machine moves a median less than a
    mean; CPU time counts this process's work only, not the time other processes took the cores)."""
    from poslsh.integrations import hf
    from poslsh.integrations.hf.prefill import _cache_argument

    hf.unpatch_model(model)
    if MODEL_ARMS[arm] is not None:
        method, evict = MODEL_ARMS[arm]
        hf.patch_model(model, method, evict=evict, backend="triton" if stub else "auto")
    import inspect

    kwargs = {_cache_argument(model): None, "use_cache": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    cache, logits = hf.chunked_prefill(model, ids, PREFILL_CHUNK)
    token = logits.argmax(-1, keepdim=True)
    out = [token]
    kwargs[_cache_argument(model)] = cache

    def step(token):
        logits = model(input_ids=token, **kwargs).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    out.append(step(out[-1]))
    marks = [(time.perf_counter(), time.process_time())]
    for _ in range(tokens):
        out.append(step(out[-1]))
        marks.append((time.perf_counter(), time.process_time()))
    hf.unpatch_model(model)
    wall, cpu = (sorted(b[i] - a[i] for a, b in zip(marks, marks[1:])) for i in (0, 1))
    return wall[tokens // 2] * 1e3, cpu[tokens // 2] * 1e3, torch.cat(out, 1)[0].tolist()


def model_rows(args) -> list[dict]:
    import statistics

    model = tiny_bloom(args.layers)
    rows = []
    for n in args.contexts:
        ids = torch.randint(1, 512, (1, n), generator=torch.Generator().manual_seed(n))
        arms = [a for a in args.arms if a != "native" or n <= args.native_max]
        times, cpu, tokens = {a: [] for a in arms}, {a: [] for a in arms}, {}
        for _ in range(args.rounds):
            for arm in arms:
                with contextlib.ExitStack() as stack:
                    if args.launch_stub:
                        from poslsh_lab.host_stub import stub_launches

                        stack.enter_context(stub_launches())
                    wall_ms, cpu_ms, tokens[arm] = _decode_ms(model, arm, ids, args.tokens, args.launch_stub)
                times[arm].append(wall_ms)
                cpu[arm].append(cpu_ms)
        native = {name: statistics.median(d["native"]) if "native" in d else None
                  for name, d in (("wall", times), ("cpu", cpu))}
        for arm in arms:
            wall_ms, cpu_ms = statistics.median(times[arm]), statistics.median(cpu[arm])
            rows.append({"model": "tiny-bloom", "layers": args.layers, "context": n, "arm": arm,
                         "tokens": args.tokens, "threads": args.threads, "ms_per_token": wall_ms,
                         "ms_per_token_rounds": times[arm], "cpu_ms_per_token": cpu_ms, "cpu_ms_per_token_rounds": cpu[arm],
                         "ratio_to_native": None if native["wall"] is None else wall_ms / native["wall"],
                         "cpu_ratio_to_native": None if native["cpu"] is None else cpu_ms / native["cpu"],
                         "launch_stub": args.launch_stub,
                         "tokens_equal_native": None if native["wall"] is None or args.launch_stub  # (stubs compute nothing)
                         else tokens[arm] == tokens["native"]})
    return rows


def _print_model(rows: list[dict]) -> None:
    for row in rows:
        ratio = "" if row["ratio_to_native"] is None else \
            f"  {row['ratio_to_native']:5.2f}x native (cpu {row['cpu_ratio_to_native']:5.2f}x)"
        same = "" if row["tokens_equal_native"] is None else f"  tokens {'=' if row['tokens_equal_native'] else '!='} native"
        spread = f"(rounds {min(row['ms_per_token_rounds']):.2f}-{max(row['ms_per_token_rounds']):.2f})"
        print(f"tiny-bloom L={row['layers']} n={row['context']:<6d} {row['arm']:13s} wall {row['ms_per_token']:7.3f} ms/token "
              f"{spread} cpu {row['cpu_ms_per_token']:7.3f} ms/token{ratio}{same}")


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
    p.add_argument("--profile", action="store_true",
                   help="CUDA: print a cProfile of each method's plan call; --launch-stub: of each stubbed call")
    p.add_argument("--launch-stub", action="store_true",
                   help="CPU: the Triton decode's host work with its kernels stubbed (a stub measurement)")
    p.add_argument("--model", choices=("tiny-bloom",), default=None,
                   help="time a whole model's decoding per token instead of one attention call")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", type=int, nargs="+", default=[256])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--arms", nargs="+", choices=tuple(MODEL_ARMS), default=["native", "exact", "window", "window_evict", "lsh"])
    p.add_argument("--native-max", type=int, default=4096, help="longest context native runs at")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is not None:
        rows = model_rows(args)
        _print_model(rows)
        if args.json:
            _save(rows, args.json)
        return rows
    register_backend("null", _null, priority=-100, methods=METHODS, kernels=True, slope_grad=True)
    try:
        rows = (stub_rows(args) if args.launch_stub else cpu_rows(args) if args.device == "cpu"
                else cuda_rows(args))
    finally:  # the registry as it was (the benchmark may run inside a test session)
        dispatch.BACKENDS.pop("null", None)
    for row in rows:
        if args.device == "cpu":
            unit = "ms" if row["what"] == "cpu" else "us"
            value = row["us_per_call"] if unit == "us" else row["us_per_call"] / 1e3
            print(f"{row['what']:4s} {row['method']:7s} {row['way']:12s} nk={row['nk']:<7d} {value:9.2f} {unit} per call"
                  + (f"  ({row['note']})" if "note" in row else ""))
    if args.json:
        _save(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
