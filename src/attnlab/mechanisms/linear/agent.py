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
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask


@dataclass(frozen=True)
class AgentConfig(LinearHeadsConfig):
    """agents: agent tokens per head (the feature dimension of the equivalent linear attention)."""

    agents: int = 16

    def validate(self) -> None:
        super().validate()
        positive_int("agents", self.agents)


@register(
    "agent",
    family="linear",
    papers=("R55",),
    year=2024,
    summary="Agent attention: softmax from n agent tokens to keys, then from queries to agents; causal, O(n d) state",
    config=AgentConfig,
)
class AgentAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * n * (d + 2)`` numbers at any length. Op
    ``cumulative_softmax`` over the agent logits, read by the softmax of the query logits."""

    op = "cumulative_softmax"

    def __init__(self, cfg: AgentConfig) -> None:
        super().__init__(cfg)
        self.agent_tokens = nn.Parameter(torch.randn(cfg.heads, cfg.agents, cfg.d) / math.sqrt(cfg.d))

    def _logits(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = super().project(x, 0)
        scale = 1.0 / math.sqrt(self.d)
        a = self.agent_tokens.to(x.dtype)
        return (q @ a.transpose(-1, -2)) * scale, (k @ a.transpose(-1, -2)) * scale, v  # (B, H, T, n) x2

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        return self._logits(x)

    def op_options(self) -> dict:
        return {"q_map": "softmax", "mode": self.cfg.mode, "chunk": self.cfg.chunk}

    def reference(self, x: Tensor) -> Tensor:
        """Agent step as a masked softmax per agent over (query time, key time), then the query step."""
        qa, ka, v = self._logits(x)
        T = x.shape[1]
        logits = ka.transpose(-1, -2)[..., None, :].expand(-1, -1, -1, T, -1)  # (B, H, n, T, T)
        agent_w = logits.masked_fill(~causal_mask(T, x.device), float("-inf")).softmax(-1)
        agent_v = agent_w @ v[:, :, None]  # (B, H, n, T, d): each agent's summary at each time
        o = torch.einsum("bhtm,bhmtd->bhtd", qa.softmax(-1), agent_v)
        return self.out(o)

    def state_size(self, seq_len: int) -> int:
        return self.heads * self.cfg.agents * (self.d + 2)
