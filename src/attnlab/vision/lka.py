"""VAN's large-kernel attention (V65, Guo et al. 2022, "Visual Attention Network").

A ``K x K`` convolution is decomposed into a depthwise ``(2d - 1) x (2d - 1)`` convolution (local), a depthwise
``ceil(K/d) x ceil(K/d)`` convolution with dilation ``d`` (long range) and a pointwise convolution (channels);
the result is an attention map that gates the input elementwise:

    A      = Conv_1x1( DW-D-Conv( DW-Conv(F) ) )
    LKA(F) = A (*) F

VAN's attention sub-layer wraps it in pointwise projections: ``Attn(X) = W_2 LKA(GELU(W_1 X))`` (the block adds
the residual). The paper's K = 21, d = 3: a 5 x 5 depthwise, a 7 x 7 depthwise with dilation 3, a 1 x 1.
Cost per pixel: ``C (25 + 49 + C)`` multiply-adds for LKA plus ``2 C^2`` for the projections: linear in the
number of pixels, adaptive in space and channel. Zero padding keeps the size. Deviations: VAN uses BatchNorm
in its blocks and a convolutional FFN; here the ViT's LayerNorm and token MLP.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from .common import depthwise_ref, pointwise_ref, to_image, to_tokens
from .registry import MixerContext, register_mixer


class LargeKernelAttention(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C): ``W_2 LKA(GELU(W_1 X))`` on the token image."""

    def __init__(self, dim: int, grid: tuple[int, int], kernel: int = 5, dilated_kernel: int = 7,
                 dilation: int = 3) -> None:
        super().__init__()
        for name, value in (("kernel", kernel), ("dilated_kernel", dilated_kernel), ("dilation", dilation)):
            positive_int(name, value)
        for name, value in (("kernel", kernel), ("dilated_kernel", dilated_kernel)):
            if value % 2 == 0:
                raise ValueError(f"{name} must be odd (a centred 'same' convolution), got {value}")
        self.grid, self.dilation = grid, dilation
        self.proj1 = nn.Conv2d(dim, dim, 1)
        self.dw = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.dwd = nn.Conv2d(dim, dim, dilated_kernel, padding=dilation * (dilated_kernel // 2), dilation=dilation,
                             groups=dim)
        self.pw = nn.Conv2d(dim, dim, 1)
        self.proj2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        u = F.gelu(self.proj1(to_image(x, self.grid)))
        a = self.pw(self.dwd(self.dw(u)))
        return to_tokens(self.proj2(a * u))

    def reference(self, x: Tensor) -> Tensor:
        """The formula with convolutions written as sums of shifted images."""
        u = F.gelu(pointwise_ref(to_image(x, self.grid), self.proj1.weight, self.proj1.bias))
        a = depthwise_ref(u, self.dw.weight, self.dw.bias)
        a = depthwise_ref(a, self.dwd.weight, self.dwd.bias, dilation=self.dilation)
        a = pointwise_ref(a, self.pw.weight, self.pw.bias)
        return to_tokens(pointwise_ref(a * u, self.proj2.weight, self.proj2.bias))


@register_mixer("lka", papers=("V65",), summary="VAN large-kernel attention: DW conv + dilated DW conv + 1x1, "
                "gating the input", grid_only=True)
def build_lka(ctx: MixerContext, kernel: int = 5, dilated_kernel: int = 7,
              dilation: int = 3) -> LargeKernelAttention:
    return LargeKernelAttention(ctx.dim, ctx.grid, kernel, dilated_kernel, dilation)
