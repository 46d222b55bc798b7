"""Window, lsh and hybrid attention on a sequence shard: exchange the halo, overlap it with the interior.

Per call, on every rank (``HaloPlan`` says what and with whom):

1. post the sends of the key/value slices (and padding mask) that other shards read, and the receives
   of this shard's halo, one ``batch_isend_irecv``;
2. meanwhile compute the *interior* queries, whose every head's reach lies inside the shard, on the
   local keys alone;
3. wait, then compute the *edge* queries against [left halo | local keys | right halo].

Each query is computed in exactly one call over every key it reaches, so no LSE merge is needed: the
outputs are concatenated: no key pair is computed twice, and no backend's LSE needs a gradient. Halo keys of KV heads that do not reach as far
as the widest head are left as zeros: their positional weight is zero, so they are never used (and
never sent).

Autograd: two ``autograd.Function`` s bracket the local work. ``_HaloStart`` (identity on k, v) starts
the forward transfer; its backward waits for the gradients other ranks computed for this shard's
keys and adds them. ``_HaloWait`` returns the received halo; its backward sends the halo's key/value
gradients back to their owners. The engine runs ``_HaloWait``'s backward before the interior's
(it was created later), so the gradient transfer overlaps the interior's backward as well. Every rank
must run the backward (as with DDP): the transfers pair up across ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .exchange import p2p, wait
from .local import LocalCall
from .plan import HaloPlan, Segment

__all__ = ["HaloExchange", "halo_attention"]

Slices = list[tuple[int, int, int]]  # (kv head, lo, hi), global positions


class HaloExchange:
    """The transfers of one call: keys, values and padding mask forward; their gradients backward."""

    def __init__(self, plan: HaloPlan, group, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
        self.plan, self.group = plan, group
        self.b, self.hkv, _, self.d = k.shape
        self.dv = v.shape[-1]
        self.dtype, self.device = k.dtype, k.device
        self.mask = mask
        lo, hi = plan.window
        self.left = plan.start - lo  # halo lengths on either side
        self.right = hi - plan.stop
        self.works: list = []

    # Message layout for a list of slices: every slice's keys [B, len, D], then their values, then the
    # padding mask over the slices' union (one interval: a peer's slices all end at the shard start or
    # all begin at its end) as 0/1 in the key dtype.
    def _numel(self, slices: Slices, with_mask: bool) -> int:
        keys = sum(hi - lo for _, lo, hi in slices) * self.b
        span = max(hi for _, _, hi in slices) - min(lo for _, lo, _ in slices)
        return keys * (self.d + self.dv) + (self.b * span if with_mask else 0)

    def _pack(self, k: Tensor, v: Tensor, mask: Tensor | None, slices: Slices, origin: int) -> Tensor:
        parts = [t[:, g, lo - origin:hi - origin].reshape(-1) for t in (k, v) for g, lo, hi in slices]
        if mask is not None:
            a, b = min(lo for _, lo, _ in slices), max(hi for _, _, hi in slices)
            parts.append(mask[:, a - origin:b - origin].to(k.dtype).reshape(-1))
        return torch.cat(parts)

    def _unpack(self, buf: Tensor, slices: Slices, origin: int, k: Tensor, v: Tensor, mask: Tensor | None,
                add: bool) -> None:
        i = 0
        for t, width in ((k, self.d), (v, self.dv)):
            for g, lo, hi in slices:
                n = (hi - lo) * self.b * width
                piece = buf[i:i + n].view(self.b, hi - lo, width)
                dst = t[:, g, lo - origin:hi - origin]
                dst.add_(piece) if add else dst.copy_(piece)
                i += n
        if mask is not None:
            a, b = min(lo for _, lo, _ in slices), max(hi for _, _, hi in slices)
            mask[:, a - origin:b - origin] = buf[i:i + self.b * (b - a)].view(self.b, b - a) > 0.5

    def _side(self, peer: int) -> tuple[str, int]:
        """Which halo a peer's slices belong to (owners left of this rank fill the left one) and the
        position of that halo's index 0."""
        return ("left", self.plan.window[0]) if peer < self.plan.rank else ("right", self.plan.stop)

    def start_forward(self, k: Tensor, v: Tensor) -> None:
        plan, mask = self.plan, self.mask
        sends = {c: self._pack(k, v, mask, sl, plan.start) for c, sl in plan.send.items()}
        self.recv_bufs = {o: torch.empty(self._numel(sl, mask is not None), dtype=self.dtype, device=self.device)
                          for o, sl in plan.recv.items()}
        self.works = p2p(sends, self.recv_bufs, self.group, "forward")
        self._keep = sends  # alive until the transfer completes

    def finish_forward(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Wait; return the halo (left_k, left_v, right_k, right_v), zeros where nothing was needed; the
        halo's padding mask goes to ``self.left_mask`` / ``self.right_mask``."""
        wait(self.works)
        new = lambda n, w: torch.zeros(self.b, self.hkv, n, w, dtype=self.dtype, device=self.device)  # noqa: E731
        halo = {"left": (new(self.left, self.d), new(self.left, self.dv)),
                "right": (new(self.right, self.d), new(self.right, self.dv))}
        masks = {side: (None if self.mask is None else
                        torch.zeros(self.b, n, dtype=torch.bool, device=self.device))
                 for side, n in (("left", self.left), ("right", self.right))}
        for owner, buf in self.recv_bufs.items():
            side, origin = self._side(owner)
            self._unpack(buf, self.plan.recv[owner], origin, *halo[side], masks[side], add=False)
        self.recv_bufs = self._keep = None
        self.left_mask, self.right_mask = masks["left"], masks["right"]
        return (*halo["left"], *halo["right"])

    def start_backward(self, dlk: Tensor, dlv: Tensor, drk: Tensor, drv: Tensor) -> None:
        plan = self.plan
        grads = {"left": (dlk, dlv), "right": (drk, drv)}
        sends = {}
        for owner, sl in plan.recv.items():
            side, origin = self._side(owner)
            sends[owner] = self._pack(*grads[side], None, sl, origin)
        self.recv_bufs = {c: torch.empty(self._numel(sl, False), dtype=dlk.dtype, device=self.device)
                          for c, sl in plan.send.items()}
        self.works = p2p(sends, self.recv_bufs, self.group, "backward")
        self._keep = sends
        self._backward_started = True

    def finish_backward(self, dk: Tensor, dv: Tensor) -> tuple[Tensor, Tensor]:
        """Wait for the gradients other shards computed for this shard's keys and add them."""
        if not getattr(self, "_backward_started", False):
            # The halo took no part in the loss (autograd skipped _HaloWait): its gradient is zero, but
            # the transfers must still pair up with the other ranks'.
            z = lambda n, w: dk.new_zeros(self.b, self.hkv, n, w)  # noqa: E731
            self.start_backward(z(self.left, self.d), z(self.left, self.dv), z(self.right, self.d),
                                z(self.right, self.dv))
        self._backward_started = False
        wait(self.works)
        # The incoming gradients are fresh tensors of the engine's; a view or a non-contiguous one is
        # copied before the in-place add (a full copy would cost O(shard) memory on every call).
        dk = dk if dk._base is None and dk.is_contiguous() else dk.clone()
        dv = dv if dv._base is None and dv.is_contiguous() else dv.clone()
        for consumer, buf in self.recv_bufs.items():
            self._unpack(buf, self.plan.send[consumer], self.plan.start, dk, dv, None, add=True)
        self.recv_bufs = self._keep = None
        return dk, dv


class _HaloStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, ex: HaloExchange):
        ex.start_forward(k.detach(), v.detach())
        ctx.ex = ex
        return k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dk: Tensor, dv: Tensor):
        dk, dv = ctx.ex.finish_backward(dk, dv)
        return dk, dv, None


class _HaloWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, ex: HaloExchange):  # k, v: only to order the graph
        ctx.ex = ex
        return ex.finish_forward()

    @staticmethod
    def backward(ctx, dlk: Tensor, dlv: Tensor, drk: Tensor, drv: Tensor):
        ctx.ex.start_backward(dlk, dlv, drk, drv)
        return None, None, None


def _cat(pieces: list[Tensor | None], dim: int) -> Tensor | None:
    pieces = [p for p in pieces if p is not None]
    return None if not pieces else (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim))


def _span(left: Tensor | None, local: Tensor | None, right: Tensor | None, seg: Segment, plan: HaloPlan,
          dim: int) -> Tensor | None:
    """The segment's keys [k0, k1) along ``dim``: [left halo part | local part | right halo part]."""
    if local is None:
        return None
    s, e, lo = plan.start, plan.stop, plan.window[0]
    take = lambda t, a, b: t.narrow(dim, a, b - a)  # noqa: E731
    return _cat([take(left, seg.k0 - lo, s - lo) if seg.k0 < s else None,
                 take(local, max(seg.k0, s) - s, min(seg.k1, e) - s),
                 take(right, 0, seg.k1 - e) if seg.k1 > e else None], dim)


def halo_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, plan: HaloPlan, group,
                   call: LocalCall) -> tuple[Tensor, Tensor]:
    """This shard's (out [B, H, n, Dv], lse [B, H, n]) for window / lsh / hybrid attention.

    Args:
        q: [B, H, n, D]; k: [B, Hkv, n, D]; v: [B, Hkv, n, Dv]: the shard [plan.start, plan.stop).
        key_padding_mask: bool [B, n] or None.
        plan: this rank's ``HaloPlan``; group: the process group; call: the method, global parameters.
    """
    s = plan.start
    ex = HaloExchange(plan, group, k, v, key_padding_mask)
    k1, v1 = _HaloStart.apply(k, v, ex)
    kpm = key_padding_mask
    results = {}
    for seg in plan.segments:  # interior first, while the halo is in flight
        if not seg.edge:
            keys = slice(seg.k0 - s, seg.k1 - s)
            results[seg] = call(q[:, :, seg.q0 - s:seg.q1 - s], k1[:, :, keys], v1[:, :, keys],
                                None if kpm is None else kpm[:, keys], seg.q0, seg.k0)
    lk, lv, rk, rv = _HaloWait.apply(k1, v1, ex)
    for seg in plan.segments:
        if seg.edge:
            results[seg] = call(q[:, :, seg.q0 - s:seg.q1 - s], _span(lk, k1, rk, seg, plan, 2),
                                _span(lv, v1, rv, seg, plan, 2), _span(ex.left_mask, kpm, ex.right_mask, seg, plan, 1),
                                seg.q0, seg.k0)
    outs = [results[seg] for seg in plan.segments]
    return _cat([o for o, _ in outs], 2), _cat([lse for _, lse in outs], 2)
