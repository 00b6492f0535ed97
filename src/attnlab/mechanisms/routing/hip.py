"""HiP: hierarchically pruned attention [D74] -- a tree search for each query block's top-k key blocks.

Training-free, causal prefill. Queries are grouped in blocks of ``block`` rows (the block approximation:
a query block shares its key blocks). For query block ``g`` the candidates are its past key blocks
``[0, g)``, first cut into ``top_k`` equal intervals. Each iteration splits every interval in two, scores each
half by its *representative key* (the key at the centre of the half's positions) as the best
``<q, k_rep>`` over the block's queries, and keeps the ``top_k`` best halves; after ``ceil(log2(g / top_k))``
iterations each kept interval is one key block. So a query block scores ``O(top_k log T)`` keys instead of
``T``, and no position is structurally excluded. The own block is always read (causal inside).

Execution: query-centric tiles (``core.selection.tiles_from_blocks``): each query block gathers its
``top_k + 1`` key blocks, ``(top_k + 1) * block`` keys per query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.selection import tile_attention, tiles_from_blocks


def _score(qg: Tensor, kk: Tensor, rows_ok: Tensor, lo: Tensor, hi: Tensor, block: int) -> Tensor:
    """Best score of each interval's representative key over its query block.

    qg (B, H, G, block, D) grouped queries, kk (B, H, Tk, D), rows_ok (G, block), lo/hi (B, H, G, m) key-block
    intervals -> (B, H, G, m); empty intervals -> -inf.
    """
    B, H, G, m = lo.shape
    rep = ((lo + hi) * block // 2).clamp(max=kk.shape[2] - 1)  # centre token of the interval
    krep = torch.gather(kk, 2, rep.reshape(B, H, G * m, 1).expand(B, H, G * m, kk.shape[-1])).view(B, H, G, m, -1)
    s = torch.einsum("bhgqd,bhgmd->bhgqm", qg, krep).masked_fill(~rows_ok.view(1, 1, G, -1, 1), float("-inf"))
    return s.amax(3).masked_fill(hi <= lo, float("-inf"))


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
        i = torch.arange(top_k, device=dev)
        lo = (i.view(1, -1) * own.view(-1, 1)) // top_k  # (G, top_k): top_k near-equal intervals of [0, own)
        hi = ((i + 1).view(1, -1) * own.view(-1, 1)) // top_k
        lo, hi = lo.expand(B, H, G, top_k).contiguous(), hi.expand(B, H, G, top_k).contiguous()
        qg = F.pad(q, (0, 0, 0, G * block - Tq)).view(B, H, G, block, D)
        rows_ok = (torch.arange(G * block, device=dev) < Tq).view(G, block)
        kk = k.repeat_interleave(H // Hkv, 1)
        while bool((hi - lo > 1).any()):
            mid = (lo + hi) // 2
            split = hi - lo > 1  # intervals of one block (or empty) are kept whole, with an empty sibling
            c_lo = torch.cat([lo, torch.where(split, mid, hi)], -1)
            c_hi = torch.cat([torch.where(split, mid, hi), hi], -1)
            best = _score(qg, kk, rows_ok, c_lo, c_hi, block).topk(top_k, dim=-1).indices
            lo, hi = torch.gather(c_lo, -1, best), torch.gather(c_hi, -1, best)
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
