"""TiC's multi-head self-attention convolution (V59, "TiC: Exploring Vision Transformer in Convolution"):
self-attention inside the sliding window of a convolution, so the layer runs on any image size with no
position table to resample.

    MSA-Conv(X)_p = sum_{q in win_k(p)} softmax_q(Q_p . K_q / sqrt(d)) V_q        (per head, then W_O)

with ``win_k(p)`` the ``k x k`` window centred on pixel ``p`` (stride 1), like a ``k x k`` convolution whose
weights are computed from the content. Built as ``mha`` with the ``HaloBlocks(block=1, halo=k // 2)`` pattern
(a query block of one pixel reading its halo): the sparse engine computes only the window pairs, cost
``N k^2 d`` per head. Deviations: at the border the window is clipped (keys outside the image do not exist)
where a convolution would read zero padding; TiC's multi-directional cyclic shift and inter-pooling mechanisms
and its dilated / depthwise variants are not implemented.
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
def build_tic(ctx: MixerContext, kernel: int = 3, **options: Any) -> nn.Module:
    positive_int("kernel", kernel)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (a window centred on the pixel), got {kernel}")
    pattern = HaloBlocks(grid=ctx.grid, block=1, halo=kernel // 2)
    return mech.build("mha", **catalogue_options(mech.get("mha"), ctx, {"pattern": pattern, **options}))


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
