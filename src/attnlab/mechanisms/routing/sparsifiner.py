"""Sparsifiner [D75]: a learned low-rank connectivity predictor picks each query's top-k keys.

A lightweight predictor projects the tokens to ``rank``-dimensional queries and keys per head; their product
``C = Q_r K_r^T`` (cost ``T^2 rank``, with ``rank`` much smaller than the head dim) scores every token pair,
and each query attends only to its ``top_k`` best keys (bidirectional, vision transformers: an
instance-dependent, unstructured mask). The selection is not differentiable; the predictor is trained by
distillation toward the dense attention map (:meth:`SparsifinerAttention.predictor_loss`, training only).

The op ``sparsifiner`` takes the connectivity scores as a tensor option (``connectivity`` (B, H, Tq, Tk), the
layer computes them with its predictor); without them (``connectivity=None``) it ranks keys by the attention
scores themselves (exact per-query top-k attention, the predictor's distillation target).

Execution: per-query key sets through the tile engine (``core.sparse``): one row per query gathering its
``top_k`` keys -- ``T x top_k`` work and gathered memory, never ``T x T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.checks import positive_int
from attnlab.ops._engine import Tiles, flat_key_index, tile_attention
from attnlab.ops.sparse import ALL, sparse_op

from ..common import split_heads
from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


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


# ---- the op and the layer ----------------------------------------------------------------------------------


def _scores(q: Tensor, k: Tensor, connectivity: Tensor | None) -> Tensor:
    if connectivity is None:
        with torch.no_grad():
            return q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)
    want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if not isinstance(connectivity, Tensor) or tuple(connectivity.shape) != want:
        got = tuple(connectivity.shape) if isinstance(connectivity, Tensor) else connectivity
        raise ValueError(f"connectivity must be a tensor (B, H, Tq, Tk) = {want}, got {got}")
    return connectivity.detach()


def _sparsifiner_weights(q: Tensor, k: Tensor, *, q_offset: int, top_k: int = 8, connectivity: Tensor | None = None,
                         **_: Any) -> Tensor:
    idx = topk_keys(_scores(q, k, connectivity), top_k)
    return torch.zeros(*idx.shape[:3], k.shape[2], dtype=torch.bool, device=q.device).scatter_(-1, idx, True)


@sparse_op("sparsifiner", papers=("D75",), summary="each query attends its top-k keys by a connectivity score "
           "(a learned low-rank predictor, or q.k itself)", options={"top_k": 8, "connectivity": None},
           weights_mask=_sparsifiner_weights, causal=lambda o: False, decodes=False, dense_options={"top_k": ALL},
           example={"top_k": 5})
def sparsifiner_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, top_k: int,
                   connectivity: Tensor | None) -> Tensor:
    """Bidirectional top-k: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    positive_int("top_k", top_k)
    return per_query_attention(q, k, v, topk_keys(_scores(q, k, connectivity), top_k), scale)


@dataclass(frozen=True)
class SparsifinerConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    causal: bool = False  # bidirectional (vision transformers)
    rank: int = 4  # predictor width per head
    top_k: int = 8
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal", "kv_heads", "rope")

    def validate(self) -> None:
        self.check("rank", "top_k")


@register(
    "sparsifiner", family="routing", papers=("D75",), year=2023, config=SparsifinerConfig, decodes=False,
    summary="learned low-rank connectivity predictor; each query attends its top-k predicted keys",
)
class SparsifinerAttention(RoutingLayer):
    """The op with the learned predictor ``pq``, ``pk`` (rank per head) as the connectivity."""

    op = "sparsifiner"

    def __init__(self, cfg: SparsifinerConfig) -> None:
        super().__init__(cfg)
        self.pq = nn.Linear(cfg.dim, cfg.heads * cfg.rank, bias=False)
        self.pk = nn.Linear(cfg.dim, cfg.heads * cfg.rank, bias=False)
        self._x: Tensor | None = None

    def connectivity(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> predicted connectivity scores (B, H, T, T)."""
        return split_heads(self.pq(x), self.cfg.heads) @ split_heads(self.pk(x), self.cfg.heads).transpose(-1, -2)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        self._x = x  # the predictor reads the tokens, not q and k
        try:
            return super().forward(x, cache)
        finally:
            self._x = None

    def reference(self, x: Tensor) -> Tensor:
        self._x = x
        try:
            return super().reference(x)
        finally:
            self._x = None

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        with torch.no_grad():
            return {**self.op_options(), "connectivity": self.connectivity(self._x)}

    def predictor_loss(self, x: Tensor) -> Tensor:
        """Distillation (training only): KL(dense attention || softmax of the connectivity), teacher detached."""
        q, k, _ = self.project(x)
        with torch.no_grad():
            teacher = torch.softmax((q @ k.transpose(-1, -2)) * self.cfg.d**-0.5, -1)
        logp = F.log_softmax(self.connectivity(x), -1)
        return F.kl_div(logp, teacher, reduction="batchmean")
