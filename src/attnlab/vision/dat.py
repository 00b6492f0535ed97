"""Deformable attention of DAT / DAT++ (D197, Xia et al., "DAT++: Spatially Dynamic Vision Transformer with
Deformable Attention").

Keys and values are not the tokens themselves but the image sampled at a few data-dependent points: a uniform
grid of reference points (one per ``stride x stride`` cell) moved by offsets that a small network predicts from
the queries.

    q      = x W_q                                       (every token is a query)
    dp     = s * tanh( W_off GELU( DWConv_{k, stride}(q_g) ) )   per channel group g (``groups``)
    p      = r + dp                                      r: reference points (the strided conv's centres)
    x~_g   = bilinear(x_g, p_g)                          zero outside the image
    k, v   = x~ W_k, x~ W_v
    z      = softmax(q k^T / sqrt(d)) v                  per head, over the ``ceil(gh/stride) ceil(gw/stride)`` samples

Offsets are in pixels (``offset_range`` = ``s``); each group of channels has its own sampling points (heads are
split evenly over the groups). DAT++'s overlapped offset network: the depthwise kernel (``kernel``) is larger
than ``stride``. Cost per image: ``T * Ns * C`` for attention with ``Ns = T / stride^2`` samples.

Deviations: no relative position bias (DAT++ interpolates one at the sampled offsets; the ViT adds its own
absolute positions), GELU without the offset network's LayerNorm. ``reference`` computes the offset network
with explicit shifted-image convolutions and the bilinear sampling as an explicit four-neighbour sum (not
``grid_sample``), in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from .common import depthwise_ref, pointwise_ref, to_image, to_tokens
from .registry import MixerContext, register_mixer


class DeformableAttention(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C): queries at every token, keys/values at the deformed sample points."""

    def __init__(self, dim: int, grid: tuple[int, int], heads: int = 4, groups: int = 2, stride: int = 2,
                 kernel: int = 5, offset_range: float = 2.0) -> None:
        super().__init__()
        for name, value in (("heads", heads), ("groups", groups), ("stride", stride), ("kernel", kernel)):
            positive_int(name, value)
        if kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred convolution), got {kernel}")
        if heads % groups or dim % heads:
            raise ValueError(f"groups ({groups}) must divide heads ({heads}), and heads must divide dim ({dim})")
        if isinstance(offset_range, bool) or not isinstance(offset_range, (int, float)) or offset_range < 0:
            raise ValueError(f"offset_range must be a non-negative number, got {offset_range!r}")
        self.grid, self.heads, self.groups, self.stride, self.range = grid, heads, groups, stride, float(offset_range)
        cg = dim // groups
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.off_dw = nn.Conv2d(cg, cg, kernel, stride=stride, padding=kernel // 2, groups=cg)
        self.off_pw = nn.Conv2d(cg, 2, 1, bias=False)  # (dy, dx) per sample point

    def _reference_points(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Pixel coordinates (hk, 1), (1, wk) of the strided convolution's centres."""
        gh, gw = self.grid
        ys = torch.arange(0, gh, self.stride, device=like.device, dtype=like.dtype)
        xs = torch.arange(0, gw, self.stride, device=like.device, dtype=like.dtype)
        return ys.view(-1, 1), xs.view(1, -1)

    def points(self, x: Tensor) -> Tensor:
        """Sample points (B * groups, hk, wk, 2) as pixel (y, x)."""
        B, C = x.shape[0], x.shape[-1]
        qg = to_image(self.q(x), self.grid).reshape(B * self.groups, C // self.groups, *self.grid)
        off = self.range * torch.tanh(self.off_pw(F.gelu(self.off_dw(qg))))  # (B G, 2, hk, wk)
        ry, rx = self._reference_points(x)
        return torch.stack([ry + off[:, 0], rx + off[:, 1]], -1)

    def _attend(self, x: Tensor, sampled: Tensor) -> Tensor:
        """x (B, T, C); sampled (B, Ns, C) -> (B, T, C)."""
        B, T, C = x.shape
        H = self.heads
        q = self.q(x).view(B, T, H, -1).transpose(1, 2)
        k = self.k(sampled).view(B, -1, H, C // H).transpose(1, 2)
        v = self.v(sampled).view(B, -1, H, C // H).transpose(1, 2)
        z = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // H), -1) @ v
        return self.o(z.transpose(1, 2).reshape(B, T, C))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        gh, gw = self.grid
        p = self.points(x)
        norm = torch.stack([p[..., 1] * 2 / max(gw - 1, 1) - 1, p[..., 0] * 2 / max(gh - 1, 1) - 1], -1)  # (x, y)
        img = to_image(x, self.grid).reshape(B * self.groups, C // self.groups, gh, gw)
        s = F.grid_sample(img, norm, mode="bilinear", padding_mode="zeros", align_corners=True)
        return self._attend(x, to_tokens(s.reshape(B, C, *s.shape[-2:])))

    def reference(self, x: Tensor) -> Tensor:
        """float64: offsets through explicit convolutions, bilinear sampling as a four-neighbour sum."""
        x = x.double()
        B, T, C = x.shape
        G, gh, gw = self.groups, *self.grid
        lin = {n: (getattr(self, n).weight.double(), getattr(self, n).bias.double()) for n in "qkvo"}
        qg = to_image(F.linear(x, *lin["q"]), self.grid).reshape(B * G, C // G, gh, gw)
        # the strided 'same' convolution = the stride-1 one read at every stride-th pixel
        a = depthwise_ref(qg, self.off_dw.weight.double(), self.off_dw.bias.double())[..., :: self.stride, :: self.stride]
        off = self.range * torch.tanh(pointwise_ref(F.gelu(a), self.off_pw.weight.double(), None))
        hk, wk = off.shape[-2:]
        img = to_image(x, self.grid).reshape(B * G, C // G, gh, gw)
        sampled = torch.zeros(B * G, C // G, hk, wk, dtype=torch.float64)
        for i in range(hk):
            for j in range(wk):
                py, px = i * self.stride + off[:, 0, i, j], j * self.stride + off[:, 1, i, j]  # (B G,)
                y0, x0 = torch.floor(py), torch.floor(px)
                for dy in (0, 1):
                    for dx in (0, 1):
                        yy, xx = y0 + dy, x0 + dx
                        w = (1 - (py - yy).abs()) * (1 - (px - xx).abs())  # bilinear weight of this neighbour
                        inside = (yy >= 0) & (yy < gh) & (xx >= 0) & (xx < gw)
                        yi, xi = yy.clamp(0, gh - 1).long(), xx.clamp(0, gw - 1).long()
                        pix = img[torch.arange(B * G), :, yi, xi]  # (B G, C / G)
                        sampled[:, :, i, j] = sampled[:, :, i, j] + (w * inside)[:, None] * pix
        sampled = to_tokens(sampled.reshape(B, C, hk, wk))
        H, d = self.heads, C // self.heads
        q = F.linear(x, *lin["q"]).view(B, T, H, d).transpose(1, 2)
        k = F.linear(sampled, *lin["k"]).view(B, -1, H, d).transpose(1, 2)
        v = F.linear(sampled, *lin["v"]).view(B, -1, H, d).transpose(1, 2)
        z = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        return F.linear(z.transpose(1, 2).reshape(B, T, C), *lin["o"])


@register_mixer("dat", papers=("D197",), summary="DAT++ deformable attention: keys/values sampled bilinearly at "
                "reference points moved by offsets predicted from the queries", grid_only=True)
def build_dat(ctx: MixerContext, groups: int = 2, stride: int = 2, kernel: int = 5,
              offset_range: float = 2.0) -> DeformableAttention:
    return DeformableAttention(ctx.dim, ctx.grid, ctx.attn.heads, groups, stride, kernel, offset_range)
