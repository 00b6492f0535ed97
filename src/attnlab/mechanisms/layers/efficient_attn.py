"""Efficient Attention (paper L156, "You Need to Pay Better Attention").

Beyond Optimised Attention, the key projection goes too: ``Q_i K_i^T = X W_Q^i (X W_K^i)^T`` and the product
``W_Q^i W_K^i^T`` is one matrix, so each head scores its queries directly against its slice of the input,
which is also its value:

    Q_i = X W_Q^i,   K_i = V_i = X_i
    out = concat_i softmax(Q_i X_i^T / sqrt(d) + mask) X_i  W_O

Half of standard attention's parameters (2 dim^2) and two matmuls fewer per head. Fast path: SDPA through
``attnlab.attention``; the cache holds only the input slices (keys and values are the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..common import split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register


@dataclass(frozen=True)
class EfficientAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4

    fixed = ("kv_heads", "head_dim", "rope", "rope_base")


@register("efficient_attn", family="layers", papers=("L156",), year=2024, config=EfficientAttnConfig,
          summary="no key or value projection: queries meet input slices (1/2 of MHA's parameters)")
class EfficientAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): a query projection against input slices, then op ``sdpa``."""

    def __init__(self, cfg: EfficientAttnConfig) -> None:
        super().__init__(cfg, proj="qo")

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        xh = split_heads(x, self.heads)
        return split_heads(self.q_proj(x), self.heads), xh, xh

    def state_size(self, seq_len: int) -> int:
        return self.dim * seq_len  # keys and values are the same input slices

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        q, k, _ = self.project(x, start)
        if cache is not None:  # keys and values are the same numbers: cache them once (empty value slot)
            k, _ = cache.kv.append(k, k[..., :0])
        return self.out(self.attend(q, k, k, start, None if cache is None else cache.state))

    def reference(self, x: Tensor) -> Tensor:
        """Head by head: softmax(X W_Q^i X_i^T / sqrt(d)) X_i, then W_O."""
        T, d = x.shape[1], self.head_dim
        heads = []
        for i in range(self.heads):
            rows = slice(i * d, (i + 1) * d)
            s = (x @ self.q_proj.weight[rows].T) @ x[..., rows].transpose(-1, -2) / d ** 0.5
            if self.causal:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            heads.append(torch.softmax(s, dim=-1) @ x[..., rows])
        return self.o_proj(torch.cat(heads, dim=-1))
