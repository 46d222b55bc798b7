"""Host side of the Triton kernels: what a call needs on the device (``Plan``, cached per method and
partitions), tile configurations, launches (the forward's built once per call shape: ``ForwardRecipe``),
split-key decoding, and the autograd Function.

``triton_attention(q, k, v, spec)`` runs a resolved ``AttentionSpec`` (``poslsh.attention.resolve_spec``)
and is what the dispatcher's "triton" backend calls; benchmarks call it to time the kernels without
the dispatcher's validation.
"""

from __future__ import annotations

import functools
import json
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from ...cache_keys import version_key
from ...method import method_rule
from ..core import AttentionSpec, last_dim_contiguous
from ..ranges import normalize_grid
from ..speed import DECODE_ROWS
from .backward import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel
from .forward import _fwd_kernel
from .jit import COMPILE_OPTIONS

__all__ = ["triton_attention", "default_config", "supports_triton", "interpreting", "Plan", "plan_for", "build_plan",
           "run_plan", "set_tuned", "write_tuned", "WIDTH_CAP", "MAX_KEYS"]

LOG2E = 1.4426950408889634
MAX_KEYS = 2**30  # the kernels take fewer key positions than this (``supports_triton``)
# A half-width at or beyond every supported length: "unbounded" in the kernels' int32 (pb + w + 1 < 2^31).
WIDTH_CAP = MAX_KEYS - 1
# Grid plans are normalised to a span of positions, not to the key count, so a decode step's growing
# cache reuses them: 2^23 for every length whose positions compare as float32 (``_float_positions``:
# p + U < 2^24 stays exact), the next power of two above it for longer ones.
GRID_SPAN = 2**23
TUNED_PATH = Path(__file__).with_name("tuned.json")


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------------
# Plan: the method's per-head device arrays, built once per (method, slopes, widths, partitions, n)
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Plan:
    """What the kernels need to know besides q, k, v.

    Attributes:
        method: kernel method id (``MethodRule.kernel_id``); r: samples (1 for exact/window); cut: per-position
            block bounds instead of grid scalars.
        W, U: int32 [H, r] grid widths/offsets (normalised to ``span`` positions); S, E: int32 [H, r, n]
            block bounds (cut).
        slope2: float32 [H], slope * log2(e) (exact, window, hybrid); win: int32 [H] half-widths w_h
            (window, hybrid's near field), at most ``WIDTH_CAP`` (a width >= Nk keeps every key); win_r:
            int32 [H] the band's right sides (``win`` unless ``spec.window_right`` gives them).
        order: int32 [H], heads by decreasing work (so the widest start first); work: float [H].
        reach: host int, the most keys one query can see in any head whatever the length (decides
            split-key decoding, with the key count: ``min(reach, Nk)``).
        span: the key counts the plan serves: every Nk <= span (exact, window, grid), or Nk == span
            (cut, whose block bounds are per position). Nothing in a plan depends on Nk otherwise, so a
            decode step's growing cache reuses it.
        by_width: ``head_groups``' cache: (threshold, group) -> the head orders of its wide and narrow heads.
        recipes: the forward's launch recipes of its call shapes (``ForwardRecipe``); a copy of the plan
            with other arrays (``dataclasses.replace``) starts without any.
        tickets: the split forward's tickets (``ForwardRecipe.tickets``), int32 [count] per (device, count);
            partials: its fp32 partial results (``ForwardRecipe.partials``) per (device, elements). Held
            here, not in the recipes, which are evicted: a CUDA graph that captured a split launch keeps
            writing them for as long as the plan, whose arrays it reads too, lives. Scratch of one launch,
            so the plan's launches on one stream share them (no allocation per decode step).
    """

    method: int
    r: int
    cut: bool
    W: Tensor
    U: Tensor
    S: Tensor
    E: Tensor
    slope2: Tensor
    win: Tensor
    win_r: Tensor
    order: Tensor
    work: Tensor
    reach_fn: Any = None
    _reach: int | None = None
    span: int = MAX_KEYS
    by_width: dict = field(default_factory=dict)
    recipes: dict = field(default_factory=dict, init=False, repr=False)
    tickets: dict = field(default_factory=dict, init=False, repr=False)
    partials: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def reach(self) -> int:
        if self._reach is None:
            self._reach = int(self.reach_fn())
        return self._reach

    def serves(self, nk: int) -> bool:
        """Whether this plan is valid for Nk keys (``span``)."""
        return nk == self.span if self.cut else nk <= self.span

    def kv_order(self, group: int) -> Tensor:
        w = self.work.reshape(-1, group).sum(1)
        return torch.argsort(w, descending=True, stable=True).to(torch.int32)


# The config keys each kernel's launch reads (the dQ kernel's own keys default to the dK/dV kernel's)
FWD_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "maxnreg"})
DKDV_KEYS = frozenset({"BWD_BLOCK_M", "BWD_BLOCK_N", "bwd_num_warps", "bwd_num_stages"})
DQ_KEYS = DKDV_KEYS | {"DQ_BLOCK_M", "DQ_BLOCK_N", "dq_num_warps", "dq_num_stages"}
TILE_KEYS = FWD_KEYS | DQ_KEYS
# Every key a kernel config may hold (``triton_attention``'s docstring says what each does); "wide" holds
# "min_work" and tile keys. A key outside these is refused: a variant deleted or misspelt would otherwise
# be ignored without a word.
CONFIG_KEYS = TILE_KEYS | {"tma", "bwd_tma", "delta", "wide", "splits", "split_waves", "float_positions"}


def head_groups(plan: Plan, cfg: dict, group: int = 0,
                reads: frozenset | None = None) -> list[tuple[Tensor, dict]]:
    """The launches of one kernel as [(head order int32 [heads], config)]: one, (the plan's order, ``cfg``),
    unless ``cfg["wide"]`` = {"min_work": t, tile keys...} splits the heads by their work (window:
    band width; LSH: mean block width; hybrid: the larger) into heads with work >= t, launched with
    ``cfg`` updated by the wide entry's tile keys, and the rest with ``cfg`` (the narrow heads' short key
    loops and the wide heads' long ones want different tiles). ``group`` > 0: KV heads of ``group`` query
    heads (the dK/dV kernel; a KV head is as wide as its widest query head); 0: query heads. ``reads``:
    the config keys of this kernel (``FWD_KEYS``, ``DKDV_KEYS``, ``DQ_KEYS``); a wide entry that sets none
    of them leaves one launch (None: any wide entry splits).

    The split reads the plan's work on the host once per plan and threshold (cached in the plan): a call
    with this option is CUDA-graph capturable only after a first call outside the capture."""
    wide = cfg.get("wide")
    if wide and reads is not None and not any(k in reads for k in wide):  # tiles of another kernel: one launch
        wide = None
    if not wide:
        return [(plan.order if group == 0 else plan.kv_order(group), cfg)]
    if "min_work" not in wide:
        raise ValueError(f"config['wide'] needs 'min_work' (the work threshold of a wide head), got {wide!r}")
    key = (float(wide["min_work"]), group)
    if key not in plan.by_width:
        work = plan.work.detach().float().cpu().reshape(-1, max(group, 1)).amax(1)
        order = torch.argsort(work, descending=True, stable=True)
        n_wide = int((work[order] >= key[0]).sum())
        plan.by_width[key] = [part.to(device=plan.order.device, dtype=torch.int32)
                              for part in (order[:n_wide], order[n_wide:])]
    narrow_cfg = {k: v for k, v in cfg.items() if k != "wide"}
    return [(order, c) for order, c in zip(plan.by_width[key], (wide_config(cfg), narrow_cfg)) if order.numel()]


def wide_config(cfg: dict) -> dict:
    """The config of the wide heads' launches: ``cfg`` without its "wide" entry, updated by that entry's tile keys."""
    return dict({k: v for k, v in cfg.items() if k != "wide"},
                **{k: v for k, v in cfg["wide"].items() if k != "min_work"})


_PLANS: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64


def grid_span(nk: int) -> int:
    """The span of positions a grid plan for Nk keys is normalised to (``GRID_SPAN``)."""
    return max(GRID_SPAN, triton.next_power_of_2(nk))


def build_plan(spec: AttentionSpec, nk: int, device: torch.device, reach: int | None = None) -> Plan:
    """The device arrays of ``spec`` in a form that serves every key count the plan's ``span`` covers
    (widths capped at ``WIDTH_CAP``, grid scalars normalised to ``grid_span(nk)``); only the cut scheme's
    per-position block bounds are built for Nk itself. ``spec.window`` may hold widths >= Nk (the
    length-free widths of ``poslsh.attention.plan``). Host syncs: none but the lazy ``reach`` of an LSH
    plan (one, on first use), unless the caller gives ``reach`` (known on the host: no device read)."""
    h = spec.num_heads
    dummy_i = torch.zeros(1, dtype=torch.int32, device=device)
    rule = spec.rule
    method = rule.kernel_id
    slope2 = (spec.slopes.detach().to(torch.float64) * LOG2E).to(device=device, dtype=torch.float32)
    win = torch.zeros(h, dtype=torch.int32, device=device)
    if spec.window is not None:  # widths may exceed Nk (a plan's length-free widths): capped, never re-capped
        win = spec.window.clamp(max=WIDTH_CAP).to(device=device, dtype=torch.int32)
    win_r = win if spec.window_right is None else spec.window_right.clamp(max=WIDTH_CAP).to(device=device,
                                                                                          dtype=torch.int32)
    parts = spec.partitions
    if not rule.collisions:
        left = spec.window.clamp(max=WIDTH_CAP) if spec.window is not None else torch.full((h,), WIDTH_CAP)
        right = (torch.zeros_like(left) if spec.causal
                 else left if spec.window_right is None else spec.window_right.clamp(max=WIDTH_CAP))
        work = (left + right).to(torch.float32)
        reach = int((left + right).max()) + 1
        return Plan(method, 1, False, dummy_i, dummy_i, dummy_i, dummy_i, slope2, win, win_r,
                    torch.argsort(work, descending=True, stable=True).to(device=device, dtype=torch.int32),
                    work.to(device), _reach=reach)
    if parts.scheme == "grid":
        span = grid_span(nk)
        W, U = normalize_grid(parts.widths.to(device), parts.offsets.to(device), span)
        S = E = dummy_i
        work = W.float().mean(dim=1)
        reach_fn = lambda: int(W.max()) * (1 if spec.causal else 2)  # noqa: E731 - one host sync, on demand
    else:
        span = nk
        start, end = parts.to(device).block_bounds()
        S, E = start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()
        W = U = dummy_i
        work = (E - S).float().mean(dim=(1, 2))
        reach_fn = lambda: int((E - S).max()) * (1 if spec.causal else 2)  # noqa: E731
    r = parts.num_samples
    if rule.near_far:
        work = torch.maximum(work, win.float())  # the near field is visited too
        lsh_reach = reach_fn
        near = int(spec.window.clamp(max=WIDTH_CAP).max()) * (1 if spec.causal else 2)
        reach_fn = lambda: max(lsh_reach(), near)  # noqa: E731
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    return Plan(method, r, parts.scheme == "cut", W, U, S, E, slope2, win, win_r, order, work, reach_fn, reach, span)


def plan_for(spec: AttentionSpec, nk: int, device: torch.device) -> Plan:
    """The cached ``Plan`` of a spec: a model's layers and decode steps reuse it (no host -> device
    copies of slopes and widths per call). Keyed by content (slopes, widths, method, causality, the
    plan's span) and by the identity and version of the partitions' tensors, so a changed input is never
    served stale."""
    parts = spec.partitions
    pkey = None
    if parts is not None:
        tensors = (parts.widths, parts.offsets, parts.cut_positions, parts.cut_pointers)
        pkey = (parts.scheme,) + tuple(None if t is None else version_key(t) or "untracked" for t in tensors)
    # The key count only where the plan depends on it (``Plan.span``): a decode step's new length hits.
    span = None if parts is None else nk if parts.scheme == "cut" else grid_span(nk)
    key = (spec.method, spec.causal, span, str(device), tuple(spec.slopes.tolist()),
           None if spec.window is None else tuple(spec.window.tolist()),
           None if spec.window_right is None else tuple(spec.window_right.tolist()), pkey)
    if pkey is not None and "untracked" in pkey:  # inference tensors: no version to recognise them by
        return build_plan(spec, nk, device)
    hit = _PLANS.get(key)
    if hit is not None and (hit[0] is None or hit[0]() is parts):
        _PLANS.move_to_end(key)
        return hit[1]
    plan = build_plan(spec, nk, device)
    _PLANS[key] = (None if parts is None else weakref.ref(parts), plan)
    while len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


# --------------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------------

# Decoding (at most DECODE_ROWS query rows, the speed table's decode regime too) runs with BLOCK_M = 16
# and a split key range.


def _load_tuned() -> dict:
    try:
        return json.loads(TUNED_PATH.read_text()).get("configs", {})
    except (OSError, ValueError):
        return {}


_TUNED = _load_tuned()


def set_tuned(configs: dict[str, dict]) -> None:
    """Make ``configs`` (keys "method/prefill|decode/dtype/dD") this process's defaults (the benchmark
    does so after its sweep)."""
    _TUNED.update({k: dict(v) for k, v in configs.items()})
    _CALL_CONFIGS.clear()


def write_tuned(path: Path, configs: dict[str, dict], provenance: dict) -> None:
    """Write the measured table in the format ``tuned.json`` is read in."""
    Path(path).write_text(json.dumps({"provenance": provenance, "configs": configs}, indent=1, sort_keys=True) + "\n")


HOPPER_SHARED = 232448  # bytes of shared memory a program may take on an H100/H200 (227 KB)
SHARED_SCRATCH = 2048  # beyond the tiles: Triton's reduction scratch (1 KB seen in the dK/dV kernel)


def default_config(method: str, dtype: torch.dtype, head_dim: int, device_type: str = "cuda",
                   decode: bool = False, shared_limit: int = HOPPER_SHARED) -> dict[str, int]:
    """Tile sizes and launch parameters: the measured table ``tuned.json`` (written by ``poslsh bench``
    on an H200) where it has the case, else these defaults; on CUDA shrunk until every kernel's shared
    memory fits ``shared_limit`` bytes (``fit_shared_memory``; ``shared_limit_of`` a device)."""
    if device_type != "cuda":  # the interpreter: small tiles give many boundary/interior cases
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1,
                    BWD_BLOCK_M=16, BWD_BLOCK_N=16, bwd_num_warps=4, bwd_num_stages=1)
    return fit_shared_memory(_cuda_config(method, dtype, head_dim, decode), head_dim, dtype, shared_limit)


def _cuda_config(method: str, dtype: torch.dtype, head_dim: int, decode: bool) -> dict[str, int]:
    key = f"{method}/{'decode' if decode else 'prefill'}/{str(dtype).removeprefix('torch.')}/d{head_dim}"
    if key in _TUNED:
        return dict(_TUNED[key])
    if decode:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2,
                    BWD_BLOCK_M=16, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2,
                    BWD_BLOCK_M=32, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)
    rule = method_rule(method)
    if rule.collisions:
        # per-element counts dominate: 16-key tiles compute the fewest pairs past the block edges
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=4, num_stages=3,
                    BWD_BLOCK_M=64, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)
    if rule.all_exact:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3,
                    BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3,
                BWD_BLOCK_M=64, BWD_BLOCK_N=32, bwd_num_warps=4, bwd_num_stages=2)


def shared_bytes(cfg: dict, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Shared memory of each kernel of ``cfg``, bytes, at least what Triton allocates on sm_90a: the
    forward's tiles (q tile plus num_stages k and v tiles; exact), the backward's an upper bound (dK/dV: its k and v
    tiles plus at least 2 stages of q and dO tiles; dQ: its q and dO tiles plus the stages of k and v);
    measured against Triton 3.6's allocation for head dims 128, 160 and 256 (tests/test_triton_sass.py)."""
    bd, e = max(16, triton.next_power_of_2(head_dim)), dtype.itemsize
    dq_m, dq_n = cfg.get("DQ_BLOCK_M", cfg["BWD_BLOCK_M"]), cfg.get("DQ_BLOCK_N", cfg["BWD_BLOCK_N"])
    dq_stages = cfg.get("dq_num_stages", cfg["bwd_num_stages"])
    return {"fwd": e * bd * (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) + SHARED_SCRATCH,
            "dkdv": e * bd * (2 * cfg["BWD_BLOCK_N"] + 2 * max(cfg["bwd_num_stages"], 2) * cfg["BWD_BLOCK_M"])
            + SHARED_SCRATCH,
            "dq": e * bd * (2 * dq_m + 2 * max(dq_stages, 2) * dq_n) + SHARED_SCRATCH}


def fit_shared_memory(cfg: dict, head_dim: int, dtype: torch.dtype, limit: int) -> dict:
    """``cfg`` with its tiles shrunk until each kernel's shared memory (``shared_bytes``) is at most
    ``limit``: fewer pipeline stages first (down to 2), then narrower key tiles, then fewer query rows (down
    to 16; 4 warps). The tuned head dims (64, 128) fit an H100's; without this, head dims above 128 asked
    for up to 256 KB and Triton refused the launch (OutOfResources, the GPU conformance run)."""
    cfg = dict(cfg)
    for kernel, (rows, keys, stages, warps) in {
            "fwd": ("BLOCK_M", "BLOCK_N", "num_stages", "num_warps"),
            "dkdv": ("BWD_BLOCK_M", "BWD_BLOCK_N", "bwd_num_stages", "bwd_num_warps"),
            "dq": ("DQ_BLOCK_M", "DQ_BLOCK_N", "dq_num_stages", "dq_num_warps")}.items():
        if kernel == "dq" and shared_bytes(cfg, head_dim, dtype)["dq"] > limit:  # its own keys from here on
            for own, shared in zip((rows, keys, stages, warps), ("BWD_BLOCK_M", "BWD_BLOCK_N", "bwd_num_stages",
                                                                 "bwd_num_warps")):
                cfg.setdefault(own, cfg[shared])
        # the dQ kernel's key tiles are its inner loop (its stages' tiles), dK/dV's its query tiles
        inner, outer = (rows, keys) if kernel == "dkdv" else (keys, rows)
        while shared_bytes(cfg, head_dim, dtype)[kernel] > limit:
            if cfg.get(stages, 1) > 2:
                cfg[stages] -= 1
            elif cfg.get(inner, 16) > 16:
                cfg[inner] //= 2
            elif cfg.get(outer, 16) > 16:
                cfg[outer] //= 2
                cfg[warps] = min(cfg.get(warps, 4), 4)
            else:
                break  # the smallest tiles: Triton reports what it cannot fit
    wide = cfg.get("wide")
    if isinstance(wide, dict):  # the wide heads' launches have their own tiles: fitted the same way
        fitted = fit_shared_memory(wide_config(cfg), head_dim, dtype, limit)
        cfg["wide"] = dict(wide, **{k: fitted[k] for k in TILE_KEYS
                                    if k in fitted and (k in wide or fitted[k] != cfg.get(k))})
    return cfg


@functools.lru_cache(maxsize=16)
def shared_limit_of(device: torch.device) -> int:
    """The shared memory one program may take on ``device`` (opt-in), bytes; an H100's where torch does
    not report it."""
    if device.type != "cuda":
        return HOPPER_SHARED
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or HOPPER_SHARED)


_CALL_CONFIGS: OrderedDict = OrderedDict()


def _check_config(config: dict) -> None:
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; the kernels take {sorted(CONFIG_KEYS)}")
    wide = config.get("wide")
    if wide is None:
        return
    if not isinstance(wide, dict) or "min_work" not in wide:
        raise ValueError(f"config['wide'] must be a dict with 'min_work' (the work threshold of a wide head) and "
                         f"tile keys, got {wide!r}")
    if set(wide) - TILE_KEYS - {"min_work"}:
        raise ValueError(f"config['wide']: unknown keys {sorted(set(wide) - TILE_KEYS - {'min_work'})}; it takes "
                         f"'min_work' and {sorted(TILE_KEYS)}")


def _call_config(method: str, dtype: torch.dtype, head_dim: int, device: torch.device, decode: bool,
                 config: dict | None) -> dict:
    """``default_config`` for ``device`` updated by ``config``, one dict per distinct content (not to be
    modified): the forward's recipes know a config by its identity (``_recipe``), so equal calls find theirs."""
    frozen = None if not config else tuple(sorted(
        (name, tuple(sorted(value.items())) if isinstance(value, dict) else value) for name, value in config.items()))
    key = (method, dtype, head_dim, device, decode, frozen)
    cfg = _CALL_CONFIGS.get(key)
    if cfg is None:
        _check_config(config or {})
        cfg = _CALL_CONFIGS[key] = default_config(method, dtype, head_dim, device.type, decode,
                                                  shared_limit_of(device))
        cfg.update(config or {})
        while len(_CALL_CONFIGS) > 64:
            _CALL_CONFIGS.popitem(last=False)
    return cfg


def _float_positions(nk: int, cfg: dict[str, Any]) -> bool:
    """Positions and block bounds as float32 (block starts by reciprocal, compares on the FP32 pipe)
    when every position + offset < 2^24 is exact; ``config={"float_positions": False}`` forces the
    integer path, which longer sequences take (tests run it at small sizes)."""
    return 2 * nk < 2**24 and bool(cfg.get("float_positions", True))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv on ints, without its constexpr wrapper (microseconds per host call)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# Split-key decoding: programs for SPLIT_WAVES waves of the multiprocessors (2 waves, session 5's choice,
# left a third of an H100 idle in a 256K exact decode's last wave: 288 programs on 132), each split at
# least SPLIT_MIN_TILES key tiles; ``config={"split_waves": w}`` overrides.
SPLIT_WAVES = 8
SPLIT_MIN_TILES = 4


def _splits(plan: Plan, b: int, h: int, nq: int, nk: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, key tiles per split) for the forward: split the key range only when the query tiles
    alone cannot fill the GPU (decoding, short chunks against a long cache). Sized by the keys a
    query reaches (``min(plan.reach, Nk)``), not by the cache length."""
    forced = cfg.get("splits")
    if forced is None and nq > DECODE_ROWS:
        return 1, 0
    block_m = cfg["BLOCK_M"]
    tiles = -(-(min(plan.reach, nk) + block_m) // cfg["BLOCK_N"]) + 1  # (_cdiv inlined: a decode step's host time)
    if forced is not None:
        want = int(forced)
    else:  # enough programs for several waves, so the last, partial wave idles few multiprocessors
        programs = -(-nq // block_m) * b * h
        want = -(-cfg.get("split_waves", SPLIT_WAVES) * _multiprocessors(device) // programs)
    want = max(1, min(want, tiles // SPLIT_MIN_TILES, 128))
    if want == 1:
        return 1, 0
    per = -(-tiles // want)
    return -(-tiles // per), per


# --------------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------------


def _launch_key(tensors: tuple, ints: tuple) -> tuple:
    """What Triton's JIT may specialise launch arguments on, or finer: a tensor's 16-byte alignment; an
    int's ``== 1``, divisibility by 16 and width (int32 or not: the value itself, in a tuple, outside
    2..2^31-1, where ints are rare). The caller names only the arguments that vary between launches of one ``Launcher``:
    its recipe fixes the dtypes (q's, which k and v share) and the allocations it makes (aligned), and
    ``forward.DECODE_VARYING`` are not specialised (int32 below ``MAX_KEYS``). (Floats the JIT does not
    specialise on; a launch's floats are among its fixed arguments.)"""
    return tuple([t.data_ptr() % 16 == 0 for t in tensors] + [x % 16 == 0 if 1 < x < 2**31 else (x,) for x in ints])


PREBOUND = True


def prebound() -> bool:
    """Whether launches reuse compiled kernels: ``PREBOUND`` (module attribute; False sends every launch
    through the JIT: the comparison in ``bench/host_overhead.py`` and the tests) and compiled kernels
    (the interpreter has none)."""
    return PREBOUND and not interpreting()


class Launcher:
    """One launch of a Triton kernel whose grid, constexprs and compile options are fixed (one of a
    ``ForwardRecipe``'s), at the cost of its compiled launcher, not of the JIT's dispatch.

    ``launcher(args, key)`` launches ``kernel[grid](*args, *constexprs)``. ``key`` is ``_launch_key`` of
    the arguments that may change between its launches (the caller fixes the others: the same values at
    every launch) and the current device, or None: through the JIT (``prebound()`` is False). The first
    launch of each key goes through the JIT (which compiles or finds the kernel and returns it); later
    ones call that compiled kernel directly, as Triton's fused-softmax tutorial does. With the fixed
    arguments the key is at least as fine as the JIT's specialisation, so a launch never takes a kernel
    compiled for another device, alignment or constant."""

    def __init__(self, kernel, grid: tuple[int, int], constexprs: tuple, options: dict) -> None:
        self.kernel, self.grid, self.constexprs, self.options = kernel, (grid[0], grid[1], 1), constexprs, options
        self.compiled: dict = {}

    def __call__(self, args: tuple, key: tuple | None) -> None:
        if key is None:
            self.jit(args)
            return
        run = self.compiled.get(key)
        if run is None:
            self.compiled[key] = self.jit(args)[self.grid]  # the compiled kernel's runner for this grid
        else:
            run(*args, *self.constexprs)

    def jit(self, args: tuple):
        """Launch through the JIT; returns the compiled kernel."""
        names = self.kernel.arg_names[len(args):]
        return self.kernel[self.grid](*args, **dict(zip(names, self.constexprs)), **self.options)


_UNREAD: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # one-element stand-ins for unread arguments


def _unread(device: torch.device, dtype: torch.dtype) -> Tensor:
    """A one-element tensor for a kernel argument the launch does not read (no mask, no tickets),
    allocated once per device and dtype."""
    if (device, dtype) not in _UNREAD:
        _UNREAD[device, dtype] = torch.zeros(1, dtype=dtype, device=device)
    return _UNREAD[device, dtype]


def _kpm_arg(kpm: Tensor | None, device: torch.device) -> tuple[Tensor, int]:
    """The mask as int8 rows: a view of a bool mask whose keys are contiguous (no copy, no allocation
    per call), else a copy; without a mask a placeholder (``_unread``)."""
    if kpm is None:
        return _unread(device, torch.int8), 0
    if kpm.dtype == torch.bool and kpm.stride(-1) == 1 and kpm.device == device:
        k8 = kpm.view(torch.int8)
    else:
        k8 = kpm.to(device=device, dtype=torch.int8).contiguous()
    return k8, k8.stride(0)


@dataclass(eq=False)
class ForwardRecipe:
    """The forward's launches for one call shape, built once, so that a decoding step fills in only the
    arguments its growing cache changes.

    Fixed, with the recipe's key (``_recipe``): the plan (which holds its recipes), the config dict (by
    identity: ``AttentionPlan`` keeps one per dtype, head dim and regime), causality, the scale, q's shape,
    strides and dtype, the KV heads, the mask's presence, the split count and the position arithmetic
    (``_float_positions``); and what they determine: each launch's grid, constexprs and compile options
    (a ``Launcher`` per head group), the plan's arrays with the group's head order, q's and the outputs'
    strides (``empty_like(q)`` lays out alike for alike q), the sizes, the scalars and the split tickets.
    Per call (``_fwd``): the tensors (q, k, v, mask, outputs, partials), k's and v's strides (a cache grown
    by concatenation changes them), the mask's row stride, Nk, q_offset and the key tiles per split.

    Attributes:
        cfg: the config it was built for; splits: split-key programs per query tile (1: none).
        groups: [(Launcher, (W, U, S, E, order, slope2, win, win_r), kv_tile)], one per head group; kv_tile: the
            block shape of its K and V tensor descriptors ([1, 1, BLOCK_N, BLOCK_D]) when it reads them by TMA
            (the config's ``tma`` and ``tma_ready`` k and v), else None.
        q_strides: of q (B, H, Nq); out_strides: of what each program writes (split, B, H, Nq): the
            partials with splits, else the output; final_strides: of the output (B, H, Nq).
        sizes: (B, H, Nq); scalars: (query heads per KV head, scale * log2(e), log2(r)).
        partials, partial_lses: the split partials, fp32 out [splits, B, H, Nq, BLOCK_D] and their LSEs
            [splits, B, H, Nq], views of one plan buffer (``Plan.partials``); None without splits.
        tickets: int32 [query tiles x B x H], zero between launches, with which the last split program
            of a query tile knows it is last and merges (``forward._merge_splits``); None without splits.
            The plan's (``Plan.tickets``), shared by its launches of one grid size: those must not run
            concurrently (on two streams at once).
    """

    cfg: dict
    splits: int
    groups: list
    q_strides: tuple
    out_strides: tuple
    final_strides: tuple
    sizes: tuple
    scalars: tuple
    partials: Tensor | None
    partial_lses: Tensor | None
    tickets: Tensor | None

    @classmethod
    def build(cls, plan: Plan, q: Tensor, k: Tensor, o: Tensor, has_kpm: bool, causal: bool, scale: float,
              cfg: dict, splits: int, nk: int, tma: bool = False) -> "ForwardRecipe":
        B, H, Nq, D = q.shape
        bd = max(16, triton.next_power_of_2(D))
        partials = partial_lses = tickets = None
        if splits > 1:  # normalised fp32 partials [splits, B, H, Nq, BLOCK_D] (contiguous), then their LSEs
            size, lse_start = splits * B * H * Nq * (bd + 1), splits * B * H * Nq * bd  # (16-byte aligned LSEs)
            buffer = plan.partials.get((q.device, size))
            if buffer is None:
                buffer = plan.partials[q.device, size] = torch.empty(size, dtype=torch.float32, device=q.device)
            partials, partial_lses = buffer[:lse_start], buffer[lse_start:]
            out_strides = (B * H * Nq * bd, H * Nq * bd, Nq * bd, bd)
        else:
            out_strides = (0,) + o.stride()[:3]
        groups = []
        # One launch per group of heads (``head_groups``: one group, every head, unless the config's "wide"
        # gives wide heads their own tiles); a group's programs take their heads from its order.
        for order, sub in (head_groups(plan, cfg, reads=FWD_KEYS) if splits == 1 else [(plan.order, cfg)]):
            bm = sub["BLOCK_M"]
            options = dict(num_warps=sub["num_warps"], num_stages=sub["num_stages"], **COMPILE_OPTIONS)
            if sub.get("maxnreg"):  # a register cap: more programs per multiprocessor, spills outside the key loops
                options["maxnreg"] = sub["maxnreg"]
            constexprs = (plan.method, plan.r, plan.cut, causal, D, bd, bm, sub["BLOCK_N"], _prec(q.dtype),
                          _float_positions(nk, sub), has_kpm, splits > 1, tma)
            launcher = Launcher(_fwd_kernel, (_cdiv(Nq, bm) * B * order.numel(), splits), constexprs, options)
            groups.append((launcher, (plan.W, plan.U, plan.S, plan.E, order, plan.slope2, plan.win, plan.win_r),
                           [1, 1, sub["BLOCK_N"], bd] if tma else None))
        if splits > 1:  # one per program of grid axis 0 (one head group with splits), the plan's
            count = groups[0][0].grid[0]
            tickets = plan.tickets.get((q.device, count))
            if tickets is None:
                tickets = plan.tickets[q.device, count] = torch.zeros(count, dtype=torch.int32, device=q.device)
        return cls(cfg, splits, groups, q.stride()[:3], out_strides, o.stride()[:3], (B, H, Nq),
                   (H // k.shape[1], scale * LOG2E, math.log2(plan.r)), partials, partial_lses, tickets)


_RECIPES_PER_PLAN = 16


def _recipe(plan: Plan, q: Tensor, k: Tensor, o: Tensor, has_kpm: bool, causal: bool, scale: float, cfg: dict,
            splits: int, nk: int, tma: bool) -> ForwardRecipe:
    """The plan's recipe of this call shape (``ForwardRecipe``), built on its first call; with
    ``PREBOUND = False`` one built afresh (the plain path the cached recipes are held to)."""
    if not PREBOUND:
        return ForwardRecipe.build(plan, q, k, o, has_kpm, causal, scale, cfg, splits, nk, tma)
    key = (id(cfg), splits, 2 * nk < 2**24, q.shape, q.stride(), q.dtype, k.shape[1], has_kpm, causal, scale, tma)
    recipe = plan.recipes.get(key)
    if recipe is None or recipe.cfg is not cfg:  # (it holds its cfg alive, so the id is that dict's)
        recipe = plan.recipes[key] = ForwardRecipe.build(plan, q, k, o, has_kpm, causal, scale, cfg, splits, nk, tma)
        while len(plan.recipes) > _RECIPES_PER_PLAN:
            del plan.recipes[next(iter(plan.recipes))]
    return recipe


def _fwd(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, plan: Plan, causal: bool, scale: float,
         q_offset: int, cfg: dict) -> tuple[Tensor, Tensor]:
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    splits, per = _splits(plan, B, H, Nq, Nk, cfg, q.device)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    tma = bool(cfg.get("tma")) and tma_ready(k) and tma_ready(v)
    recipe = _recipe(plan, q, k, o, kpm is not None, causal, scale, cfg, splits, Nk, tma)
    kpm8, kpm_stride = _kpm_arg(kpm, q.device)
    if splits > 1:  # the programs write the split partials, each query tile's last program merges them
        tensors = (q, k, v, recipe.partials, recipe.partial_lses, o, lse, recipe.tickets, kpm8)
    else:
        tensors = (q, k, v, o, lse, o, lse, _unread(q.device, torch.int32), kpm8)
    kv_strides = k.stride()[:3] + v.stride()[:3]
    tail = recipe.final_strides + (kpm_stride,) + recipe.sizes + (Nk, q_offset) + recipe.scalars + (per,)
    key = None  # one key for the call's launches: what varies in any (``_launch_key``), and the device
    if prebound():
        key = _launch_key((q, k, v, kpm8), kv_strides + (kpm_stride,)) + (torch.cuda.current_device(),)
    for launcher, plan_arrays, kv_tile in recipe.groups:  # the kernel's parameters, in order
        if kv_tile is not None:  # descriptors in k's and v's place (built per call: they hold the pointers)
            tensors = (q, TensorDescriptor.from_tensor(k, kv_tile), TensorDescriptor.from_tensor(v, kv_tile)) \
                + tensors[3:]
        launcher(tensors + plan_arrays + recipe.q_strides + kv_strides + recipe.out_strides + tail, key)
    return o, lse


def tma_ready(t: Tensor) -> bool:
    """Whether the copy engine (TMA) can read ``t`` [B, H, N, D] through a tensor descriptor: a Hopper or later
    GPU (or the interpreter), unit last stride, 16-byte aligned base and other strides."""
    if not interpreting() and not (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9):
        return False
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in t.stride()[:-1])


def _delta(do: Tensor, o: Tensor, dlse: Tensor | None, cfg: dict) -> Tensor:
    """delta = rowsum(dO * O) - dLSE, fp32 [B, H, Nq] contiguous: dS = P (dP - delta) (a gradient of the
    LSE adds P * dLSE; the merges of partial results by LSE, ring and split forms, need it).
    ``cfg["delta"]``: "torch" (default; fp32 copies of dO and O), "kernel" (``_bwd_delta_kernel``: dO and
    O read once) or "dq" (computed by the dQ kernel, ``_bwd``; here, where no dQ kernel runs: "kernel")."""
    how = cfg.get("delta", "torch")
    if how == "dq":
        how = "kernel"
    if how == "torch":
        delta = (do.float() * o.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        return delta.contiguous()
    if how != "kernel":
        raise ValueError(f"config['delta'] must be 'torch', 'kernel' or 'dq', got {how!r}")
    B, H, Nq, D = o.shape
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=o.device)
    dl = delta if dlse is None else dlse.float().contiguous()
    block_r = 64
    _bwd_delta_kernel[(triton.cdiv(Nq, block_r) * B * H,)](
        o, do, dl, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), H, Nq,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_R=block_r, HAS_DLSE=dlse is not None,
        num_warps=4, **COMPILE_OPTIONS)
    return delta


def _bwd(do: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
         kpm: Tensor | None, plan: Plan, causal: bool, scale: float, q_offset: int,
         cfg: dict) -> tuple[Tensor, Tensor, Tensor]:
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta_in_dq = cfg.get("delta") == "dq"
    if delta_in_dq:  # [B, H, Nq] fp32, written by the dQ kernels (launched before the dK/dV kernels)
        delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
        dl = delta if dlse is None else dlse.float().contiguous()
    else:
        delta = dl = _delta(do, o, dlse, cfg)  # [B, H, Nq] fp32
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    kpm8, kpm_stride = _kpm_arg(kpm, q.device)
    bd = max(16, triton.next_power_of_2(D))
    # bwd_tma: the loop's tiles by tensor descriptors (dK/dV: Q and dO; dQ: K and V), built per head group's tiles
    tma = bool(cfg.get("bwd_tma")) and all(tma_ready(t) for t in (q, k, v, do))

    def by_tma(t: Tensor, rows: int):
        return TensorDescriptor.from_tensor(t, [1, 1, rows, bd]) if tma else t

    dq = torch.empty_like(q)
    # dQ first: with config delta "dq" its kernels write the delta the dK/dV kernels read
    for order, sub in head_groups(plan, cfg, reads=DQ_KEYS):
        # The dQ kernel has its own tiles (defaults: the dK/dV kernel's): its MMAs have M = query rows, so a
        # 128-row tile takes Hopper's warpgroup MMA where the dK/dV kernel wants a 64-key M.
        bm, bn = sub.get("DQ_BLOCK_M", sub["BWD_BLOCK_M"]), sub.get("DQ_BLOCK_N", sub["BWD_BLOCK_N"])
        _bwd_dq_kernel[(triton.cdiv(Nq, bm) * B * order.numel(),)](
            q, by_tma(k, bn), by_tma(v, bn), do, lse, delta, o, dl, dq, kpm8, plan.W, plan.U, plan.S, plan.E, order,
            plan.slope2, plan.win, plan.win_r,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            o.stride(0), o.stride(1), o.stride(2), dq.stride(0), dq.stride(1), dq.stride(2), kpm_stride,
            B, H, Nq, Nk, q_offset, group, scale * LOG2E, math.log2(plan.r), scale,
            METHOD=plan.method, R=plan.r, CUT=plan.cut, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=bd,
            BLOCK_M=bm, BLOCK_N=bn, PREC=_prec(q.dtype), FDIV=_float_positions(Nk, sub),
            HAS_KPM=kpm is not None, DELTA_HERE=delta_in_dq, HAS_DLSE=delta_in_dq and dlse is not None,
            TMA=tma,
            num_warps=sub.get("dq_num_warps", sub["bwd_num_warps"]),
            num_stages=sub.get("dq_num_stages", sub["bwd_num_stages"]), **COMPILE_OPTIONS)
    for order, sub in head_groups(plan, cfg, group, DKDV_KEYS):
        bm, bn = sub["BWD_BLOCK_M"], sub["BWD_BLOCK_N"]
        _bwd_dkdv_kernel[(triton.cdiv(Nk, bn) * B * order.numel(),)](
            by_tma(q, bm), k, v, by_tma(do, bm), lse, delta, dk, dv, kpm8, plan.W, plan.U, plan.S, plan.E, order,
            plan.slope2, plan.win, plan.win_r,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), kpm_stride,
            B, H, Hkv, Nq, Nk, q_offset, group, scale * LOG2E, math.log2(plan.r), scale,
            METHOD=plan.method, R=plan.r, CUT=plan.cut, CAUSAL=causal, HEAD_DIM=D, BLOCK_D=bd,
            BLOCK_M=bm, BLOCK_N=bn, PREC=_prec(q.dtype), FDIV=_float_positions(Nk, sub),
            HAS_KPM=kpm is not None, TMA=tma,
            num_warps=sub["bwd_num_warps"], num_stages=sub["bwd_num_stages"], **COMPILE_OPTIONS)
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    """autograd.Function over the kernels: forward returns (out, lse), both differentiable."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, plan: Plan, causal: bool,
                scale: float, q_offset: int, cfg: dict) -> tuple[Tensor, Tensor]:
        q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
        o, lse = _fwd(q, k, v, kpm, plan, causal, scale, q_offset, cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.kpm, ctx.plan, ctx.causal, ctx.scale, ctx.q_offset, ctx.cfg = kpm, plan, causal, scale, q_offset, cfg
        return o, lse

    @staticmethod
    def backward(ctx: Any, do: Tensor | None, dlse: Tensor | None):
        q, k, v, o, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = _bwd(do, dlse, q, k, v, o, lse, ctx.kpm, ctx.plan, ctx.causal, ctx.scale, ctx.q_offset,
                          ctx.cfg)
        return dq, dk, dv, None, None, None, None, None, None


def triton_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                     config: dict | None = None) -> tuple[Tensor, Tensor]:
    """Run a resolved spec with the Triton kernels; differentiable in q, k, v.

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv] (fp16, bf16 or fp32, one dtype;
            Dv != D is zero-padded to one head dim).
        spec: from ``poslsh.attention.resolve_spec`` (queries at spec.q_offset .. q_offset + Nq - 1).
        config: overrides of ``default_config`` (tile sizes, warps, stages; ``splits`` forces the
            split-key forward; ``float_positions=False`` the integer position path). Variants, off
            unless given (``bench/kernel_sweep.py`` measures them): ``delta="kernel"`` (the backward's
            rowsum(dO * O) by a kernel, not fp32 copies; ``delta="dq"``: by the dQ kernel, which loads dO
            anyway), ``wide={"min_work": t, <tile keys>}`` (heads whose work reaches t launched apart
            with their own tiles, forward and backward: ``head_groups``),
            ``maxnreg`` (the forward launches' register cap per thread), ``tma`` (the forward reads K
            and V through tensor descriptors, the copy engine's, where ``tma_ready``; else by pointers),
            ``bwd_tma`` (the same for the tiles the backward's loops read: Q and dO in dK/dV, K and V in dQ).
            A key outside ``CONFIG_KEYS`` raises ValueError.

    Returns:
        (out [B, H, Nq, Dv] in q's dtype, lse [B, H, Nq] float32, the natural log of
        sum_j w_ij exp(scale q_i . k_j), w the method's weight).
    """
    B, H, Nq, D = q.shape
    Nk, dv_dim = k.shape[2], v.shape[-1]
    if not 0 <= spec.q_offset <= Nk - Nq:  # the causal tile ranges assume queries inside the keys
        raise ValueError(f"the Triton kernels take q_offset in [0, Nk - Nq] = [0, {Nk - Nq}], got {spec.q_offset}")
    if dv_dim != D:  # one head dim in the kernels: zero-pad (q.k unchanged) and slice the output
        m = max(D, dv_dim)
        pad = lambda x: torch.nn.functional.pad(x, (0, m - x.shape[-1]))  # noqa: E731
        out, lse = triton_attention(pad(q), pad(k), pad(v), spec, config)
        return out[..., :dv_dim], lse
    cfg = _call_config(spec.method, q.dtype, D, q.device, Nq <= DECODE_ROWS, config)
    plan = plan_for(spec, Nk, q.device)
    return run_plan(q, k, v, spec.key_padding_mask, plan, spec.causal, float(spec.scale), int(spec.q_offset), cfg)


def run_plan(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor | None, plan: Plan, causal: bool, scale: float,
             q_offset: int, cfg: dict) -> tuple[Tensor, Tensor]:
    """The kernels on a built plan (``plan.serves(Nk)``; q, k, v as ``triton_attention`` takes them, one
    head dim): the forward alone when no gradient is wanted (no autograd node), else ``TritonAttention``.
    Nothing here reads the device, so a call with static shapes can be captured in a CUDA graph once
    the plan's ``reach`` has been read (any earlier call did)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return TritonAttention.apply(q, k, v, kpm, plan, causal, scale, q_offset, cfg)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    return _fwd(q, k, v, kpm, plan, causal, scale, q_offset, cfg)


def supports_triton(q: Tensor, spec: AttentionSpec) -> bool:
    """Every method (lsh with any kernel's partitions; exact, window and hybrid with ALiBi slopes),
    key padding, fp16/bf16/fp32 on CUDA (or anywhere under TRITON_INTERPRET=1), head dims up to 256,
    positive finite scale, fewer than 2^30 keys."""
    rule = spec.rule
    if not rule.only_collisions and spec.kernels is not None:
        return False
    if rule.collisions and spec.partitions is None:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if q.device.type != "cuda" and not interpreting():
        return False
    if not (math.isfinite(spec.scale) and spec.scale > 0):
        return False
    return q.shape[-1] <= 256 and spec.q_offset + q.shape[2] < MAX_KEYS

