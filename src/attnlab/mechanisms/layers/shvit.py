"""Single-head self-attention on a channel split (L54, SHViT, Yun & Ro 2024).

The channels are split into an attended part of ``C_p = round(r * dim)`` channels and a pass-through rest;
one attention head runs on the first part only, the rest is concatenated back unchanged and the whole is
projected:

    X_att, X_res = Split(X, [C_p, dim - C_p])
    X~_att       = softmax(X_att W_Q (X_att W_K)^T / sqrt(d_qk)) X_att W_V      (C_p -> C_p)
    SHSA(X)      = Concat(X~_att, X_res) W_O                                      (dim -> dim)

The paper's partial ratio is ``r = 1 / 4.67`` and its query/key width ``d_qk = 16``. One head avoids the
redundancy of multi-head attention, and attending over a fraction of the channels cuts the projections and
the attention's value width by ``1 / r``.

Deviations (image-specific pieces): SHViT normalizes ``X_att`` with GroupNorm over the whole feature map before
the projections; here ``pre_norm`` is a per-token RMSNorm over the ``C_p`` channels (a norm over positions would
let a query see the future). The projection is linear (SHViT puts a ReLU and BatchNorm around its 1x1 conv).
Positions come from RoPE on q and k (or none); any static pattern applies (default causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.reference import reference_attention
from ..common import RMSNorm
from ..heads import positive_number
from ..registry import register
from .mha import PatternHeadsConfig, PatternLayer

PAPER_RATIO = 1 / 4.67  # SHViT's partial ratio r: C_p = r * dim


@dataclass(frozen=True)
class SHViTConfig(PatternHeadsConfig):
    """partial: fraction r of the channels the head attends over (``C_p = max(1, round(r * dim))``);
    key_dim: query/key width d_qk; pre_norm: RMSNorm of the attended channels before the projections."""

    heads: int = 1
    rope: bool = True
    partial: float = PAPER_RATIO
    key_dim: int = 16
    pre_norm: bool = True

    fixed = ("heads", "kv_heads", "head_dim")  # one head by construction

    def prepare(self) -> None:
        super().prepare()
        # key_dim is the rotated width (``d``): check it before the base's rope check names head_dim
        if isinstance(self.key_dim, bool) or not isinstance(self.key_dim, int) or self.key_dim < 1:
            raise ValueError(f"key_dim must be a positive int, got {self.key_dim!r}")
        if self.rope and self.key_dim % 2:
            raise ValueError(f"rope needs an even key_dim, got {self.key_dim}")

    def validate(self) -> None:
        positive_number("partial", self.partial)
        if self.partial > 1:
            raise ValueError(f"partial must be in (0, 1] (a fraction of the channels), got {self.partial!r}")
        if not isinstance(self.pre_norm, bool):
            raise ValueError(f"pre_norm must be True or False, got {self.pre_norm!r}")

    @property
    def pdim(self) -> int:
        """C_p: the attended channels."""
        return min(self.dim, max(1, round(self.partial * self.dim)))

    @property
    def d(self) -> int:
        """Query/key width (what RoPE rotates and the softmax scale uses)."""
        return self.key_dim


@register(
    "shvit",
    family="layers",
    papers=("L54",),
    year=2024,
    summary="single-head attention over a fraction r = 1/4.67 of the channels; the rest passed through",
    config=SHViTConfig,
)
class SingleHeadAttention(PatternLayer):
    """(B, T, dim) -> (B, T, dim): one head over the first ``C_p`` channels (op ``sdpa`` or ``pattern``), the
    other ``dim - C_p`` concatenated unchanged, then ``W_O``. Decoding keeps one head's keys (width d_qk) and
    values (width C_p) per position."""

    def __init__(self, cfg: SHViTConfig) -> None:
        super().__init__(cfg, proj="")
        p, kd = cfg.pdim, cfg.key_dim
        self.norm = RMSNorm(p) if cfg.pre_norm else None
        self.qkv = nn.Linear(p, 2 * kd + p, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> q, k (B, 1, T, d_qk), v (B, 1, T, C_p) from the attended channels."""
        cfg = self.cfg
        h = x[..., : cfg.pdim]
        if self.norm is not None:
            h = self.norm(h)
        q, k, v = self.qkv(h).unsqueeze(1).split([cfg.key_dim, cfg.key_dim, cfg.pdim], dim=-1)
        if cfg.rope:
            q, k = self.rotate(q, start), self.rotate(k, start)
        return q, k, v

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """o (B, 1, T, C_p) -> Concat(o, X_res) W_O (B, T, dim)."""
        return self.o_proj(torch.cat([o[:, 0].to(x.dtype), x[..., self.cfg.pdim :]], dim=-1))

    def reference(self, x: Tensor) -> Tensor:
        """The formula with dense scores: Split, softmax(X_att W_Q (X_att W_K)^T / sqrt(d_qk)) X_att W_V,
        Concat with X_res, W_O."""
        cfg = self.cfg
        p, kd = cfg.pdim, cfg.key_dim
        x_att, x_res = x[..., :p], x[..., p:]
        if cfg.pre_norm:
            x_att = x_att / torch.sqrt(x_att.pow(2).mean(-1, keepdim=True) + self.norm.eps) * self.norm.weight
        W = self.qkv.weight  # (2 kd + p, p)
        q, k, v = x_att @ W[:kd].T, x_att @ W[kd : 2 * kd].T, x_att @ W[2 * kd :].T  # (B, T, .)
        if cfg.rope:
            q, k = self.rotate(q[:, None], 0)[:, 0], self.rotate(k[:, None], 0)[:, 0]
        a = reference_attention(q[:, None], k[:, None], v[:, None], cfg.pattern, dtype=None)[:, 0]
        return torch.cat([a, x_res], dim=-1) @ self.o_proj.weight.T

    def state_size(self, seq_len: int) -> int:
        """One head's key (d_qk) and value (C_p) per visible position."""
        visible = seq_len if self.cfg.pattern is None else self.cfg.pattern.count(1, seq_len, seq_len - 1)
        return round((self.cfg.key_dim + self.cfg.pdim) * visible)
