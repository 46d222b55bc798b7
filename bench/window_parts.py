"""Where the window forward's time goes at long n (issue 23 item 3: 256K, eps 1e-3, aim 5.0 ms on an H100).

The per-head window's heads differ by two orders of magnitude in width (Press slopes, H = 32, eps 1e-3: 9 to
1768 keys), so one tile shape serves neither end. This times the Triton forward (``triton_attention``, the
public call's kernel) on head groups apart, each beside its floor, under several tile configs:

* ``all``: the 32 heads as shipped; ``wide``: the heads with half-width >= ``--wide-from`` (256) alone;
  ``narrow``: the others alone; ``w8``: 32 heads of half-width 8 (the fixed cost of a query tile).
* per group: keys per query, the band's matrix-product rate (4 D flops per query-key pair of the band) and
  the rate of its four [B, H, n, D] tensors' bytes (q, k, v read, o written) against ``o.copy_(q)``'s
  (two tensors' bytes: ``floor_ms`` = twice its time scaled to the group's heads).
* every config's output is compared with the shipped config's (relative error, must stay at bf16 level).
* ``contest``: on ``all``, the shipped config timed in alternation (``--rounds``) with the joined config (the
  fastest of the wide group and of the narrow group as one call: ``wide`` config key, the wide heads launched
  apart) and the two fastest other configs; ``over_shipped``: the median of the rounds' time ratios.
* ``--base DIR``: another checkout's ``poslsh`` package (e.g. the commit before a kernel change: ``git archive
  BASE poslsh | tar -x -C DIR``) imported beside this one as ``poslsh_base``; its kernel with its own shipped
  config is the row ``base`` of every group and an entry of the contest, so a kernel change is measured
  against its predecessor in one process, in alternation.

B = 1, D = 128, bf16, causal, q ~ 2 N(0, 1), k, v ~ N(0, 1); ``triton.testing.do_bench`` medians.

    python bench/window_parts.py --json /tmp/out/window_parts.json            # ~2 min on an H100
    TRITON_INTERPRET=1 python bench/window_parts.py --tiny --json /tmp/wp.json  # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import triton

from poslsh.alibi import alibi_slopes
from poslsh.attention import resolve_spec
from poslsh.attention.window import window_sizes
from poslsh.attention.triton import launch

# Forward tile configs tried on each group: layered on the shipped one ("shipped" = no change).
CONFIGS = {
    "shipped": {},
    "64x32_s2": dict(num_stages=2),
    "64x32_s4": dict(num_stages=4),
    "64x16": dict(BLOCK_N=16),
    "64x64": dict(BLOCK_N=64),
    "64x128_s2": dict(BLOCK_N=128, num_stages=2),
    "128x32_w8": dict(BLOCK_M=128, num_warps=8),
    "128x64_w8": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8),
    "128x128_w8_s2": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "32x32_w2": dict(BLOCK_M=32, num_warps=2),
    "32x64_w2": dict(BLOCK_M=32, BLOCK_N=64, num_warps=2),
    "64x32_reg128": dict(maxnreg=128),
    # the one-edge boundary stretches (session 15) took the forward from 168 to 176 registers: 2 programs of 128
    # threads fit an SM's 64K registers instead of 3; 168 brings the third back (one 4-byte spill, outside the loops)
    "reg168": dict(maxnreg=168),
    "64x64_reg168": dict(BLOCK_N=64, maxnreg=168),
    # K and V through tensor descriptors (TMA): 128 registers instead of 176, no per-thread addresses
    "tma": dict(tma=True),
    "tma_64x64": dict(tma=True, BLOCK_N=64),
    # tma with the wide heads (half-width >= t) on 64-key tiles, the rest on 32: offline 12.6 instructions per element
    # of a plain tile at 64 x 64 against 18.4 at 64 x 32 (session 15's NOTES); the next contest
    **{f"tma_wide{t}_64x64": dict(tma=True, wide=dict(min_work=t, BLOCK_N=64)) for t in (256, 512, 1024)},
    # or on exact's 128 x 64 tiles with 8 warps (offline with tma: 174 registers, 64 x 64's instructions per element)
    **{f"tma_wide{t}_128x64_w8": dict(tma=True, wide=dict(min_work=t, BLOCK_M=128, BLOCK_N=64, num_warps=8,
                                                          maxnreg=None)) for t in (512, 1024)},
    # Programs per multiprocessor by shared memory (bench/sass_report.py's shared_bytes, tma): 64 x 64 with 3 stages
    # takes 113 KB (one or two programs, at the 228 KB edge), with 2 stages 81 KB (two); 64 x 32 with 2 stages
    # 48 KB and 128 registers under maxnreg 128 (four programs, no spill; 3 stages: 65 KB, three)
    **{f"w{t}_s2": dict(wide=dict(min_work=t, BLOCK_N=64, num_stages=2)) for t in (256, 512)},
    "n_s2r128_w512": dict(num_stages=2, maxnreg=128, wide=dict(min_work=512, BLOCK_N=64, num_stages=3, maxnreg=168)),
    "n_s2r128_w512_s2": dict(num_stages=2, maxnreg=128, wide=dict(min_work=512, BLOCK_N=64, num_stages=2,
                                                                 maxnreg=168)),
    # the widest heads only (half-width >= 1024: few boundary tiles per program) on exact's 128 x 64 tiles
    "wide1024_128x64_w8": dict(wide=dict(min_work=1024, BLOCK_M=128, BLOCK_N=64, num_warps=8)),
}


def press_widths(h: int, n: int, eps: float) -> list[int]:
    """The half-widths ``window_eps`` gives the Press slopes of h heads (the library's own rule)."""
    return [int(w) for w in window_sizes(alibi_slopes(h), eps, n)]


def inputs(widths: list[int], n: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """q ~ 2 N(0, 1), k, v ~ N(0, 1) [1, len(widths), n, d] on the generator's device, and the causal window
    spec with these half-widths."""
    q, k, v = (torch.randn(1, len(widths), n, d, generator=gen, device=gen.device) for _ in range(3))
    q, k, v = (2.0 * q).to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v, resolve_spec(q, k, v, method="window", causal=True, widths=widths)


def import_base(root: Path):
    """The ``poslsh`` package under ``root`` as the module ``poslsh_base`` (its imports are relative, so its
    submodules load from there too): (its resolve_spec, its triton launch module)."""
    init = root / "poslsh" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--base: no poslsh package under {root} (expected {init})")
    spec = importlib.util.spec_from_file_location("poslsh_base", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["poslsh_base"] = module
    spec.loader.exec_module(module)
    base_launch = importlib.import_module("poslsh_base.attention.triton.launch")
    return importlib.import_module("poslsh_base.attention").resolve_spec, base_launch


def time_ms(fn, warmup: int, rep: int, device: str) -> float:
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--n", type=int, default=262144)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window-eps", type=float, default=1e-3)
    p.add_argument("--wide-from", type=int, default=256, help="half-width from which a head is 'wide'")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--groups", nargs="+", default=["all", "wide", "narrow", "w8"],
                   choices=["all", "wide", "narrow", "w8"])
    p.add_argument("--budget-s", type=float, default=170.0, help="stop starting measurements after this")
    p.add_argument("--rounds", type=int, default=3, help="the contest's alternating rounds")
    p.add_argument("--base", type=Path, help="a directory holding another checkout's poslsh package, timed "
                   "beside this one as the config 'base' (row per group, contest entry)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: n = 96, H = 4, D = 16, eps 0.3, two configs, "
                   "the wider two heads as the wide group")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.n, args.heads, args.head_dim, args.configs, args.window_eps = 96, 4, 16, ["shipped", "32x32_w2"], 0.3
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    n, d, t0 = args.n, args.head_dim, time.monotonic()
    widths = press_widths(args.heads, n, args.window_eps)
    if args.tiny:
        args.wide_from = sorted(widths)[len(widths) // 2]  # two groups of two heads
    groups = {"all": widths, "wide": [w for w in widths if w >= args.wide_from],
              "narrow": [w for w in widths if w < args.wide_from], "w8": [min(8, n - 1)] * args.heads}
    doc = dict(name="window_parts", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
               device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, triton=triton.__version__,
               shape=dict(B=1, n=n, D=d, dtype=str(dtype).removeprefix("torch."), causal=True,
                          window_eps=args.window_eps, wide_from=args.wide_from),
               timing="triton.testing.do_bench median" if device == "cuda" else "one CPU call (smoke run)",
               groups={g: dict(heads=len(w), widths=w) for g, w in groups.items()}, rows=[], contest=None)
    warm, rep = (25, 100) if device == "cuda" else (0, 0)

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))

    gen = torch.Generator(device=device).manual_seed(0)
    shipped = launch.default_config("window", dtype, d, device)
    base = import_base(args.base) if args.base else None
    if base:
        doc["base"] = str(args.base)

    def caller(q, k, v, spec, name: str, cfg: dict | None = None):
        """One forward of config ``name`` (``cfg``: this checkout's kernel) or ``base`` (the base package's kernel
        with its shipped config)."""
        if name == "base":
            base_resolve, base_launch = base
            base_spec = base_resolve(q, k, v, method="window", causal=True, widths=spec.window)
            base_cfg = base_launch.default_config("window", dtype, d, device)
            return lambda: base_launch.triton_attention(q, k, v, base_spec, base_cfg)[0]
        return lambda: launch.triton_attention(q, k, v, spec, cfg)[0]

    floor_per_head = None
    for g, w in groups.items():
        if not w or g not in args.groups:
            continue
        h = len(w)
        q, k, v, spec = inputs(w, n, d, dtype, gen)
        if floor_per_head is None:  # o.copy_(q) moves two tensors; the window moves four
            o = torch.empty_like(q)
            floor_per_head = 2 * time_ms(lambda: o.copy_(q), warm, rep, device) / h
            del o
        # query-key pairs of the band: keys j in [max(i - w, 0), i] for each query i (w <= n - 1)
        pairs = sum((wh + 1) * n - wh * (wh + 1) // 2 for wh in w)
        ref = None
        for name in args.configs + (["base"] if base else []):
            if time.monotonic() - t0 > args.budget_s:
                doc["stopped_by_budget"] = True
                break
            overrides = CONFIGS.get(name, {})
            row = dict(group=g, heads=h, config=name, overrides=overrides)
            try:
                call = caller(q, k, v, spec, name, {**shipped, **overrides})
                out = call()  # compiles
                if ref is None:
                    ref = out
                row["rel_to_shipped"] = float((out.float() - ref.float()).norm() / ref.float().norm())
                ms = time_ms(call, warm, rep, device)
                row.update(ms=ms, keys_per_query=pairs / n, tflops=4 * d * pairs / ms / 1e9,
                           tb_per_s=4 * q.numel() * q.element_size() / ms / 1e9,
                           floor_ms=floor_per_head * h)
            except Exception as err:  # a config that does not fit the device is a result, not a crash
                row["error"] = f"{type(err).__name__}: {err}"[:400]
            doc["rows"].append(row)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()
                              if k != "overrides"}), flush=True)
            save()
        del q, k, v

    # The contest: the shipped config against the joined one (the fastest wide and narrow configs, wide heads
    # launched apart), the two fastest others and the base kernel on "all", timed in alternation on the 32 heads.
    contenders = {}
    best = {}
    for g in ("wide", "narrow"):
        ok = [r for r in doc["rows"] if r["group"] == g and "ms" in r and r["rel_to_shipped"] < 2e-2
              and r["config"] != "base"]
        if ok:
            best[g] = min(ok, key=lambda r: r["ms"])["config"]
    if len(best) == 2:
        contenders["joined"] = {**shipped, **CONFIGS[best["narrow"]], "wide": {"min_work": args.wide_from, **{
            k: v for k, v in {**shipped, **CONFIGS[best["wide"]]}.items()
            if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg")}}}
    ranked = sorted((r for r in doc["rows"] if r["group"] == "all" and "ms" in r and r["config"] not in ("shipped", "base")
                     and r["rel_to_shipped"] < 2e-2), key=lambda r: r["ms"])
    contenders.update({r["config"]: {**shipped, **CONFIGS[r["config"]]} for r in ranked[:2]})
    if base:
        contenders["base"] = None
    if contenders and time.monotonic() - t0 < args.budget_s + 30:
        q, k, v, spec = inputs(groups["all"], n, d, dtype, gen)
        configs = {"shipped": shipped, **contenders}
        calls = {name: caller(q, k, v, spec, name, cfg) for name, cfg in configs.items()}
        ref = calls["shipped"]()
        contest = {}
        for name, cfg in configs.items():
            out = calls[name]()
            contest[name] = dict(config=cfg, ms=[], rel_to_shipped=float((out.float() - ref.float()).norm()
                                                                         / ref.float().norm()))
        for _ in range(args.rounds):  # alternate: the host and the clocks drift between seconds
            for name in configs:
                contest[name]["ms"].append(time_ms(calls[name], warm, rep, device))
        for name, entry in contest.items():
            entry["over_shipped"] = statistics.median(a / b for a, b in zip(entry["ms"], contest["shipped"]["ms"]))
            print(json.dumps({"contest": name, "ms": [round(x, 3) for x in entry["ms"]],
                              "over_shipped": round(entry["over_shipped"], 3)}), flush=True)
        doc["contest"] = dict(best_per_group=best, entries=contest)
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
