"""Attention in attention (V233, A2N, "Attention in Attention Network for Image Super-Resolution"): a block
with an attention branch and a non-attention branch, mixed by weights that a small "attention dropout" module
computes from the input -- attention over whether to use attention.

    att   = Conv3x3_b( PA( Conv3x3_a(X) ) ),   PA(Y) = Y (*) sigmoid(Conv1x1(Y))     (pixel attention)
    non   = Conv3x3_n(X)
    pi    = softmax( W_2 ReLU( W_1 avgpool(X) ) / temperature )                      (2 weights per image)
    A2B(X) = Conv1x1( pi_att att + pi_non non )

The paper adds the input (a residual); here the ViT block does. Cost per pixel ``3 * 9 C^2 + 2 C^2`` (three 3x3
and two 1x1 convolutions), i.e. a local mixer whose use of attention is decided per image. Deviations: the
paper's reduction ``r`` of the dynamic-weight MLP is a knob (``reduction``, default 4); its temperature
schedule (annealed during training) is a fixed ``temperature`` (default 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..mechanisms.heads import positive_number
from .common import conv_ref, pointwise_ref, to_image, to_tokens
from .registry import MixerContext, register_mixer


class AttentionInAttention(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C)."""

    def __init__(self, dim: int, grid: tuple[int, int], reduction: int = 4, temperature: float = 1.0) -> None:
        super().__init__()
        positive_int("reduction", reduction)
        self.temperature = positive_number("temperature", temperature)
        self.grid = grid
        self.conv_a, self.conv_b = nn.Conv2d(dim, dim, 3, padding=1), nn.Conv2d(dim, dim, 3, padding=1)
        self.pa = nn.Conv2d(dim, dim, 1)
        self.conv_n = nn.Conv2d(dim, dim, 3, padding=1)
        hidden = max(1, dim // reduction)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, 2)
        self.out = nn.Conv2d(dim, dim, 1)

    def weights(self, img: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, 2): (pi_att, pi_non) per image."""
        return (self.fc2(F.relu(self.fc1(img.mean(dim=(2, 3))))) / self.temperature).softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        img = to_image(x, self.grid)
        y = self.conv_a(img)
        att = self.conv_b(y * torch.sigmoid(self.pa(y)))
        non = self.conv_n(img)
        pi = self.weights(img)[:, :, None, None, None]
        return to_tokens(self.out(pi[:, 0] * att + pi[:, 1] * non))

    def reference(self, x: Tensor) -> Tensor:
        """Convolutions as sums of shifted images, the softmax over the two branch weights written out."""
        img = to_image(x, self.grid)
        y = conv_ref(img, self.conv_a.weight, self.conv_a.bias)
        gate = 1 / (1 + torch.exp(-pointwise_ref(y, self.pa.weight, self.pa.bias)))
        att = conv_ref(y * gate, self.conv_b.weight, self.conv_b.bias)
        non = conv_ref(img, self.conv_n.weight, self.conv_n.bias)
        h = (img.mean(dim=(2, 3)) @ self.fc1.weight.T + self.fc1.bias).clamp(min=0)
        z = (h @ self.fc2.weight.T + self.fc2.bias) / self.temperature
        e = torch.exp(z - z.amax(-1, keepdim=True))
        pi = e / e.sum(-1, keepdim=True)
        mixed = pi[:, 0, None, None, None] * att + pi[:, 1, None, None, None] * non
        return to_tokens(pointwise_ref(mixed, self.out.weight, self.out.bias))


@register_mixer("a2n", papers=("V233",), summary="attention in attention: pixel-attention and plain conv branches "
                "mixed by input-dependent weights", grid_only=True)
def build_a2n(ctx: MixerContext, reduction: int = 4, temperature: float = 1.0) -> AttentionInAttention:
    return AttentionInAttention(ctx.dim, ctx.grid, reduction, temperature)
