"""Cog attention (paper L134, "More Expressive Attention with Negative Weights").

Weights keep the sign of the score and take the softmax of its magnitude:

    S = q k^T / sqrt(d)            W = sign(S) * softmax(|S|)          out = W v

so a head can copy (positive weight), delete (negative weight) or ignore (small |S|) a token. The absolute
values of a row's weights sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register
from ._scored import ProjectedAttention, by_rows, check_config, check_positive, visible


@dataclass(frozen=True)
class CogConfig:
    dim: int = 64
    heads: int = 4
    causal: bool = True
    rope: bool = True
    chunk: int = 128  # query rows per block of the fast path

    def __post_init__(self) -> None:
        check_config("cog", self.dim, self.heads, even_head_dim=self.rope)
        check_positive("cog", "chunk", self.chunk)


@register("cog", family="layers", papers=("L134",), year=2024, config=CogConfig,
          summary="signed attention: sign(qk) * softmax(|qk|), so heads can subtract tokens")
class CogAttention(ProjectedAttention):
    def __init__(self, cfg: CogConfig) -> None:
        super().__init__(cfg.dim, cfg.heads, cfg.causal, rope=cfg.rope)
        self.cfg = cfg

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); scores are built ``chunk`` query rows at a time."""
        q, k, v, start = self.qkv(x, cache)
        scale = self.head_dim ** -0.5

        def rows(a: int, b: int) -> Tensor:
            s = q[:, :, a:b] @ k.transpose(-1, -2) * scale  # (B, H, rows, Tk)
            m = visible(b - a, k.shape[2], start + a, self.causal, x.device)
            w = torch.softmax(s.abs().masked_fill(~m, float("-inf")), dim=-1) * torch.sign(s)
            return w @ v

        return self.out(by_rows(rows, q.shape[2], self.cfg.chunk))

    def reference(self, x: Tensor) -> Tensor:
        """Dense: W_ij = sign(S_ij) exp|S_ij| / sum_{visible j'} exp|S_ij'| over the whole score matrix."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        mag = torch.where(allowed, s.abs(), torch.zeros_like(s))
        e = torch.exp(mag - mag.amax(-1, keepdim=True)) * allowed
        w = torch.sign(s) * e / e.sum(-1, keepdim=True)
        return self.out(torch.einsum("bhij,bhjd->bhid", w, v))
