"""Causal linear attention with a choice of feature map (R33, R53).

``o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)`` -- the kernel view of attention
(Katharopoulos et al. 2020, "Transformers are RNNs"), which R33 reads as a Hebbian associative memory and R53
places in its unified token-mixing template. Feature maps:

* ``elu1`` (Katharopoulos et al.), ``relu``;
* ``taylor``: Based's (Arora et al. 2024) second-order Taylor map of ``exp(q.k / sqrt d)`` on a small
  ``feature_dim`` (queries and keys are projected to ``feature_dim`` per head; F = 1 + f + f^2);
* ``cosformer``: cosFormer's (Qin et al. 2022) ReLU features re-weighted by ``cos(pi/2 (i - j) / max_len)``,
  decomposed as ``cos(a_i - a_j) = cos a_i cos a_j + sin a_i sin a_j`` so it stays linear (F = 2 d).
  Positions must stay below ``max_len``.

The original papers of these maps are not in ``shared/papers.md``; the entry cites the two that are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.checks import positive_int
from ...core.linear import state_numbers
from ..heads import one_of
from ..registry import preset, register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask, feature_dim, feature_map, kernel_scores

MAPS = ("elu1", "relu", "taylor", "cosformer")


@dataclass(frozen=True)
class LinearAttentionConfig(LinearHeadsConfig):
    """feature_map: elu1 | relu | taylor | cosformer; feature_dim: per-head query/key width for ``taylor``
    (None: head_dim); max_len: cosFormer's re-weighting horizon; eps: the denominator's epsilon."""

    feature_map: str = "elu1"
    feature_dim: int | None = 16
    max_len: int = 65536
    eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        one_of("feature_map", self.feature_map, MAPS)
        positive_int("max_len", self.max_len)
        if self.feature_dim is not None:
            positive_int("feature_dim", self.feature_dim)


@register(
    "linear",
    family="linear",
    papers=("R33", "R53"),
    year=2020,
    summary="causal linear attention, feature maps elu+1 / ReLU / Taylor (Based) / cosFormer; O(1) decoding state",
    config=LinearAttentionConfig,
)
class LinearAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); state ``H * F * (d + 1)`` numbers at any length. Op ``linear`` on the layer's
    own features (cosFormer's depend on absolute positions)."""

    op = "linear"

    def __init__(self, cfg: LinearAttentionConfig) -> None:
        qk = cfg.feature_dim if cfg.feature_map == "taylor" else cfg.d
        super().__init__(cfg, qk_dim=qk)
        self.qk_dim = qk

    @property
    def F(self) -> int:
        if self.cfg.feature_map == "cosformer":
            return 2 * self.qk_dim
        return feature_dim(self.cfg.feature_map, self.qk_dim)

    def _angles(self, start: int, T: int, device: torch.device) -> Tensor:
        if start + T > self.cfg.max_len:
            raise ValueError(f"cosformer: position {start + T - 1} is beyond max_len={self.cfg.max_len}")
        pos = torch.arange(start, start + T, device=device, dtype=torch.float64)
        return (pos * (math.pi / 2 / self.cfg.max_len))[:, None]

    def features(self, q: Tensor, k: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(B, H, T, qk_dim) -> (B, H, T, F) for queries and keys at absolute positions ``start..``."""
        if self.cfg.feature_map != "cosformer":
            return feature_map(q, self.cfg.feature_map), feature_map(k, self.cfg.feature_map)
        a = self._angles(start, q.shape[2], q.device).to(q.dtype)
        q, k = torch.relu(q), torch.relu(k)
        return torch.cat([q * a.cos(), q * a.sin()], -1), torch.cat([k * a.cos(), k * a.sin()], -1)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Plain projections (B, H, T, qk_dim), (B, H, T, qk_dim), (B, H, T, d)."""
        return super().project(x, 0)

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        fq, fk = self.features(q, k, start)
        return fq, fk, v

    def op_options(self) -> dict:
        c = self.cfg
        return {"feature_map": "identity", "normalize": True, "eps": c.eps, "mode": c.mode, "chunk": c.chunk}

    def reference(self, x: Tensor) -> Tensor:
        """The quadratic form: A = phi(Q) phi(K)^T (cosFormer: times cos(pi/2 (i-j)/M)), causal, row-normalized."""
        q, k, v = self.qkv(x)
        T = x.shape[1]
        if self.cfg.feature_map == "cosformer":
            i = torch.arange(T, device=x.device, dtype=x.dtype)
            A = torch.relu(q) @ torch.relu(k).transpose(-1, -2)
            A = A * torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / self.cfg.max_len)
        else:
            A = kernel_scores(q, k, self.cfg.feature_map)
        A = A.masked_fill(~causal_mask(T, x.device), 0.0)
        return self.out((A @ v) / (A.sum(-1, keepdim=True) + self.cfg.eps))

    def state_size(self, seq_len: int) -> int:
        return state_numbers(self.heads, self.F, self.d, normalize=True)


preset("based", "linear", feature_map="taylor", feature_dim=16)
preset("cosformer", "linear", feature_map="cosformer")
