"""A CPU stand-in for the ``cudnn`` module of nvidia-cudnn-frontend, for the parts of its graph API the
"cudnn" backend uses: it records the SDPA graphs built, checks each executed variant pack against
the declared tensors (uids, shapes, strides), and computes in float64 what cuDNN's fused SDPA computes,
as the frontend defines it (``test/python/sdpa/fp16_ref.py``, ``include/cudnn_frontend_utils.h``
``get_alibi_slope``, the composite backward in ``node/scaled_dot_product_flash_attention.h``):

* forward: s = scale q.k + m_h (j - i) (row i, column j from the top-left corner), keys j >= seq_len_kv[b]
  and j > i removed (ALiBi is accepted only with ``diagonal_band_right_bound=0``, top-left), rows
  i >= seq_len_q[b] zeroed; stats = max + log(sum exp(s - max)); O = softmax(s) V;
* backward: P = exp(s - stats), delta = rowsum(dO * O) (the only use of O), dS = P (dO V^T - delta),
  dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO, K and V gradients summed over each query group.

So the backend's wiring (variant packs, strides, padding lengths, the LSE's gradient through a
second backward call) is exercised on the CPU; the real library is held to the same oracle on the GPU.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch


def cudnn_alibi_slopes(num_heads: int) -> torch.Tensor:
    """The frontend's ``get_alibi_slope(n_heads)``, transcribed: float32 [H]."""
    n = 1 << int(math.log2(num_heads))
    exps = [float(i + 1) for i in range(n)] + [(i + 1) * 0.5 for i in range(0, 2 * (num_heads - n), 2)]
    return torch.tensor([2.0 ** (e * -8.0 / n) for e in exps], dtype=torch.float32)


class GraphNotSupported(Exception):
    pass


class FakeTensor:
    def __init__(self, uid=None, dim=None, stride=None, data_type=None, name=""):
        self.uid, self.dim, self.stride, self.data_type, self.name = uid, dim, stride, data_type, name
        self.output = False

    def set_uid(self, uid):
        self.uid = uid
        return self

    def set_output(self, flag):
        self.output = flag
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, data_type):
        self.data_type = data_type
        return self


class FakeGraph:
    def __init__(self, fake: "FakeCudnn", io_data_type=None, intermediate_data_type=None, compute_data_type=None,
                 handle=None):
        self.fake, self.io = fake, io_data_type
        self.op = None

    def tensor(self, uid=None, name="", dim=None, stride=None, data_type=None):
        return FakeTensor(uid, list(dim), list(stride), data_type, name)

    def _masking(self, attn_scale, use_alibi_mask=False, diagonal_alignment=None, diagonal_band_right_bound=None,
                 use_padding_mask=False, seq_len_q=None, seq_len_kv=None):
        return dict(scale=attn_scale, alibi=use_alibi_mask, align=diagonal_alignment,
                    right=diagonal_band_right_bound, padding=use_padding_mask, seq_q=seq_len_q, seq_kv=seq_len_kv)

    def sdpa(self, name, q, k, v, generate_stats, **masking):
        self.op = ("fwd", dict(q=q, k=k, v=v), self._masking(**masking))
        self.o, self.stats = FakeTensor(), FakeTensor()
        return self.o, self.stats

    def sdpa_backward(self, name, q, k, v, o, dO, stats, **masking):
        self.op = ("bwd", dict(q=q, k=k, v=v, o=o, do=dO, stats=stats), self._masking(**masking))
        self.grads = FakeTensor(), FakeTensor(), FakeTensor()
        return self.grads

    def validate(self):
        kind, tensors, m = self.op
        if m["alibi"] and not (m["right"] == 0 and m["align"] == "TOP_LEFT"):
            raise GraphNotSupported("When alibi mask is used, diagonal_band_right_bound needs to be set to 0.")
        if m["padding"] and (m["seq_q"] is None or m["seq_kv"] is None):
            raise GraphNotSupported("Padding mask requires seq_len_q and seq_len_kv to be set.")
        if tensors["q"].dim[3] % 8 or tensors["v"].dim[3] % 8:
            raise GraphNotSupported("hidden_dim should be multiple of 8")
        if self.fake.refuse is not None:
            raise GraphNotSupported(self.fake.refuse)
        if kind == "bwd" and self.fake.refuse_backward is not None:
            raise GraphNotSupported(self.fake.refuse_backward)
        self.fake.builds.append(kind)

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        pass

    def check_support(self):
        pass

    def build_plans(self):
        pass

    def get_workspace_size(self):
        return 4 * self.op[1]["q"].dim[1]  # the slopes

    def _bound(self, pack, t: FakeTensor) -> torch.Tensor:
        x = pack[t.uid]
        assert list(x.shape) == t.dim and list(x.stride()) == t.stride, (t.name, t.dim, t.stride, x.shape, x.stride())
        return x

    def execute(self, pack, workspace, handle=None):
        kind, tensors, m = self.op
        assert workspace.numel() >= self.get_workspace_size()
        x = {name: self._bound(pack, t) for name, t in tensors.items()}
        q, k, v = (x[n].double() for n in "qkv")
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        g = h // k.shape[1]
        ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        s = m["scale"] * q @ ke.transpose(-1, -2)
        i = torch.arange(nq, dtype=torch.float64)[:, None]
        j = torch.arange(nk, dtype=torch.float64)[None, :]
        if m["alibi"]:
            s = s + cudnn_alibi_slopes(h).double()[:, None, None] * (j - i)
        keep = (j <= i).expand(b, 1, nq, nk)
        rows = torch.ones(b, 1, nq, 1, dtype=torch.bool)
        if m["padding"]:
            lq, lk = (pack[t.uid].reshape(-1).long() for t in (m["seq_q"], m["seq_kv"]))
            keep = keep & (j[None, None] < lk[:, None, None, None])
            rows = i[None, None] < lq[:, None, None, None]
        s = s.masked_fill(~keep, -math.inf)
        if kind == "fwd":
            mx = s.amax(-1, keepdim=True)
            stats = mx + torch.log(torch.exp(s - mx).sum(-1, keepdim=True))
            o = torch.where(rows, torch.softmax(s, -1) @ ve, 0.0)
            self._bound(pack, self.o).copy_(o)
            self._bound(pack, self.stats).copy_(stats)
            return
        p = torch.where(rows, torch.exp(s - x["stats"].double()), 0.0)
        do, o = x["do"].double(), x["o"].double()
        delta = (do * o).sum(-1, keepdim=True)
        ds = p * (do @ ve.transpose(-1, -2) - delta)
        dq = m["scale"] * ds @ ke
        dk = (m["scale"] * ds.transpose(-1, -2) @ q).unflatten(1, (-1, g)).sum(2)
        dv = (p.transpose(-1, -2) @ do).unflatten(1, (-1, g)).sum(2)
        for t, val in zip(self.grads, (dq, dk, dv)):
            self._bound(pack, t).copy_(val)


class FakeCudnn(SimpleNamespace):
    """The module stand-in: ``builds`` lists the graphs validated ("fwd"/"bwd"); set ``refuse`` to a
    message to make every graph build fail as cuDNN does for an unsupported graph, ``refuse_backward``
    the backward graphs only (as cuDNN 9.19 does for one query row)."""

    def __init__(self):
        super().__init__(
            data_type=SimpleNamespace(HALF="HALF", BFLOAT16="BFLOAT16", FLOAT="FLOAT", INT32="INT32"),
            diagonal_alignment=SimpleNamespace(TOP_LEFT="TOP_LEFT", BOTTOM_RIGHT="BOTTOM_RIGHT"),
            heur_mode=SimpleNamespace(A="A", FALLBACK="FALLBACK"),
            cudnnGraphNotSupportedError=GraphNotSupported, builds=[], refuse=None, refuse_backward=None)

    def backend_version(self):
        return 91900

    def create_handle(self):
        return object()

    def set_stream(self, handle, stream):
        pass

    def pygraph(self, **kwargs):
        return FakeGraph(self, **kwargs)
