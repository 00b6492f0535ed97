"""Neural Attention (paper L215): scores from a small feed-forward network over each query-key pair.

Per head, the dot product is replaced by a two-layer MLP of the concatenated pair:

    S_ij = w2 . act(W1 [q_i ; k_j] + b1)          A = softmax(S + mask)        out = A v

Fast path: the first layer is linear in the concatenation, so ``W1 [q; k] = W1q q + W1k k``: both halves are
computed once per token and only the activation and the second layer run per pair, ``chunk`` query rows at a
time (``chunk x Tk x hidden`` numbers live at once). Cost: ``O(T^2 * hidden)`` per head instead of
``O(T^2 * d)``. The second layer's bias is left out: it adds the same constant to every score of a row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._scored import by_rows, visible


@dataclass(frozen=True)
class NeuralAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    hidden: int = 16  # width of the score MLP
    chunk: int = 64  # query rows per block of the fast path

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        positive_int("hidden", self.hidden)
        positive_int("chunk", self.chunk)


@register("neural_attn", family="layers", papers=("L215",), year=2025, config=NeuralAttnConfig,
          summary="scores from a per-head MLP over concatenated query-key pairs")
class NeuralAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); the MLP scores are the layer's own (``attend``), ``chunk`` rows at a time."""

    def __init__(self, cfg: NeuralAttnConfig) -> None:
        super().__init__(cfg)
        d, n = cfg.d, cfg.hidden
        self.w1 = nn.Parameter(torch.randn(cfg.heads, n, 2 * d) * (2 * d) ** -0.5)  # on [q ; k]
        self.b1 = nn.Parameter(torch.zeros(cfg.heads, n))
        self.w2 = nn.Parameter(torch.randn(cfg.heads, n) * n ** -0.5)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int, state=None) -> Tensor:
        """q (B, H, T, d) at positions start.. over k, v (B, H, Tk, d) -> (B, H, T, d)."""
        d = self.head_dim
        hq = torch.einsum("bhid,hnd->bhin", q, self.w1[..., :d]) + self.b1[None, :, None]  # (B, H, T, n)
        hk = torch.einsum("bhjd,hnd->bhjn", k, self.w1[..., d:])  # (B, H, Tk, n)

        def rows(a: int, b: int) -> Tensor:
            h = F.gelu(hq[:, :, a:b, None, :] + hk[:, :, None, :, :])  # (B, H, rows, Tk, n)
            s = torch.einsum("bhijn,hn->bhij", h, self.w2)
            m = visible(b - a, k.shape[2], start + a, self.causal, q.device)
            return torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1) @ v

        return by_rows(rows, q.shape[2], self.cfg.chunk)

    def reference(self, x: Tensor) -> Tensor:
        """The MLP applied to the explicit concatenation of every (query, key) pair."""
        q, k, v = self.project(x, 0)
        B, H, T, d = q.shape
        qi = q[:, :, :, None, :].expand(B, H, T, T, d)
        kj = k[:, :, None, :, :].expand(B, H, T, T, d)
        pairs = torch.cat([qi, kj], dim=-1)  # (B, H, T, T, 2d): [q_i ; k_j]
        hidden = F.gelu(torch.einsum("bhijc,hnc->bhijn", pairs, self.w1) + self.b1[None, :, None, None])
        s = torch.einsum("bhijn,hn->bhij", hidden, self.w2)
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self.out(torch.softmax(s, dim=-1) @ v)
