"""Point-to-point transfers over torch.distributed, with every byte a rank sends counted.

``p2p(sends, recvs, group, phase)`` posts one ``batch_isend_irecv`` (isend/irecv pairs; NCCL groups
them into one launch, gloo runs them as independent async ops) and returns the works to wait on, so
callers overlap computation with the transfer. ``count_traffic()`` collects what this process sent,
split into the forward exchange, the backward exchange (gradients and re-sent keys) and call metadata
(the one small all-gather per call).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Traffic", "count_traffic", "p2p", "wait", "record", "global_rank", "all_gather_ints"]


@dataclass
class Traffic:
    """Bytes this rank sent: ``forward``, ``backward`` and ``metadata`` (collectives), and messages."""

    forward: int = 0
    backward: int = 0
    metadata: int = 0
    messages: int = 0
    peers: set = field(default_factory=set)

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "metadata": self.metadata,
                "messages": self.messages, "peers": sorted(self.peers)}


_active: list[Traffic] = []


@contextlib.contextmanager
def count_traffic():
    """``with count_traffic() as t: ...``: t holds the bytes this process sent inside the block."""
    t = Traffic()
    _active.append(t)
    try:
        yield t
    finally:
        _active.remove(t)


def record(phase: str, nbytes: int, peer: int | None = None) -> None:
    for t in _active:
        setattr(t, phase, getattr(t, phase) + int(nbytes))
        if peer is not None:
            t.messages += 1
            t.peers.add(peer)


def global_rank(group, rank: int) -> int:
    """The default group's rank of ``group``'s rank ``rank`` (what P2POp takes)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def p2p(sends: dict[int, Tensor], recvs: dict[int, Tensor], group, phase: str, tag: int = 0) -> list:
    """Post isends of ``sends[peer]`` and irecvs into ``recvs[peer]`` (group ranks); returns the works.

    Empty tensors are not sent (both sides compute the same sizes, so both skip them). ``tag`` keeps
    two transfers in flight between the same pair apart (gloo matches by tag; NCCL by issue order,
    which is the same on both sides)."""
    ops = []
    for peer, buf in sends.items():
        if buf.numel():
            ops.append(dist.P2POp(dist.isend, buf, global_rank(group, peer), group, tag))
            record(phase, buf.numel() * buf.element_size(), peer)
    for peer, buf in recvs.items():
        if buf.numel():
            ops.append(dist.P2POp(dist.irecv, buf, global_rank(group, peer), group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def wait(works: list) -> None:
    for w in works:
        w.wait()


def all_gather_ints(values: list[int], group, device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (int64, same length on all ranks): one all-gather, counted as metadata."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    # A ring all-gather: each rank forwards the other W - 1 ranks' values.
    record("metadata", mine.numel() * mine.element_size() * (len(out) - 1))
    dist.all_gather(out, mine, group=group)
    return [o.tolist() for o in out]
