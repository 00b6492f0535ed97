"""Dynamic Mask Attention [D51]: value-derived key importance, used both as the sparse mask and as a score bias.

Content-aware mask: each key position gets an importance per kv head computed from the *value* states,
``delta_j = exp(A_h * softplus(w_h . v_j))`` (``v_j`` the position's values of all kv heads, ``w_h`` a learned
projection, ``A_h = -exp(a_h) < 0`` a learned per-head rate, so ``delta`` lies in ``(0, 1]``). Each query keeps
the ``window`` keys of highest importance among those it may see (causal), and the importance is added to the
kept scores: ``softmax(q.k * scale + delta_j)`` over the kept keys. The bias makes the importance trainable
end to end (its gradient reaches ``w`` and ``a``); the top-w choice itself has no gradient.

The op ``dma`` takes the importance as a tensor option (``importance`` (B, Hkv, Tk), the layer computes it with
its learned ``w`` and ``a``); without it (``importance=None``, a model that has none) it uses the parameter-free
stand-in ``w_h`` = the mean over all value channels, ``a_h = 0``: ``delta_j = exp(-softplus(mean(v_j)))``.

Execution (sparse-engine tiles, no dense scores): query rows are cut in chunks of ``chunk``; a chunk
gathers the ``window`` most important keys *before* it plus its own ``chunk`` keys -- a superset of what any
of its rows keeps, since a key beaten by ``window`` earlier keys stays beaten for later rows. The exact mask
is the per-row top-w inside the tile (keys sorted by importance, a running count of visible keys). The bias
rides along exactly as one extra channel: ``q' = [q, 1]``, ``k' = [k, delta / scale]``, ``v' = [v, 0]``, so
``scale * q'.k' = scale * q.k + delta`` in the fused kernel, forward and backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import masked_softmax
from attnlab.ops._engine import Tiles, flat_key_index, tile_attention
from attnlab.ops.sparse import sparse_op

from ..common import merge_heads
from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def dma_tiles(bias: Tensor, H: int, Tq: int, window: int, block: int, q_offset: int) -> Tiles:
    """Query-centric tiles of the top-``window`` selection. bias (B, Hkv, Tk) importance per key.

    Ties in importance go to the earlier position. Returns one tile per (batch, head, block of rows).
    """
    B, Hkv, Tk = bias.shape
    dev = bias.device
    rep = H // Hkv
    Bq = min(block, Tq)
    G = math.ceil(Tq / Bq)
    with torch.no_grad():
        pri = bias.detach()
        first = q_offset + torch.arange(G, device=dev) * Bq  # absolute position of each block's first row
        key = torch.arange(Tk, device=dev)
        pre = pri.unsqueeze(2).masked_fill(key.view(1, 1, 1, Tk) >= first.view(1, 1, G, 1), float("-inf"))
        w = min(window, Tk)
        # stable sort, not topk: equal importance must go to the earlier position, as in the per-row rule
        idx = torch.sort(pre.expand(B, Hkv, G, Tk), dim=-1, descending=True, stable=True).indices[..., :w]
        idx = idx.masked_fill(idx >= first.view(1, 1, G, 1), -1)  # (B, Hkv, G, w); -1: fewer keys before
        own = (first.view(G, 1) + torch.arange(Bq, device=dev)).expand(B, Hkv, G, Bq)
        kpos = torch.cat([idx, own.masked_fill(own >= Tk, -1)], -1)  # (B, Hkv, G, K)
        ok = kpos >= 0
        kp = torch.where(ok, torch.gather(pri, 2, kpos.clamp(min=0).flatten(2)).view_as(kpos),
                         torch.tensor(float("-inf"), dtype=pri.dtype, device=dev))
        # priority order: importance descending, then position ascending (two stable sorts)
        o1 = torch.sort(torch.where(ok, kpos, Tk), dim=-1, stable=True).indices
        kpos, ok, kp = (torch.gather(t, -1, o1) for t in (kpos, ok, kp))
        o2 = torch.sort(kp, dim=-1, descending=True, stable=True).indices
        kpos, ok = torch.gather(kpos, -1, o2), torch.gather(ok, -1, o2)
        rows = torch.arange(G * Bq, device=dev).view(G, Bq)
        qpos = (rows + q_offset).view(1, 1, G, Bq, 1)
        vis = ok.unsqueeze(-2) & (kpos.unsqueeze(-2) <= qpos)  # (B, Hkv, G, Bq, K)
        before = torch.cumsum(vis.to(torch.int32), -1) - vis.to(torch.int32)  # visible keys ranked higher
        mask = vis & (before < window)
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        kpos_h = kpos.repeat_interleave(rep, 1)  # (B, H, G, K)
        k_idx = flat_key_index(kpos_h, b, h // rep, Hkv, Tk).reshape(B * H * G, -1)
        q_idx = ((b * H + h) * Tq + rows.clamp(max=Tq - 1).view(1, 1, G, Bq)).reshape(B * H * G, Bq)
        row_ok = (rows < Tq).view(1, 1, G, Bq).expand(B, H, G, Bq).reshape(B * H * G, Bq)
        mask = mask.repeat_interleave(rep, 1).reshape(B * H * G, Bq, -1)
    return Tiles(q_idx, k_idx, row_ok, mask)


def dma_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, window: int, chunk: int = 64, scale: float | None = None,
    q_offset: int | None = None,
) -> Tensor:
    """Causal DMA. q (B, H, Tq, D); k, v (B, Hkv, Tk, D); bias (B, Hkv, Tk) importance -> (B, H, Tq, Dv).

    Each row (at ``q_offset + r``) attends its ``window`` most important visible keys with ``bias`` added.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("window", window)
    positive_int("chunk", chunk)
    if bias.shape != (B, Hkv, Tk):
        raise ValueError(f"bias must have shape (B, Hkv, Tk) = {(B, Hkv, Tk)}, got {tuple(bias.shape)}")
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    tiles = dma_tiles(bias, H, Tq, window, chunk, q_offset)
    Dv = v.shape[-1]
    q1 = torch.cat([q, q.new_ones(B, H, Tq, 1)], -1)
    k1 = torch.cat([k, (bias / scale).unsqueeze(-1).to(k.dtype)], -1)
    width = max(D + 1, Dv)  # the fused kernel wants one head size for q, k and v (zero channels add nothing)
    q1, k1, v1 = F.pad(q1, (0, width - D - 1)), F.pad(k1, (0, width - D - 1)), F.pad(v, (0, width - Dv))
    return tile_attention(q1, k1, v1, [tiles], scale)[..., :Dv]


def dma_mask(bias: Tensor, Tq: int, window: int, q_offset: int | None = None) -> Tensor:
    """Dense (B, Hkv, Tq, Tk) selection, plainly: each row keeps its ``window`` visible keys of highest
    importance ``bias`` (B, Hkv, Tk) (ties: earlier position)."""
    B, Hkv, Tk = bias.shape
    q_offset = Tk - Tq if q_offset is None else q_offset
    keep = torch.zeros(B, Hkv, Tq, Tk, dtype=torch.bool, device=bias.device)
    for i in range(Tq):
        n = q_offset + i + 1  # visible keys 0 .. q_offset + i
        order = torch.argsort(-bias[:, :, :n].detach(), dim=-1, stable=True)  # ties: earlier position first
        keep[:, :, i].scatter_(-1, order[..., :window], True)
    return keep


def dma_reference(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, window: int, scale: float | None = None,
    q_offset: int | None = None, mask: Tensor | None = None, dtype: torch.dtype | None = torch.float64,
) -> Tensor:
    """Plain DMA (float64 by default): dense scores + bias, each row's top-``window`` visible keys by importance
    (ANDed with a free ``mask`` (B or 1, H or 1, Tq, Tk) if given)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q_offset = Tk - Tq if q_offset is None else q_offset
    dtype = dtype or q.dtype
    rep = H // Hkv
    kd, vd = k.to(dtype).repeat_interleave(rep, 1), v.to(dtype).repeat_interleave(rep, 1)
    bd = bias.to(dtype).repeat_interleave(rep, 1)  # (B, H, Tk)
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), kd) * scale + bd.unsqueeze(2)
    keep = dma_mask(bias, Tq, window, q_offset).repeat_interleave(rep, 1)
    return masked_softmax(s, keep if mask is None else keep & mask) @ vd


def default_importance(v: Tensor) -> Tensor:
    """The parameter-free importance (B, Hkv, Tk) from values (B, Hkv, Tk, d): ``exp(-softplus(mean(v_j)))``, the
    mean over every kv head's channels (the learned form with ``w`` uniform, ``a = 0``)."""
    z = F.softplus(v.mean((1, 3)))  # (B, Tk)
    return torch.exp(-z).unsqueeze(1).expand(v.shape[0], v.shape[1], v.shape[2])


def _importance(v: Tensor, importance: Tensor | None) -> Tensor:
    if importance is None:
        return default_importance(v)
    if not isinstance(importance, Tensor) or importance.shape != (v.shape[0], v.shape[1], v.shape[2]):
        got = tuple(importance.shape) if isinstance(importance, Tensor) else importance
        raise ValueError(f"importance must be a tensor (B, Hkv, Tk) = {tuple(v.shape[:3])}, got {got}")
    return importance


def _dma_dense(q, k, v, *, scale, q_offset, mask, dtype, window, chunk, importance):
    return dma_reference(q, k, v, _importance(v, importance), window, scale, q_offset, mask, dtype)


@sparse_op("dma", papers=("D51",), summary="dynamic mask attention: value-derived key importance picks each "
           "query's top-w keys and is added to their scores", options={"window": 64, "chunk": 64,
           "importance": None}, weights_mask=None, dense=_dma_dense, causal_only=True, renamed={"block": "chunk"},
           dense_options=None, example={"window": 6, "chunk": 4})
def dma_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, window: int, chunk: int,
           importance: Tensor | None) -> Tensor:
    """Causal DMA: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); ``importance`` (B, Hkv, Tk) of every
    key so far (None: the parameter-free stand-in from v); ``chunk`` query rows per tile. Stateless."""
    return dma_attention(q, k, v, _importance(v, importance), window, chunk, scale, q_offset)


@dataclass(frozen=True)
class DMAConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    window: int = 64  # keys kept per query
    chunk: int = 64  # query rows per tile
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)
    renamed: ClassVar[dict[str, str]] = {"delta_correction": "delta", "block": "chunk"}

    def validate(self) -> None:
        self.check("window", "chunk")


@register(
    "dma", family="routing", papers=("D51",), year=2025, config=DMAConfig,
    summary="dynamic mask attention: value-derived key importance picks each query's top-w keys and biases them",
)
class DMAAttention(RoutingLayer):
    """The op with the learned importance: ``dt_proj`` (w, per kv head over all heads' values) and ``a_log``."""

    op = "dma"

    def __init__(self, cfg: DMAConfig) -> None:
        super().__init__(cfg)
        self.dt_proj = nn.Linear(cfg.kvh * cfg.d, cfg.kvh)
        self.a_log = nn.Parameter(torch.zeros(cfg.kvh))

    def importance(self, v: Tensor) -> Tensor:
        """Values (B, Hkv, T, d) -> importance (B, Hkv, T) in (0, 1]."""
        z = F.softplus(self.dt_proj(merge_heads(v.to(self.dt_proj.weight.dtype))))  # (B, T, Hkv)
        return torch.exp(-self.a_log.exp() * z).transpose(1, 2)

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        return {**self.op_options(), "importance": self.importance(v)}
