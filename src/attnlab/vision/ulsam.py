"""ULSAM, the ultra-lightweight subspace attention module (V61, Saini et al. 2020).

The ``C`` channels are split into ``g`` subspaces ``F_1 .. F_g`` of ``C / g`` channels; each gets one spatial
attention map from a depthwise 1x1 convolution, a 3x3 max-pool (stride 1), a pointwise convolution to one
channel and a softmax over the ``H W`` positions; the map reweights its subspace, which is kept as a residual:

    A_n  = softmax_{HW}( PW( maxpool_3x3( DW_1x1(F_n) ) ) )        (1, H, W)
    F^_n = A_n (*) F_n + F_n
    ULSAM(F) = concat(F^_1, .., F^_g)

Parameters ``2 C + C + g`` (DW scale and bias, PW weights and bias); cost ``O(N C)``: a multi-scale (one map
per subspace) spatial attention for compact CNNs. Max-pool pads with ``-inf`` (the border takes the max of what
exists). Deviation: in the ViT the module sits in the mixer slot, so the block adds its own residual too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from .common import shifted, to_image, to_tokens
from .registry import MixerContext, register_mixer


class ULSAM(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C): per-subspace spatial softmax maps reweighting the subspaces."""

    def __init__(self, dim: int, grid: tuple[int, int], groups: int = 4) -> None:
        super().__init__()
        positive_int("groups", groups)
        if dim % groups:
            raise ValueError(f"groups ({groups}) must divide dim ({dim})")
        self.grid, self.groups = grid, groups
        self.dw = nn.Conv2d(dim, dim, 1, groups=dim)
        # one pointwise conv per subspace (C/g -> 1) as one grouped conv (C -> g)
        self.pw = nn.Conv2d(dim, groups, 1, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        img = to_image(x, self.grid)
        B, C, H, W = img.shape
        a = self.pw(F.max_pool2d(self.dw(img), 3, stride=1, padding=1))  # (B, g, H, W)
        a = a.flatten(2).softmax(-1).view(B, self.groups, 1, H, W)
        f = img.reshape(B, self.groups, C // self.groups, H, W)
        return to_tokens((a * f + f).reshape(B, C, H, W))

    def reference(self, x: Tensor) -> Tensor:
        """Subspace by subspace; the max-pool as a max over the nine shifted images (-inf outside)."""
        img = to_image(x, self.grid)
        B, C, H, W = img.shape
        c = C // self.groups
        out = []
        for n in range(self.groups):
            f = img[:, n * c:(n + 1) * c]
            h = f * self.dw.weight[n * c:(n + 1) * c, 0, 0, 0].view(1, -1, 1, 1) \
                + self.dw.bias[n * c:(n + 1) * c].view(1, -1, 1, 1)
            inside = torch.ones_like(h)
            pooled = torch.full_like(h, float("-inf"))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    s, ok = shifted(h, dy, dx), shifted(inside, dy, dx) > 0
                    pooled = torch.where(ok, torch.maximum(pooled, s), pooled)
            logits = torch.einsum("c,bchw->bhw", self.pw.weight[n, :, 0, 0], pooled) + self.pw.bias[n]
            a = torch.exp(logits - logits.amax(dim=(1, 2), keepdim=True))
            a = a / a.sum(dim=(1, 2), keepdim=True)
            out.append(a[:, None] * f + f)
        return to_tokens(torch.cat(out, dim=1))


@register_mixer("ulsam", papers=("V61",), summary="ULSAM: one spatial softmax map per channel subspace "
                "(DW 1x1, 3x3 max-pool, PW to 1 channel)", grid_only=True)
def build_ulsam(ctx: MixerContext, groups: int = 4) -> ULSAM:
    return ULSAM(ctx.dim, ctx.grid, groups)
