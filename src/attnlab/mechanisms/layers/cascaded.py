"""Cascaded group attention (L87, EfficientViT, Liu et al. 2023).

The input's channels are split into h groups ``x = [x_1, ..., x_h]`` (dim / h each). Head j sees its own
split plus the previous head's output, so later heads refine earlier ones:

    x~_1 = x_1,   x~_j = x_j + y_{j-1}
    y_j  = softmax(x~_j W_Q^j (x~_j W_K^j)^T / sqrt(key_dim)) x~_j W_V^j     (dim / h -> dim / h)
    out  = concat(y_1, ..., y_h) W_P

Each head projects dim/h channels instead of dim, so the projections cost 1/h of MHA's; queries and keys use
a small ``key_dim`` (EfficientViT: 16). The heads run one after another (head j needs y_{j-1}).
Deviations: EfficientViT's depthwise convolution on the queries and its 2-D relative position bias are
image-specific and left out; positions come from RoPE on q and k (or none), and any static pattern applies.
The output projection is linear (EfficientViT puts a ReLU before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.checks import positive_int
from ...core.reference import reference_attention
from ..common import apply_rope
from ..heads import LayerCache
from ..registry import register
from .mha import PatternHeadsConfig, PatternLayer, cached_attention


@dataclass(frozen=True)
class CascadedConfig(PatternHeadsConfig):
    """key_dim: query/key width per head (None: min(16, dim // heads)); values keep dim // heads."""

    rope: bool = True
    key_dim: int | None = None

    fixed = ("kv_heads", "head_dim")  # heads split the channels

    def validate(self) -> None:
        if self.key_dim is not None:
            positive_int("key_dim", self.key_dim)
        if self.rope and self.kd % 2:
            raise ValueError(f"rope needs an even key_dim, got {self.kd}")

    @property
    def split(self) -> int:
        return self.dim // self.heads

    @property
    def d(self) -> int:
        """Per-head query/key width (what RoPE rotates)."""
        return self.kd

    @property
    def kd(self) -> int:
        return self.key_dim or min(16, self.split)


@register(
    "cascaded",
    family="layers",
    papers=("L87",),
    year=2023,
    summary="cascaded group attention: each head sees a channel split plus the previous head's output",
    config=CascadedConfig,
)
class CascadedGroupAttention(PatternLayer):
    """(B, T, dim) -> (B, T, dim); the heads run one after another, each its own projections and attention
    (``cached_attention``: the op's engine); the decoding cache holds one KVCache per head (``state["kv"]``)."""

    def __init__(self, cfg: CascadedConfig) -> None:
        super().__init__(cfg, proj="")
        c, kd = cfg.split, cfg.kd
        self.qkv = nn.ModuleList(nn.Linear(c, 2 * kd + c, bias=False) for _ in range(cfg.heads))
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def _head_qkv(self, j: int, xj: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x~_j (B, T, c) -> q, k (B, 1, T, kd), v (B, 1, T, c)."""
        kd = self.cfg.kd
        q, k, v = self.qkv[j](xj).unsqueeze(1).split([kd, kd, self.cfg.split], dim=-1)
        if self.cfg.rope:
            q, k = apply_rope(q, pos, self.cfg.rope_base), apply_rope(k, pos, self.cfg.rope_base)
        return q, k, v

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        pos = torch.arange(start, start + x.shape[1], device=x.device)
        per_head = None if cache is None else cache.state["kv"]
        ys: list[Tensor] = []
        for j, xj in enumerate(x.split(self.cfg.split, dim=-1)):
            xt = xj if j == 0 else xj + ys[-1]
            q, k, v = self._head_qkv(j, xt, pos)
            ys.append(cached_attention(q, k, v, None if cache is None else per_head[j], self.cfg.pattern)[:, 0])
        if cache is not None:
            cache.length = start + x.shape[1]
        return self.proj(torch.cat(ys, dim=-1))

    def reference(self, x: Tensor) -> Tensor:
        """The cascade with dense scores: x~_j = x_j + y_{j-1}; y_j = softmax(q k^T / sqrt(kd)) v."""
        cfg, c, kd = self.cfg, self.cfg.split, self.cfg.kd
        pos = torch.arange(x.shape[1], device=x.device)
        ys: list[Tensor] = []
        for j in range(cfg.heads):
            xt = x[..., j * c : (j + 1) * c] + (ys[-1] if ys else 0)
            W = self.qkv[j].weight  # (2 kd + c, c)
            q, k, v = (xt @ W[:kd].T)[:, None], (xt @ W[kd : 2 * kd].T)[:, None], (xt @ W[2 * kd :].T)[:, None]
            if cfg.rope:
                q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
            ys.append(reference_attention(q, k, v, cfg.pattern, dtype=None)[:, 0])
        return torch.cat(ys, dim=-1) @ self.proj.weight.T

    def init_cache(self, batch: int = 1) -> LayerCache:
        super().init_cache(batch)  # refuses non-causal patterns
        cache = LayerCache(kv=False)
        cache.state["kv"] = [KVCache() for _ in range(self.cfg.heads)]
        return cache

    def state_size(self, seq_len: int) -> int:
        return self.cfg.heads * (self.cfg.kd + self.cfg.split) * seq_len
