"""ShiftViT's zero-parameter shift (V125, Wang et al. 2022): attention replaced by moving a few channels.

The channels of the token image ``X (C, H, W)`` are split into four groups of ``g = floor(fraction * C / 4)``
channels and a rest; each group moves by one pixel in one direction, the vacated border is filled with zeros,
the rest is unchanged:

    left : Y[c, i, j] = X[c, i, j + 1]      c in [0, g)
    right: Y[c, i, j] = X[c, i, j - 1]      c in [g, 2g)
    up   : Y[c, i, j] = X[c, i + 1, j]      c in [2g, 3g)
    down : Y[c, i, j] = X[c, i - 1, j]      c in [3g, 4g)
    rest : Y[c] = X[c]                      c in [4g, C)

(``X[..]`` outside the image is 0.) No parameters, no FLOPs; spatial mixing comes from stacking blocks. The
paper's ratio is ``fraction = 1/3`` (``gamma = 1/12`` per direction). Deviation: ShiftViT replaces the whole
attention sub-block by the shift (its block is ``x + MLP(LN(shift(x)))``); here the shift sits in the mixer
slot of the pre-norm block, so a block computes ``x + shift(LN(x))`` then the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import shifted, to_image, to_tokens
from .registry import MixerContext, register_mixer

PAPER_FRACTION = 1 / 3


class Shift(nn.Module):
    """(B, gh * gw, C) -> (B, gh * gw, C): four channel groups moved by one pixel, zero fill."""

    def __init__(self, grid: tuple[int, int], fraction: float = PAPER_FRACTION) -> None:
        super().__init__()
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.grid, self.fraction = grid, fraction

    def group(self, channels: int) -> int:
        g = int(self.fraction * channels / 4)
        if g < 1:
            raise ValueError(f"fraction={self.fraction} of {channels} channels leaves no channel per direction "
                             "(needs fraction * dim >= 4)")
        return g

    def forward(self, x: Tensor) -> Tensor:
        img = to_image(x, self.grid)
        g = self.group(img.shape[1])
        a, b, c, d, r = img.split([g, g, g, g, img.shape[1] - 4 * g], dim=1)
        # F.pad order: (left, right, top, bottom) of the last two axes; slicing back to H x W moves the content
        left = F.pad(a, (0, 1))[..., :, 1:]
        right = F.pad(b, (1, 0))[..., :, :-1]
        up = F.pad(c, (0, 0, 0, 1))[..., 1:, :]
        down = F.pad(d, (0, 0, 1, 0))[..., :-1, :]
        return to_tokens(torch.cat([left, right, up, down, r], dim=1))

    def reference(self, x: Tensor) -> Tensor:
        """The formula pixel by pixel (explicit loops)."""
        img = to_image(x, self.grid)
        g = self.group(img.shape[1])
        out = img.clone()
        for k, (dy, dx) in enumerate(((0, 1), (0, -1), (1, 0), (-1, 0))):
            out[:, k * g:(k + 1) * g] = shifted(img[:, k * g:(k + 1) * g], dy, dx)
        return to_tokens(out)


@register_mixer("shift", papers=("V125",), summary="ShiftViT: 4 channel groups moved one pixel, zero fill; no "
                "parameters", grid_only=True)
def build_shift(ctx: MixerContext, fraction: float = PAPER_FRACTION) -> Shift:
    m = Shift(ctx.grid, fraction)
    m.group(ctx.dim)  # fail at build time when dim is too small
    return m
