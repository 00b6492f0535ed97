"""Attentive probing (V36, "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling"): a
classifier on frozen features whose pooling is a learned query cross-attending to the tokens.

    K = F W_K,  V = F W_V                           F: frozen tokens (B, N, dim)
    o_m = sum_h softmax(q_{m,h} K_h^T / sqrt(d)) V_h W_O^h      m = 1 .. queries (learned q_m, per head h)
    logits = W_C (1/M sum_m o_m) + b

With one query this is the attentive probe of MAE-style evaluations; several queries (the paper's efficient
probing uses a few) each pool a view, averaged before the classifier. Only the probe trains: the backbone runs
without gradients. Cost per image ``O(M N dim)`` plus the projections. Deviations: W_K and W_V are kept (the
paper's efficient variant trims projections); no LayerNorm or MLP on the pooled vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int


class AttentiveProbe(nn.Module):
    """features (B, N, dim) -> logits (B, classes)."""

    def __init__(self, dim: int, classes: int, heads: int = 1, queries: int = 1) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("classes", classes), ("heads", heads), ("queries", queries)):
            positive_int(name, value)
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.k_proj, self.v_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, classes)

    def pool(self, f: Tensor) -> Tensor:
        """(B, N, dim) -> (B, dim): the mean over queries of the cross-attention outputs."""
        B, N, D = f.shape
        H, M = self.heads, self.query.shape[0]
        q = self.query.to(f.dtype).view(1, M, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        k = self.k_proj(f).view(B, N, H, D // H).transpose(1, 2)
        v = self.v_proj(f).view(B, N, H, D // H).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, H, M, d)
        return self.o_proj(o.transpose(1, 2).reshape(B, M, D)).mean(1)

    def forward(self, f: Tensor) -> Tensor:
        return self.head(self.pool(f))

    def reference(self, f: Tensor) -> Tensor:
        """Query by query and head by head with an explicit softmax."""
        B, N, D = f.shape
        H, d = self.heads, D // self.heads
        k, v = f @ self.k_proj.weight.T, f @ self.v_proj.weight.T
        pooled = torch.zeros(B, D, dtype=f.dtype)
        for q in self.query.to(f.dtype):
            heads = []
            for h in range(H):
                s = torch.einsum("d,bnd->bn", q[h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]) / d**0.5
                w = torch.exp(s - s.amax(1, keepdim=True))
                w = w / w.sum(1, keepdim=True)
                heads.append(torch.einsum("bn,bnd->bd", w, v[..., h * d:(h + 1) * d]))
            pooled = pooled + torch.cat(heads, -1) @ self.o_proj.weight.T
        return (pooled / self.query.shape[0]) @ self.head.weight.T + self.head.bias


class ProbedViT(nn.Module):
    """A frozen backbone's ``features`` (no gradients reach it) followed by an :class:`AttentiveProbe`."""

    def __init__(self, backbone: nn.Module, probe: AttentiveProbe) -> None:
        super().__init__()
        self.backbone, self.probe = backbone, probe
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def forward(self, img: Tensor) -> Tensor:
        self.backbone.eval()
        with torch.no_grad():
            f = self.backbone.features(img)
        return self.probe(f)
