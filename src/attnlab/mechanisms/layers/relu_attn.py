"""ReLU attention (paper L271, "Replacing softmax with ReLU in Vision Transformers").

The softmax is replaced by a point-wise ReLU divided by the sequence length:

    W_ij = relu(q_i . k_j / sqrt(d)) / L          out = W v

Causal choice: ``L`` is the number of keys query ``i`` sees (``i + 1`` at absolute position ``i``), not the
full length. Dividing by the full length would make every earlier output change when a token is appended,
so a prefix's outputs would depend on the future and decoding could not match the full forward. Without a
causal mask the two agree (every query sees all ``L`` keys), which is the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register
from ._scored import ProjectedAttention, by_rows, check_config, check_positive, visible


@dataclass(frozen=True)
class ReLUAttnConfig:
    dim: int = 64
    heads: int = 4
    causal: bool = True
    rope: bool = True
    chunk: int = 128  # query rows per block of the fast path

    def __post_init__(self) -> None:
        check_config("relu_attn", self.dim, self.heads, even_head_dim=self.rope)
        check_positive("relu_attn", "chunk", self.chunk)


@register("relu_attn", family="layers", papers=("L271",), year=2023, config=ReLUAttnConfig,
          summary="softmax replaced by relu(qk)/L, L = keys each query sees")
class ReLUAttention(ProjectedAttention):
    def __init__(self, cfg: ReLUAttnConfig) -> None:
        super().__init__(cfg.dim, cfg.heads, cfg.causal, rope=cfg.rope)
        self.cfg = cfg

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        q, k, v, start = self.qkv(x, cache)
        scale = self.head_dim ** -0.5
        Tk = k.shape[2]

        def rows(a: int, b: int) -> Tensor:
            m = visible(b - a, Tk, start + a, self.causal, x.device)
            s = torch.relu(q[:, :, a:b] @ k.transpose(-1, -2) * scale).masked_fill(~m, 0.0)
            return (s @ v) / m.sum(-1, keepdim=True).to(v.dtype)

        return self.out(by_rows(rows, q.shape[2], self.cfg.chunk))

    def reference(self, x: Tensor) -> Tensor:
        """Dense: W_ij = max(0, S_ij) / n_i with n_i = L (full) or i + 1 (causal)."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5
        w = torch.clamp(s, min=0.0)
        if self.causal:
            w = w * torch.ones(T, T, dtype=x.dtype, device=x.device).tril()
            n = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(T, 1)
        else:
            n = torch.full((T, 1), float(T), dtype=x.dtype, device=x.device)
        return self.out(torch.einsum("bhij,bhjd->bhid", w / n, v))
