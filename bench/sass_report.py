"""Compile the Triton kernels for an H100/H200 (sm_90a) on any machine, no GPU needed, and report
registers, spills and the instruction mix of each loop (the per-tile cost of the key/query loops).

Kernel work on a lent GPU is short on time; this shows before any device call what a change does
to the machine code (e.g. integer compares on the INT32 pipe versus float compares on the FP32
pipe). It specialises arguments as the runtime would for the benchmark shape (B = 1, H = 32,
N = 262144, D = 128, contiguous bf16): ints equal to 1 become constants, pointers and multiples
of 16 get 16-byte divisibility (without that, loads would not vectorise and the report would lie).

    python bench/sass_report.py [--kernel fwd|dq|dkdv] [--r 8] [--block-m 64 --block-n 16]
                                [--warps 4 --stages 3] [--bidirectional] [--cut] [--method M] [--padding] [--split]
                                [--tma]
                                [--sass FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("bench/sass_report.py compiles for the GPU: run it without TRITON_INTERPRET")

from poslsh.attention.triton.backward import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel  # noqa: E402
from poslsh.attention.triton.forward import _fwd_kernel  # noqa: E402
from poslsh.attention.triton.jit import COMPILE_OPTIONS  # noqa: E402
from poslsh.method import METHOD_RULES  # noqa: E402

KERNELS = {"fwd": _fwd_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel,
           "delta": _bwd_delta_kernel}
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "OUT": "*bf16", "DO": "*bf16", "DQ": "*bf16",
            "DK": "*bf16", "DV": "*bf16", "LSE": "*fp32", "OUT_LSE": "*fp32", "DELTA": "*fp32", "SLOPE2": "*fp32",
            "W": "*i32", "U": "*i32", "S": "*i32", "E": "*i32", "ORDER": "*i32", "WIN": "*i32", "WIN_R": "*i32",
            "TICKETS": "*i32", "KPM": "*i8", "DQA": "*fp32", "DLSE": "*fp32"}
FLOATS = {"qk_scale", "log2_r", "scale"}
SHAPE = dict(B=1, group=1, H=32, Hkv=32, Nq=262144, Nk=262144, q_offset=0, stride_os=0, stride_kpmb=0,
             split_tiles=0)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DELTA_CONST = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_R=64, HAS_DLSE=False)  # as launch._delta launches it


# Flags a kernel takes that the callers here leave at their launch default unless they name them
FLAG_DEFAULTS = {"DELTA_HERE": False, "HAS_DLSE": False, "TMA": False}


def compile_kernel(fn, constexprs: dict, warps: int, stages: int, maxnreg: int | None = None, dtype: str = "bf16"):
    constexprs = {**{k: v for k, v in FLAG_DEFAULTS.items() if k in fn.arg_names}, **constexprs}
    sig, attrs, const = {}, {}, dict(constexprs)
    plain = set(getattr(fn, "do_not_specialize", ()) or ())  # ints the runtime leaves unspecialised
    descriptors = {}
    if constexprs.get("TMA"):  # the loop's tiles as tensor descriptors: dK/dV's Q and dO [B, H, Nq, D] in tiles of
        # BLOCK_M rows; the forward's and dQ's K and V [B, Hkv, Nk, D] in tiles of BLOCK_N
        names, rows = (("Q", "DO"), "BLOCK_M") if fn is _bwd_dkdv_kernel else (("K", "V"), "BLOCK_N")
        tile = f"[1, 1, {constexprs[rows]}, {constexprs['BLOCK_D']}]"
        descriptors = {name: f"tensordesc<{dtype}{tile}>" for name in names}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in descriptors:
            sig[name] = descriptors[name]
        elif name in plain:
            sig[name] = "i32"
        elif SHAPE.get(name) == 1:
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = (POINTERS.get(name) or ("fp32" if name in FLOATS else "i32")).replace("bf16", dtype)
            if name in POINTERS or name.startswith("stride") or SHAPE.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={k: v for k, v in const.items() if k in fn.arg_names}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages,
                                                                                   maxnreg=maxnreg, **COMPILE_OPTIONS))


def ptxas_info(ptx: str) -> str:
    """ptxas's register and spill counts for sm_90a, from the ptxas Triton compiled it with: the wheel's
    ``ptxas`` up to Triton 3.8; 3.9 emits a PTX version only its CUDA 13 ``ptxas-blackwell`` reads."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        Path(path).write_text(ptx)
        for tool in ("ptxas", "ptxas-blackwell"):
            done = subprocess.run([str(BIN / tool), "--gpu-name", "sm_90a", "-v", path, "-o", os.path.join(d, "k.o")],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return ", ".join(re.findall(r"Used \d+ registers|\d+ bytes spill stores|\d+ bytes spill loads",
                                            done.stderr))
    raise RuntimeError(f"no ptxas in {BIN} assembles this PTX: {done.stderr.strip()}")


def occupancy(kernel, warps: int) -> dict:
    """Registers, spills, shared memory and the CTAs one multiprocessor holds (64K registers, 227 KB shared)."""
    info = ptxas_info(kernel.asm["ptx"])
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    smem = kernel.metadata.shared
    ctas = min(65536 // (regs * 32 * warps), (227 * 1024) // max(smem + 1024, 1))
    return dict(ptxas=info, registers=regs, shared_kb=round(smem / 1024, 1), ctas_per_sm=ctas, warps=warps)


def sweep_variants() -> dict:
    """Every kernel launch of bench/kernel_sweep.py's variants (bf16, D = 128, causal, r = 8; each head group
    of a "wide" split apart), compiled for sm_90a: {method/variant/kernel[/group]: occupancy}."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from kernel_sweep import base_config, join, variants

    out, seen = {}, {}
    for method in ("window", "lsh", "hybrid", "exact"):
        alibi = not METHOD_RULES[method].collisions
        common = dict(METHOD=METHOD_RULES[method].kernel_id, R=1 if alibi else 8, CUT=False, CAUSAL=True, HEAD_DIM=128,
                      BLOCK_D=128, PREC="tf32", FDIV=True, HAS_KPM=False)
        for name, _, var in variants(method):
            cfg = join(base_config(method, torch.bfloat16, "cuda", 128), var)
            groups = [("", cfg)]
            if cfg.get("wide"):
                narrow = {k: v for k, v in cfg.items() if k != "wide"}
                groups = [("/wide", dict(narrow, **{k: v for k, v in cfg["wide"].items() if k != "min_work"})),
                          ("/narrow", narrow)]
            for tag, c in groups:
                launches = {"fwd": (_fwd_kernel, dict(common, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], SPLIT=False),
                                    c["num_warps"], c["num_stages"], c.get("maxnreg")),
                            "dkdv": (_bwd_dkdv_kernel, dict(common, BLOCK_M=c["BWD_BLOCK_M"], BLOCK_N=c["BWD_BLOCK_N"]),
                                     c["bwd_num_warps"], c["bwd_num_stages"], None),
                            "dq": (_bwd_dq_kernel, dict(common, BLOCK_M=c["DQ_BLOCK_M"], BLOCK_N=c["DQ_BLOCK_N"],
                                                        DELTA_HERE=c.get("delta") == "dq"),
                                   c["dq_num_warps"], c["dq_num_stages"], None)}
                if c.get("delta") == "kernel":
                    launches["delta"] = (_bwd_delta_kernel, DELTA_CONST, 4, 3, None)
                for kname, (fn, const, warps, stages, maxnreg) in launches.items():
                    key = (kname, tuple(sorted(const.items())), warps, stages, maxnreg)
                    if key not in seen:
                        seen[key] = occupancy(compile_kernel(fn, const, warps, stages, maxnreg), warps)
                    out[f"{method}/{name}/{kname}{tag}"] = seen[key]
    return out


def fits_shared(methods, dtypes, head_dims, limits) -> list[dict]:
    """Each kernel of ``launch.default_config`` fitted to each shared-memory limit, compiled for sm_90a:
    Triton's shared memory beside ``launch.shared_bytes``' figure (exact for the forward, an upper bound
    for the backward) and the limit."""
    import torch

    from poslsh.attention.triton import launch

    out = []
    for method, dtype, d, limit in ((m, t, d, lim) for m in methods for t in dtypes for d in head_dims for lim in limits):
        tdt = getattr(torch, dtype)
        cfg = launch.default_config(method, tdt, d, "cuda", False, limit)
        alibi = not METHOD_RULES[method].collisions
        bd = max(16, triton.next_power_of_2(d))
        common = dict(METHOD=METHOD_RULES[method].kernel_id, R=1 if alibi else 8, CUT=False, CAUSAL=True, HEAD_DIM=d,
                      BLOCK_D=bd, PREC="ieee" if dtype == "float32" else "tf32", FDIV=True, HAS_KPM=False)
        dq = {own: cfg.get(own, cfg[shared]) for own, shared in  # the dQ kernel's keys, else the backward's
              (("DQ_BLOCK_M", "BWD_BLOCK_M"), ("DQ_BLOCK_N", "BWD_BLOCK_N"), ("dq_num_warps", "bwd_num_warps"),
               ("dq_num_stages", "bwd_num_stages"))}
        launches = {"fwd": (_fwd_kernel, dict(common, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT=False),
                            cfg["num_warps"], cfg["num_stages"]),
                    "dkdv": (_bwd_dkdv_kernel, dict(common, BLOCK_M=cfg["BWD_BLOCK_M"], BLOCK_N=cfg["BWD_BLOCK_N"]),
                             cfg["bwd_num_warps"], cfg["bwd_num_stages"]),
                    "dq": (_bwd_dq_kernel, dict(common, BLOCK_M=dq["DQ_BLOCK_M"], BLOCK_N=dq["DQ_BLOCK_N"]),
                           dq["dq_num_warps"], dq["dq_num_stages"])}
        bound = launch.shared_bytes(cfg, d, tdt)
        for kname, (fn, const, warps, stages) in launches.items():
            k = compile_kernel(fn, const, warps, stages, None, {"float16": "fp16", "bfloat16": "bf16",
                                                                "float32": "fp32"}[dtype])
            out.append(dict(method=method, dtype=dtype, head_dim=d, limit=limit, kernel=kname, shared=k.metadata.shared,
                            bound=bound[kname], tiles=[const["BLOCK_M"], const["BLOCK_N"], warps, stages]))
    return out


def sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout


def loops(text: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each loop: the code between a backward branch and its target."""
    code = [(int(m.group(1), 16), m.group(2)) for line in text.splitlines()
            if (m := re.search(r"/\*([0-9a-f]{4,5})\*/\s+(.*?);", line))]
    out = []
    for addr, ins in code:
        target = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in code if int(target.group(1), 16) <= a <= addr]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            out.append((len(body), ops))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=sorted(KERNELS), default="fwd")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--block-m", type=int, default=64)
    p.add_argument("--block-n", type=int, default=16)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--maxnreg", type=int, help="register cap per thread (the kernels' maxnreg config key)")
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--cut", action="store_true")
    p.add_argument("--method", choices=sorted(METHOD_RULES), default="lsh")
    p.add_argument("--padding", action="store_true", help="with a key padding mask")
    p.add_argument("--split", action="store_true", help="the split-key (decoding) forward")
    p.add_argument("--tma", action="store_true", help="the loop's tiles through tensor descriptors (fwd and dq: K, V; dkdv: "
                   "Q, dO; the tma and bwd_tma keys)")
    p.add_argument("--integer-positions", action="store_true", help="the FDIV=False path (n >= 2^23)")
    p.add_argument("--sass", type=Path, help="also write the whole SASS here")
    p.add_argument("--json", action="store_true", help="print {ptxas, loops: [{instructions, ops}]} as JSON")
    p.add_argument("--sweep-variants", action="store_true",
                   help="compile every launch of bench/kernel_sweep.py's variants; print registers, spills, shared "
                        "memory and CTAs per multiprocessor of each (JSON with --json)")
    p.add_argument("--every-variant", action="store_true",
                   help="compile every method's forward with padding and split keys (its merge inside), and every "
                        "method's backward with padding; print {variant: ptxas} as JSON")
    p.add_argument("--fits-shared", action="store_true",
                   help="compile the default tiles of --methods, --dtypes, --head-dims fitted to each of --limits "
                        "bytes of shared memory; print [{kernel, shared, bound, limit, ...}] as JSON")
    p.add_argument("--methods", nargs="+", default=["exact"])
    p.add_argument("--dtypes", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[256])
    p.add_argument("--limits", nargs="+", type=int, default=[232448])
    args = p.parse_args(argv)
    if args.fits_shared:
        print(json.dumps(fits_shared(args.methods, args.dtypes, args.head_dims, args.limits)))
        return 0
    if args.sweep_variants:
        report = sweep_variants()
        if args.json:
            print(json.dumps(report))
        for name, info in report.items():
            if not args.json:
                print(f"{name:60s} {info['registers']:3d} regs, {info['shared_kb']:6.1f} KB, {info['warps']} warps, "
                      f"{info['ctas_per_sm']} CTAs/SM  [{info['ptxas']}]")
        return 0
    if args.every_variant:
        out = {}
        for method in sorted(METHOD_RULES):
            alibi = not METHOD_RULES[method].collisions
            base = dict(METHOD=METHOD_RULES[method].kernel_id, R=1 if alibi else 4, CUT=False, CAUSAL=True, HEAD_DIM=128,
                        BLOCK_D=128, PREC="tf32", FDIV=True, HAS_KPM=True)
            fwd = dict(base, BLOCK_M=16, BLOCK_N=64, SPLIT=True)
            out[f"fwd {method} padded split"] = ptxas_info(compile_kernel(_fwd_kernel, fwd, 4, 2).asm["ptx"])
            bwd = dict(base, BLOCK_M=32, BLOCK_N=64)
            out[f"dkdv {method} padded"] = ptxas_info(compile_kernel(_bwd_dkdv_kernel, bwd, 4, 2).asm["ptx"])
            dq = dict(base, BLOCK_M=128, BLOCK_N=64)
            out[f"dq {method} padded"] = ptxas_info(compile_kernel(_bwd_dq_kernel, dq, 8, 2).asm["ptx"])
        out["delta"] = ptxas_info(compile_kernel(_bwd_delta_kernel, DELTA_CONST, 4, 1).asm["ptx"])
        print(json.dumps(out))
        return 0
    alibi = not METHOD_RULES[args.method].collisions
    const = dict(METHOD=METHOD_RULES[args.method].kernel_id, R=1 if alibi else args.r, CUT=args.cut and not alibi,
                 CAUSAL=not args.bidirectional, HEAD_DIM=128, BLOCK_D=128, BLOCK_M=args.block_m,
                 BLOCK_N=args.block_n, PREC="tf32", FDIV=not args.integer_positions, HAS_KPM=args.padding)
    if args.kernel == "delta":
        const = dict(DELTA_CONST)
    elif args.kernel == "fwd":
        const.update(SPLIT=args.split)
    if args.kernel != "delta":
        const["TMA"] = args.tma
    kernel = compile_kernel(KERNELS[args.kernel], const, args.warps, args.stages, args.maxnreg)
    text = sass(kernel.asm["cubin"])
    if args.sass:
        args.sass.write_text(text)
    if args.json:
        print(json.dumps({"ptxas": ptxas_info(kernel.asm["ptx"]), "shared_bytes": kernel.metadata.shared,
                          "loops": [{"instructions": n, "ops": dict(ops)} for n, ops in loops(text)]}))
        return 0
    print(f"{args.kernel} {const} warps={args.warps} stages={args.stages} maxnreg={args.maxnreg}: "
          f"{ptxas_info(kernel.asm['ptx'])}, {kernel.metadata.shared} bytes of shared memory")
    for i, (n, ops) in enumerate(loops(text)):
        print(f"  loop {i}: {n} instructions per iteration per thread: "
              + ", ".join(f"{op} {k}" for op, k in ops.most_common(14)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
