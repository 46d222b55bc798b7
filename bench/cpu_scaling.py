"""Issue 3's CPU scaling benchmark: LSH attention forward time at n = 65,536 over n = 8,192
(linear is 8, quadratic 64; the target is <= 12) and peak memory at n = 65,536 (target < 2 GB).

H = 4, D = 64, float32, r = 8, causal, Press slopes, batch 1, no autograd; partition sampling is
included in the time. Time is the best of ``--repeats`` runs; the ratio is taken on process CPU time
(with one torch thread, the work done), because wall time on a shared, loaded machine measures the
other tenants too; the wall-time ratio is recorded beside it. Memory: the process's peak resident
set during the call (VmHWM, reset before it; includes Python, torch and the inputs) and its growth
over the resident set at the start of the call (see
``poslsh_lab.experiments.metrics.cpu_time_and_memory``).

    python bench/cpu_scaling.py                     # writes bench/results/cpu_scaling.json
    python bench/cpu_scaling.py --backends fused split --schemes grid cut
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from poslsh_lab.util import save_results
from poslsh_lab.experiments.metrics import cpu_time_and_memory
from poslsh_lab.experiments.scaling import Config
from poslsh_lab.experiments.scaling.measure import run_method

TARGET_RATIO, TARGET_BYTES = 12.0, 2 * 10**9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs=2, default=[8192, 65536])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=["fused", "split"])
    p.add_argument("--schemes", nargs="+", default=["grid", "cut"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu_scaling.json")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    small, large = args.lengths
    runs = []
    for backend in args.backends:
        for scheme in args.schemes:
            cfg = Config(heads=args.heads, head_dim=args.head_dim, samples=args.samples, scheme=scheme)
            method = f"lsh-{backend}"
            warm = torch.randn(1, args.heads, 512, args.head_dim)
            run_method(method, warm, warm, warm, cfg, torch.Generator().manual_seed(0))
            stats = {}
            for n in (small, large):
                g = torch.Generator().manual_seed(n)
                q, k, v = (torch.randn(1, args.heads, n, args.head_dim, generator=g) for _ in range(3))
                gen = torch.Generator().manual_seed(0)
                stats[n] = cpu_time_and_memory(lambda: run_method(method, q, k, v, cfg, gen), args.repeats)
                del q, k, v
            ratio = stats[large]["cpu_seconds"] / stats[small]["cpu_seconds"]
            wall_ratio = stats[large]["seconds"] / stats[small]["seconds"]
            peak = stats[large]["peak_rss"]
            run = {"backend": backend, "scheme": scheme,
                   "seconds": {str(n): s["seconds"] for n, s in stats.items()},
                   "cpu_seconds": {str(n): s["cpu_seconds"] for n, s in stats.items()},
                   "ratio": ratio, "wall_ratio": wall_ratio, "peak_rss_bytes": peak,
                   "peak_rss_delta_bytes": stats[large]["peak_rss_delta"],
                   "meets_ratio": ratio <= TARGET_RATIO,
                   "meets_memory": None if peak is None else peak < TARGET_BYTES}
            runs.append(run)
            mem = "n/a" if peak is None else f"{peak / 2**20:.0f} MiB peak RSS"
            print(f"{backend:6s} {scheme:5s} cpu t({small})={stats[small]['cpu_seconds']:.3f}s "
                  f"t({large})={stats[large]['cpu_seconds']:.3f}s ratio={ratio:.2f} | wall ratio={wall_ratio:.2f} "
                  f"| {mem}", flush=True)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    config = {**vars(args), "out": str(args.out), "load_average_at_end": load, "dtype": "float32", "causal": True, "batch": 1,
              "targets": {"ratio": TARGET_RATIO, "peak_bytes": TARGET_BYTES}}
    doc = save_results(args.out, config, {"runs": runs})
    print(json.dumps({"written": str(args.out), "runs": len(doc["results"]["runs"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
