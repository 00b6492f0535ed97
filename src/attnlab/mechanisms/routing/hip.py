"""HiP: hierarchically pruned attention [D74] -- a tree search for each query block's top-k key blocks.

Training-free, causal prefill. Queries are grouped in blocks of ``block`` rows (the block approximation:
a query block shares its key blocks). For query block ``g`` the candidates are its past key blocks
``[0, g)``, first cut into ``top_k`` equal intervals. Each iteration splits every interval in two, scores each
half by its *representative key* (the key at the centre of the half's positions) as the best
``<q, k_rep>`` over the block's queries, and keeps the ``top_k`` best halves; after ``ceil(log2(g / top_k))``
iterations each kept interval is one key block. So a query block scores ``O(top_k log T)`` keys instead of
``T``, and no position is structurally excluded. The own block is always read (causal inside).

Execution: query-centric tiles (``core.sparse.plan_blocks``): each query block gathers its
``top_k + 1`` key blocks, ``(top_k + 1) * block`` keys per query.

The registered layer ``hip`` uses the per-query form (HiP's decoding: a query block of one row), in prefill
and decoding alike, so a decoded token re-selects its blocks over the cache exactly as its row of the full
forward does; its key blocks run key-centric like MoBA's (aligned blocks, no K/V copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.ops._engine import tile_attention, tiles_from_blocks
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import blocks_attention


def _score(qg: Tensor, kk: Tensor, rows_ok: Tensor, lo: Tensor, hi: Tensor, block: int) -> Tensor:
    """Best score of each interval's representative key over its query block.

    qg (B, H, G, block, D) grouped queries, kk (B, Hkv, Tk, D) (query head h reads kv head h // (H / Hkv)),
    rows_ok (G, block), lo/hi (B, H, G, m) key-block intervals -> (B, H, G, m); empty intervals -> -inf.
    """
    B, H, G, m = lo.shape
    Hkv, D = kk.shape[1], kk.shape[-1]
    rep = ((lo + hi) * block // 2).clamp(max=kk.shape[2] - 1)  # centre token of the interval
    # the query heads of one kv head are adjacent: gather from the kv head directly (no repeated copy of K)
    idx = rep.reshape(B, Hkv, (H // Hkv) * G * m, 1).expand(-1, -1, -1, D)
    krep = torch.gather(kk, 2, idx).view(B, H, G, m, D)
    s = torch.einsum("bhgqd,bhgmd->bhgqm", qg, krep).masked_fill(~rows_ok.view(1, 1, G, -1, 1), float("-inf"))
    return s.amax(3).masked_fill(hi <= lo, float("-inf"))


def _tree_search(qg: Tensor, kk: Tensor, rows_ok: Tensor, own: Tensor, block: int, top_k: int) -> tuple[Tensor, Tensor]:
    """Kept key-block intervals ``lo, hi`` (B, H, G, top_k) of each query group over its ``own[g]`` past blocks.

    qg (B, H, G, R, D) grouped queries, kk (B, Hkv, Tk, D) keys, rows_ok (G, R), own (G,).
    """
    B, H, G = qg.shape[:3]
    i = torch.arange(top_k, device=qg.device)
    lo = (i.view(1, -1) * own.view(-1, 1)) // top_k  # (G, top_k): top_k near-equal intervals of [0, own)
    hi = ((i + 1).view(1, -1) * own.view(-1, 1)) // top_k
    lo, hi = lo.expand(B, H, G, top_k).contiguous(), hi.expand(B, H, G, top_k).contiguous()
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        split = hi - lo > 1  # intervals of one block (or empty) are kept whole, with an empty sibling
        c_lo = torch.cat([lo, torch.where(split, mid, hi)], -1)
        c_hi = torch.cat([torch.where(split, mid, hi), hi], -1)
        best = _score(qg, kk, rows_ok, c_lo, c_hi, block).topk(top_k, dim=-1).indices
        lo, hi = torch.gather(c_lo, -1, best), torch.gather(c_hi, -1, best)
    return lo, hi


def hip_select(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(block_index, valid), each (B, H, G, top_k + 1): the own block first, then the pruned past blocks."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    positive_int("block", block)
    positive_int("top_k", top_k)
    if q_offset % block:
        raise ValueError(f"HiP needs q_offset ({q_offset}) to be a multiple of block ({block})")
    dev = q.device
    with torch.no_grad():
        G = math.ceil(Tq / block)
        own = torch.arange(G, device=dev) + q_offset // block  # (G,): number of past key blocks
        qg = F.pad(q, (0, 0, 0, G * block - Tq)).view(B, H, G, block, D)
        rows_ok = (torch.arange(G * block, device=dev) < Tq).view(G, block)
        lo, hi = _tree_search(qg, k, rows_ok, own, block, top_k)
        sel = torch.cat([own.view(1, 1, G, 1).expand(B, H, G, 1), lo], -1)
        valid = torch.cat([torch.ones(B, H, G, 1, dtype=torch.bool, device=dev), hi > lo], -1)
    return sel, valid


def hip_attention(
    q: Tensor, k: Tensor, v: Tensor, block: int, top_k: int, scale: float | None = None, q_offset: int | None = None,
) -> Tensor:
    """Causal HiP prefill. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); queries at q_offset + i."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    sel, valid = hip_select(q, k, block, top_k, q_offset)
    tiles = tiles_from_blocks(sel, valid, block, block, Tq, Tk, Hkv, q_offset, causal=True)
    return tile_attention(q, k, v, [tiles], default_scale(D, scale))


# ---- per-query form: decoding, and the registered layer -------------------------------------------------


def hip_row_select(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-query tree search (HiP's decoding form: a query block of one row). q (B, H, Tq, D) at positions
    ``q_offset + r``, k (B, Hkv, Tk, D) -> (sel, valid) (B, H, Tq, top_k + 1) key blocks: the query's own block
    (``pos // block``) first, then the kept past blocks."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    positive_int("block", block)
    positive_int("top_k", top_k)
    q_offset = Tk - Tq if q_offset is None else q_offset
    top_k = min(top_k, math.ceil(Tk / block))  # more intervals than past blocks keep every block anyway
    dev = q.device
    with torch.no_grad():
        own = (torch.arange(Tq, device=dev) + q_offset) // block
        rows_ok = torch.ones(Tq, 1, dtype=torch.bool, device=dev)
        lo, hi = _tree_search(q.unsqueeze(3), k, rows_ok, own, block, top_k)
        sel = torch.cat([own.view(1, 1, Tq, 1).expand(B, H, Tq, 1), lo], -1)
        valid = torch.cat([torch.ones(B, H, Tq, 1, dtype=torch.bool, device=dev), hi > lo], -1)
    return sel, valid


def hip_row_attention(
    q: Tensor, k: Tensor, v: Tensor, block: int, top_k: int, scale: float | None = None, q_offset: int | None = None,
    q_block: int = 128,
) -> Tensor:
    """Causal per-query HiP. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); queries at q_offset + r.

    Execution as MoBA's: key-centric tiles over aligned key blocks, the own block causal on the diagonal.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    sel, valid = hip_row_select(q, k, block, top_k, q_offset)
    return blocks_attention(q, k, v, sel, valid, block, q_offset, default_scale(D, scale), q_block)


def hip_row_mask(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int | None = None) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of the per-query tree search, written plainly row by row (for the reference)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    top_k = min(top_k, math.ceil(Tk / block))
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool, device=q.device)
    for b in range(B):
        for h in range(H):
            kh = k[b, h // (H // Hkv)]
            for r in range(Tq):
                p = q_offset + r
                own = p // block
                iv = [(i * own // top_k, (i + 1) * own // top_k) for i in range(top_k)]
                iv = [(lo, hi) for lo, hi in iv if hi > lo]
                while any(hi - lo > 1 for lo, hi in iv):
                    cand = []
                    for lo, hi in iv:
                        cand += [(lo, (lo + hi) // 2), ((lo + hi) // 2, hi)] if hi - lo > 1 else [(lo, hi)]
                    score = [float(q[b, h, r].detach() @ kh[(lo + hi) * block // 2].detach()) for lo, hi in cand]
                    best = sorted(range(len(cand)), key=lambda c: -score[c])[:top_k]
                    iv = [cand[c] for c in best]
                for blk in [own] + [lo for lo, _ in iv]:
                    mask[b, h, r, blk * block : min((blk + 1) * block, p + 1)] = True
    return mask


# ---- the op and the layer ----------------------------------------------------------------------------------


def _hip_weights(q: Tensor, k: Tensor, *, q_offset: int, block: int = 64, top_k: int = 4, **_: Any) -> Tensor:
    return hip_row_mask(q, k, block, top_k, q_offset)


@sparse_op("hip", papers=("D74",), summary="hierarchical pruning: per-query tree search (halve intervals, keep "
           "top-k by centre key) for key blocks + own block", options={"block": 64, "top_k": 4},
           weights_mask=_hip_weights, causal_only=True, dense_options={"top_k": ALL},
           example={"block": 4, "top_k": 2})
def hip_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, block: int,
           top_k: int) -> Tensor:
    """Per-query HiP (every row runs its own tree search over the blocks before its own): q (B, H, Tq, D),
    k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless, so decoding equals the full forward."""
    return hip_row_attention(q, k, v, block, top_k, scale, q_offset)


@dataclass(frozen=True)
class HiPConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    block: int = 64  # key block size (the tree's leaves)
    top_k: int = 4  # past key blocks per query (the own block is read too)
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        self.check("block", "top_k")


@register(
    "hip", family="routing", papers=("D74",), year=2024, config=HiPConfig,
    summary="hierarchical pruning: per-query tree search (halve intervals, keep top-k) for key blocks + own block",
)
class HiPAttention(RoutingLayer):
    """Per-query HiP: every query (prefill row or decoded token) runs its own tree search over the blocks
    before its own, so decoding with a cache equals the full forward. The prefill block approximation
    (a query block shares its search) is :func:`hip_attention` (functional)."""

    op = "hip"
