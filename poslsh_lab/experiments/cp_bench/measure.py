"""cp-bench, measuring: the launch (torchrun or spawned processes) and what every rank measures.

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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from poslsh.alibi import alibi_slopes
from poslsh.attention import attention
from poslsh.attention.window import hybrid_widths, window_sizes
from poslsh.distributed import context_parallel_attention, count_traffic, gather, shard
from poslsh.distributed.launch import init_from_env, run_local
from poslsh.distributed.layout import shard_positions
from ...util import replot_saved, save_results, synchronize
from ..metrics import cpu_time_and_memory, relative_error
from .design import DTYPES, NAME, Config, check
from .report import replot


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
    return cpu_time_and_memory(fn)["peak_rss_delta"]


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
    check(config)
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
