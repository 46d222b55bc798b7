"""A small decoder-only ALiBi transformer built on ``poslsh.nn.ALiBiAttention``.

Pre-LayerNorm blocks (attention, then a GELU MLP), no positional embeddings (ALiBi carries position),
tied input/output embeddings. Attention runs through ``poslsh.attention`` with the method set by
``set_attention`` ("exact", "window", "lsh" or "hybrid"), or, for fast training of the exact model on a GPU,
through ``torch.nn.functional.scaled_dot_product_attention`` with the ALiBi bias as a dense mask
(``LMConfig.train_attention = "sdpa"``); both compute the same function of the same weights.

With "lsh" or "hybrid" in eval mode the partitions of layer l are fixed and drawn from (seed, l), the same for
every sequence length (each ``ALiBiAttention``'s ``poslsh.layer_partitions.LayerPartitions``). In training
mode they are fresh at every forward: drawn from torch's global RNG, or, after ``set_partition_schedule(seed)``
(what the trainer does), layer l's partitions at step s from ``seed_for(seed, "train", l, s)``
(``TrainingPartitionSeeds``), so a positional-LSH-native run is reproducible from its seed alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslsh.method import MethodSpec, as_method
from poslsh.nn import ALiBiAttention
from poslsh.seeds import seed_for

__all__ = ["LMConfig", "ALiBiLM", "Block", "TrainingPartitionSeeds", "load_checkpoint", "save_checkpoint"]


@dataclass
class LMConfig:
    """Model shape. ``vocab_size`` 259 = bytes + BOS/EOS/PAD (``ByteTokenizer``)."""

    vocab_size: int = 259
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    train_attention: str = "sdpa"  # "sdpa" (dense ALiBi mask, training only) or "poslsh"


@dataclass(frozen=True)
class TrainingPartitionSeeds:
    """The seed schedule of one layer's training partitions (``ALiBiAttention.set_partition_schedule``):
    step s -> ``seed_for(seed, "train", layer, s)``. torch's CPU generator keeps the low 32 bits of a
    seed, so two (layer, step) pairs of a run share partitions with probability ~ pairs^2 / 2^33."""

    seed: int
    layer: int

    def __call__(self, step: int) -> int:
        return seed_for(self.seed, "train", self.layer, step)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). x [B, N, E] -> [B, N, E]."""

    def __init__(self, config: LMConfig, layer: int = 0) -> None:
        super().__init__()
        e = config.d_model
        self.ln1 = nn.LayerNorm(e)
        self.attn = ALiBiAttention(e, config.n_heads, method="exact", layer=layer)
        self.ln2 = nn.LayerNorm(e)
        self.fc = nn.Linear(e, config.mlp_ratio * e)
        self.proj = nn.Linear(config.mlp_ratio * e, e)
        self.dropout = nn.Dropout(config.dropout)
        self._bias: tuple[tuple, Tensor] | None = None  # the last SDPA bias: ((n, device, dtype), [H, n, n])

    def forward(self, x: Tensor, partitions=None, sdpa: bool = False) -> Tensor:
        h = self.ln1(x)
        a = self._sdpa_alibi(h) if sdpa else self.attn(h, partitions=partitions)
        x = x + self.dropout(a)
        return x + self.dropout(self.proj(F.gelu(self.fc(self.ln2(x)))))

    def _sdpa_alibi(self, x: Tensor) -> Tensor:
        """Exact causal ALiBi attention of ``self.attn``'s projections through SDPA with a dense bias.

        x [B, N, E] -> [B, N, E]; memory O(H N^2) for the bias, meant for training contexts (<= 4K).
        """
        attn = self.attn
        b, n, _ = x.shape
        h, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(x).view(b, n, h, d).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_kv_heads, d).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, attn.num_kv_heads, d).transpose(1, 2)
        if attn.num_kv_heads != h:
            k, v = (t.repeat_interleave(h // attn.num_kv_heads, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._alibi_bias(n, x.device, q.dtype))
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    def _alibi_bias(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Causal ALiBi bias [H, n, n] (-m_h (i - j), -inf above the diagonal), kept for the next call:
        building it copies the CPU slopes to the device, which on CUDA waits for the whole queue."""
        key = (n, device, dtype)
        if self._bias is None or self._bias[0] != key:
            pos = torch.arange(n, device=device)
            dist = (pos[:, None] - pos[None, :]).to(torch.float32)
            slopes = self.attn.slopes.to(device=device, dtype=torch.float32)
            bias = (-slopes[:, None, None] * dist).masked_fill(dist < 0, float("-inf")).to(dtype)
            self._bias = (key, bias)
        return self._bias[1]


class ALiBiLM(nn.Module):
    """Decoder-only ALiBi language model. ``forward(idx [B, N]) -> logits [B, N, vocab]`` (float32)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.apply(self._init)
        for blk in self.blocks:  # GPT-2 style: scale the residual projections by depth
            for lin in (blk.attn.out_proj, blk.proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        self.attention_spec, self.attention_seed, self.attention_backend = MethodSpec("exact"), 0, "auto"

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_modules(self) -> list[ALiBiAttention]:
        return [blk.attn for blk in self.blocks]

    def set_attention(self, method: str | MethodSpec = "exact", samples: int | None = None, scheme: str | None = None,
                      seed: int = 0, window_eps: float | None = None, backend: str = "auto",
                      sampling: str | None = None, hybrid_eps: float | None = None) -> "ALiBiLM":
        """Switch every layer to ``method`` (a ``MethodSpec``, or "exact", "window", "lsh" or "hybrid" with
        its options, None: the default); the eval partitions of "lsh" and "hybrid" are fixed per layer
        from (seed, layer)."""
        spec = as_method(method, samples=samples, scheme=scheme, sampling=sampling, window_eps=window_eps,
                         hybrid_eps=hybrid_eps)
        for attn in self.attention_modules():
            attn.set_method(spec, seed=seed, backend=backend)
        self.attention_spec, self.attention_seed, self.attention_backend = spec, seed, backend
        return self

    @property
    def attention_options(self) -> dict[str, Any]:
        """The arguments of the last ``set_attention``: the method's fields, seed and backend."""
        return {**asdict(self.attention_spec), "seed": self.attention_seed, "backend": self.attention_backend}

    def set_partition_schedule(self, seed: int | None, step: int = 0) -> "ALiBiLM":
        """Training-mode partitions of layer l at step s from ``TrainingPartitionSeeds(seed, l)(s)``,
        counting steps from ``step`` (one per training forward); None: torch's global RNG again."""
        for layer, attn in enumerate(self.attention_modules()):
            attn.set_partition_schedule(None if seed is None else TrainingPartitionSeeds(seed, layer), step)
        return self

    def forward(self, idx: Tensor, sdpa: bool | None = None) -> Tensor:
        """idx int64 [B, N] -> logits float32 [B, N, vocab].

        ``sdpa``: compute exact attention with SDPA instead of ``poslsh.attention`` (only valid while
        the method is "exact"); default: in training when ``config.train_attention == "sdpa"``.
        """
        x = self.embed(idx)
        exact = self.attention_spec.method == "exact"
        if sdpa is None:
            sdpa = self.training and self.config.train_attention == "sdpa" and exact
        elif sdpa and not exact:
            raise ValueError(f"sdpa=True computes exact attention; the model is set to {self.attention_spec.method!r}")
        for blk in self.blocks:  # eval: each layer's fixed partitions, training: fresh ones (ALiBiAttention)
            x = blk(x, sdpa=sdpa)
        return self.head(self.ln_f(x)).float()

    def loss(self, idx: Tensor, targets: Tensor, sdpa: bool | None = None) -> Tensor:
        """Mean next-token cross-entropy (nats): idx, targets int64 [B, N]."""
        logits = self(idx, sdpa=sdpa)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def save_checkpoint(model: ALiBiLM, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (model config plus ``extra``) to out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": asdict(model.config), **(extra or {})}, indent=1) + "\n")
    return out


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ALiBiLM, dict]:
    """Load a checkpoint folder written by ``save_checkpoint``: (model in eval mode, config.json dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())
    model = ALiBiLM(LMConfig(**meta["model"]))
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"head.weight"}:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), meta
