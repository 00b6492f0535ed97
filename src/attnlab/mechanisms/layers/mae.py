"""MAE: a mixture of attentive experts, each expert multi-head attention with one head dropped (L238, Peng et
al. 2020, "A Mixture of h-1 Heads is Better than h Heads").

Expert ``i`` is the layer without head ``i``, rescaled to keep its magnitude:
``f_i(x) = h / (h - 1) * sum_{j != i} H^j W_O^j``. A gating network gives per-token responsibilities
``r = softmax(W_2 tanh(W_1 x))`` (``W_1`` omitted when ``gate_hidden = 0``) and ``MAE(x) = sum_i r_i f_i(x)``.

Fast path: the mixture collapses to one weighted multi-head sum, ``sum_j (1 - r_j) h / (h - 1) H^j W_O^j``,
so the cost is that of one MHA plus the gate (the reference evaluates the h experts literally).

Training: the paper alternates block-coordinate steps between the responsibilities (the gate) and the
experts' parameters. ``set_phase("gate" | "experts" | "joint")`` freezes the other block so a training loop
can alternate; "joint" (the default) trains both at once. Deviation: responsibilities are per token (causal,
usable for decoding) rather than computed once per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..common import merge_heads
from ..registry import register
from .mha import MHAConfig, MultiHeadAttention


@dataclass(frozen=True)
class MAEConfig(MHAConfig):
    """MHA options plus gate_hidden: width of the gating network's hidden layer (0: a linear gate)."""

    gate_hidden: int = 0

    def validate(self) -> None:
        super().validate()
        if self.heads < 2:
            raise ValueError(f"MAE drops one head per expert and needs heads >= 2, got {self.heads}")
        if self.gate_hidden < 0:
            raise ValueError(f"gate_hidden must be >= 0, got {self.gate_hidden}")


@register(
    "mae",
    family="layers",
    papers=("L238",),
    year=2020,
    summary="mixture of attentive experts: h experts of h-1 heads mixed by learned per-token responsibilities",
    config=MAEConfig,
)
class MAEAttention(MultiHeadAttention):
    """(B, T, dim) -> (B, T, dim); the MHA projections are the experts' shared parameters."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__(cfg)
        h = cfg.heads
        if cfg.gate_hidden:
            self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.gate_hidden), nn.Tanh(), nn.Linear(cfg.gate_hidden, h))
        else:
            self.gate = nn.Linear(cfg.dim, h)

    def responsibilities(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, T, h), each row sums to 1."""
        return torch.softmax(self.gate(x), dim=-1)

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """o (B, h, T, d): each head weighted by its weight summed over the experts keeping it."""
        h = self.cfg.heads
        w = (1.0 - self.responsibilities(x)) * (h / (h - 1))
        return self.o_proj(merge_heads(o * w.transpose(1, 2).unsqueeze(-1)))

    def reference(self, x: Tensor) -> Tensor:
        """The h experts one by one: each is MHA without head i, rescaled by h / (h - 1), mixed by r_i."""
        h = self.cfg.heads
        r = self.responsibilities(x)
        Wo = self.o_proj.weight.T.chunk(h, dim=0)
        heads = self._head_outputs(x)  # h tensors (B, T, d)
        out = x.new_zeros(x.shape)
        for i in range(h):
            expert = sum(heads[j] @ Wo[j] for j in range(h) if j != i) * (h / (h - 1))
            if self.o_proj.bias is not None:
                expert = expert + self.o_proj.bias
            out = out + r[..., i : i + 1] * expert
        return out

    def _head_outputs(self, x: Tensor) -> list[Tensor]:
        """Each head's attention output (B, T, d) from the dense float reference."""
        from ...core.reference import reference_attention

        q, k, v = self.project(x, 0)
        o = reference_attention(q, k, v, self.cfg.pattern, self.cfg.score_mod, dtype=None)
        return list(o.unbind(1))

    def set_phase(self, phase: str) -> None:
        """Block-coordinate training: "gate" trains only the responsibilities, "experts" only the attention
        parameters, "joint" both."""
        if phase not in ("gate", "experts", "joint"):
            raise ValueError(f"phase must be 'gate', 'experts' or 'joint', got {phase!r}")
        gate_ids = {id(p) for p in self.gate.parameters()}
        for p in self.parameters():
            is_gate = id(p) in gate_ids
            p.requires_grad_(phase == "joint" or (phase == "gate") == is_gate)
