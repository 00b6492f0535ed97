"""Adaptive attention with a sentinel (paper L246, "Knowing When to Look") as a learned sink for any layer.

The paper lets the decoder attend either to the image regions or to a "visual sentinel" -- a gated memory
vector -- in one softmax, so the sentinel's weight ``beta_t`` says how much the step relies on what it already
knows instead of looking. Here the sentinel is a learned key/value pair per head, prepended to every query's
keys, whose value is gated per query by the hidden state:

    s_t^v = sigmoid(W_g x_t) * v_s                      (the sentinel's value for query t, per head)
    [alpha_t, beta_t] = softmax([q_t k_j / sqrt(d) for visible j ; q_t k_s / sqrt(d)])
    out_t = sum_j alpha_tj v_j + beta_t s_t^v

Fast path: SDPA over the keys with ``k_s`` prepended and the values widened by one channel that is 1 for the
sentinel and 0 elsewhere, so the same call returns ``beta_t``; the query-dependent gate is applied afterwards.
Deviation: the paper scores the sentinel with an additive MLP of the LSTM state; here it is a dot product
with a learned key, so it shares the attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.core.attention import attention
from attnlab.core.patterns import Causal

from ..common import split_heads
from ..heads import HeadsConfig, OpLayer
from ..registry import register


class Sentinel(nn.Module):
    """A learned key/value sink per head with a per-query gate; ``attend`` replaces plain attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        d = dim // heads
        self.heads = heads
        self.key = nn.Parameter(torch.randn(heads, d) * d ** -0.5)
        self.value = nn.Parameter(torch.zeros(heads, d))
        self.gate = nn.Linear(dim, dim)

    def gated_value(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> the sentinel value per query, (B, H, T, d)."""
        return torch.sigmoid(split_heads(self.gate(x), self.heads)) * self.value[None, :, None, :]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, causal: bool) -> Tensor:
        """q: (B, H, Tq, d) at the last Tq of the Tk key positions; k, v: (B, H, Tk, d); x: (B, Tq, dim)."""
        B, H, _, d = k.shape
        ks = self.key.to(k.dtype)[None, :, None, :].expand(B, H, 1, d)
        vs = torch.cat([self.value, torch.ones_like(self.value[:, :1])], dim=-1)  # (H, d + 1)
        vs = vs[None, :, None, :].expand(B, H, 1, d + 1)
        k_aug = torch.cat([ks, k], dim=2)
        v_aug = torch.cat([vs, torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)], dim=2)
        # the sentinel sits at index 0: with bottom-right alignment query t sees it and the keys <= t
        o = attention(q, k_aug, v_aug, Causal() if causal else None)
        beta = o[..., -1:]
        return o[..., :-1] + beta * (self.gated_value(x) - self.value[None, :, None, :])

    def reference(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, causal: bool) -> Tensor:
        """Plain softmax over [keys ; sentinel] with the weights materialized (q, k, v from position 0)."""
        T = k.shape[2]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
        if causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        s_sent = torch.einsum("bhid,hd->bhi", q, self.key)[..., None] / q.shape[-1] ** 0.5
        w = torch.softmax(torch.cat([s, s_sent], dim=-1), dim=-1)
        alpha, beta = w[..., :T], w[..., T:]
        return alpha @ v + beta * self.gated_value(x)


@dataclass(frozen=True)
class SentinelConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True

    fixed = ("kv_heads", "head_dim")


@register("sentinel", family="layers", papers=("L246",), year=2017, config=SentinelConfig,
          summary="learned gated sentinel key/value every query may attend to instead of the context")
class SentinelAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); the sentinel's attention (keys with the learned sink prepended) is its own."""

    def __init__(self, cfg: SentinelConfig) -> None:
        super().__init__(cfg)
        self.sentinel = Sentinel(cfg.dim, cfg.heads)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        q, k, v, _ = self.qkv_cached(x, cache)
        return self.out(self.sentinel.attend(q, k, v, x, self.causal))

    def reference(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x, 0)
        return self.out(self.sentinel.reference(q, k, v, x, self.causal))
