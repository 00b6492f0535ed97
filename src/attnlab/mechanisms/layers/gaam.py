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

The op ``gaam`` takes the learned parameters as tensor options: ``offset`` = ``delta`` (H, G) and ``var_scale`` =
``xi`` (H, G) (G densities per head; the layer passes its own). Their parameter-free defaults (None) are one
density per head with ``delta = 0`` and ``xi = 1``: each row's weights are a Gaussian of its standardized scores.
A free mask restricts the keys over which the row mean, variance and normalization are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.core.softmax import masked_softmax
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer, positive_number
from ..registry import register
from ._scored import (
    allowed,
    by_rows,
    check_free_mask,
    dense_allowed,
    grouped_apply,
    grouped_scores,
    per_head,
    repeat_kv,
)


def _densities(q: Tensor, offset: Tensor | None, var_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The (H, G) mean offsets and variance scales (defaults: one density, offset 0, scale 1)."""
    H = q.shape[1]
    G = next((t.shape[-1] for t in (offset, var_scale) if isinstance(t, Tensor) and t.dim() == 2), 1)
    off = per_head("offset", offset, (H, G), q)
    xi = per_head("var_scale", var_scale, (H, G), q)
    off = torch.zeros(H, G, dtype=q.dtype, device=q.device) if off is None else off
    xi = torch.ones(H, G, dtype=q.dtype, device=q.device) if xi is None else xi
    return off, xi


def _gaam_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                    causal: bool = True, offset: Tensor | None = None, var_scale: Tensor | None = None,
                    eps: float = 1e-5, chunk: int = 128) -> Tensor:
    """Float64, dense, one Gaussian density at a time, normalized over each row's allowed keys (zero rows when a row
    sees no key)."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    off, xi = _densities(q.double(), offset, var_scale)
    s = torch.einsum("bhid,bhjd->bhij", q.double(), repeat_kv(k.double(), H)) * scale
    ok = dense_allowed(Tq, Tk, q_offset, causal, mask, q.device).expand_as(s)
    okf = ok.double()
    n = okf.sum(-1, keepdim=True).clamp(min=1)
    mu = (s * okf).sum(-1, keepdim=True) / n
    var = ((s - mu) ** 2 * okf).sum(-1, keepdim=True) / n
    log_g = torch.zeros_like(s)
    for g in range(off.shape[1]):
        variance = xi[:, g].view(1, -1, 1, 1) * (var + eps)
        log_g = log_g - (s - mu - off[:, g].view(1, -1, 1, 1)) ** 2 / (2 * variance)
    log_g = torch.where(ok, log_g, torch.full_like(log_g, -torch.inf))
    top = log_g.amax(-1, keepdim=True)
    g = torch.exp(log_g - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))  # cancels in the ratio
    w = g / g.sum(-1, keepdim=True).clamp(min=1e-300)
    return w @ repeat_kv(v.double(), H)


@register_op("gaam", family="dense", papers=("L47",), summary="Gaussian weights over each row's standardized scores "
             "with a mean offset and variance scale per head", options={"causal": True, "offset": None,
             "var_scale": None, "eps": 1e-5, "chunk": 128}, reference=_gaam_reference, example={"chunk": 7})
def gaam_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
            state: dict | None = None, causal: bool = True, offset: Tensor | None = None,
            var_scale: Tensor | None = None, eps: float = 1e-5, chunk: int = 128) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv), ``chunk`` query rows at
    a time; ``offset``, ``var_scale``: (H, G) per-head densities (None: one density, 0 and 1). Stateless."""
    positive_int("chunk", chunk)
    positive_number("eps", eps)
    check_free_mask("gaam", mask, q, k)
    off, xi = _densities(q, offset, var_scale)
    H, G = off.shape

    def rows(a: int, b: int) -> Tensor:
        s = grouped_scores(q[:, :, a:b], k) * scale  # (B, H, rows, Tk)
        m = allowed(a, b, k.shape[2], q_offset, causal, mask, q.device)
        mf = m.to(s.dtype)
        n = mf.sum(-1, keepdim=True).clamp(min=1)
        mu = (s * mf).sum(-1, keepdim=True) / n
        var = ((s - mu).pow(2) * mf).sum(-1, keepdim=True) / n
        z = (s - mu).unsqueeze(-1) - off.view(1, H, 1, 1, G)  # (B, H, rows, Tk, G)
        log_g = -(z.pow(2) / (2 * xi.view(1, H, 1, 1, G))).sum(-1) / (var + eps)
        return grouped_apply(masked_softmax(log_g, m), v)

    out = by_rows(rows, q.shape[2], chunk)
    return out if state is None else (out, state)


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
    """(B, T, dim) -> (B, T, dim): projections + the op ``gaam`` with the learned ``delta`` and ``xi`` per head."""

    op = "gaam"

    def __init__(self, cfg: GAAMConfig) -> None:
        super().__init__(cfg)
        self.delta = nn.Parameter(torch.zeros(cfg.heads, cfg.gaussians))  # mean offsets
        self.log_xi = nn.Parameter(torch.zeros(cfg.heads, cfg.gaussians))  # log variance scales

    def op_options(self) -> dict:
        return {**super().op_options(), "offset": self.delta, "var_scale": self.log_xi.exp()}

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
