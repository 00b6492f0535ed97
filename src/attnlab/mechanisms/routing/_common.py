"""Projections, rotary positions and the cache shared by the routing layers (kept tiny on purpose); the base
of the inference-time selection layers (prefill boundary, cache state, delta correction)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.core.cache import KVCache
from attnlab.core.selection import (
    Tiles,
    flat_key_index,
    masked_reference,
    tile_attention,
    tiles_from_selection,
)

from ..base import AttentionLayer, check_hidden
from ..common import apply_rope, merge_heads, split_heads
from .delta import correction_terms


class ProjectedLayer(AttentionLayer):
    """q, k, v, o projections over ``(B, T, dim)``; subclasses implement ``attend`` and ``attend_reference``."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None, rope: bool) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim ({dim}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
        self.dim, self.heads, self.kv_heads, self.rope = dim, heads, kv_heads, rope
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def qkv(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, dim) -> q (B, H, T, d), k, v (B, Hkv, T, d); rotary at absolute positions start..start+T-1."""
        check_hidden(x, self.dim)
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.kv_heads)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if self.rope:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        return q, k, v

    def out(self, o: Tensor) -> Tensor:
        return self.o_proj(merge_heads(o.to(self.o_proj.weight.dtype)))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        start = 0 if cache is None else cache.length
        q, k, v = self.qkv(x, start)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.out(self.attend(q, k, v, start))

    def reference(self, x: Tensor) -> Tensor:
        """The dense formula with materialized scores; run it on a float64 copy of the layer (``.double()``)."""
        q, k, v = self.qkv(x)
        return self.out(self.attend_reference(q, k, v))

    def init_cache(self, batch: int = 1) -> KVCache:
        return KVCache()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


# ---- inference-time selection layers (hip, minference, delta_select, recycled) ------------------------------


def set_tiles(rows: Tensor, kpos: Tensor, kok: Tensor, B: int, H: int, Hkv: int, Tq: int, Tk: int,
              q_offset: int) -> Tiles:
    """Query-centric tiles from explicit key sets: tile ``t`` of every (batch, head) holds the call's query rows
    ``rows[t]`` (S, R) (-1: padding) and reads key positions ``kpos[..., t, :]`` where ``kok`` holds, causally.

    kpos, kok: (B or 1, H or 1, S, K); positions distinct per tile where valid. Rows in no tile see nothing.
    """
    S, R = rows.shape
    K = kpos.shape[-1]
    dev = rows.device
    kpos, kok = kpos.expand(B, H, S, K), kok.expand(B, H, S, K)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H * S, K)
    row_ok = (rows >= 0).expand(B * H, S, R).reshape(-1, R)
    r = torch.where(rows >= 0, rows, rows[:, :1].clamp(min=0))  # padding repeats a real row of its tile
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1, 1) * Tq + r).reshape(-1, R)
    mask = kok.unsqueeze(-2) & (kpos.unsqueeze(-2) <= (r + q_offset).view(1, 1, S, R, 1))  # (B, H, S, R, K)
    return Tiles(q_idx, k_idx, row_ok, mask.reshape(B * H * S, R, K))


def causal_rows(Tq: int, Tk: int, q_offset: int, device=None) -> Tensor:
    """(Tq, Tk) bool: key position <= query position ``q_offset + row``."""
    return torch.arange(Tk, device=device).view(1, Tk) <= (torch.arange(Tq, device=device) + q_offset).view(Tq, 1)


class SelectionCache(KVCache):
    """KV cache plus what an inference-time selection carries between calls (``state``: the prefill length,
    the last delta correction, recycled keys, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.state: dict = {}


class SelectionLayer(ProjectedLayer):
    """Base of the inference-time selection layers: projections, rotary positions, a :class:`SelectionCache`,
    the prefill boundary and the optional delta correction [D99] (``cfg.delta_correction``: sampling stride,
    0 = off) on top of the selection.

    Subclasses implement ``select_attend(q, k, v, q_offset, state)`` (fast path, (B, H, Tq, Dv)) and
    ``selection_mask(q, k)`` (the dense boolean (B, 1 or H, T, T) selection of a full forward, built plainly);
    ``reference`` is dense float64 attention with that mask (plus the correction written plainly).
    """

    def prefill_end(self, q_offset: int, Tq: int, state: dict) -> int:
        """Positions below this are the prefill: ``cfg.prefill``, or (``prefill=None``) the first call."""
        P = getattr(self.cfg, "prefill", None)
        if P is not None:
            return P
        if q_offset == 0:
            state["prefill_end"] = Tq
        return state.get("prefill_end", 0)

    def corrected_end(self, q_offset: int, Tq: int, state: dict) -> int | None:
        """Rows at positions below this get the delta correction (None: every row)."""
        return None

    def forward(self, x: Tensor, cache: SelectionCache | None = None) -> Tensor:
        start = 0 if cache is None else cache.length
        q, k, v = self.qkv(x, start)
        if cache is not None:
            k, v = cache.append(k, v)
        state = {} if cache is None else cache.state
        out = self.select_attend(q, k, v, start, state)
        stride = self.cfg.delta_correction
        if stride:
            d = correction_terms(q, k, v, out, stride, q_offset=start, carry=state.get("delta"))
            end = self.corrected_end(start, q.shape[2], state)
            if end is not None:
                d = d * (torch.arange(q.shape[2], device=q.device) + start < end).view(1, 1, -1, 1)
            out = out + d
            state["delta"] = d[:, :, -1].detach()
        return self.out(out)

    def reference(self, x: Tensor) -> Tensor:
        """Dense attention with the selection as a mask; the correction adds ``dense - masked`` of the row
        ``stride * floor(i / stride)`` to row ``i`` (rows before ``corrected_end``). Run on a float64 copy."""
        q, k, v = self.qkv(x)
        T = q.shape[2]
        out = masked_reference(q, k, v, self.selection_mask(q, k))
        stride = self.cfg.delta_correction
        if stride:
            dense = masked_reference(q, k, v, causal_rows(T, T, 0, q.device))
            sample = torch.arange(T, device=q.device) // stride * stride
            d = (dense - out)[:, :, sample]
            end = self.corrected_end(0, T, {})
            if end is not None:
                d = d * (torch.arange(T, device=q.device) < end).view(1, 1, T, 1)
            out = out + d
        return self.out(out)

    def init_cache(self, batch: int = 1) -> SelectionCache:
        return SelectionCache()

    def select_attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: dict) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def selection_mask(self, q: Tensor, k: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def check_correction(stride: int) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
        raise ValueError(f"delta_correction must be a non-negative integer (a sampling stride, 0 = off), got {stride!r}")


def check_prefill(prefill: int | None) -> None:
    if prefill is not None and (isinstance(prefill, bool) or not isinstance(prefill, int) or prefill < 1):
        raise ValueError(f"prefill must be a positive integer or None (the first call), got {prefill!r}")


def blocks_attention(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, valid: Tensor, block: int, q_offset: int,
                     scale: float, rows: int = 128) -> Tensor:
    """Per-query key-block selections ``sel, valid`` (B, H, Tq, n) with the own block at entry 0, causal.

    Prefill (``Tq == Tk``, offset 0): the own block runs as causal diagonal blocks (no gather); otherwise every
    block goes through key-centric tiles (``core.selection.tiles_from_selection``).
    """
    from .moba import block_sets

    Hkv, Tk = k.shape[1], k.shape[2]
    sets = block_sets(Tk, block, q.device)
    if q.shape[2] == Tk and q_offset == 0:
        parts = tiles_from_selection(sel[..., 1:], valid[..., 1:], sets, Hkv, Tk, q_offset, True, rows)
        return tile_attention(q, k, v, parts, scale, diag_block=block)
    return tile_attention(q, k, v, tiles_from_selection(sel, valid, sets, Hkv, Tk, q_offset, True, rows), scale)
