"""ViTDet's window attention with a few global blocks (V193, Li et al. 2022), and 2-D neighborhood attention,
as ViT mixers built on the catalogue's ``mha`` layer with a 2-D grid pattern (the sparse engine runs only the
allowed pairs).

``window``: non-overlapping ``window x window`` windows of the patch grid (``MaxViTBlock``); a token attends to
the tokens of its own window only:

    O_i = sum_{j in win(i)} softmax_j(q_i . k_j / sqrt(d)) v_j        (per head, then W_O)

Cost ``N w^2 d`` per head instead of ``N^2 d``. ViTDet keeps a plain ViT and makes most blocks windowed, with
``global_blocks`` (4 of 12 in the paper) evenly spaced blocks of full attention propagating information across
windows: :func:`vitdet_mixers` gives that layout. Deviations: no relative position bias (the ViT's absolute 2-D
positions instead); a grid that is not a multiple of the window keeps a smaller last window instead of padding.

``neighborhood``: each token attends to the ``kernel x kernel`` tokens around it (NAT's ``Neighborhood``
pattern, shifted inward at the borders).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.checks import nonneg_int, positive_int
from ..core.patterns import MaxViTBlock, Neighborhood
from ..mechanisms import registry as mech
from .registry import MixerContext, catalogue_options, register_mixer


def _mha(ctx: MixerContext, pattern: Any, options: dict[str, Any]) -> nn.Module:
    entry = mech.get("mha")
    return mech.build("mha", **catalogue_options(entry, ctx, {"pattern": pattern, **options}))


@register_mixer("window", papers=("V193",), summary="ViTDet window attention: mha inside non-overlapping "
                "w x w windows of the patch grid", grid_only=True)
def build_window(ctx: MixerContext, window: int = 2, **options: Any) -> nn.Module:
    positive_int("window", window)
    return _mha(ctx, MaxViTBlock(grid=ctx.grid, window=window), options)


@register_mixer("neighborhood", papers=("P101",), summary="2-D neighborhood attention: mha over the k x k tokens "
                "around each token", grid_only=True)
def build_neighborhood(ctx: MixerContext, kernel: int = 3, **options: Any) -> nn.Module:
    positive_int("kernel", kernel)
    return _mha(ctx, Neighborhood(grid=ctx.grid, kernel_size=kernel), options)


def vitdet_mixers(depth: int, global_blocks: int | None = None, local: str = "window",
                  glob: str = "mha") -> tuple[str, ...]:
    """ViTDet's layout: ``global_blocks`` evenly spaced global blocks (the last block of each of
    ``global_blocks`` equal stages; default ``max(1, depth // 3)``), the others windowed."""
    positive_int("depth", depth)
    g = max(1, depth // 3) if global_blocks is None else nonneg_int("global_blocks", global_blocks)
    if g > depth:
        raise ValueError(f"global_blocks ({g}) must be at most depth ({depth})")
    ends = {round((s + 1) * depth / g) - 1 for s in range(g)}
    return tuple(glob if i in ends else local for i in range(depth))


def window_attention_ref(layer: nn.Module, x: Tensor, grid: tuple[int, int], window: int) -> Tensor:
    """Reference of a ``window`` mixer (an ``mha`` layer without rope or QK-norm): cut the token image into
    windows explicitly, run dense softmax attention inside each window head by head, put the tokens back.
    x (B, gh * gw, dim)."""
    cfg = layer.cfg
    B, T, _ = x.shape
    gh, gw = grid
    H, d = cfg.heads, cfg.d
    group = cfg.heads // cfg.kvh
    q = (x @ layer.q_proj.weight.T).reshape(B, T, H, d)
    k = (x @ layer.k_proj.weight.T).reshape(B, T, cfg.kvh, d)
    v = (x @ layer.v_proj.weight.T).reshape(B, T, cfg.kvh, d)
    o = torch.zeros(B, T, H, d, dtype=x.dtype)
    for r0 in range(0, gh, window):
        for c0 in range(0, gw, window):
            idx = torch.tensor([r * gw + c for r in range(r0, min(r0 + window, gh))
                                for c in range(c0, min(c0 + window, gw))])
            for h in range(H):
                s = torch.einsum("bid,bjd->bij", q[:, idx, h], k[:, idx, h // group]) / d**0.5
                o[:, idx, h] = torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, idx, h // group])
    return o.reshape(B, T, H * d) @ layer.o_proj.weight.T
