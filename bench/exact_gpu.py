"""Exact ALiBi on the GPU, every backend side by side in one process (issue 23): cuDNN's fused ALiBi
("cudnn"), our Triton kernel, FlexAttention and ``backend="auto"`` through ``poslsh.attention``, beside
bias-free causal SDPA with PyTorch's cuDNN and flash backends (the ceiling without a bias).

    python bench/exact_gpu.py --out DIR                      # ~2.5 min on an H100 (16K, 64K, 256K)
    python bench/exact_gpu.py --out DIR --write-table poslsh/attention/speed_table.json
    python bench/exact_gpu.py --out DIR --method window --ns 65536 262144   # the per-head window, eps 1e-3

(i) checks: a small case (B = 2, H = 12: not a power of two, Hkv = 4, N = 1000, D = 128, bf16), with right
padding in one row and without, per backend, forward (out, lse) and q/k/v gradients of a loss through out and
lse, against ``backend="reference"`` in float64 on the same rounded inputs; the bound is 2x (4x for gradients)
the output's own bf16 rounding, as the test suite's. (ii) timings at each n: B = 1, H = 32, D = 128, bf16,
causal, Press slopes, random q, k, v ~ N(0, 1); forward and forward + backward (``torch.autograd.grad`` of out
with a random dO); ``triton.testing.do_bench`` median under 0.2 s a call, else the median of 3 event-timed
calls (2 over 1 s a call). The order puts the comparisons the issue needs first (cudnn, triton, flex, and
flex_fa4 where FlashAttention-4 is installed, at every n), then the SDPA ceilings, then auto at every n: with
``--write-table`` the table is written before the auto rows and auto chooses by it (what it picked by the
shipped table is ``auto_selects``, by the new one ``auto_selects_by_new_table``); a measurement predicted to
pass ``--budget-s`` is recorded as skipped. (iii) ``DIR/exact_gpu.json``: environment (date, device, versions
incl. the cuDNN frontend and library, command), config, checks, rows (auto's with ``ran_on``: the backends its
timed calls ran on, ``backends_run``, after ``--auto-warm-s`` of calls, ``warm_ran_on``; where they ran on one
backend, ``paired``: auto and that backend timed alternately ``--pair-rounds`` times, and ``auto_over_pick``, the
median ratio), what auto selected at first, and ``speed_table``: the measured poslsh
backends in ``poslsh.attention.speed``'s table format, regime "prefill" (forward) and "prefill+backward"
(forward + backward, ``speed.BACKWARD``); ``--write-table PATH`` merges it into that table (entries of the
same device, method, regime and n replaced backend by backend). The JSON is rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

import poslsh
from poslsh.attention import BACKENDS, EMPTY_LSE, available_backends, resolve_spec, select_backend
from poslsh.attention import speed
from poslsh.attention.speed import BACKWARD
from poslsh_lab.experiments.metrics import event_times
from poslsh_lab.util import save_results

NAME = "exact_gpu"
BACKENDS_TIMED = ("cudnn", "triton", "flex", "flex_fa4")  # those registered here
SDPA = {"sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_flash": "FLASH_ATTENTION"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ns", type=int, nargs="+", default=[16384, 65536, 262144])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=165.0, help="skip measurements predicted past this")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--auto-warm-s", type=float, default=3.0,
                   help="auto's calls before it is timed (its choice settles: poslsh.attention.rent)")
    p.add_argument("--pair-rounds", type=int, default=3,
                   help="auto and the backend it ran on, timed alternately this many times each (0: not)")
    p.add_argument("--method", choices=("exact", "window"), default="exact",
                   help="window: the per-head window at --window-eps instead (no SDPA columns)")
    p.add_argument("--window-eps", type=float, default=1e-3)
    p.add_argument("--write-table", type=Path, default=None, metavar="PATH",
                   help="merge the measured speed table into this speed_table.json")
    return p.parse_args(argv)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:600]


def versions() -> dict[str, Any]:
    v: dict[str, Any] = {"torch_cudnn": torch.backends.cudnn.version()}
    try:
        import cudnn

        v["cudnn_frontend"] = getattr(cudnn, "__version__", None)
        v["cudnn_backend"] = cudnn.backend_version()
    except Exception as err:  # absent or without a library: the cudnn column says so
        v["cudnn_frontend"] = error_text(err)
    return v


# --------------------------------------------------------------------------------------------------
# (i) correctness
# --------------------------------------------------------------------------------------------------


def method_kw(args: argparse.Namespace) -> dict[str, Any]:
    """The method's arguments of every poslsh.attention call (none for exact ALiBi)."""
    return {} if args.method == "exact" else {"method": args.method, "window_eps": args.window_eps}


def check(name: str, method: dict[str, Any], padded: bool = True) -> dict[str, Any]:
    b, h, hkv, n, d = 2, 12, 4, 1000, 128
    row: dict[str, Any] = {"backend": name, "case": f"B{b} H{h}/{hkv} N{n} D{d} bf16 causal Press"
                           + (", row 1 padded" if padded else ""), **method}
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, hh, n, d, generator=g).to("cuda", torch.bfloat16) for hh in (h, hkv, hkv))
        mask = None
        if padded:
            mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
            mask[1, 700:] = False
        do = torch.randn(b, h, n, d, generator=g).to("cuda", torch.bfloat16)
        dl = torch.randn(b, h, n, generator=g).to("cuda")
        kw = dict(causal=True, key_padding_mask=mask, return_lse=True, **method)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
        if name != "auto" and not BACKENDS[name].accepts(q, resolve_spec(q, k, v, causal=True, key_padding_mask=mask,
                                                                          **method)):
            row.update(ok=None, skipped="refuses the call")
            return row
        out, lse = poslsh.attention(*ins, backend=name, **kw)
        ref, ref_lse = poslsh.attention(*ref_ins, backend="reference", **kw)
        floor = rel(ref.to(torch.bfloat16), ref)
        loss = lambda o, l_: (o.double() * do.double()).sum() + (l_.double() * dl.double()).sum()  # noqa: E731
        grads = torch.autograd.grad(loss(out, lse), ins)
        ref_grads = torch.autograd.grad(loss(ref, ref_lse), ref_ins)
        seen = ref_lse > EMPTY_LSE / 2  # rows that see a key (a padded window row may see none: EMPTY_LSE)
        row.update(rel_err_out=rel(out, ref), max_err_lse=float((lse.double() - ref_lse)[seen].abs().max()),
                   empty_rows_ok=bool((lse[~seen] < EMPTY_LSE / 2).all()),
                   rel_err_dq_dk_dv=[rel(a, c) for a, c in zip(grads, ref_grads)],
                   bound_out=2 * floor + 1e-5, bound_grads=4 * floor + 2e-5)
        row["ok"] = (row["rel_err_out"] <= row["bound_out"] and row["max_err_lse"] <= 1e-3 and row["empty_rows_ok"]
                     and max(row["rel_err_dq_dk_dv"]) <= row["bound_grads"])
    except Exception as err:
        row.update(ok=False, error=error_text(err))
    print(f"[check] {row}", flush=True)
    return row


# --------------------------------------------------------------------------------------------------
# (ii) timing
# --------------------------------------------------------------------------------------------------


def wall_ms(fn: Callable[[], Any]) -> float:
    """Milliseconds of one call, by the host's clock after a device synchronisation."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn: Callable[[], Any], warmup_ms: int, rep_ms: int) -> tuple[float, str, float, float]:
    """(ms per call, how, seconds of the first call (compiles, cuDNN graph builds), wall seconds spent):
    do_bench median for calls under 0.2 s, else the median of 3 calls after one warm-up. Which of the two
    is decided by the faster of the next two calls when the first of them is over 0.2 s: the call after a
    compile may still pay a one-time cost (session 14: after flex's 9.9 s first call at 16K, the median of
    the next two, one over 0.2 s, said 149 ms, where do_bench says 5.6)."""
    from triton.testing import do_bench

    t0 = time.perf_counter()
    fn()  # compile / warm
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    est = wall_ms(fn)
    if est > 200:
        est = min(est, wall_ms(fn))
    if est <= 200:
        ms = float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        return ms, "do_bench median", first, time.perf_counter() - t0
    times = [est] + event_times(fn, 2)
    how = f"median of {len(times)} calls (first wall-clock timed)"
    return statistics.median(times), how, first, time.perf_counter() - t0


def warm_up(fn: Callable[[], Any], seconds: float) -> float:
    """Call ``fn`` for about ``seconds`` (at least once); the seconds spent. "auto" takes a backend that
    builds per shape (cuDNN, the compiled flex backends) only once a shape's calls have paid for the build
    (``poslsh.attention.rent``): a training loop reaches it within its first steps, a benchmark here."""
    start = time.perf_counter()
    while True:
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - start >= seconds:
            return time.perf_counter() - start


def paired(args: argparse.Namespace, auto_fn: Callable[[], Any], pick: str, pick_fn: Callable[[], Any]) -> dict:
    """auto and the backend its calls ran on, timed alternately (the GPU's clocks and the host drift between
    the columns measured minutes apart): {"paired": {"auto": [ms], pick: [ms]}, "auto_over_pick": median ratio}."""
    times: dict[str, list[float]] = {"auto": [], pick: []}
    for _ in range(args.pair_rounds):
        times[pick].append(time_ms(pick_fn, args.warmup_ms, args.rep_ms)[0])
        times["auto"].append(time_ms(auto_fn, args.warmup_ms, args.rep_ms)[0])
    return {"paired": times, "auto_over_pick": statistics.median(a / b for a, b in zip(times["auto"], times[pick]))}


@contextlib.contextmanager
def backends_run() -> Iterator[collections.Counter]:
    """Within it, a count of the backend each ``poslsh.attention`` call ran on, by name, as its plan chose it
    (``AttentionPlan._backend_for``; a call resolved afresh, the first of its arguments, is not counted):
    what "auto" ran while it was timed (it may defer cuDNN until a shape's calls have paid for its graphs)."""
    from poslsh.attention.plan import AttentionPlan

    counts: collections.Counter = collections.Counter()
    chosen = AttentionPlan._backend_for

    def counted(self, *args, **kwargs):
        backend = chosen(self, *args, **kwargs)
        counts[backend.name] += 1
        return backend

    AttentionPlan._backend_for = counted
    try:
        yield counts
    finally:
        AttentionPlan._backend_for = chosen


def call_fn(column: str, q, k, v, do, backward: bool, method: dict[str, Any]) -> Callable[[], Any]:
    if column in SDPA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = getattr(SDPBackend, SDPA[column])

        def fwd():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        def fwd():
            return poslsh.attention(q, k, v, causal=True, backend=column, **method)
    if not backward:
        return lambda: fwd()
    return lambda: torch.autograd.grad(fwd(), (q, k, v), do)


def run(args: argparse.Namespace) -> dict[str, Any]:
    available_backends()
    out_path = args.out / f"{NAME}.json"
    res: dict[str, Any] = {"versions": versions(), "checks": [], "rows": [], "auto_selects": {},
                           "registered": sorted(BACKENDS)}
    if "cudnn" not in BACKENDS:
        res["cudnn_missing"] = "the cudnn backend is not registered (nvidia-cudnn-frontend absent or no cuDNN 9)"

    def save():
        res["speed_table"] = speed_table(res["rows"], torch.cuda.get_device_name(), args.method)
        save_results(out_path, vars(args), res)

    start = time.perf_counter()
    if not args.no_check:
        res["checks"] = [check(name, method_kw(args), padded) for name in (*BACKENDS_TIMED, "auto")
                         if name in BACKENDS or name == "auto" for padded in (True, False)]
        save()
    h, d = args.heads, args.head_dim
    last_ms: dict[tuple[str, str], tuple[int, float]] = {}
    plan = []
    for n in sorted(args.ns):
        for backward in (False, True):
            plan += [(n, c, backward) for c in BACKENDS_TIMED if c in BACKENDS]
        for backward in (False, True):
            plan += [(n, c, backward) for c in SDPA if args.method == "exact"]
    # auto last, at every n (the budget skips what would not fit): with --write-table it chooses by the table
    # this run wrote
    plan += [(n, "auto", backward) for n in sorted(args.ns) for backward in (False, True)]
    inputs: dict[int, tuple] = {}
    for n, column, backward in plan:
        if column == "auto" and args.write_table and "table_written" not in res:
            res["table_written"] = str(args.write_table)
            write_table(args, res)
            speed.load_table(args.write_table)
            inputs.clear()  # auto_selects are asked again, by the new table
        pas = "fwd+bwd" if backward else "fwd"
        row: dict[str, Any] = {"column": column, "n": n, "pass": pas}
        prev = last_ms.get((column, pas))
        predicted = None if prev is None else prev[1] * (n / prev[0]) ** 2 * 4 / 1e3  # ~4 calls, quadratic
        if predicted is not None and time.perf_counter() - start + predicted > args.budget_s:
            row["skipped"] = f"time budget (predicted {predicted:.0f} s)"
        else:
            try:
                if n not in inputs:
                    inputs.clear()
                    torch.cuda.empty_cache()
                    g = torch.Generator(device="cuda").manual_seed(n)
                    q, k, v, do = (torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
                                   for _ in range(4))
                    inputs[n] = (q, k, v, do)
                    spec = resolve_spec(q, k, v, causal=True, **method_kw(args))
                    picks = "auto_selects_by_new_table" if "table_written" in res else "auto_selects"
                    res.setdefault(picks, {})[str(n)] = {
                        "fwd": select_backend(q, spec).name,
                        "fwd+bwd": select_backend(q.detach().requires_grad_(), spec).name}
                q, k, v, do = inputs[n]
                q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
                fn = call_fn(column, q, k, v, do, backward, method_kw(args))
                if column == "auto":  # its steady state: calls until a built-per-shape backend is paid for
                    with backends_run() as warm:
                        row["warm_s"] = warm_up(fn, args.auto_warm_s)
                    row["warm_ran_on"] = dict(warm)
                with backends_run() as ran:
                    ms, how, first, spent = time_ms(fn, args.warmup_ms, args.rep_ms)
                row.update(ms=ms, how=how, first_call_s=first, wall_s=spent)
                if column == "auto":
                    row["ran_on"] = dict(ran)
                    if len(ran) == 1 and next(iter(ran)) in BACKENDS_TIMED and args.pair_rounds:
                        row.update(paired(args, fn, next(iter(ran)), call_fn(next(iter(ran)), q, k, v, do, backward,
                                                                             method_kw(args))))
                if args.method == "exact":  # fwd 2 matmuls per causal pair; bwd 2.5x more
                    row["tflops"] = 4 * d * h * n * (n + 1) / 2 * (3.5 if backward else 1) / ms / 1e9
                last_ms[(column, pas)] = (n, ms)
            except Exception as err:
                row["error"] = error_text(err)
                torch.cuda.empty_cache()
        print(f"[time] {row}", flush=True)
        res["rows"].append(row)
        save()
    res["elapsed_s"] = time.perf_counter() - start
    save()
    return res


def speed_table(rows: list[dict[str, Any]], device: str, method: str = "exact") -> dict[str, Any]:
    """The measured poslsh backends as ``poslsh.attention.speed``'s table: ``method``, regime "prefill"
    (forward ms) and "prefill+backward" (forward + backward ms), per n (str) and backend."""
    table: dict[str, dict] = {}
    for r in rows:
        if r["column"] in BACKENDS_TIMED and "ms" in r:
            regime = "prefill" + (BACKWARD if r["pass"] == "fwd+bwd" else "")
            table.setdefault(regime, {}).setdefault(str(r["n"]), {})[r["column"]] = r["ms"]
    return {"devices": {device: {method: table}}}


def merge_table(path: Path, fragment: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Merge ``fragment`` into the speed table at ``path``: per device, method, regime and n, the measured
    backends replace theirs, others stay; the run is appended to ``provenance["merged"]``."""
    doc = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    for device, methods in fragment["devices"].items():
        for method, regimes in methods.items():
            for regime, by_n in regimes.items():
                for n, by_backend in by_n.items():
                    doc["devices"].setdefault(device, {}).setdefault(method, {}).setdefault(regime, {}) \
                        .setdefault(n, {}).update(by_backend)
    doc.setdefault("provenance", {}).setdefault("merged", []).append(provenance)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def write_table(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Merge this run's measurements (so far) into ``--write-table``'s speed table."""
    doc = json.loads((args.out / f"{NAME}.json").read_text())
    env = doc["environment"]
    merge_table(args.write_table, speed_table(res["rows"], torch.cuda.get_device_name(), args.method),
                {"device": env["device"], "date": env["date"][:10], "command": env["command"],
                 "source": f"{NAME}.json"})


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("exact_gpu needs a CUDA device", file=sys.stderr)
        return 2
    res = run(args)
    if args.write_table and "table_written" not in res:  # a run without auto rows (one n)
        write_table(args, res)
    bad = [c for c in res["checks"] if c.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
