"""MHE: multiple head embeddings over one shared projection (L182, Xue & Aletras 2023, "Pit One Against Many").

One query, one key and one value projection ``W_Q, W_K, W_V: dim -> d`` are shared by every head; head ``i``
differs only by small embeddings ``e_i^Q, e_i^K, e_i^V`` (d numbers each), combined with the shared projection
by addition (MHE-ADD: ``Q_i = X W_Q + e_i^Q``) or element-wise product (MHE-MUL: ``Q_i = (X W_Q) * e_i^Q``).
Then ``O = concat_i softmax(Q_i K_i^T / sqrt(d)) V_i  W_O``. Extra parameters over single-head attention:
3·h·d (the paper's count), against MHA's 3·h·d·dim projections.

Fast path: the shared projections run once as one "head" and the embeddings broadcast over heads, then the
attention engine (any pattern). RoPE, when on, rotates the per-head q and k after the embedding.
Property the tests check: with ADD, no RoPE and no score modifier, ``e_i^K`` shifts every score of a row by
the same ``Q_i . e_i^K`` and cancels in the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.reference import reference_attention
from ..common import apply_rope
from ..heads import one_of
from ..registry import register
from .mha import PatternHeadsConfig, PatternLayer


@dataclass(frozen=True)
class MHEConfig(PatternHeadsConfig):
    """mode: "mul" or "add" (how head embeddings combine with the shared projection); head_dim: d
    (None: dim // heads)."""

    rope: bool = True
    mode: str = "mul"

    fixed = ("kv_heads",)  # one shared key/value projection, per-head embeddings

    def validate(self) -> None:
        one_of("mode", self.mode, ("mul", "add"))


@register(
    "mhe",
    family="layers",
    papers=("L182",),
    year=2023,
    summary="multiple head embeddings: one shared q/k/v projection plus a small embedding per head",
    config=MHEConfig,
)
class MHEAttention(PatternLayer):
    """(B, T, dim) -> (B, T, dim). Projection cost 3·T·dim·d (one head's) instead of 3·T·dim·h·d."""

    def __init__(self, cfg: MHEConfig) -> None:
        super().__init__(cfg, proj="")
        h, d = cfg.heads, cfg.d
        self.q_proj = nn.Linear(cfg.dim, d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.dim, bias=False)
        # MUL starts near the identity (heads then diverge), ADD near zero -- both with distinct heads
        center = 1.0 if cfg.mode == "mul" else 0.0
        self.emb = nn.Parameter(center + 0.5 * torch.randn(3, h, d))  # rows: e^Q, e^K, e^V

    def _combine(self, base: Tensor, e: Tensor) -> Tensor:
        """base (B, T, d), e (h, d) -> (B, h, T, d)."""
        base, e = base.unsqueeze(1), e.view(1, *e.shape[:1], 1, e.shape[-1])
        return base * e if self.cfg.mode == "mul" else base + e

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The shared projections once, each head's embedding broadcast: (B, h, T, d) each."""
        q, k, v = (self._combine(p(x), e) for p, e in zip((self.q_proj, self.k_proj, self.v_proj), self.emb))
        if self.cfg.rope:
            q, k = self.rotate(q, start), self.rotate(k, start)
        return q, k, v

    def reference(self, x: Tensor) -> Tensor:
        """Head by head: Q_i = X W_Q (+|*) e_i^Q, etc.; O = concat_i softmax(Q_i K_i^T / sqrt d) V_i W_O."""
        cfg = self.cfg
        pos = torch.arange(x.shape[1], device=x.device)
        eq, ek, ev = self.emb
        outs = []
        for i in range(cfg.heads):
            if cfg.mode == "mul":
                q, k, v = x @ self.q_proj.weight.T * eq[i], x @ self.k_proj.weight.T * ek[i], x @ self.v_proj.weight.T * ev[i]
            else:
                q, k, v = x @ self.q_proj.weight.T + eq[i], x @ self.k_proj.weight.T + ek[i], x @ self.v_proj.weight.T + ev[i]
            q, k, v = q[:, None], k[:, None], v[:, None]
            if cfg.rope:
                q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
            outs.append(reference_attention(q, k, v, cfg.pattern, dtype=None)[:, 0])
        return torch.cat(outs, dim=-1) @ self.o_proj.weight.T

    def state_size(self, seq_len: int) -> int:
        return 2 * self.cfg.heads * self.cfg.d * seq_len
