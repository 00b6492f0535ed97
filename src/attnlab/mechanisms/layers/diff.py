"""Differential attention (DIFF Transformer, Ye et al. 2024) and Shared DIFF (L265, shared base + low-rank).

DIFF Transformer is the parent of L265 (whose abstract describes it); it is not itself in ``shared/papers.md``,
so both layers cite L265. Per head i, with q/k width d and value width 2d:

    [Q1; Q2] = X [W_Q1, W_Q2],  [K1; K2] = X [W_K1, W_K2],  V = X W_V
    head_i   = (1 - lambda_init) * RMSNorm( (softmax(Q1 K1^T / sqrt d) - lambda softmax(Q2 K2^T / sqrt d)) V )
    lambda   = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,   lambda_init = 0.8 - 0.6 exp(-0.3 (depth - 1))
    out      = concat_i head_i W_O

The difference of two softmax maps cancels common-mode "noise" attention. With ``heads = dim / (2 d)`` it has
the parameters and FLOPs of MHA with 2·heads heads of width d. Fast path: the two maps run as 2·heads query
heads through the attention engine in one call (any causal pattern; value halves as extra heads so the fused
kernel applies) and are subtracted after; the KV cache holds both key sets and the shared values.

Shared DIFF (L265) replaces the two independent query (and key) projections by one shared base plus a
low-rank update per map: ``W_Qj = W_Q + A_j B_j`` (rank r), likewise for keys -- fewer parameters, the same
attention. Fast path: ``X W_Q + (X A_j) B_j``; the reference forms the full matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ...core.reference import reference_attention
from ..common import RMSNorm, apply_rope, merge_heads, split_heads
from ..heads import LayerCache
from ..registry import register
from .mha import PatternHeadsConfig, PatternLayer, cached_attention


@dataclass(frozen=True)
class DiffConfig(PatternHeadsConfig):
    """heads: differential heads; head_dim: q/k width d of one map (None: dim // heads // 2; values use 2d);
    depth: the layer's 1-based index, for lambda_init (or set lambda_init)."""

    heads: int = 4
    rope: bool = True
    depth: int = 1
    lambda_init: float | None = None

    fixed = ("kv_heads",)  # every map has its own keys

    def validate(self) -> None:
        positive_int("depth", self.depth)
        if self.head_dim is None and self.dim % (2 * self.heads):
            raise ValueError(f"dim ({self.dim}) must be divisible by 2 * heads ({2 * self.heads}); set head_dim")

    @property
    def d(self) -> int:
        return self.head_dim or self.dim // self.heads // 2

    @property
    def lam_init(self) -> float:
        if self.lambda_init is not None:
            return self.lambda_init
        return 0.8 - 0.6 * math.exp(-0.3 * (self.depth - 1))


@register(
    "diff",
    family="layers",
    papers=("L265",),
    year=2024,
    summary="differential attention (DIFF Transformer): difference of two softmax maps, per-head RMSNorm",
    config=DiffConfig,
)
class DiffAttention(PatternLayer):
    """(B, T, dim) -> (B, T, dim); both maps in one call of the op (2h query heads)."""

    def __init__(self, cfg: DiffConfig) -> None:
        super().__init__(cfg, proj="")
        h, d = cfg.heads, cfg.d
        self._make_qk(cfg)
        self.v_proj = nn.Linear(cfg.dim, h * 2 * d, bias=False)
        self.o_proj = nn.Linear(h * 2 * d, cfg.dim, bias=False)
        self.lam = nn.Parameter(0.1 * torch.randn(4, d))  # lq1, lk1, lq2, lk2
        self.subln = RMSNorm(2 * d)

    def _make_qk(self, cfg: DiffConfig) -> None:
        self.q_proj = nn.Linear(cfg.dim, 2 * cfg.heads * cfg.d, bias=False)  # [W_Q1, W_Q2]
        self.k_proj = nn.Linear(cfg.dim, 2 * cfg.heads * cfg.d, bias=False)

    def qk_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, dim) -> q, k (B, T, 2 * h * d): map 1's heads, then map 2's."""
        return self.q_proj(x), self.k_proj(x)

    def qk_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Explicit (dim, h * d) matrices W_Q1, W_Q2, W_K1, W_K2 (for the reference)."""
        q1, q2 = self.q_proj.weight.T.chunk(2, dim=1)
        k1, k2 = self.k_proj.weight.T.chunk(2, dim=1)
        return q1, q2, k1, k2

    def lambda_(self) -> Tensor:
        lq1, lk1, lq2, lk2 = self.lam
        return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.cfg.lam_init

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (B, 2h, T, d): map 1's heads, then map 2's; v (B, h, T, 2d)."""
        h = self.cfg.heads
        qa, ka = self.qk_maps(x)
        q, k = split_heads(qa, 2 * h), split_heads(ka, 2 * h)
        v = split_heads(self.v_proj(x), h)
        if self.cfg.rope:
            q, k = self.rotate(q, start), self.rotate(k, start)
        return q, k, v

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        h = self.cfg.heads
        q, k, v, _ = self.qkv_cached(x, cache)
        o = self._both_maps(q, k, v)
        o = o[:, :h] - self.lambda_() * o[:, h:]
        return self.o_proj(merge_heads(self.subln(o) * (1.0 - self.cfg.lam_init)))

    def _both_maps(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, 2h, Tq, d), k (B, 2h, Tk, d), v (B, h, Tk, 2d) -> (B, 2h, Tq, 2d): [A1 V; A2 V] per head.

        One attention call with value width d: SDPA's CPU flash kernel needs equal q and v widths (a 2d-wide v
        falls back to the unfused math path, measured 7x slower), so the value halves ride on copies of the
        2h query heads.
        """
        va, vb = v.repeat(1, 2, 1, 1).chunk(2, dim=-1)  # (B, 2h, Tk, d) each
        o = cached_attention(q.repeat(1, 2, 1, 1), k.repeat(1, 2, 1, 1), torch.cat([va, vb], dim=1), None,
                             self.cfg.pattern)
        oa, ob = o.chunk(2, dim=1)
        return torch.cat([oa, ob], dim=-1)

    def reference(self, x: Tensor) -> Tensor:
        """Head by head with the two attention maps materialized and subtracted."""
        cfg, h, d = self.cfg, self.cfg.heads, self.cfg.d
        pos = torch.arange(x.shape[1], device=x.device)
        Wq1, Wq2, Wk1, Wk2 = self.qk_weights()
        Wv = self.v_proj.weight.T
        lam = self.lambda_()
        heads = []
        for i in range(h):
            cols = slice(i * d, (i + 1) * d)
            q1, q2, k1, k2 = ((x @ W[:, cols])[:, None] for W in (Wq1, Wq2, Wk1, Wk2))
            if cfg.rope:
                q1, q2, k1, k2 = (apply_rope(t, pos, cfg.rope_base) for t in (q1, q2, k1, k2))
            v = (x @ Wv[:, i * 2 * d : (i + 1) * 2 * d])[:, None]
            _, a1 = reference_attention(q1, k1, v, cfg.pattern, return_weights=True, dtype=None)
            _, a2 = reference_attention(q2, k2, v, cfg.pattern, return_weights=True, dtype=None)
            heads.append(((a1 - lam * a2) @ v)[:, 0])
        o = torch.stack(heads, dim=1)  # (B, h, T, 2d)
        return self.o_proj(merge_heads(self.subln(o) * (1.0 - cfg.lam_init)))

    def state_size(self, seq_len: int) -> int:
        return (2 * self.cfg.heads * self.cfg.d + self.cfg.heads * 2 * self.cfg.d) * seq_len


@dataclass(frozen=True)
class SharedDiffConfig(DiffConfig):
    """DIFF options plus rank: rank of each map's low-rank update to the shared query/key bases."""

    rank: int = 8

    def validate(self) -> None:
        super().validate()
        positive_int("rank", self.rank)


@register(
    "shared_diff",
    family="layers",
    papers=("L265",),
    year=2025,
    summary="Shared DIFF: differential attention with a shared q/k base plus low-rank updates per map",
    config=SharedDiffConfig,
)
class SharedDiffAttention(DiffAttention):
    """(B, T, dim) -> (B, T, dim); q/k parameters 2·dim·h·d + 4·r·(dim + h·d) instead of 4·dim·h·d."""

    def _make_qk(self, cfg: SharedDiffConfig) -> None:
        hd, r = cfg.heads * cfg.d, cfg.rank
        self.q_base = nn.Linear(cfg.dim, hd, bias=False)
        self.k_base = nn.Linear(cfg.dim, hd, bias=False)
        # A_j: dim -> r, B_j: r -> h*d, for j = 1, 2 and for queries and keys
        self.q_down = nn.Linear(cfg.dim, 2 * r, bias=False)
        self.k_down = nn.Linear(cfg.dim, 2 * r, bias=False)
        self.q_up = nn.Parameter(torch.randn(2, r, hd) / math.sqrt(r))
        self.k_up = nn.Parameter(torch.randn(2, r, hd) / math.sqrt(r))

    def _maps(self, x: Tensor, base: nn.Linear, down: nn.Linear, up: Tensor) -> Tensor:
        lo = down(x).unflatten(-1, (2, -1))  # (B, T, 2, r): X A_1, X A_2
        upd = torch.einsum("btjr,jrc->btjc", lo, up)  # (X A_j) B_j
        return (base(x).unsqueeze(-2) + upd).flatten(-2)  # (B, T, 2 * h * d)

    def qk_maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._maps(x, self.q_base, self.q_down, self.q_up), self._maps(x, self.k_base, self.k_down, self.k_up)

    def qk_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """W_Xj = W_X + A_j B_j as full (dim, h * d) matrices."""
        out = []
        for base, down, up in ((self.q_base, self.q_down, self.q_up), (self.k_base, self.k_down, self.k_up)):
            A = down.weight.T.chunk(2, dim=1)  # (dim, r) each
            out += [base.weight.T + A[j] @ up[j] for j in range(2)]
        return out[0], out[1], out[2], out[3]
