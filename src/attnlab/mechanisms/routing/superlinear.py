"""Superlinear multi-step attention [D275], the N = 2 (jump-search) instance: span search, then span attention.

Keys are cut into spans of ``stride`` positions; span ``m`` covers ``[m * stride, (m + 1) * stride)`` and its
*anchor* is its centre key ``m * stride + stride // 2``.

1. **Span search**: a query at position ``i`` scores every eligible span by ``<q_i, k_anchor>`` -- one strided
   key per span, ``T / stride`` scores per query (like looking at every ``stride``-th entry in jump search) --
   and keeps the ``top_k`` best.
2. **Span attention**: standard attention over the kept spans plus a local window: the keys from the start of
   the span holding ``i - window + 1`` up to ``i`` (so the local part covers ``window`` to
   ``window + stride - 1`` keys and never cuts a span). Eligible spans are the complete spans before the local
   part, so every past position is either local or selectable (no structural exclusion).

With ``stride ~ sqrt(T)`` and fixed ``top_k`` both steps cost ``O(T^{3/2})``. The span choice has no gradient
here (indices); the paper trains it end to end. The op ``superlinear`` has no learned parameters: the
span search reads q and k (the inference-time form); ``chunk`` is the query rows per local tile.

Execution: the kept spans are aligned key blocks, run key-centric (``core.sparse.plan_selection``:
queries that picked the same span share it, no K/V copy when ``T`` is a multiple of ``stride``); the local part
is query-centric (a chunk of ``chunk`` rows gathers the contiguous keys its rows may see, exact mask). The
parts are disjoint and merged exactly by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.ops._engine import Tiles, flat_key_index, tile_attention, tiles_from_selection
from attnlab.ops.sparse import ALL, nonneg_int, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import block_sets


def local_start(pos: Tensor, stride: int, window: int) -> Tensor:
    """First key of the local part of queries at absolute positions ``pos``: the start of the span holding
    ``pos - window + 1`` (clamped at 0)."""
    return (pos - window + 1).clamp(min=0) // stride * stride


def span_search(q: Tensor, k: Tensor, stride: int, window: int, top_k: int, q_offset: int) -> tuple[Tensor, Tensor]:
    """Step 1: (sel, valid) each (B, H, Tq, n) span ids per query, n = min(top_k, complete spans)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dev = q.device
    with torch.no_grad():
        nb = Tk // stride  # complete spans (the eligible ones are complete)
        if nb == 0 or top_k == 0:
            z = torch.zeros(B, H, Tq, 0, dtype=torch.long, device=dev)
            return z, z.bool()
        anchors = torch.arange(nb, device=dev) * stride + stride // 2
        ka = k[:, :, anchors]  # (B, Hkv, nb, D): one strided key per span
        s = (q.view(B, Hkv, H // Hkv, Tq, D) @ ka.unsqueeze(2).transpose(-1, -2)).view(B, H, Tq, nb)
        lo = local_start(torch.arange(Tq, device=dev) + q_offset, stride, window)
        eligible = (torch.arange(nb, device=dev).view(1, nb) + 1) * stride <= lo.view(Tq, 1)
        s = s.masked_fill(~eligible, float("-inf"))
        val, idx = s.topk(min(top_k, nb), dim=-1)
    return idx, torch.isfinite(val)


def local_tiles(B: int, H: int, Hkv: int, Tq: int, Tk: int, stride: int, window: int, block: int,
                q_offset: int, device: torch.device | None = None) -> Tiles:
    """Query-centric tiles of the local part: rows of a block gather keys from their first row's local start
    up to their last row; the exact mask keeps ``local_start(i) <= j <= i`` per row."""
    dev = device
    Bq = min(block, Tq)
    G = math.ceil(Tq / Bq)
    rows = torch.arange(G * Bq, device=dev).view(G, Bq)
    pos = rows + q_offset
    K = Bq + window + stride - 2  # the most keys a block's rows can see together
    kpos = local_start(pos[:, :1], stride, window) + torch.arange(K, device=dev)  # (G, K)
    lo = local_start(pos, stride, window)
    mask = (kpos.unsqueeze(1) >= lo.unsqueeze(-1)) & (kpos.unsqueeze(1) <= pos.unsqueeze(-1)) & (kpos.unsqueeze(1) < Tk)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos.view(1, 1, G, K), b, h // (H // Hkv), Hkv, Tk).reshape(B * H * G, K)
    q_idx = ((b * H + h) * Tq + rows.clamp(max=Tq - 1).view(1, 1, G, Bq)).reshape(B * H * G, Bq)
    row_ok = (rows < Tq).expand(B * H, G, Bq).reshape(B * H * G, Bq)
    mask = mask.expand(B * H, G, Bq, K).reshape(B * H * G, Bq, K)
    return Tiles(q_idx, k_idx, row_ok, mask)


def superlinear_attention(
    q: Tensor, k: Tensor, v: Tensor, stride: int, window: int, top_k: int, chunk: int = 64,
    scale: float | None = None, q_offset: int | None = None, q_block: int = 128,
) -> Tensor:
    """Causal span search + span attention. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("stride", stride)
    positive_int("window", window)
    positive_int("chunk", chunk)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    q_offset = Tk - Tq if q_offset is None else q_offset
    sel, valid = span_search(q, k, stride, window, top_k, q_offset)
    parts: list = [local_tiles(B, H, Hkv, Tq, Tk, stride, window, chunk, q_offset, q.device)]
    if sel.shape[-1]:
        parts += tiles_from_selection(sel, valid, block_sets(Tk, stride, q.device), Hkv, Tk, q_offset, True, q_block)
    return tile_attention(q, k, v, parts, default_scale(D, scale))


def superlinear_mask(q: Tensor, k: Tensor, stride: int, window: int, top_k: int, q_offset: int | None = None) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of the selection, built plainly row by row (for the reference)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool, device=q.device)
    for r in range(Tq):
        i = q_offset + r
        lo = max(0, i - window + 1) // stride * stride
        mask[:, :, r, lo : i + 1] = True
        spans = lo // stride  # complete spans before the local part
        if spans == 0 or top_k == 0:
            continue
        for b in range(B):
            for h in range(H):
                anchors = k[b, h // (H // Hkv), [m * stride + stride // 2 for m in range(spans)]]
                for m in (anchors @ q[b, h, r]).topk(min(top_k, spans)).indices.tolist():
                    mask[b, h, r, m * stride : (m + 1) * stride] = True
    return mask


# ---- the op and the layer ----------------------------------------------------------------------------------


def _superlinear_weights(q: Tensor, k: Tensor, *, q_offset: int, stride: int = 64, window: int = 64, top_k: int = 4,
                         **_: Any) -> Tensor:
    return superlinear_mask(q, k, stride, window, top_k, q_offset)


@sparse_op("superlinear", papers=("D275",), summary="two-step jump search: score span anchors (strided keys), "
           "attend top-k spans plus a local window", options={"stride": 64, "window": 64, "top_k": 4, "chunk": 64},
           weights_mask=_superlinear_weights, causal_only=True, renamed={"block": "chunk"},
           dense_options={"top_k": ALL}, example={"stride": 4, "window": 5, "top_k": 2, "chunk": 4})
def superlinear_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, stride: int,
                   window: int, top_k: int, chunk: int) -> Tensor:
    """Causal span search + span attention: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless."""
    return superlinear_attention(q, k, v, stride, window, top_k, chunk, scale, q_offset)


@dataclass(frozen=True)
class SuperlinearConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    stride: int = 64  # span length = anchor spacing (about sqrt(T) for the O(T^1.5) setting)
    window: int = 64  # local keys (rounded down to a span start)
    top_k: int = 4  # spans per query
    chunk: int = 64  # query rows per local tile
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)
    renamed: ClassVar[dict[str, str]] = {"delta_correction": "delta", "block": "chunk"}

    def validate(self) -> None:
        self.check("stride", "window", "chunk")
        nonneg_int("top_k", self.top_k)


@register(
    "superlinear", family="routing", papers=("D275",), year=2025, config=SuperlinearConfig,
    summary="two-step jump search: score span anchors (strided keys), attend top-k spans plus a local window",
)
class SuperlinearAttention(RoutingLayer):
    op = "superlinear"
