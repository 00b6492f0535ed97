"""TiC's multi-head self-attention convolution (V59, "TiC: Exploring Vision Transformer in Convolution"):
self-attention inside the sliding window of a convolution, so the layer runs on any image size with no
position table to resample.

    MSA-Conv(X)_p = sum_{q in win_k(p)} softmax_q(Q_p . K_q / sqrt(d)) V_q        (per head, then W_O)

with ``win_k(p)`` the ``k x k`` window centred on pixel ``p`` (stride 1), like a ``k x k`` convolution whose
weights are computed from the content. Built as ``mha`` with the ``HaloBlocks(block=1, halo=k // 2)`` pattern
(a query block of one pixel reading its halo): the sparse engine computes only the window pairs, cost
``N k^2 d`` per head. Deviations: at the border the window is clipped (keys outside the image do not exist)
where a convolution would read zero padding; TiC's inter-pooling mechanism and its dilated / depthwise
variants are not implemented.

**Multi-directional cyclic shift** (``shift=s > 0``), TiC's first capacity-enhancing strategy: it links distant
tokens by rolling the feature map cyclically before the local attention. Convention (a reading of the
paper's description; its exact recipe was not available here): the channels are split into four equal groups
(the remainder stays in place), rolled cyclically by ``s`` pixels down, up, right and left,

    X'[c in group g](y, x) = X[c](y - dy_g mod gh, x - dx_g mod gw),   (dy, dx)_g = (s,0), (-s,0), (0,s), (0,-s)

and MSA-Conv runs on ``X'``, so every token's query, key and value mix its own features with those of the
tokens ``s`` pixels away in four directions (with ``s = gh // 2`` the far side of the image). The roll is free
(an index permutation); the output is not rolled back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import positive_int
from ..core.patterns import HaloBlocks
from ..mechanisms import registry as mech
from .registry import MixerContext, catalogue_options, register_mixer


@register_mixer("tic", papers=("V59",), summary="TiC MSA-Conv: attention inside each pixel's centred k x k "
                "window (a convolution with content weights)", grid_only=True)
def build_tic(ctx: MixerContext, kernel: int = 3, shift: int = 0, **options: Any) -> nn.Module:
    positive_int("kernel", kernel)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (a window centred on the pixel), got {kernel}")
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0 (pixels of the cyclic shift; 0: none), got {shift!r}")
    pattern = HaloBlocks(grid=ctx.grid, block=1, halo=kernel // 2)
    layer = mech.build("mha", **catalogue_options(mech.get("mha"), ctx, {"pattern": pattern, **options}))
    if shift == 0:
        return layer
    if ctx.dim < 4:
        raise ValueError(f"shift needs at least 4 channels (four direction groups), got dim={ctx.dim}")
    return CyclicShiftMSAConv(layer, ctx.grid, shift)


DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # down, up, right, left


def cyclic_shift(x: Tensor, grid: tuple[int, int], shift: int) -> Tensor:
    """Grid tokens (B, gh * gw, C) with channel group g (of four equal groups; the remainder stays) rolled
    cyclically by ``shift`` pixels in direction ``DIRECTIONS[g]``."""
    B, T, C = x.shape
    gh, gw = grid
    img = x.view(B, gh, gw, C)
    g = C // 4
    parts = [torch.roll(img[..., i * g:(i + 1) * g], (dy * shift, dx * shift), dims=(1, 2))
             for i, (dy, dx) in enumerate(DIRECTIONS)]
    return torch.cat([*parts, img[..., 4 * g:]], -1).reshape(B, T, C)


class CyclicShiftMSAConv(nn.Module):
    """TiC's multi-directional cyclic shift, then MSA-Conv: ``msa_conv(cyclic_shift(x))``."""

    def __init__(self, layer: nn.Module, grid: tuple[int, int], shift: int) -> None:
        super().__init__()
        self.layer, self.grid, self.shift = layer, tuple(grid), shift

    @property
    def cfg(self):
        return self.layer.cfg

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(cyclic_shift(x, self.grid, self.shift))


def cyclic_shift_ref(x: Tensor, grid: tuple[int, int], shift: int) -> Tensor:
    """Reference: every output pixel reads its group's source pixel with explicit modular indices."""
    B, T, C = x.shape
    gh, gw = grid
    g = C // 4
    out = x.clone()
    for i, (dy, dx) in enumerate(DIRECTIONS):
        for y in range(gh):
            for xx in range(gw):
                src = ((y - dy * shift) % gh) * gw + (xx - dx * shift) % gw
                out[:, y * gw + xx, i * g:(i + 1) * g] = x[:, src, i * g:(i + 1) * g]
    return out


def msa_conv_ref(layer: nn.Module, x: Tensor, grid: tuple[int, int], kernel: int) -> Tensor:
    """Reference: for every pixel gather its clipped centred window and run a dense softmax over it, head by
    head (an ``mha`` layer without rope or QK-norm). x (B, gh * gw, dim)."""
    cfg = layer.cfg
    B, T, _ = x.shape
    gh, gw = grid
    H, d, g, r = cfg.heads, cfg.d, cfg.heads // cfg.kvh, kernel // 2
    q = (x @ layer.q_proj.weight.T).view(B, T, H, d)
    k = (x @ layer.k_proj.weight.T).view(B, T, cfg.kvh, d)
    v = (x @ layer.v_proj.weight.T).view(B, T, cfg.kvh, d)
    o = torch.zeros_like(q)
    for y in range(gh):
        for xx in range(gw):
            p = y * gw + xx
            win = torch.tensor([a * gw + b for a in range(max(0, y - r), min(gh, y + r + 1))
                                for b in range(max(0, xx - r), min(gw, xx + r + 1))])
            for h in range(H):
                s = torch.einsum("bd,bjd->bj", q[:, p, h], k[:, win, h // g]) / d**0.5
                o[:, p, h] = torch.einsum("bj,bjd->bd", s.softmax(-1), v[:, win, h // g])
    return o.reshape(B, T, H * d) @ layer.o_proj.weight.T
