"""Optimised Attention (paper L156, "You Need to Pay Better Attention").

The value projection is dropped: ``W_V^i`` and ``W_O`` are consecutive linear maps, so the output projection
can absorb it. Head ``i`` attends with its own queries and keys but carries the ``i``-th slice of the input:

    Q_i = X W_Q^i,   K_i = X W_K^i,   V_i = X_i (columns i*d .. (i+1)*d of X)
    out = concat_i softmax(Q_i K_i^T / sqrt(d) + mask) V_i  W_O

3/4 of standard attention's parameters (3 dim^2) and one matmul fewer per head. Fast path: SDPA through
``attnlab.attention``; the cache holds keys and input slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..common import split_heads
from ..heads import HeadsConfig, OpLayer
from ..registry import register


@dataclass(frozen=True)
class OptimisedAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4

    fixed = ("kv_heads", "head_dim", "rope", "rope_base")


@register("optimised_attn", family="layers", papers=("L156",), year=2024, config=OptimisedAttnConfig,
          summary="no value projection: heads carry input slices (3/4 of MHA's parameters)")
class OptimisedAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections q, k (values: input slices), then op ``sdpa``."""

    def __init__(self, cfg: OptimisedAttnConfig) -> None:
        super().__init__(cfg, proj="qko")

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        q, k = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(x), self.heads)
        return q, k, split_heads(x, self.heads)

    def reference(self, x: Tensor) -> Tensor:
        """Head by head with the weight matrices sliced explicitly."""
        T, d = x.shape[1], self.head_dim
        heads = []
        for i in range(self.heads):
            rows = slice(i * d, (i + 1) * d)
            q = x @ self.q_proj.weight[rows].T
            k = x @ self.k_proj.weight[rows].T
            s = q @ k.transpose(-1, -2) / d ** 0.5
            if self.causal:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            heads.append(torch.softmax(s, dim=-1) @ x[..., rows])
        return self.o_proj(torch.cat(heads, dim=-1))
