"""Which backend is fastest for a call, as measured on a GPU: ``backend="auto"`` consults this before
the registry's fixed priorities.

``speed_table.json`` (beside this file) is written from a benchmark's JSON by
``poslsh_lab.experiments.gpu_bench.speed_table`` and shipped with the package: per device name, method and
regime ("prefill", or "decode" for at most ``DECODE_ROWS`` query rows), the median forward ms of each
backend at each measured length. A call that needs gradients (training) reads the regime's
"+backward" entry ("prefill+backward": forward and backward ms), where the ranking can differ (Flex's
backward is faster than Triton's for exact attention on an H100), and the forward entry where the table
has no such entry. A call takes the entry at the measured length nearest its key length (in log scale).
Devices, methods or regimes the table lacks fall back to the priorities.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from .registry import forget_public_plans

__all__ = ["measured_order", "regime", "load_table", "TABLE_PATH", "DECODE_ROWS", "BACKWARD"]

TABLE_PATH = Path(__file__).with_name("speed_table.json")
DECODE_ROWS = 16  # at most this many query rows: decoding (the Triton launcher's switch too)
BACKWARD = "+backward"  # suffix of a regime's forward + backward entry


def regime(nq: int, grad: bool = False) -> str:
    """The table's regime of a call with ``nq`` query rows: "prefill" or "decode", + "+backward" when
    the call needs gradients."""
    return ("decode" if nq <= DECODE_ROWS else "prefill") + (BACKWARD if grad else "")


def _load(path: Path = TABLE_PATH) -> dict:
    try:
        return json.loads(Path(path).read_text()).get("devices", {})
    except (OSError, ValueError):
        return {}


_TABLE = _load()


def load_table(path: Path | str = TABLE_PATH) -> None:
    """Consult the table at ``path`` from now on (a benchmark that has just measured and written one asks
    "auto" what it picks by it); the plans of earlier public calls, which chose by the old one, are dropped."""
    global _TABLE
    _TABLE = _load(path)
    forget_public_plans()


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def measured_order(device: torch.device, method: str, nq: int, nk: int, grad: bool = False) -> list[str]:
    """Backend names by measured speed for this call (fastest first); empty when nothing was measured.
    ``grad``: the call needs gradients (its forward + backward entry, else the forward one)."""
    if device.type != "cuda" or not _TABLE:
        return []
    by_method = _TABLE.get(_device_name(device.index if device.index is not None else torch.cuda.current_device()))
    regimes = (by_method or {}).get(method) or {}
    entries = (grad and regimes.get(regime(nq, True))) or regimes.get(regime(nq))
    # Below half the shortest measured length the table says nothing: the registry's priorities decide
    # (a backend measured fastest at 16K, such as cuDNN, which builds a graph for every new shape, is
    # not chosen for short calls on that measurement alone).
    if not entries or 2 * nk < min(int(s) for s in entries):
        return []
    n = min(entries, key=lambda s: abs(math.log(int(s)) - math.log(max(nk, 1))))
    return sorted(entries[n], key=entries[n].get)
