"""Pieces shared by the linear / recurrent layers: the constant-size cache, projections, feature maps.

Every layer of this family holds a :class:`RecurrentCache` while decoding: a fixed-size recurrent state (plus,
for layers with a local term, the last few tokens), never a growing key/value list -- except RAT and Local
Linear Attention, which say so in their ``state_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ...core.linear import MODES
from ..base import AttentionLayer
from ..common import merge_heads, split_heads


@dataclass
class RecurrentCache:
    """Decoding state of one layer: ``state`` (the kernel's), ``length`` (tokens seen) and named ``extra`` tensors
    (e.g. the last ``w - 1`` tokens of a local window). Its size does not grow with ``length`` (RAT and LLA
    excepted)."""

    state: Any = None
    length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> list[Tensor]:
        found: list[Tensor] = []

        def walk(x: Any) -> None:
            if isinstance(x, Tensor):
                found.append(x)
            elif isinstance(x, (tuple, list)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)

        walk(self.state)
        walk(self.extra)
        return found

    def numel(self) -> int:
        """Numbers held (for one batch row when the batch is 1)."""
        return sum(t.numel() for t in self.tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def check_common(dim: int, heads: int, mode: str | None = None, chunk_size: int | None = None) -> None:
    positive_int("dim", dim)
    positive_int("heads", heads)
    if dim % heads:
        raise ValueError(f"dim ({dim}) is not divisible by heads ({heads})")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)


class QKVLayer(AttentionLayer):
    """Base: ``q, k, v`` projections to ``heads`` heads of ``dim // heads`` and an output projection."""

    def __init__(self, dim: int, heads: int, qk_dim: int | None = None) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.d = dim // heads
        self.qk_dim = qk_dim or self.d  # per-head width of queries and keys
        self.q_proj = nn.Linear(dim, heads * self.qk_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * self.qk_dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, dim) -> q, k (B, H, T, qk_dim), v (B, H, T, d)."""
        H = self.heads
        return split_heads(self.q_proj(x), H), split_heads(self.k_proj(x), H), split_heads(self.v_proj(x), H)

    def out(self, o: Tensor) -> Tensor:
        """(B, H, T, d) -> (B, T, dim)."""
        return self.o_proj(merge_heads(o))

    def init_cache(self, batch: int = 1) -> RecurrentCache:
        return RecurrentCache()


def causal_mask(T: int, device: torch.device | str) -> Tensor:
    """(T, T) lower-triangular boolean mask."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


# ---- feature maps phi: (..., d) -> (..., F) ------------------------------------------------------------------------

FEATURE_MAPS = ("elu1", "relu", "taylor", "identity", "silu", "sigmoid")


def feature_map(x: Tensor, kind: str) -> Tensor:
    """phi(x) of linear attention.

    * ``elu1``: elu(x) + 1 (Katharopoulos et al. 2020), F = d.
    * ``relu``: max(x, 0), F = d.
    * ``taylor``: second-order Taylor expansion of exp (Based): ``[1, x', vec(x' x'^T) / sqrt 2]`` with
      ``x' = x / d^(1/4)``, so ``phi(q).phi(k) = 1 + q.k/sqrt d + (q.k)^2 / (2 d)``; F = 1 + d + d^2.
    * ``identity``, ``silu``, ``sigmoid``: as named.
    """
    if kind == "elu1":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "identity":
        return x
    if kind == "silu":
        return F.silu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "taylor":
        d = x.shape[-1]
        x = x / d**0.25
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)
    raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")


def feature_dim(kind: str, d: int) -> int:
    return 1 + d + d * d if kind == "taylor" else d


def kernel_scores(q: Tensor, k: Tensor, kind: str) -> Tensor:
    """Plain ``(B, H, Tq, Tk)`` similarities ``phi(q_i) . phi(k_j)`` written without the feature expansion where
    one exists (Taylor: ``1 + s + s^2 / 2`` with ``s = q.k / sqrt d``) -- the references use this."""
    if kind == "taylor":
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return 1.0 + s + 0.5 * s * s
    return feature_map(q, kind) @ feature_map(k, kind).transpose(-1, -2)


def causal_depthwise_conv(x: Tensor, weight: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal depthwise 1-D convolution along time, carrying the last ``w - 1`` inputs.

    x ``(B, T, C)``, weight ``(C, w)`` (tap ``w - 1`` multiplies the current token), past ``(B, w - 1, C)`` or None.
    Returns y ``(B, T, C)`` and the new past ``(B, w - 1, C)``.
    """
    B, T, C = x.shape
    w = weight.shape[1]
    if past is None:
        past = x.new_zeros(B, w - 1, C)
    xx = torch.cat([past, x], dim=1)  # (B, w - 1 + T, C)
    y = F.conv1d(xx.transpose(1, 2), weight[:, None, :], groups=C).transpose(1, 2)
    return y, xx[:, xx.shape[1] - (w - 1) :]
