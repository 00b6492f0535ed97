"""Routing Transformer [D43]: online k-means routes queries and keys; a query attends its own cluster.

Queries and keys are unit-normalized and assigned to their nearest of ``clusters`` centroids per head
(centroids are a buffer, updated by an exponential moving average of their members while training -- online
k-means). Query ``i`` sees key ``j <= i`` iff both fall in the same cluster. Assignments are per token, so
decoding with a cache gives exactly the rows of a full forward (in eval mode, where centroids are fixed).

The op ``routing_transformer`` takes the centroids as a tensor option (``centroids`` (H, C, D), the layer passes
its buffer); without them (``centroids=None``, inference on a model that has none) it routes with ``clusters``
fixed, seeded random unit centroids (seed 0), the same on every call.

Execution: each cluster's keys form a key set (sorted positions, padded to the largest cluster); queries are
grouped by cluster into key-centric tiles (``core.sparse``), so the cost is ``sum over clusters of
queries x keys`` (about ``T^2 / clusters``) instead of ``T^2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.ops._engine import tile_attention, tiles_from_selection
from attnlab.ops.sparse import sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of each unit-normalized vector: x (B, Hx, T, D), centroids (Hx, C, D) -> (B, Hx, T)."""
    return torch.einsum("bhtd,hcd->bhtc", F.normalize(x.detach(), dim=-1), centroids).argmax(-1)


def cluster_key_sets(key_cluster: Tensor, clusters: int) -> Tensor:
    """(B, Hkv, Tk) cluster ids -> (B, Hkv, C, Kmax) key positions of each cluster, -1 padded."""
    B, Hkv, Tk = key_cluster.shape
    order = torch.sort(key_cluster, dim=-1, stable=True)
    counts = F.one_hot(key_cluster, clusters).sum(2)  # (B, Hkv, C)
    kmax = max(1, int(counts.max()))
    start = torch.cumsum(counts, -1) - counts
    rank = torch.arange(Tk, device=key_cluster.device) - torch.gather(start, -1, order.values)
    sets = torch.full((B, Hkv, clusters, kmax), -1, dtype=torch.long, device=key_cluster.device)
    b = torch.arange(B, device=key_cluster.device).view(B, 1, 1)
    h = torch.arange(Hkv, device=key_cluster.device).view(1, Hkv, 1)
    sets[b, h, order.values, rank] = order.indices
    return sets


def routing_attention(
    q: Tensor, k: Tensor, v: Tensor, centroids: Tensor, scale: float | None = None, q_offset: int | None = None,
    causal: bool = True,
) -> Tensor:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D), centroids (H, C, D) -> (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    C = centroids.shape[1]
    rep = H // Hkv
    qc = assign(q, centroids)  # (B, H, Tq)
    # keys are routed with their query heads' centroids (a kv head serves rep query heads)
    kc = assign(k.repeat_interleave(rep, 1), centroids)  # (B, H, Tk)
    sets = cluster_key_sets(kc, C)  # (B, H, C, Kmax)
    parts = tiles_from_selection(qc.unsqueeze(-1), torch.ones_like(qc, dtype=torch.bool).unsqueeze(-1), sets, Hkv,
                                 Tk, q_offset, causal)
    return tile_attention(q, k, v, parts, scale)


def routing_mask(q: Tensor, k: Tensor, centroids: Tensor, q_offset: int | None = None, causal: bool = True) -> Tensor:
    """Dense (B, H, Tq, Tk): same cluster (and j <= i)."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    qc = assign(q, centroids)
    kc = assign(k.repeat_interleave(H // k.shape[1], 1), centroids)
    m = qc.unsqueeze(-1) == kc.unsqueeze(-2)
    if causal:
        m = m & torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(q_offset)
    return m


# ---- the op and the layer ----------------------------------------------------------------------------------


def op_centroids(q: Tensor, clusters: int, centroids: Tensor | None) -> Tensor:
    """The centroids an op call routes with: ``centroids`` (H, C, D) checked, or seeded random unit vectors."""
    H, D = q.shape[1], q.shape[-1]
    if centroids is None:
        positive_int("clusters", clusters)
        g = torch.Generator().manual_seed(0)
        return F.normalize(torch.randn(H, clusters, D, generator=g, dtype=torch.float64), dim=-1).to(q)
    if not isinstance(centroids, Tensor) or centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D:
        got = tuple(centroids.shape) if isinstance(centroids, Tensor) else centroids
        raise ValueError(f"centroids must be a tensor (heads, clusters, head_dim) = ({H}, C, {D}), got {got}")
    return centroids.to(q.dtype)


def _routing_weights(q: Tensor, k: Tensor, *, q_offset: int, clusters: int = 4, centroids: Tensor | None = None,
                     causal: bool = True, **_: Any) -> Tensor:
    return routing_mask(q, k, op_centroids(q, clusters, centroids), q_offset, causal)


@sparse_op("routing_transformer", papers=("D43",), summary="k-means routing: each query attends the keys of its "
           "own cluster (unit-normalized q/k; centroids given, or fixed seeded ones)",
           options={"clusters": 4, "centroids": None, "causal": True}, weights_mask=_routing_weights,
           dense_options={"clusters": 1}, example={"clusters": 3})
def routing_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, clusters: int,
               centroids: Tensor | None, causal: bool) -> Tensor:
    """Clustered attention: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). Assignments are per token,
    so decoding equals the full forward while the centroids stay fixed."""
    return routing_attention(q, k, v, op_centroids(q, clusters, centroids), scale, q_offset, causal)


@dataclass(frozen=True)
class RoutingConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    clusters: int = 4
    decay: float = 0.999  # online k-means: centroid <- decay * centroid + (1 - decay) * mean of members
    delta: int = 0  # D99 correction stride, 0 = off

    def validate(self) -> None:
        self.check("clusters")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


@register(
    "routing_transformer", family="routing", papers=("D43",), year=2021, config=RoutingConfig,
    summary="online k-means routes queries and keys; each query attends the keys of its own cluster",
)
class RoutingTransformerAttention(RoutingLayer):
    """The op with this layer's centroids (a buffer, moved by online k-means while training)."""

    op = "routing_transformer"

    def __init__(self, cfg: RoutingConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("centroids", F.normalize(torch.randn(cfg.heads, cfg.clusters, cfg.d), dim=-1))

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        return {**self.op_options(), "centroids": self.centroids.to(q.dtype)}

    @torch.no_grad()
    def _update(self, q: Tensor, k: Tensor) -> None:
        """One online k-means step on this batch's normalized queries and keys."""
        x = torch.cat([q, k.repeat_interleave(self.cfg.heads // self.cfg.kvh, 1)], 2)
        xn = F.normalize(x, dim=-1).to(self.centroids.dtype)
        onehot = F.one_hot(assign(x, self.centroids), self.cfg.clusters).to(xn.dtype)  # (B, H, T, C)
        sums = torch.einsum("bhtc,bhtd->hcd", onehot, xn)
        counts = onehot.sum((0, 2)).unsqueeze(-1)
        mean = sums / counts.clamp(min=1)
        new = self.cfg.decay * self.centroids + (1 - self.cfg.decay) * mean
        self.centroids.copy_(torch.where(counts > 0, F.normalize(new, dim=-1), self.centroids))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state) -> Tensor:
        out = super().attend(q, k, v, q_offset, state)
        if self.training:
            self._update(q, k)
        return out
