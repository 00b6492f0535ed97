"""Pieces shared by the linear / recurrent layers: their heads config, feature maps, a causal convolution.

Every layer of this family is an :class:`~attnlab.mechanisms.heads.OpLayer` whose decoding cache is a
:class:`~attnlab.mechanisms.heads.LayerCache` without keys and values: a fixed-size recurrent state (the op's, in
``cache.state``, plus the layer's own extras there, e.g. the last ``w - 1`` tokens of a local window) -- except RAT
and Local Linear Attention, which say so in their ``state_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.checks import positive_int
from ...core.linear import MODES
from ...ops.linear import FEATURE_MAPS, feature_map, kernel_scores
from ..heads import HeadsConfig, OpLayer, one_of

# the heads options a linear layer does not take: full heads of dim // heads, always causal, positions by decay
LINEAR_FIXED = ("kv_heads", "head_dim", "causal", "rope", "rope_base")


@dataclass(frozen=True)
class LinearHeadsConfig(HeadsConfig):
    """dim, heads as every layer; mode: parallel | chunked | recurrent (identical results); chunk: tokens per
    chunk of the chunked form."""

    dim: int = 256
    heads: int = 4
    mode: str = "chunked"
    chunk: int = 64

    fixed = LINEAR_FIXED
    renamed = {"chunk_size": "chunk"}

    def validate(self) -> None:
        one_of("mode", self.mode, MODES)
        positive_int("chunk", self.chunk)


class LinearLayer(OpLayer):
    """The base of this family's layers: an :class:`OpLayer` with full heads of width ``d`` and ``qkv(x)``, the
    plain projections from position 0 (their references read them)."""

    @property
    def d(self) -> int:
        return self.cfg.d

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> q, k, v (B, H, T, d) without a cache."""
        return self.project(x, 0)


def causal_mask(T: int, device: torch.device | str) -> Tensor:
    """(T, T) lower-triangular boolean mask."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def feature_dim(kind: str, d: int) -> int:
    return 1 + d + d * d if kind == "taylor" else d


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


__all__ = ["FEATURE_MAPS", "LINEAR_FIXED", "LinearHeadsConfig", "LinearLayer", "causal_depthwise_conv", "causal_mask",
           "feature_dim", "feature_map", "kernel_scores"]
