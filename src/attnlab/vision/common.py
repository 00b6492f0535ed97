"""Tokens <-> images, and the plain float64 pieces the mixers' references are written from."""

from __future__ import annotations

import torch
from torch import Tensor


def to_image(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Row-major grid tokens (B, gh * gw, C) -> image (B, C, gh, gw)."""
    B, T, C = x.shape
    gh, gw = grid
    if T != gh * gw:
        raise ValueError(f"expected {gh} x {gw} = {gh * gw} grid tokens, got {T}")
    return x.transpose(1, 2).reshape(B, C, gh, gw)


def to_tokens(img: Tensor) -> Tensor:
    """Image (B, C, gh, gw) -> row-major tokens (B, gh * gw, C)."""
    return img.flatten(2).transpose(1, 2)


def shifted(img: Tensor, dy: int, dx: int) -> Tensor:
    """Reference helper: ``out[..., i, j] = img[..., i + dy, j + dx]``, 0 outside the image (explicit loops)."""
    H, W = img.shape[-2:]
    out = torch.zeros_like(img)
    for i in range(H):
        for j in range(W):
            if 0 <= i + dy < H and 0 <= j + dx < W:
                out[..., i, j] = img[..., i + dy, j + dx]
    return out


def depthwise_ref(img: Tensor, weight: Tensor, bias: Tensor | None, dilation: int = 1) -> Tensor:
    """Reference depthwise convolution, 'same' zero padding, odd kernel: ``out[c, i, j] = b[c] + sum_{u, v}
    w[c, u, v] * img[c, i + (u - k//2) * dilation, j + (v - k//2) * dilation]`` as a sum of shifted images.
    img (B, C, H, W); weight (C, 1, k, k)."""
    k = weight.shape[-1]
    out = torch.zeros_like(img)
    for u in range(k):
        for v in range(k):
            out = out + weight[:, 0, u, v].view(1, -1, 1, 1) * shifted(img, (u - k // 2) * dilation,
                                                                       (v - k // 2) * dilation)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def pointwise_ref(img: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Reference 1x1 convolution: ``out[o] = b[o] + sum_c w[o, c] img[c]``; weight (O, C, 1, 1)."""
    out = torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], img)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv_ref(img: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Reference full convolution, 'same' zero padding, odd kernel: ``out[o] = b[o] + sum_{c, u, v}
    w[o, c, u, v] img[c, i + u - k//2, j + v - k//2]``; weight (O, C, k, k)."""
    k = weight.shape[-1]
    out = 0
    for u in range(k):
        for v in range(k):
            out = out + torch.einsum("oc,bchw->bohw", weight[:, :, u, v], shifted(img, u - k // 2, v - k // 2))
    return out if bias is None else out + bias.view(1, -1, 1, 1)
