"""MoBA: mixture of block attention (the block-gating scheme VMoBA [D56] builds on).

Keys are cut into blocks of ``block`` positions; a query's gate score for block j is its dot product with
the block's mean key, ``s_ij = <q_i, mean(K_j)>``. Each query reads its own (current) block causally plus the
``top_k - 1`` past blocks with the highest gate -- chosen per query, so different queries of one block read
different blocks. Execution is key-centric (``core.sparse``): queries are grouped by the block they
selected, each block is gathered once per tile of queries, partial results are merged by log-sum-exp; the
current block runs as causal attention on contiguous blocks without any gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_scores
from attnlab.ops._engine import tile_attention, tiles_from_selection
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def block_means(k: Tensor, block: int) -> Tensor:
    """(B, Hkv, Tk, D) -> (B, Hkv, nb, D): mean key of each block (the last, partial block over its keys)."""
    B, Hkv, Tk, D = k.shape
    whole = Tk // block
    means = k[:, :, : whole * block].unflatten(2, (whole, block)).mean(3)
    if whole * block == Tk:
        return means
    # the partial last block (every decoding step has one): its own mean, no padded copy of the keys
    return torch.cat([means, k[:, :, whole * block:].mean(2, keepdim=True)], dim=2)


def gate_scores(q: Tensor, k: Tensor, block: int) -> Tensor:
    """Per-query gate over key blocks: q (B, H, Tq, D), k (B, Hkv, Tk, D) -> (B, H, Tq, nb)."""
    return grouped_scores(q, block_means(k, block))  # block means (B, Hkv, nb, D)


def moba_select(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int) -> tuple[Tensor, Tensor]:
    """Selected key blocks per query: (sel, valid), each (B, H, Tq, top_k).

    Entry 0 is the query's current block (always read); entries 1.. are the best past blocks by gate score
    (invalid where fewer past blocks exist). Selection is not differentiated (indices).
    """
    with torch.no_grad():
        s = gate_scores(q, k, block)
        B, H, Tq, nb = s.shape
        cur = (torch.arange(Tq, device=q.device) + q_offset) // block  # (Tq,)
        past = torch.arange(nb, device=q.device).view(1, nb) < cur.view(Tq, 1)
        s = s.masked_fill(~past, float("-inf"))
        n = min(top_k - 1, nb)
        if n > 0:
            # topk over a short last dim is several times slower than max on CPU
            val, idx = s.max(-1, keepdim=True) if n == 1 else s.topk(n, dim=-1)
            valid = torch.isfinite(val)
        else:
            idx = s.new_zeros(B, H, Tq, 0, dtype=torch.long)
            valid = idx.bool()
        sel = torch.cat([cur.view(1, 1, Tq, 1).expand(B, H, Tq, 1), idx], dim=-1)
        valid = torch.cat([torch.ones(B, H, Tq, 1, dtype=torch.bool, device=q.device), valid], dim=-1)
    return sel, valid


def block_sets(Tk: int, block: int, device=None) -> Tensor:
    """(1, 1, nb, block) key positions of each block (positions >= Tk are padding)."""
    nb = math.ceil(Tk / block)
    return (torch.arange(nb, device=device).view(nb, 1) * block + torch.arange(block, device=device)).view(1, 1, nb, block)


def moba_attention(
    q: Tensor, k: Tensor, v: Tensor, block: int, top_k: int, scale: float | None = None,
    q_offset: int | None = None, q_block: int = 128,
) -> Tensor:
    """Causal MoBA. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). Queries sit at q_offset + i."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("block", block)
    positive_int("top_k", top_k)
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    sel, valid = moba_select(q, k, block, top_k, q_offset)
    sets = block_sets(Tk, block, q.device)
    if Tq == Tk and q_offset == 0:
        # prefill: the current block is causal attention on contiguous blocks (no gather, no mask)
        parts = tiles_from_selection(sel[..., 1:], valid[..., 1:], sets, Hkv, Tk, q_offset, True, q_block)
        return tile_attention(q, k, v, parts, scale, diag_block=block)
    parts = tiles_from_selection(sel, valid, sets, Hkv, Tk, q_offset, True, q_block)
    return tile_attention(q, k, v, parts, scale)


def blocks_attention(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, valid: Tensor, block: int, q_offset: int,
                     scale: float, q_block: int = 128) -> Tensor:
    """Per-query key-block selections ``sel, valid`` (B, H, Tq, n) with the own block at entry 0, causal.

    Prefill (``Tq == Tk``, offset 0): the own block runs as causal diagonal blocks (no gather); otherwise every
    block goes through key-centric tiles.
    """
    Hkv, Tk = k.shape[1], k.shape[2]
    sets = block_sets(Tk, block, q.device)
    if q.shape[2] == Tk and q_offset == 0:
        parts = tiles_from_selection(sel[..., 1:], valid[..., 1:], sets, Hkv, Tk, q_offset, True, q_block)
        return tile_attention(q, k, v, parts, scale, diag_block=block)
    return tile_attention(q, k, v, tiles_from_selection(sel, valid, sets, Hkv, Tk, q_offset, True, q_block), scale)


def moba_mask(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int | None = None) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of MoBA's selection, built plainly from the gate (for the reference)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    s = gate_scores(q, k, block)
    nb = s.shape[-1]
    qpos = torch.arange(Tq, device=q.device) + q_offset
    blk_of_key = torch.arange(Tk, device=q.device) // block
    chosen = torch.zeros(B, H, Tq, nb, dtype=torch.bool, device=q.device)
    for i in range(Tq):
        cur = int(qpos[i]) // block
        chosen[:, :, i, cur] = True
        if cur > 0 and top_k > 1:
            best = s[:, :, i, :cur].topk(min(top_k - 1, cur), dim=-1).indices
            chosen[:, :, i].scatter_(-1, best, True)
    mask = chosen[..., blk_of_key]  # block choice -> token choice
    return mask & (torch.arange(Tk, device=q.device).view(1, Tk) <= qpos.view(Tq, 1))


# ---- the op and the layer ----------------------------------------------------------------------------------


def _moba_weights(q: Tensor, k: Tensor, *, q_offset: int, block: int = 64, top_k: int = 3, **_: Any) -> Tensor:
    return moba_mask(q, k, block, top_k, q_offset)


@sparse_op("moba", papers=("D56",), summary="mixture of block attention: per-query top-k key blocks by mean-key "
           "gate, current block always read", options={"block": 64, "top_k": 3}, weights_mask=_moba_weights,
           causal_only=True, dense_options={"top_k": ALL}, example={"block": 4, "top_k": 2})
def moba_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, block: int,
            top_k: int) -> Tensor:
    """Causal MoBA on q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless (the gate reads the
    cached keys), so decoding equals the full forward."""
    return moba_attention(q, k, v, block, top_k, scale, q_offset)


@dataclass(frozen=True)
class MoBAConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    block: int = 64
    top_k: int = 3
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        self.check("block", "top_k")


@register(
    "moba", family="routing", papers=("D56",), year=2025, config=MoBAConfig,
    summary="mixture of block attention: per-query top-k key blocks by mean-key gate, current block always read",
)
class MoBAAttention(RoutingLayer):
    op = "moba"
