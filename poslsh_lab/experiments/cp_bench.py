"""Context parallelism benchmark: time, memory and bytes per rank of ``poslsh.distributed`` vs world size.

Runs under ``torchrun`` (RANK / WORLD_SIZE set: NCCL on CUDA, one GPU per process) or, without it,
spawns ``max(world_sizes)`` local processes itself (gloo on the CPU, ``threads`` torch threads each).
For every world size W in ``world_sizes`` (sub-groups of the launched processes: ranks 0..W-1), every
per-rank length n in ``lengths`` (total W * n: weak scaling) and every method it

* checks the result against one process on the gathered sequence (up to ``check_max_total`` tokens):
  output and dq, dk, dv, relative to the single-process result, and both against a float32 (float64
  for float64 runs) reference of the same method, whose ratio must stay within 2x (bf16's own error);
* times a forward call and a forward+backward call (median over ``repeats`` of the slowest rank's wall
  time, and the slowest rank's process CPU time);
* measures each rank's peak memory (CUDA: max allocated; CPU: peak resident-set growth);
* counts the bytes each rank sends (``poslsh.distributed.count_traffic``), beside what a ring would
  send ((W - 1) x the shard's keys and values, forward).

Writes ``cp-bench.json`` and ``cp_bench.png`` (time vs world size, bytes vs total length); only rank 0
writes (under torchrun the other ranks exit when the run is done).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from poslsh.alibi import alibi_slopes
from poslsh.attention import attention
from poslsh.attention.window import hybrid_widths, window_sizes
from poslsh.distributed import context_parallel_attention, count_traffic, gather, shard
from poslsh.distributed.launch import init_from_env, run_local
from poslsh.distributed.layout import shard_positions
from ..util import (Count, CountOrZero, Fraction, Positive, check_fields, fmt, markdown_table, pyplot, replot_saved,
                    save_figure, save_results, synchronize)
from .metrics import relative_error
from .scaling import measure

NAME = "cp-bench"
PLOT = "cp_bench.png"
METHODS = ("window", "lsh", "hybrid", "exact")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    """What to run. Defaults: the committed CPU run (about 25 minutes on 2 shared cores).

    Attributes:
        world_sizes: Ranks W to measure (sub-groups 0..W-1 of the launched processes; without torchrun the
            largest is the number of processes spawned).
        lengths: Tokens per rank n (the sequence is W x n: weak scaling).
        methods: Methods to measure.
        batch: Batch size B.
        heads: Query heads H, with Press slopes.
        kv_heads: Key/value heads (grouped KV); 0 means as many as the query heads.
        head_dim: Head dimension D.
        dtype: Dtype of q, k, v.
        causal: Causal attention (--no-causal: bidirectional).
        window_eps: Truncation level of the window method.
        samples: Partitions r of lsh and hybrid.
        hybrid_eps: Target error of the hybrid (sets its near-field widths).
        scheme: Positional LSH scheme.
        halo: Halo per KV head (head) or every head the widest head's (max).
        halo_max: Also measure halo max (forward time and bytes) at the largest world size.
        exact_layout: Layout of the causal exact ring (zigzag balances its work).
        exact_max_local: Longest per-rank length timed for exact attention (a ring: quadratic).
        check_max_total: Check against one process on the gathered sequence up to this total length.
        check_lengths: Extra per-rank lengths where only the check runs (not timed).
        backward: Also time forward+backward and check the gradients.
        repeats: Timed calls per point (the median is kept).
        warmup: Untimed calls before the timed ones.
        threads: Torch CPU threads per process; 0 keeps torch's default.
        device: Where to run; auto is CUDA under torchrun when it is available, else the CPU.
        backend: Backend of the local attention calls (auto picks per call).
        seed: Seed of inputs and partitions.
        replot: A saved cp-bench.json: only redraw its PNG and report into --out (every other flag is
            ignored; nothing is launched).
    """

    world_sizes: tuple[Count, ...] = (1, 2, 4)
    lengths: tuple[Count, ...] = (2048, 8192)
    methods: tuple[Literal["window", "lsh", "hybrid", "exact"], ...] = METHODS
    batch: Count = 1
    heads: Count = 8
    kv_heads: CountOrZero = 0
    head_dim: Count = 64
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    causal: bool = True
    window_eps: Fraction = 1e-3
    samples: Count = 8
    hybrid_eps: Positive = 1e-2
    scheme: Literal["grid", "cut"] = "grid"
    halo: Literal["head", "max"] = "head"
    halo_max: bool = True
    exact_layout: Literal["zigzag", "contiguous"] = "zigzag"
    exact_max_local: CountOrZero = 2048
    check_max_total: CountOrZero = 8192
    check_lengths: tuple[Count, ...] = ()
    backward: bool = True
    repeats: Count = 3
    warmup: CountOrZero = 1
    threads: CountOrZero = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: str = "auto"
    seed: int = 0
    replot: str = ""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(relative_error(a, b))


def _max_over(group, *values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if "nccl" in str(dist.get_backend(group)).lower() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _inputs(config: Config, total: int, rank: int, world: int, device: torch.device, layout: str, full: bool):
    """This rank's (q, k, v, dout) shards, and the full-sequence tensors when ``full`` (for the check).

    The full tensors come from one seed; without the check each rank draws only its own shard."""
    b, h, d = config.batch, config.heads, config.head_dim
    hkv = config.kv_heads or h
    dt = DTYPES[config.dtype]
    if full:
        g = torch.Generator(device=device).manual_seed(config.seed)
        whole = [torch.randn(b, hh, total, d, generator=g, device=device, dtype=dt) for hh in (h, hkv, hkv, h)]
        return [shard(t, rank, world, layout) for t in whole], whole
    g = torch.Generator(device=device).manual_seed(config.seed + 1000 * (rank + 1))
    n = shard_positions(total, world, rank, layout).numel()
    return [torch.randn(b, hh, n, d, generator=g, device=device, dtype=dt) for hh in (h, hkv, hkv, h)], None


def _kwargs(config: Config, method: str, halo: str) -> dict[str, Any]:
    kw = dict(method=method, causal=config.causal, slopes=alibi_slopes(config.heads), backend=config.backend)
    if method == "window":  # each method takes only the options it reads
        kw["window_eps"] = config.window_eps
    if method == "hybrid":
        kw["hybrid_eps"] = config.hybrid_eps
    if method in ("lsh", "hybrid"):
        kw.update(samples=config.samples, scheme=config.scheme, seed=config.seed)
    if method == "exact":
        kw["layout"] = config.exact_layout if config.causal else "contiguous"
    else:
        kw["halo"] = halo
    return kw


def _single_process(q, k, v, dout, config: Config, method: str, kw: dict, backward: bool, dtype=None):
    """The method on one process over the whole sequence (same partitions: same seed), optionally in
    another dtype: (out, dq, dk, dv)."""
    from poslsh.hashing import sample_partitions

    args = {key: val for key, val in kw.items() if key not in ("seed", "layout", "halo", "samples", "scheme")}
    if method in ("lsh", "hybrid"):
        args["partitions"] = sample_partitions(q.shape[2], kw["slopes"], kw["samples"], scheme=kw["scheme"],
                                               generator=torch.Generator().manual_seed(kw["seed"]))
    if dtype is not None:
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = attention(q, k, v, **args)
    if not backward:
        return out.detach(), None, None, None
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(config, method, kw, local, whole, group, device, layout) -> dict[str, Any]:
    """CP result (gathered) against one process, and both against a wider-dtype reference.

    Memory-lean (the GPU check runs near the memory limit): the reference comes first, then each
    result is compared and dropped."""
    ql, kl, vl, dl = (t.detach().requires_grad_(i < 3 and config.backward) for i, t in enumerate(local))
    out = context_parallel_attention(ql, kl, vl, group=group, **kw)
    if config.backward:
        out.backward(dl)
    got = [gather(t, group, layout) for t in ([out.detach()] + ([ql.grad, kl.grad, vl.grad] if config.backward
                                                               else []))]
    del out, ql, kl, vl
    if dist.get_rank(group) != 0:
        return {}
    wide = torch.float64 if DTYPES[config.dtype] in (torch.float32, torch.float64) else torch.float32
    ref = _single_process(*whole, config, method, kw, config.backward, dtype=wide)
    names = ["out", "dq", "dk", "dv"][:len(got)]
    cp_ref = {n: _rel(a, b) for n, a, b in zip(names, got, ref)}
    single = _single_process(*whole, config, method, kw, config.backward)
    single_ref = {n: _rel(a, b) for n, a, b in zip(names, single, ref)}
    del ref
    vs_single = {n: _rel(a, b) for n, a, b in zip(names, got, single)}
    floor = 1e-12 if DTYPES[config.dtype] == torch.float64 else 0.0  # float64 against itself: rounding only
    ok = all(cp_ref[n] <= 2 * single_ref[n] + floor for n in names)
    return {"vs_single": vs_single, "cp_vs_ref": cp_ref, "single_vs_ref": single_ref, "ok": ok,
            "reference_dtype": str(wide).replace("torch.", "")}


def _time(fn, group, device, repeats: int, warmup: int) -> dict[str, float]:
    walls, cpus = [], []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        wall, cpu = _max_over(group, wall, cpu)  # the step takes as long as the slowest rank
        if i >= warmup:
            walls.append(wall)
            cpus.append(cpu)
    return {"ms": 1e3 * statistics.median(walls), "ms_min": 1e3 * min(walls), "cpu_ms": 1e3 * statistics.median(cpus)}


def _peak_memory(fn, device: torch.device) -> int | None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return measure(fn)["peak_rss_delta"]


def _halo_bound(config: Config, method: str, halo: str, total: int, k: torch.Tensor, v: torch.Tensor) -> int | None:
    """The most bytes a rank whose neighbours' shards are at least as long as the reach sends forward,
    whatever N: per KV head and side the largest reach R_h of its query heads (window w_h; grid LSH
    max_t W_t - 1, the farthest a block can start before a shard edge; hybrid the larger), keys and
    values; every head the widest with halo="max". None for the cut scheme (no largest block)."""
    from poslsh.hashing import sample_partitions

    slopes = alibi_slopes(config.heads)
    reach = torch.zeros(config.heads, dtype=torch.int64)
    if method in ("window", "hybrid"):
        reach = window_sizes(slopes, config.window_eps, total) if method == "window" else \
            hybrid_widths(slopes, config.hybrid_eps, config.samples, total)
    if method in ("lsh", "hybrid"):
        parts = sample_partitions(total, slopes, config.samples, scheme=config.scheme,
                                  generator=torch.Generator().manual_seed(config.seed))
        if parts.scheme != "grid":
            return None  # cut blocks have no largest width: unbounded in principle
        reach = torch.maximum(reach, (parts.widths.amax(1) - 1).clamp(max=total - 1))
    hkv = k.shape[1]
    per_kv = reach.reshape(hkv, -1).amax(1)
    if halo == "max":
        per_kv = per_kv.amax().expand(hkv)
    sides = 1 if config.causal else 2
    b, d, dv = k.shape[0], k.shape[3], v.shape[3]
    return int(sides * per_kv.sum()) * b * (d + dv) * k.element_size()


def _measure(config: Config, method: str, halo: str, world: int, n_local: int, group, rank: int,
             device: torch.device, check_only: bool = False) -> dict[str, Any]:
    total = world * n_local
    kw = _kwargs(config, method, halo)
    layout = kw.get("layout", "contiguous")
    full = total <= config.check_max_total or check_only
    local, whole = _inputs(config, total, rank, world, device, layout, full)
    rec: dict[str, Any] = {"method": method, "halo": halo if method != "exact" else None, "layout": layout,
                           "world_size": world, "n_local": n_local, "total": total, "timed": not check_only}
    if full:
        rec["check"] = _check(config, method, kw, local, whole, group, device, layout)
        del whole
    if check_only:
        return rec
    q, k, v, dout = local
    with torch.no_grad():
        rec["fwd"] = _time(lambda: context_parallel_attention(q, k, v, group=group, **kw), group, device,
                           config.repeats, config.warmup)
    with count_traffic() as fwd_traffic, torch.no_grad():
        context_parallel_attention(q, k, v, group=group, **kw)
    rec["bytes_fwd"] = fwd_traffic.forward
    rec["bytes_metadata"] = fwd_traffic.metadata
    elt = q.element_size()
    kv_bytes = k.numel() * elt + v.numel() * elt
    rec["ring_bytes_fwd"] = (world - 1) * kv_bytes  # what a ring sends: every other shard's keys and values
    if method != "exact":
        rec["halo_bound_bytes_fwd"] = _halo_bound(config, method, halo, total, k, v)
    if config.backward and halo == config.halo:  # the halo="max" comparison: forward time and bytes only
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def step():
            out = context_parallel_attention(qg, kg, vg, group=group, **kw)
            out.backward(dout)
            qg.grad = kg.grad = vg.grad = None

        rec["fwd_bwd"] = _time(step, group, device, config.repeats, config.warmup)
        with count_traffic() as traffic:
            step()
        rec["bytes_bwd"] = traffic.backward
        rec["peak_memory"] = _peak_memory(step, device)
    else:
        rec["peak_memory"] = _peak_memory(lambda: context_parallel_attention(q, k, v, group=group, **kw), device)
    rec["input_bytes"] = sum(t.numel() * elt for t in (q, k, v))
    return rec


def _rank_main(rank: int, world: int, config: Config) -> list[dict[str, Any]]:
    """Everything this process measures (every rank runs it)."""
    device = torch.device("cuda", torch.cuda.current_device()) if _use_cuda(config) else torch.device("cpu")
    records = []
    widest = max(w for w in config.world_sizes if w <= world)  # where halo="max" is measured too
    for w in sorted(set(config.world_sizes)):
        if w > world:
            continue
        group = dist.new_group(list(range(w)))  # every rank takes part in creating every group
        if rank < w:
            for n_local in sorted(set(config.lengths) | set(config.check_lengths)):
                check_only = n_local not in config.lengths
                for method in config.methods:
                    if method == "exact" and n_local > config.exact_max_local and not check_only:
                        continue
                    halos = [config.halo] + (["max"] if config.halo_max and method != "exact" and not check_only
                                             and config.halo != "max" and w == widest else [])
                    for halo in halos:
                        rec = _measure(config, method, halo, w, n_local, group, rank, device, check_only)
                        rec["rank"] = rank
                        records.append(rec)
                        if rank == 0:
                            _log(rec)
        dist.barrier()
    return records


def _log(rec: dict[str, Any]) -> None:
    """One line per measurement on stderr (a long run shows where it is)."""
    parts = [f"[{NAME}] W={rec['world_size']} n={rec['n_local']} {rec['method']}"
             + (f" halo={rec['halo']}" if rec["halo"] else "")]
    for phase in ("fwd", "fwd_bwd"):
        if phase in rec:
            parts.append(f"{phase} {rec[phase]['ms']:.1f} ms (cpu {rec[phase]['cpu_ms']:.1f})")
    if "bytes_fwd" in rec:
        parts.append(f"sent {rec['bytes_fwd']} B")
    if rec.get("check"):
        parts.append(f"check {'ok' if rec['check']['ok'] else 'FAILED'}")
    print(", ".join(parts), file=sys.stderr, flush=True)


def _use_cuda(config: Config) -> bool:
    if config.device == "cpu":
        return False
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    return torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()


def _merge(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (method, halo, W, n): times from rank 0 (already the max over ranks), per-rank lists
    of memory and bytes, the check from rank 0."""
    rows: dict[tuple, dict[str, Any]] = {}
    for records in per_rank:
        for rec in records:
            key = (rec["method"], rec["halo"], rec["world_size"], rec["n_local"])
            row = rows.setdefault(key, {k: rec.get(k) for k in ("method", "halo", "layout", "world_size", "n_local",
                                                                 "total", "timed", "ring_bytes_fwd",
                                                                 "halo_bound_bytes_fwd", "input_bytes")}
                                  | {"peak_memory": {}, "bytes_fwd": {}, "bytes_bwd": {}, "bytes_metadata": {}})
            r = rec["rank"]
            for name in ("peak_memory", "bytes_fwd", "bytes_bwd", "bytes_metadata"):
                row[name][r] = rec.get(name)
            if r == 0:
                row.update({k: rec[k] for k in ("fwd", "fwd_bwd", "check") if k in rec})
    out = []
    for row in rows.values():
        for name in ("peak_memory", "bytes_fwd", "bytes_bwd", "bytes_metadata"):
            row[name] = [row[name][r] for r in sorted(row[name])]
        out.append(row)
    return out


def _weak_scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """time(1 rank, n) / time(W ranks, W n) per method, halo and n, for fwd and fwd+bwd (wall and CPU)."""
    base = {(r["method"], r["halo"], r["n_local"]): r for r in rows if r["world_size"] == 1}
    out = []
    for r in rows:
        b = base.get((r["method"], r["halo"], r["n_local"]))
        if b is None or r["world_size"] == 1:
            continue
        entry = {"method": r["method"], "halo": r["halo"], "n_local": r["n_local"], "world_size": r["world_size"]}
        for phase in ("fwd", "fwd_bwd"):
            if phase in r and phase in b:
                entry[f"{phase}_time_ratio"] = r[phase]["ms"] / b[phase]["ms"]
                entry[f"{phase}_cpu_ratio"] = r[phase]["cpu_ms"] / b[phase]["cpu_ms"]
        out.append(entry)
    return out


def _traffic_vs_length(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method and world size: the largest bytes any rank sent forward at each total length."""
    out = []
    for key in dict.fromkeys((r["method"], r["halo"], r["world_size"]) for r in rows if r["world_size"] > 1):
        mine = sorted((r for r in rows if (r["method"], r["halo"], r["world_size"]) == key), key=lambda r: r["total"])
        out.append({"method": key[0], "halo": key[1], "world_size": key[2],
                    "totals": [r["total"] for r in mine], "max_bytes_fwd": [max(r["bytes_fwd"]) for r in mine],
                    "halo_bound_bytes_fwd": [r.get("halo_bound_bytes_fwd") for r in mine],
                    "ring_bytes_fwd": [r["ring_bytes_fwd"] for r in mine]})
    return out


def run(config: Config, out_dir: str | Path) -> dict:
    """Measure on every process; rank 0 writes ``out_dir/cp-bench.json`` and the plot."""
    if config.replot:
        return replot_saved(config.replot, NAME, out_dir, replot)
    unknown = set(config.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {sorted(unknown)}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    check_fields(config)
    if not config.world_sizes:
        raise ValueError("world_sizes must name one or more process counts")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        rank, world = init_from_env("gloo" if config.device == "cpu" else None)
        if config.threads > 0 and not torch.cuda.is_available():
            torch.set_num_threads(config.threads)
        records = _rank_main(rank, world, config)
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        launched = {"launcher": "torchrun", "processes": world, "backend": str(dist.get_backend()),
                    "command": f"torchrun --nproc-per-node {world} -m poslsh_lab.cli {' '.join(sys.argv[1:])}"}
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:  # the report is rank 0's; the CLI would otherwise write it once per process
            sys.exit(0)
    else:
        if config.device == "cuda":
            raise ValueError("device='cuda' needs torchrun (one process per GPU); the local launcher is CPU/gloo")
        world = max(config.world_sizes)
        gathered = run_local(_rank_main, world, config, threads=config.threads)
        launched = {"launcher": "spawn", "processes": world, "backend": "gloo", "command": None}
    rows = _merge(gathered)
    timed = [r for r in rows if r["timed"]]
    results = {"rows": rows, "weak_scaling": _weak_scaling(timed), "traffic_vs_length": _traffic_vs_length(timed),
               "launch": launched, "nccl": _nccl_version()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = save_results(out_dir / f"{NAME}.json", config, results)
    replot(doc, out_dir)
    return doc


def _nccl_version() -> str | None:
    try:
        return ".".join(str(x) for x in torch.cuda.nccl.version()) if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def replot(doc: dict, out_dir: str | Path) -> None:
    """cp_bench.png from the JSON: time per call vs world size (weak scaling), bytes per rank vs total length."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    rows = [r for r in doc["results"]["rows"] if r["timed"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    main = [r for r in rows if r["halo"] in (None, doc["config"]["halo"])]
    for (method, n), color in zip(dict.fromkeys((r["method"], r["n_local"]) for r in main), plt.cm.tab10.colors * 3):
        mine = sorted((r for r in main if (r["method"], r["n_local"]) == (method, n)), key=lambda r: r["world_size"])
        ws = [r["world_size"] for r in mine]
        phase = "fwd_bwd" if all("fwd_bwd" in r for r in mine) else "fwd"
        axes[0].plot(ws, [r[phase]["ms"] for r in mine], "o-", color=color, label=f"{method}, {n} / rank")
        axes[0].plot(ws, [r[phase]["cpu_ms"] for r in mine], "x:", color=color, alpha=0.6)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("ranks W (sequence W x n: weak scaling)")
    axes[0].set_ylabel("ms per call, fwd+bwd")
    axes[0].set_title("o: wall time of the slowest rank; x: its CPU time", fontsize=8)
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    colors = dict(zip(dict.fromkeys((r["method"], r["halo"]) for r in rows), plt.cm.tab10.colors * 3))
    sizes = sorted({r["world_size"] for r in rows if r["world_size"] > 1})
    styles = dict(zip(reversed(sizes), ["-", "--", ":", "-."] * 4))
    for (method, halo, w) in dict.fromkeys((r["method"], r["halo"], r["world_size"]) for r in rows):
        pts = sorted((r["total"], max(r["bytes_fwd"])) for r in rows
                     if (r["method"], r["halo"], r["world_size"]) == (method, halo, w))
        if w > 1 and method != "exact":
            label = (method if halo in (None, doc["config"]["halo"]) else f"{method}, halo={halo}") + f", W={w}"
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], "o", ls=styles[w], color=colors[(method, halo)],
                         label=label)
    for w in sizes:  # what a ring sends at each length (the exact rows measured it where they ran)
        ring = sorted({(r["total"], r["ring_bytes_fwd"]) for r in rows if r["world_size"] == w})
        axes[1].plot([p[0] for p in ring], [p[1] for p in ring], "k", ls=styles[w], alpha=0.5,
                     label=f"a ring, W={w}: (W-1) x shard K,V")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("total sequence length")
    axes[1].set_ylabel("bytes sent per rank, forward (max over ranks)")
    axes[1].grid(True, alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:  # a one-rank run sends nothing: no lines to label
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "one rank: nothing sent", ha="center", va="center", transform=axes[1].transAxes)
    env, cfg = doc["environment"], doc["config"]
    fig.suptitle(f"context parallelism on {env['device']} ({doc['results']['launch']['backend']}): B={cfg['batch']}, "
                 f"H={cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}, {'causal' if cfg['causal'] else 'bidirectional'}",
                 fontsize=10)
    save_figure(fig, Path(out_dir) / PLOT)


def summarize(results: dict, out_dir: str | Path) -> str:
    """The run's report.md: a heading, the plot and ``readme_section``."""
    return f"## Context parallelism ({NAME})\n\n![time and bytes]({PLOT})\n\n" + readme_section(results)


def readme_section(results: dict) -> str:
    """Markdown: per (method, W, n) time, memory, bytes and check; weak scaling; bytes vs length (the
    last two where the run has more than one world size)."""
    res, cfg = results["results"], results["config"]
    rows = sorted(res["rows"], key=lambda r: (r["method"], str(r["halo"]), r["n_local"], r["world_size"]))
    checked = [r for r in rows if r.get("check")]
    rows = [r for r in rows if r["timed"]]
    mib = lambda b: "–" if b is None else f"{b / 2**20:.1f}"  # noqa: E731

    table = markdown_table(
        ["method", "halo", "W", "n / rank", "fwd ms", "fwd+bwd ms", "fwd+bwd CPU ms", "peak MiB beyond the inputs (max rank)",
         "sent fwd KiB (max rank)", "sent bwd KiB", "ring fwd KiB"],
        [[r["method"], r["halo"] or r["layout"], r["world_size"], r["n_local"], r["fwd"]["ms"],
          r["fwd_bwd"]["ms"] if "fwd_bwd" in r else "–", r["fwd_bwd"]["cpu_ms"] if "fwd_bwd" in r else "–",
          mib(max((m for m in r["peak_memory"] if m is not None), default=None)), max(r["bytes_fwd"]) / 1024,
          max(b or 0 for b in r["bytes_bwd"]) / 1024, r["ring_bytes_fwd"] / 1024] for r in rows])
    names = ("out", "dq", "dk", "dv")
    checks = markdown_table(
        ["method", "halo", "W", "n / rank", "ok"] + [f"{n} vs 1 process" for n in names]
        + [f"{n}: CP / 1 process vs {checked[0]['check']['reference_dtype'] if checked else 'ref'}" for n in names],
        [[r["method"], r["halo"] or r["layout"], r["world_size"], r["n_local"],
          "yes" if r["check"]["ok"] else "**NO**"] + [r["check"]["vs_single"].get(n) for n in names]
         + [f"{fmt(r['check']['cp_vs_ref'][n])} / {fmt(r['check']['single_vs_ref'][n])}"
            if n in r["check"]["cp_vs_ref"] else "–" for n in names] for r in checked])
    weak = markdown_table(
        ["method", "halo", "n / rank", "W", "fwd time ratio", "fwd+bwd time ratio", "fwd+bwd CPU ratio"],
        [[w["method"], w["halo"] or "–", w["n_local"], w["world_size"], w.get("fwd_time_ratio"),
          w.get("fwd_bwd_time_ratio"), w.get("fwd_bwd_cpu_ratio")] for w in res["weak_scaling"]])
    join = lambda xs: " / ".join("–" if x is None else str(x) for x in xs)  # noqa: E731
    traffic = markdown_table(
        ["method", "halo", "W", "total lengths", "max bytes sent fwd", "halo bound (bytes)", "ring bytes fwd"],
        [[t["method"], t["halo"] or "–", t["world_size"], join(t["totals"]), join(t["max_bytes_fwd"]),
          join(t.get("halo_bound_bytes_fwd", [None] * len(t["totals"]))), join(t["ring_bytes_fwd"])]
         for t in res["traffic_vs_length"]])
    launch = res["launch"]
    parts = [
        f"{launch['processes']} process{'es' if launch['processes'] > 1 else ''} ({launch['launcher']}, {launch['backend']}); B={cfg['batch']}, H={cfg['heads']}, "
        f"Hkv={cfg['kv_heads'] or cfg['heads']}, D={cfg['head_dim']}, {cfg['dtype']}, "
        f"{'causal' if cfg['causal'] else 'bidirectional'}, Press slopes; window eps={cfg['window_eps']}, "
        f"lsh/hybrid r={cfg['samples']} ({cfg['scheme']}), hybrid eps={cfg['hybrid_eps']}; exact: ring, "
        f"layout {cfg['exact_layout'] if cfg['causal'] else 'contiguous'}. Times: median of {cfg['repeats']} calls of "
        "the slowest rank (wall), and that rank's process CPU time.",
        table,
        "Correctness: the gathered result against one process on the whole sequence (relative Frobenius "
        "difference), and both against a wider-dtype reference of the same method; ok = CP's error within 2x "
        "of the single process's own.",
        checks]
    if res["weak_scaling"]:
        parts += ["Weak scaling: time at W ranks and W x the length over time at 1 rank and 1 x the length "
                  "(1 = perfect).", weak]
    if res["traffic_vs_length"]:
        parts += ["Bytes sent per rank (forward, largest over ranks) at each total length, against the halo bound "
                  "(keys and values of each KV head's largest reach, per side: window w_h, grid LSH max W - 1; the "
                  "same at every N) and a ring's ((W - 1) x the shard's keys and values).", traffic]
    return "\n\n".join(parts) + "\n"
