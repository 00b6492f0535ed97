"""Agent attention, causal form (R55): a few agent tokens attend to the keys, queries attend to the agents.

``O = softmax(Q A^T / sqrt d) . softmax(A K^T / sqrt d) V`` with ``n`` agent tokens ``A`` per head -- a generalized
linear attention whose feature dimension is ``n``. Causal: the agent step runs over the prefix,
``V_A(t)[m] = sum_{j<=t} softmax_{j<=t}(a_m . k_j / sqrt d) v_j``, a per-agent softmax over time computed by
``attnlab.core.linear.cumulative_softmax_attention`` with a running maximum (constant state ``n x (d + 2)``).

The paper pools the agents from the queries, which would let a token see later queries in a causal model; here
they are learned parameters. The paper's agent biases and depthwise-convolution term are not included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ...core.linear import cumulative_softmax_attention
from ..base import check_hidden
from ..registry import register
from ._common import QKVLayer, RecurrentCache, causal_mask, check_common


@dataclass(frozen=True)
class AgentConfig:
    """agents: agent tokens per head (the feature dimension of the equivalent linear attention)."""

    dim: int = 256
    heads: int = 4
    agents: int = 16
    mode: str = "chunked"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_common(self.dim, self.heads, self.mode, self.chunk_size)
        positive_int("agents", self.agents)


@register(
    "agent",
    family="linear",
    papers=("R55",),
    year=2024,
    summary="Agent attention: softmax from n agent tokens to keys, then from queries to agents; causal, O(n d) state",
    config=AgentConfig,
)
class AgentAttention(QKVLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * n * (d + 2)`` numbers at any length."""

    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__(cfg.dim, cfg.heads)
        self.cfg = cfg
        self.agent_tokens = nn.Parameter(torch.randn(cfg.heads, cfg.agents, self.d) / math.sqrt(self.d))

    def _logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        scale = 1.0 / math.sqrt(self.d)
        a = self.agent_tokens.to(x.dtype)
        return (q @ a.transpose(-1, -2)) * scale, (k @ a.transpose(-1, -2)) * scale, v  # (B, H, T, n) x2

    def forward(self, x: Tensor, cache: RecurrentCache | None = None) -> Tensor:
        check_hidden(x, self.cfg.dim)
        qa, ka, v = self._logits(x)
        o, st = cumulative_softmax_attention(qa.softmax(-1), ka, v, mode=self.cfg.mode, chunk_size=self.cfg.chunk_size,
                                             state=None if cache is None else cache.state)
        if cache is not None:
            cache.state, cache.length = st, cache.length + x.shape[1]
        return self.out(o)

    def reference(self, x: Tensor) -> Tensor:
        """Agent step as a masked softmax per agent over (query time, key time), then the query step."""
        qa, ka, v = self._logits(x)
        T = x.shape[1]
        logits = ka.transpose(-1, -2)[..., None, :].expand(-1, -1, -1, T, -1)  # (B, H, n, T, T)
        agent_w = logits.masked_fill(~causal_mask(T, x.device), float("-inf")).softmax(-1)
        agent_v = agent_w @ v[:, :, None]  # (B, H, n, T, d): each agent's summary at each time
        o = torch.einsum("bhtm,bhmtd->bhtd", qa.softmax(-1), agent_v)
        return self.out(o)

    def init_cache(self, batch: int = 1) -> RecurrentCache:
        return RecurrentCache()

    def state_size(self, seq_len: int) -> int:
        return self.heads * self.cfg.agents * (self.d + 2)
