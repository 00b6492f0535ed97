"""Inference-time dynamic sparse prefill for pretrained attention, as in MInference (compared in [B294]).

Functional, on given q, k, v (causal prefill; queries at ``q_offset + i``):

* **vertical-slash**: the last ``last_q`` queries estimate each head's attention; the ``n_vertical`` key columns
  and the ``n_slash`` diagonals (offsets ``i - j``) with the most estimated mass are kept (the main diagonal
  always). A query sees key ``j <= i`` iff ``j`` is a kept column or ``i - j`` a kept offset.
* **block top-k**: mean-pooled query blocks score mean-pooled key blocks; each query block keeps its
  ``top_k`` best past blocks plus its own block (causal inside).

Both run as query-centric tiles (``core.sparse``): a block of queries gathers the union of the keys any of
them may see, with the exact mask; the cost is ``queries x union``, never ``queries x all keys``.

The op (and layer) ``minference`` (``mode`` picks one of the two) runs the sparse pattern on the prefill and
dense attention on every later position (MInference's decoding); ``prefill`` fixes the prefill length so a
forward without a cache equals prefill + decoding with one. ``block``: block size of block top-k; ``chunk``:
query rows per tile of vertical-slash. The state records the prefill length (``state["prefill_end"]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_scores
from attnlab.ops._engine import Tiles, flat_key_index, tile_attention, tiles_from_blocks
from attnlab.ops.sparse import ALL, causal_rows, sampled_dense, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import block_means


def vertical_slash_select(
    q: Tensor, k: Tensor, n_vertical: int, n_slash: int, last_q: int = 64, q_offset: int | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Kept columns (B, H, n_vertical) and diagonal offsets (B, H, n_slash) per head; offset 0 always kept."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    q_offset = Tk - Tq if q_offset is None else q_offset
    scale = default_scale(D, scale)
    with torch.no_grad():
        n = min(last_q, Tq)
        qpos = torch.arange(Tq - n, Tq, device=q.device) + q_offset
        s = grouped_scores(q[:, :, -n:], k) * scale
        jpos = torch.arange(Tk, device=q.device)
        s = s.masked_fill(jpos.view(1, Tk) > qpos.view(n, 1), float("-inf"))
        a = torch.softmax(s, dim=-1)  # (B, H, n, Tk)
        vert = a.sum(2).topk(min(n_vertical, Tk), dim=-1).indices
        off = (qpos.view(n, 1) - jpos.view(1, Tk)).clamp(min=0)  # masked entries have zero weight anyway
        diag = torch.zeros(B, H, Tk, dtype=a.dtype, device=q.device).scatter_add_(
            -1, off.expand(B, H, n, Tk).reshape(B, H, -1), a.reshape(B, H, -1)
        )
        diag[..., 0] = float("inf")
        slash = diag.topk(min(n_slash, Tk), dim=-1).indices
    return vert, slash


def vertical_slash_mask(vert: Tensor, slash: Tensor, Tq: int, Tk: int, q_offset: int | None = None) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of a vertical-slash selection, built plainly."""
    q_offset = Tk - Tq if q_offset is None else q_offset
    B, H = vert.shape[:2]
    is_vert = torch.zeros(B, H, Tk, dtype=torch.bool, device=vert.device).scatter_(-1, vert, True)
    is_slash = torch.zeros(B, H, Tk, dtype=torch.bool, device=vert.device).scatter_(-1, slash, True)
    qpos = torch.arange(Tq, device=vert.device).view(Tq, 1) + q_offset
    jpos = torch.arange(Tk, device=vert.device).view(1, Tk)
    off = (qpos - jpos).clamp(min=0)
    m = is_vert.unsqueeze(2) | torch.gather(is_slash.unsqueeze(2).expand(B, H, Tq, Tk), -1, off.expand(B, H, Tq, Tk))
    return m & (jpos <= qpos)


def _tile_union(vert: Tensor, slash: Tensor, Tq: int, Tk: int, q_offset: int, block: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block`` queries, the keys any of its rows may see (B, H, G, Tk), and the kept columns (B, H, Tk)."""
    B, H = vert.shape[:2]
    dev = vert.device
    G = math.ceil(Tq / block)
    start = torch.arange(G, device=dev) * block + q_offset  # absolute position of each block's first row
    end = torch.clamp(start + block, max=q_offset + Tq)  # exclusive
    # diagonal o covers keys [start - o, end - 1 - o]: mark with a difference array
    lo = (start.view(1, 1, G, 1) - slash.unsqueeze(2)).clamp(min=0, max=Tk)
    hi = (end.view(1, 1, G, 1) - slash.unsqueeze(2)).clamp(min=0, max=Tk)
    diff = torch.zeros(B, H, G, Tk + 1, dtype=torch.int32, device=dev)
    one = torch.ones_like(lo, dtype=torch.int32)
    diff.scatter_add_(-1, lo, one).scatter_add_(-1, hi, -one)
    union = diff.cumsum(-1)[..., :Tk] > 0
    vmask = torch.zeros(B, H, Tk, dtype=torch.bool, device=dev).scatter_(-1, vert, True)
    union |= vmask.unsqueeze(2) & (torch.arange(Tk, device=dev).view(1, 1, 1, Tk) < end.view(1, 1, G, 1))
    return union, vmask


def vertical_slash_tiles(vert: Tensor, slash: Tensor, Tq: int, Tk: int, Hkv: int, q_offset: int,
                         block: int = 64, union: tuple[Tensor, Tensor] | None = None) -> Tiles:
    """Query-centric tiles: per block of ``block`` queries, the union of its columns and diagonal ranges
    (``union``: :func:`_tile_union`'s result when the caller has it)."""
    B, H = vert.shape[:2]
    dev = vert.device
    G = math.ceil(Tq / block)
    union, vmask = union if union is not None else _tile_union(vert, slash, Tq, Tk, q_offset, block)
    K = max(1, int(union.sum(-1).max()))
    kpos = torch.sort(union.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :K]
    kok = torch.gather(union, -1, kpos)
    # exact mask of every row
    smask = torch.zeros(B, H, Tk, dtype=torch.bool, device=dev).scatter_(-1, slash, True)
    rows = torch.arange(G * block, device=dev).view(G, block)
    qpos = (rows + q_offset).view(1, 1, G, block, 1)
    kp = kpos.unsqueeze(3)  # (B, H, G, 1, K)
    off = (qpos - kp).clamp(min=0, max=Tk - 1)  # padded rows may sit past the last key
    in_slash = torch.gather(smask.view(B, H, 1, 1, Tk).expand(B, H, G, block, Tk), -1, off.expand(B, H, G, block, K))
    in_vert = torch.gather(vmask, -1, kpos.reshape(B, H, -1)).view(B, H, G, 1, K)
    mask = kok.unsqueeze(3) & (kp <= qpos) & (in_slash | in_vert)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H * G, K)
    bh = torch.arange(B * H, device=dev).view(B * H, 1, 1)
    q_idx = (bh * Tq + rows.clamp(max=Tq - 1).unsqueeze(0)).reshape(-1, block)
    row_ok = (rows < Tq).expand(B * H, G, block).reshape(-1, block)
    return Tiles(q_idx, k_idx, row_ok, mask.reshape(B * H * G, block, K))


def vertical_slash_attention(
    q: Tensor, k: Tensor, v: Tensor, n_vertical: int, n_slash: int, last_q: int = 64, chunk: int = 64,
    scale: float | None = None, q_offset: int | None = None,
) -> Tensor:
    """Vertical-slash sparse prefill, ``chunk`` query rows per tile. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) ->
    (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("n_vertical", n_vertical)
    positive_int("n_slash", n_slash)
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    vert, slash = vertical_slash_select(q, k, n_vertical, n_slash, last_q, q_offset, scale)
    block = min(chunk, Tq)
    union = _tile_union(vert, slash, Tq, Tk, q_offset, block)
    if int(union[0].sum(-1).max()) > DENSE_UNION * min(Tk, q_offset + Tq):
        return vertical_slash_rows(q, k, v, vert, slash, scale, q_offset, ROW_CHUNK)
    tiles = vertical_slash_tiles(vert, slash, Tq, Tk, Hkv, q_offset, block, union)
    return tile_attention(q, k, v, [tiles], scale)


#: above this share of the keys in some tile's union, vertical-slash runs as masked row chunks over the causal
#: prefix (read in place) instead of gathered tiles: f * L / 2 diagonals of a short prompt cross nearly every
#: 64-key block of every query block, so the gathered tiles held almost all keys and an explicit mask
#: (measured at 2k, 25%, SmolLM2's heads: 20x an SDPA causal call gathered, 3.3x as row chunks)
DENSE_UNION = 0.5
ROW_CHUNK = 256


def vertical_slash_rows(q: Tensor, k: Tensor, v: Tensor, vert: Tensor, slash: Tensor, scale: float,
                        q_offset: int = 0, rows: int = ROW_CHUNK) -> Tensor:
    """Vertical-slash as chunks of ``rows`` queries over the keys up to the chunk's last position, with the
    exact mask as an additive bias (key ``j`` for query position ``p``: ``j <= p`` and (``j`` a kept column or
    ``p - j`` a kept offset)); ``slash`` must hold offset 0 (as the selection's does), so no row sees nothing.
    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    dev, ninf = q.device, float("-inf")
    # additive biases, built as floats directly (SDPA would convert a boolean mask, at several times the cost)
    col = torch.full((B, H, Tk), ninf, dtype=q.dtype, device=dev).scatter_(-1, vert, 0.0)
    # by offset, after Tk entries of -inf: entry Tk + o is 0 where offset o is kept (negative offsets never)
    by_off = torch.full((B, H, 2 * Tk), ninf, dtype=q.dtype, device=dev)
    by_off[..., Tk:].scatter_(-1, slash, 0.0)
    outs = []
    for r0 in range(0, Tq, rows):
        r1 = min(Tq, r0 + rows)
        n = min(Tk, q_offset + r1)  # the keys this chunk's rows may see
        # a Toeplitz view: the window starting at Tk - n + p + 1 holds offsets p - n + 1 .. p, so its reversal
        # is the offset p - j of every key j = 0 .. n - 1
        win = by_off.unfold(-1, n, 1)[:, :, Tk - n + q_offset + r0 + 1: Tk - n + q_offset + r1 + 1]
        bias = torch.maximum(win.flip(-1), col[:, :, None, :n])
        R = min(r1 - r0, n)
        # a kept column after a row's position lies among the last R keys: row r, key n - R + c is later iff
        # c - r > q_offset + r0 + R - n
        late = torch.ones(r1 - r0, R, dtype=torch.bool, device=dev).triu(q_offset + r0 + R - n + 1)
        bias[..., n - R:].masked_fill_(late, ninf)
        outs.append(F.scaled_dot_product_attention(q[:, :, r0:r1], k[:, :, :n], v[:, :, :n], attn_mask=bias,
                                                   scale=scale, enable_gqa=H != Hkv))
    return torch.cat(outs, 2)


def block_topk_select(q: Tensor, k: Tensor, block: int, top_k: int, q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """(block_index, valid) (B, H, G, top_k + 1): the own block first, then the best past blocks."""
    B, H, Tq, D = q.shape
    if q_offset % block:
        raise ValueError(f"block top-k needs q_offset ({q_offset}) to be a multiple of block ({block})")
    with torch.no_grad():
        G = math.ceil(Tq / block)
        qbar = block_means(q, block)  # (B, H, G, D)
        s = grouped_scores(qbar, block_means(k, block))  # (B, H, G, nb)
        own = torch.arange(G, device=q.device) + q_offset // block
        past = torch.arange(s.shape[-1], device=q.device).view(1, -1) < own.view(G, 1)
        s = s.masked_fill(~past, float("-inf"))
        n = min(top_k, s.shape[-1])
        val, idx = s.topk(n, dim=-1)
        sel = torch.cat([own.view(1, 1, G, 1).expand(B, H, G, 1), idx], -1)
        valid = torch.cat([torch.ones(B, H, G, 1, dtype=torch.bool, device=q.device), torch.isfinite(val)], -1)
    return sel, valid


def block_topk_attention(
    q: Tensor, k: Tensor, v: Tensor, block: int, top_k: int, scale: float | None = None, q_offset: int | None = None,
) -> Tensor:
    """Block top-k sparse prefill (causal). q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    sel, valid = block_topk_select(q, k, block, top_k, q_offset)
    tiles = tiles_from_blocks(sel, valid, block, block, Tq, Tk, Hkv, q_offset, causal=True)
    return tile_attention(q, k, v, [tiles], scale)


def block_topk_mask(sel: Tensor, valid: Tensor, block: int, Tq: int, Tk: int, q_offset: int = 0) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of a block top-k selection."""
    B, H, G, n = sel.shape
    nb = math.ceil(Tk / block)
    chosen = torch.zeros(B, H, G, nb + 1, dtype=torch.bool, device=sel.device)
    chosen.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)), True)
    qb = torch.arange(Tq, device=sel.device) // block
    kb = torch.arange(Tk, device=sel.device) // block
    m = chosen[:, :, qb][..., kb]
    dev = sel.device
    return m & (torch.arange(Tk, device=dev).view(1, Tk) <= torch.arange(Tq, device=dev).view(Tq, 1) + q_offset)


MODES = ("vertical_slash", "block_topk")


def _check(mode: str, n_vertical: int, n_slash: int, last_q: int, block: int, top_k: int, chunk: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("n_vertical", n_vertical), ("n_slash", n_slash), ("last_q", last_q), ("block", block),
                        ("top_k", top_k), ("chunk", chunk)):
        positive_int(name, value)


def _sparse(q: Tensor, k: Tensor, v: Tensor, scale: float, mode: str, n_vertical: int, n_slash: int, last_q: int,
            block: int, top_k: int, chunk: int) -> Tensor:
    if mode == "vertical_slash":
        return vertical_slash_attention(q, k, v, n_vertical, n_slash, last_q, chunk, scale, q_offset=0)
    return block_topk_attention(q, k, v, block, top_k, scale, q_offset=0)


def _prefill_end(q_offset: int, Tq: int, state: dict, prefill: int | None) -> int:
    """The sparse prefill is the first call, cut at ``prefill`` positions if that is shorter."""
    if q_offset == 0:
        state["prefill_end"] = min(prefill or Tq, Tq)
    return state.get("prefill_end", 0)


def _corrected_end(q_offset: int, Tq: int, state: dict, o: dict) -> int:
    return state.get("prefill_end", min(o["prefill"] or Tq, Tq))


def _minference_weights(q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None,
                        state: dict | None = None, mode: str = "vertical_slash", n_vertical: int = 64,
                        n_slash: int = 64, last_q: int = 64, block: int = 64, top_k: int = 4, chunk: int = 64,
                        prefill: int | None = None, **_: Any) -> Tensor:
    """Plainly: the prefill rows keep the pattern chosen from the whole prefill; later rows are dense causal."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = causal_rows(Tq, Tk, q_offset, q.device).expand(B, H, Tq, Tk).clone()
    if q_offset > 0:
        P = (state or {}).get("prefill_end", prefill)
        if P is None or q_offset < P:
            raise ValueError("minference: the weights of rows inside the prefill need the whole prefill (call with "
                             "q_offset 0), and later rows need its length (state or prefill=)")
        return mask
    P = min(Tq, prefill or Tq)
    qp, kp = q[:, :, :P], k[:, :, :P]
    if mode == "vertical_slash":
        vert, slash = vertical_slash_select(qp, kp, n_vertical, n_slash, last_q, 0, scale)
        sparse = vertical_slash_mask(vert, slash, P, P)
    else:
        sel, valid = block_topk_select(qp, kp, block, top_k)
        sparse = block_topk_mask(sel, valid, block, P, P)
    mask[:, :, :P] = False
    mask[:, :, :P, :P] = sparse
    return mask


@sparse_op("minference", papers=("B294",), summary="MInference sparse prefill (vertical-slash or block top-k, "
           "estimated from q, k), dense decoding", options={"mode": "vertical_slash", "n_vertical": 64,
           "n_slash": 64, "last_q": 64, "block": 64, "top_k": 4, "chunk": 64, "prefill": None},
           weights_mask=_minference_weights, stateful=True, causal_only=True, corrected_end=_corrected_end,
           dense_options={"n_vertical": ALL, "n_slash": ALL},
           example={"n_vertical": 3, "n_slash": 3, "last_q": 4, "chunk": 8, "prefill": 14})
def minference_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, mode: str,
                  n_vertical: int, n_slash: int, last_q: int, block: int, top_k: int, chunk: int,
                  prefill: int | None) -> Tensor:
    """The first call (q_offset 0) is the prefill, cut at ``prefill`` positions when set: its rows run the sparse
    pattern chosen from the whole prefill; every later row attends densely. q (B, H, Tq, D), k, v (B, Hkv, Tk, D)
    -> (B, H, Tq, Dv)."""
    _check(mode, n_vertical, n_slash, last_q, block, top_k, chunk)
    if prefill is not None:
        positive_int("prefill", prefill)
    Tq = q.shape[2]
    P = _prefill_end(q_offset, Tq, state, prefill)
    n = max(0, P - q_offset)  # sparse rows of this call (only in the first call)
    parts = [_sparse(q[:, :, :P], k[:, :, :P], v[:, :, :P], scale, mode, n_vertical, n_slash, last_q, block, top_k,
                     chunk)] if n else []
    if n < Tq:
        rows = torch.arange(n, Tq, device=q.device)
        parts.append(sampled_dense(q, k, v, rows, True, scale, q_offset).to(v.dtype))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class MInferenceConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    mode: str = "vertical_slash"  # or "block_topk"
    n_vertical: int = 64  # vertical_slash: kept key columns per head
    n_slash: int = 64  # vertical_slash: kept diagonals per head (the main one always)
    last_q: int = 64  # vertical_slash: the last queries that estimate the pattern
    block: int = 64  # block_topk: block size
    top_k: int = 4  # block_topk: past key blocks per query block (the own block is read too)
    chunk: int = 64  # vertical_slash: query rows per tile
    prefill: int | None = None  # sparse prefill = the first call, cut at this many positions; None: uncut
    delta: int = 0  # D99 sampling stride on the sparse prefill rows; 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        _check(self.mode, self.n_vertical, self.n_slash, self.last_q, self.block, self.top_k, self.chunk)
        self.check()


@register(
    "minference", family="routing", papers=("B294",), year=2025, config=MInferenceConfig,
    summary="MInference sparse prefill (vertical-slash or block top-k, estimated from q, k), dense decoding",
)
class MInferenceAttention(RoutingLayer):
    """The first call is the prefill (cut at ``prefill`` positions when set): its rows run the sparse pattern
    chosen from the whole prefill (its last queries, or its pooled blocks); every later row attends densely."""

    op = "minference"
