"""GAAM: multi-head Gaussian adaptive attention (paper L47, "Gaussian Adaptive Attention is All You Need").

GAAM weights a value by a Gaussian density of its feature, normalized with the data's own mean and
variance along the attended axis, with a learnable mean offset ``delta`` and variance scale ``xi`` per head
(a product of ``gaussians`` such densities). Here the attended axis is the key axis of a dot-product score
row (the paper's "compatible with dot-product attention" use): for query ``i`` over its visible keys ``j``

    s_ij = q_i . k_j / sqrt(d),   mu_i = mean_j s_ij,   var_i = mean_j (s_ij - mu_i)^2
    g_ij = prod_g exp(-(s_ij - mu_i - delta_hg)^2 / (2 xi_hg (var_i + eps)))
    W_ij = g_ij / sum_j g_ij,     out_i = sum_j W_ij v_j

Cost: like softmax attention plus two row reductions; weights cannot go through SDPA (the exponent is
quadratic in the score), so the fast path streams query chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer, positive_number
from ..registry import register
from ._scored import by_rows, visible


@dataclass(frozen=True)
class GAAMConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    gaussians: int = 1  # densities multiplied per head
    eps: float = 1e-5  # added to the row variance
    chunk: int = 128  # query rows per block of the fast path

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        positive_int("gaussians", self.gaussians)
        positive_number("eps", self.eps)
        positive_int("chunk", self.chunk)


@register("gaam", family="layers", papers=("L47",), year=2024, config=GAAMConfig,
          summary="Gaussian weights over normalized scores with learnable mean offset and variance per head")
class GAAMAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); the Gaussian weights are the layer's own (``attend``), ``chunk`` rows at a time."""

    def __init__(self, cfg: GAAMConfig) -> None:
        super().__init__(cfg)
        self.delta = nn.Parameter(torch.zeros(cfg.heads, cfg.gaussians))  # mean offsets
        self.log_xi = nn.Parameter(torch.zeros(cfg.heads, cfg.gaussians))  # log variance scales

    def _log_density(self, s: Tensor, m: Tensor) -> Tensor:
        """Scores (B, H, R, Tk) and visibility (R, Tk) -> log of the Gaussian weight (B, H, R, Tk)."""
        mf = m.to(s.dtype)
        n = mf.sum(-1, keepdim=True)
        mu = (s * mf).sum(-1, keepdim=True) / n
        var = ((s - mu).pow(2) * mf).sum(-1, keepdim=True) / n
        z = (s - mu).unsqueeze(-1) - self.delta.view(1, -1, 1, 1, self.cfg.gaussians)  # (B, H, R, Tk, G)
        xi = self.log_xi.exp().view(1, -1, 1, 1, self.cfg.gaussians)
        return -(z.pow(2) / (2 * xi)).sum(-1) / (var + self.cfg.eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, start: int, state=None) -> Tensor:
        """q (B, H, T, d) at positions start.. over k, v (B, H, Tk, d) -> (B, H, T, d)."""
        scale = self.head_dim ** -0.5

        def rows(a: int, b: int) -> Tensor:
            s = q[:, :, a:b] @ k.transpose(-1, -2) * scale
            m = visible(b - a, k.shape[2], start + a, self.causal, q.device)
            return torch.softmax(self._log_density(s, m).masked_fill(~m, float("-inf")), dim=-1) @ v

        return by_rows(rows, q.shape[2], self.cfg.chunk)

    def reference(self, x: Tensor) -> Tensor:
        """Dense, one Gaussian density at a time, normalized over each row's visible keys."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5
        allowed = torch.ones(T, T, dtype=x.dtype, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        n = allowed.sum(-1, keepdim=True)
        mu = (s * allowed).sum(-1, keepdim=True) / n
        var = ((s - mu) ** 2 * allowed).sum(-1, keepdim=True) / n
        log_g = torch.zeros_like(s)
        for g in range(self.cfg.gaussians):
            mean = mu + self.delta[:, g].view(1, -1, 1, 1)
            variance = self.log_xi[:, g].exp().view(1, -1, 1, 1) * (var + self.cfg.eps)
            log_g = log_g - (s - mean) ** 2 / (2 * variance)
        log_g = torch.where(allowed.bool(), log_g, torch.full_like(log_g, -torch.inf))
        g = torch.exp(log_g - log_g.amax(-1, keepdim=True))  # rescaled for range; cancels in the ratio
        w = g / g.sum(-1, keepdim=True)
        return self.out(torch.einsum("bhij,bhjd->bhid", w, v))
