"""Small shared pieces of attention layers: head splitting, rotary embeddings, QK-norm.

Kept functional so each mechanism file stays a readable transcription of its paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, heads * d) -> (B, heads, T, d)."""
    B, T, C = x.shape
    if C % heads:
        raise ValueError(f"width {C} is not divisible by heads={heads}")
    return x.view(B, T, heads, C // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, d) -> (B, T, H * d)."""
    B, H, T, d = x.shape
    return x.transpose(1, 2).reshape(B, T, H * d)


def rope_angles(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, dim) for absolute ``positions`` (T,), half-rotation layout (GPT-NeoX / Llama)."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate (B, H, T, d) queries or keys by their absolute positions (T,)."""
    cos, sin = rope_angles(positions, x.shape[-1], base)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis (used for QK-norm and in the small LM)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def positions_for(x: Tensor, cache_len: int) -> Tensor:
    """Absolute positions (T,) of the T new tokens in ``x`` (B, T, C) after ``cache_len`` cached ones."""
    return torch.arange(cache_len, cache_len + x.shape[1], device=x.device)
