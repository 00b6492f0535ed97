"""Region attention (V82, RAT, "Region Attention Transformer for Medical Image Restoration"): self-attention
restricted to irregular regions of the image given by a segmentation prior.

    O_i = sum_{j : r(j) = r(i)} softmax_j(q_i . k_j / sqrt(d)) v_j      (per head, then W_O)

where ``r(i)`` is the region of token ``i``. RAT takes its regions from SAM's masks and attends inside each
region (its region partition / restoration module groups the tokens of a region together); here the regions
are a label per patch token supplied with the images (``ViT.forward(img, regions=...)``), and when none are
supplied the ViT derives them with :func:`intensity_regions`, a parameter-free stand-in for SAM: each patch's
mean intensity quantized into ``levels`` bins. Cost: ``sum_r |r|^2 d`` per head (dense within regions; this
implementation masks a full ``N x N`` score matrix, which is exact but not the cheaper grouped form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from .registry import MixerContext, register_mixer


class RegionAttention(nn.Module):
    """(B, N, dim) -> (B, N, dim): multi-head attention where token ``i`` sees the tokens of its region.
    The regions (B, N) long are set per batch with :meth:`set_regions` (the ViT does it)."""

    needs_regions = True

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.regions: Tensor | None = None

    def set_regions(self, regions: Tensor | None) -> None:
        self.regions = regions

    def _check(self, x: Tensor) -> Tensor:
        r = self.regions
        if r is None:
            raise ValueError("region attention needs regions: call set_regions (the ViT passes them)")
        if r.shape != x.shape[:2]:
            raise ValueError(f"regions must be (B, N) = {tuple(x.shape[:2])}, got {tuple(r.shape)}")
        return r

    def forward(self, x: Tensor) -> Tensor:
        r = self._check(x)
        B, N, D = x.shape
        H = self.heads
        q, k, v = (p(x).view(B, N, H, D // H).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        same = (r[:, :, None] == r[:, None, :])[:, None]  # (B, 1, N, N); every token sees at least itself
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=same)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, D))

    def reference(self, x: Tensor) -> Tensor:
        """Region by region: gather the region's tokens, dense softmax attention among them, scatter back."""
        r = self._check(x)
        B, N, D = x.shape
        H, d = self.heads, D // self.heads
        q, k, v = x @ self.q_proj.weight.T, x @ self.k_proj.weight.T, x @ self.v_proj.weight.T
        o = torch.zeros_like(q)
        for b in range(B):
            for label in r[b].unique():
                idx = (r[b] == label).nonzero()[:, 0]
                for h in range(H):
                    sl = slice(h * d, (h + 1) * d)
                    s = q[b, idx, sl] @ k[b, idx, sl].T / d**0.5
                    o[b, idx, sl] = s.softmax(-1) @ v[b, idx, sl]
        return o @ self.o_proj.weight.T


def intensity_regions(img: Tensor, patch: int, levels: int = 2) -> Tensor:
    """A parameter-free stand-in for SAM's masks: (B, C, H, W) -> (B, (H/p) (W/p)) long labels, each patch's
    mean intensity (over channels and pixels) quantized into ``levels`` equal bins of the image's own
    min..max range (row-major patches)."""
    positive_int("levels", levels)
    m = F.avg_pool2d(img.mean(1, keepdim=True), patch).flatten(1)  # (B, n)
    lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
    t = (m - lo) / (hi - lo).clamp(min=1e-12)
    return (t * levels).long().clamp(max=levels - 1)


@register_mixer("region", papers=("V82",), summary="region attention: attention inside the regions of a "
                "segmentation prior (labels per patch)", grid_only=True)
def build_region(ctx: MixerContext) -> RegionAttention:
    return RegionAttention(ctx.dim, ctx.attn.heads)
