"""Exact ALiBi attention over sequence shards: a ring that rotates keys and values, merged by LSE.

Exact ALiBi reaches every earlier key (every key, bidirectional), so there is no halo: step t of W
gives each rank the keys and values of rank r - t (one isend/irecv to the next rank, overlapped with
the current block's attention), and the per-block (out, lse) are merged by softmax over their LSEs
(``merge_partials``). Bytes sent per rank: (W - 1) times its shard's keys and values, forward; the
backward rotates them again and sends the key/value gradient accumulators W times (in the compute
dtype, float32 for bf16: they sum W contributions).

Why not PyTorch's ``context_parallel``: its SDPA ring refuses an attention bias ("attn_bias is not
supported yet"), so ALiBi cannot be expressed, and its FlexAttention path all-gathers the whole
sequence's keys and values on every rank (O(N) memory and traffic) behind DTensor / DeviceMesh.

Blocks: a rank's query range against one key range, both contiguous, with relative offset
delta = (first query position) - (first key position). The merge needs each block's LSE *with its
gradient*. Diagonal blocks (delta in [0, Nk - Nq], the dispatcher's q_offset range) run through the
dispatcher (``backend="auto"``: on CUDA the Triton kernels, whose LSE carries a gradient; on the CPU
"fused"). Blocks of keys wholly before or after the queries lie outside that range: on CUDA they run
through FlexAttention (its score_mod uses q_idx + q_offset and its block ranges clip to [0, Nk), valid
for any offset), on the CPU through the dense reference (row-chunked to bound memory).

Backward (FlashAttention-style, no per-block state kept from the forward): each block is recomputed
with autograd and given the gradient of the merged result, d out_b = w_b dO and
d lse_b = w_b ((o_b - out) . dO + d lse) with w_b = exp(lse_b - lse).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..attention.core import compute_dtype, merge_partials
from ..attention.reference import reference_attention
from .exchange import p2p, wait
from .local import LocalCall

__all__ = ["exact_block", "RingAttention", "ring_attention"]

# Elements of one dense score chunk of the reference path.
REFERENCE_BUDGET = 1 << 22
KV_TAG, GRAD_TAG = 1, 2


def exact_block(call: LocalCall, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                delta: int) -> tuple[Tensor, Tensor]:
    """Exact ALiBi of queries at key-relative position delta.. against the keys k: (out, lse).

    Args:
        q: [B, H, Nq, D]; k: [B, Hkv, Nk, D]; v: [B, Hkv, Nk, Dv]; mask: bool [B, Nk] or None.
        delta: position of query row 0 minus position of key 0 (any integer).
    """
    nq, nk = q.shape[2], k.shape[2]
    diagonal = 0 <= delta <= nk - nq
    if diagonal and call.backend != "flex":
        return call(q, k, v, mask, delta, 0)
    spec = dataclasses.replace(call.spec(q[:, :, :min(nq, nk)], k, v, mask, 0, 0), q_offset=delta)
    if q.is_cuda and call.backend in ("auto", "flex"):
        from ..attention.flex import flex_attention_spec, supports_flex

        if supports_flex(q, spec):
            return flex_attention_spec(q, k, v, spec)
    if diagonal:  # flex asked for on the CPU
        return dataclasses.replace(call, backend="fused")(q, k, v, mask, delta, 0)
    rows = max(1, REFERENCE_BUDGET // (q.shape[0] * q.shape[1] * nk))
    parts = [reference_attention(q[:, :, i:i + rows], k, v, dataclasses.replace(spec, q_offset=delta + i))
             for i in range(0, nq, rows)]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


@dataclasses.dataclass
class RingAttention:
    """One call's ring: this rank, every rank's (start, stop, local offset) segments, the shapes."""

    rank: int
    segments: list[list[tuple[int, int, int]]]
    group: object
    call: LocalCall
    shape: tuple[int, int, int, int]  # B, Hkv, D, Dv
    dtype: torch.dtype
    device: torch.device
    has_mask: bool

    @property
    def world(self) -> int:
        return len(self.segments)

    def _length(self, r: int) -> int:
        return sum(b - a for a, b, _ in self.segments[r])

    def _numel(self, r: int, grad: bool = False) -> int:
        b, hkv, d, dv = self.shape
        return b * self._length(r) * (hkv * (d + dv) + (self.has_mask and not grad))

    def _pack(self, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        parts = [k.reshape(-1), v.reshape(-1)] + ([mask.to(k.dtype).reshape(-1)] if mask is not None else [])
        return torch.cat(parts)

    def _unpack(self, buf: Tensor, r: int, grad: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        b, hkv, d, dv = self.shape
        n = self._length(r)
        nk, nv = b * hkv * n * d, b * hkv * n * dv
        k, v = buf[:nk].view(b, hkv, n, d), buf[nk:nk + nv].view(b, hkv, n, dv)
        mask = buf[nk + nv:].view(b, n) > 0.5 if self.has_mask and not grad else None
        return k, v, mask

    def _blocks(self, owner: int):
        """(query slice, key slice, delta) of every block of this rank's queries against owner's keys."""
        causal = self.call.causal
        for p0, p1, qo in self.segments[self.rank]:
            for k0, k1, ko in self.segments[owner]:
                if causal and k0 >= p1:  # keys all after the queries
                    continue
                yield slice(qo, qo + p1 - p0), slice(ko, ko + k1 - k0), p0 - k0

    def _rotate(self, cur: Tensor, t: int, phase: str, tag: int) -> tuple[Tensor | None, list]:
        """Send ``cur`` to the next rank and receive the previous rank's (for step t + 1)."""
        if self.world == 1:
            return None, []
        nxt_owner = (self.rank - t - 1) % self.world
        nxt = torch.empty(self._numel(nxt_owner, tag == GRAD_TAG), dtype=cur.dtype, device=cur.device)
        nxt_rank, prev_rank = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        return nxt, p2p({nxt_rank: cur}, {prev_rank: nxt}, self.group, phase, tag)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(out [B, H, n, Dv] in the compute dtype, lse [B, H, n]) without autograd."""
        cdt = compute_dtype(q.dtype)
        cur = self._pack(k, v, mask)
        acc: dict[int, tuple[Tensor, Tensor]] = {}
        for t in range(self.world):
            owner = (self.rank - t) % self.world
            nxt, works = self._rotate(cur, t, "forward", KV_TAG) if t < self.world - 1 else (None, [])
            kb, vb, mb = self._unpack(cur, owner)
            for qs, ks, delta in self._blocks(owner):
                o, lse = exact_block(self.call, q[:, :, qs], kb[:, :, ks], vb[:, :, ks],
                                     None if mb is None else mb[:, ks], delta)
                part = (o.to(cdt), lse)
                acc[qs.start] = part if qs.start not in acc else merge_partials([acc[qs.start], part])
            wait(works)
            cur = cur if nxt is None else nxt
        order = sorted(acc)
        return torch.cat([acc[i][0] for i in order], 2), torch.cat([acc[i][1] for i in order], 2)

    def backward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, lse: Tensor,
                 dout: Tensor, dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        cdt = compute_dtype(q.dtype)
        dout = dout.to(cdt)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        cur = self._pack(k, v, mask)
        acc_in, grad_works = None, []
        for t in range(self.world):
            owner = (self.rank - t) % self.world
            nxt, works = self._rotate(cur, t, "backward", KV_TAG) if t < self.world - 1 else (None, [])
            kb, vb, mb = self._unpack(cur, owner)
            grad = torch.zeros(self._numel(owner, grad=True), dtype=cdt, device=q.device)
            dkb, dvb, _ = self._unpack(grad, owner, grad=True)
            for qs, ks, delta in self._blocks(owner):
                with torch.enable_grad():
                    qq = q[:, :, qs].detach().requires_grad_()
                    kk, vv = kb[:, :, ks].detach().requires_grad_(), vb[:, :, ks].detach().requires_grad_()
                    o, l = exact_block(self.call, qq, kk, vv, None if mb is None else mb[:, ks], delta)
                    w = torch.exp(l - lse[:, :, qs])
                    g_l = (dout[:, :, qs] * (o.to(cdt) - out[:, :, qs])).sum(-1)
                    if dlse is not None:
                        g_l = g_l + dlse[:, :, qs]
                    grads = torch.autograd.grad((o, l), (qq, kk, vv),
                                                ((w[..., None] * dout[:, :, qs]).to(o.dtype), w * g_l),
                                                allow_unused=True)  # e.g. every key padded out
                for acc, g in zip((dq[:, :, qs], dkb[:, :, ks], dvb[:, :, ks]), grads):
                    if g is not None:
                        acc += g
            # The accumulator of owner's key/value gradients arrives from the previous rank (sent at the
            # end of its step t - 1) while this step computes; add this step's part and pass it on.
            wait(grad_works)
            if acc_in is not None:
                grad += acc_in
            acc_in, grad_works = self._rotate(grad, t, "backward", GRAD_TAG)
            wait(works)
            cur = cur if nxt is None else nxt
        wait(grad_works)
        mine = grad if acc_in is None else acc_in  # after W hops the accumulator is back at its owner
        dk, dv, _ = self._unpack(mine, self.rank, grad=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, ring: RingAttention, mask: Tensor | None):
        out, lse = ring.forward(q, k, v, mask)
        ctx.ring, ctx.mask = ring, mask
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.ring.backward(q, k, v, ctx.mask, out, lse, dout, dlse)
        return dq, dk, dv, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, rank: int,
                   segments: list[list[tuple[int, int, int]]], group, call: LocalCall) -> tuple[Tensor, Tensor]:
    """This shard's exact (out [B, H, n, Dv], lse [B, H, n]); ``segments`` from ``layout.rank_segments``."""
    ring = RingAttention(rank, segments, group, call, (k.shape[0], k.shape[1], k.shape[3], v.shape[3]), k.dtype,
                         k.device, key_padding_mask is not None)
    return _Ring.apply(q, k, v, ring, key_padding_mask)
