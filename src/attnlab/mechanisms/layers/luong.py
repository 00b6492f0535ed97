"""Luong global attention (paper L249, "Effective Approaches to Attention-based Neural Machine Translation").

A target state ``h_t`` scores every source state ``hs_s`` with one of three functions, averages the source
states with the softmax of the scores, and combines the context with ``h_t``:

    dot:      score = h_t . hs_s
    general:  score = h_t^T W_a hs_s
    concat:   score = v_a . tanh(W_a [h_t ; hs_s])
    a_t = softmax_s(score),   c_t = sum_s a_ts hs_s,   out_t = tanh(W_c [c_t ; h_t])

Cross-attention: ``forward(x, context=source)`` or ``cross(x, source)`` (every target row sees the whole
source). Self-attention: ``forward(x)`` uses ``x`` as its own source, causally masked if ``causal`` (and
decodes with a cache). Scores are unscaled as in the paper. ``heads > 1`` (an extension) applies the same
scoring per slice of width ``dim / heads``; ``heads = 1`` is the paper. Fast path: dot and general go
through ``attnlab.attention`` (SDPA); concat splits ``W_a`` into its target and source halves (each applied
once per token) and scores ``chunk`` rows at a time.

Ops: dot and general are ``sdpa`` (scale 1) on the target states (general: mapped by ``W_a``) against the source
states; concat is ``neural_attn`` with ``activation="tanh"``, ``w1 = W_a``, ``b1 = 0``, ``w2 = v_a``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ..base import check_hidden
from ..common import merge_heads, split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer, one_of
from ..registry import register

SCORES = ("dot", "general", "concat")


@dataclass(frozen=True)
class LuongConfig(HeadsConfig):
    """score: dot | general | concat; causal: self-attention only (cross-attention sees the whole context);
    chunk: query rows per block of the concat fast path."""

    dim: int = 64
    heads: int = 1
    score: str = "general"
    chunk: int = 128

    fixed = ("kv_heads", "head_dim", "rope", "rope_base")  # keys are the source states themselves

    def validate(self) -> None:
        positive_int("chunk", self.chunk)
        one_of("score", self.score, SCORES)


@register("luong", family="layers", papers=("L249",), year=2015, config=LuongConfig,
          summary="global attention with dot / general / concat scores; self- or cross-attention")
class LuongAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); no q/k/v projections (the states are their own keys and values), the decoding
    cache keeps the source states once."""

    def __init__(self, cfg: LuongConfig) -> None:
        super().__init__(cfg, proj="")
        d = cfg.d
        if cfg.score == "general":
            self.wa = nn.Linear(cfg.dim, cfg.dim, bias=False)  # per head: rows of W_a^T
        if cfg.score == "concat":
            self.wa = nn.Parameter(torch.randn(cfg.heads, d, 2 * d) * (2 * d) ** -0.5)  # on [h_t ; hs_s]
            self.va = nn.Parameter(torch.randn(cfg.heads, d) * d ** -0.5)
        self.wc = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)

    @property
    def op(self) -> str:  # type: ignore[override]
        return "neural_attn" if self.cfg.score == "concat" else "sdpa"

    def state_size(self, seq_len: int) -> int:
        return self.dim * seq_len  # the source states themselves

    def _source(self, x: Tensor, context: Tensor | None, cache: LayerCache | None) -> tuple[Tensor, bool]:
        check_hidden(x, self.dim)
        if context is None:
            return x, self.causal
        if cache is not None:
            raise TypeError("luong: cross-attention needs no cache (each target row sees the whole context)")
        check_hidden(context, self.dim)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"luong: context batch {context.shape[0]} differs from x batch {x.shape[0]}")
        return context, False

    def forward(self, x: Tensor, cache: LayerCache | None = None, context: Tensor | None = None) -> Tensor:
        """x: (B, T, dim); context: (B, S, dim) source states or None (self-attention) -> (B, T, dim)."""
        src, masked = self._source(x, context, cache)
        if cache is not None and not self.causal:
            raise TypeError("luong: a cache needs causal=True")
        h, hs = split_heads(x, self.heads), split_heads(src, self.heads)
        start = 0 if cache is None else cache.length
        if cache is not None:
            hs, _ = cache.kv.append(hs, hs[..., :0])  # keys are the values: store them once
        q_offset = start if masked else 0
        if self.cfg.score == "concat":
            c = self.spec(h, hs, hs, q_offset=q_offset, causal=masked, w1=self.wa, w2=self.va, activation="tanh",
                          chunk=self.cfg.chunk)
        else:
            q = h if self.cfg.score == "dot" else split_heads(self.wa(x), self.heads)
            c = self.spec(q, hs, hs, scale=1.0, q_offset=q_offset, causal=masked)
        return torch.tanh(self.wc(torch.cat([merge_heads(c), x], dim=-1)))

    def cross(self, x: Tensor, context: Tensor) -> Tensor:
        """Cross-attention entry point: target states x (B, T, dim) over source states (B, S, dim)."""
        return self.forward(x, context=context)

    def reference(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The three score functions on explicit (target, source) pairs, head by head."""
        src, masked = self._source(x, context, None)
        T, S, d = x.shape[1], src.shape[1], self.dim // self.heads
        contexts = []
        for i in range(self.heads):
            h, hs = x[..., i * d:(i + 1) * d], src[..., i * d:(i + 1) * d]
            if self.cfg.score == "dot":
                s = h @ hs.transpose(-1, -2)
            elif self.cfg.score == "general":
                Wa = self.wa.weight[i * d:(i + 1) * d].T  # (dim, d): h_t^T W_a hs_s with h_t the full state
                s = (x @ Wa) @ hs.transpose(-1, -2)
            else:
                pair = torch.cat([h[:, :, None].expand(-1, T, S, d), hs[:, None].expand(-1, T, S, d)], dim=-1)
                s = torch.tanh(pair @ self.wa[i].T) @ self.va[i]
            if masked:
                s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            contexts.append(torch.softmax(s, dim=-1) @ hs)
        return torch.tanh(self.wc(torch.cat([torch.cat(contexts, dim=-1), x], dim=-1)))
