"""Sparsifiner [D75]: a learned low-rank connectivity predictor picks each query's top-k keys.

A lightweight predictor projects the tokens to ``rank``-dimensional queries and keys per head; their product
``C = Q_r K_r^T`` (cost ``T^2 rank``, with ``rank`` much smaller than the head dim) scores every token pair,
and each query attends only to its ``top_k`` best keys (bidirectional, vision transformers: an
instance-dependent, unstructured mask). The selection is not differentiable; the predictor is trained by
distillation toward the dense attention map (:meth:`SparsifinerAttention.predictor_loss`, training only).

Execution: per-query key sets through the tile engine (``core.selection``): one row per query gathering its
``top_k`` keys -- ``T x top_k`` work and gathered memory, never ``T x T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.checks import positive_int
from attnlab.core.selection import Tiles, flat_key_index, masked_reference, tile_attention

from ..common import split_heads
from ..registry import register
from ._common import ProjectedLayer


def topk_keys(c: Tensor, top_k: int) -> Tensor:
    """Connectivity scores (B, H, T, T) -> (B, H, T, n) key indices per query, n = min(top_k, T)."""
    return c.topk(min(top_k, c.shape[-1]), dim=-1).indices


def per_query_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float) -> Tensor:
    """q (B, H, T, D), k, v (B, Hkv, Tk, D), idx (B, H, T, n) distinct key positions per query -> (B, H, T, Dv)."""
    B, H, T, n = idx.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    k_idx = flat_key_index(idx, b, hkv, Hkv, Tk).reshape(B * H * T, n)
    q_idx = torch.arange(B * H * T, device=dev).view(-1, 1)
    return tile_attention(q, k, v, [Tiles(q_idx, k_idx, torch.ones_like(q_idx, dtype=torch.bool))], scale)


@dataclass(frozen=True)
class SparsifinerConfig:
    dim: int = 64
    heads: int = 4
    rank: int = 4  # predictor width per head
    top_k: int = 8

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)
        positive_int("top_k", self.top_k)


@register(
    "sparsifiner", family="routing", papers=("D75",), year=2023, config=SparsifinerConfig, decodes=False,
    summary="learned low-rank connectivity predictor; each query attends its top-k predicted keys",
)
class SparsifinerAttention(ProjectedLayer):
    def __init__(self, cfg: SparsifinerConfig) -> None:
        super().__init__(cfg.dim, cfg.heads, None, rope=False)
        self.cfg = cfg
        self.pq = nn.Linear(cfg.dim, cfg.heads * cfg.rank, bias=False)
        self.pk = nn.Linear(cfg.dim, cfg.heads * cfg.rank, bias=False)
        self._x: Tensor | None = None

    def connectivity(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> predicted connectivity scores (B, H, T, T)."""
        return split_heads(self.pq(x), self.cfg.heads) @ split_heads(self.pk(x), self.cfg.heads).transpose(-1, -2)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        if cache is not None:
            raise TypeError("sparsifiner is bidirectional and does not decode with a cache")
        q, k, v = self.qkv(x)
        with torch.no_grad():
            idx = topk_keys(self.connectivity(x), self.cfg.top_k)
        return self.out(per_query_attention(q, k, v, idx, self.head_dim**-0.5))

    def reference(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x)
        idx = topk_keys(self.connectivity(x).detach(), self.cfg.top_k)
        mask = torch.zeros(*idx.shape[:3], x.shape[1], dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
        return self.out(masked_reference(q, k, v, mask))

    def predictor_loss(self, x: Tensor) -> Tensor:
        """Distillation (training only): KL(dense attention || softmax of the connectivity), teacher detached."""
        q, k, _ = self.qkv(x)
        with torch.no_grad():
            teacher = torch.softmax((q @ k.transpose(-1, -2)) * self.head_dim**-0.5, -1)
        logp = F.log_softmax(self.connectivity(x), -1)
        return F.kl_div(logp, teacher, reduction="batchmean")

    def init_cache(self, batch: int = 1):
        raise TypeError("sparsifiner is bidirectional and does not decode with a cache")
