"""``topk``: Quest-style query-aware pages for decoding.

* prompt: causal attention over every key (Quest leaves the prompt dense);
* cache: every position, plus per page of ``block`` keys the elementwise key maximum and minimum
  (``state["kmax"]``, ``state["kmin"]``: ``(B, n, pages, D)``, counted as held bytes);
* decode: each step reads the ``pages`` pages with the highest upper bound ``sum_d max(q_d kmax_d, q_d kmin_d)``
  of the score (max over the query heads sharing the key/value head); the page of the current token is
  always read. When every page fits the step is plain attention.

Op ``quest`` (options ``pages``, ``block``): one-row calls read the top pages of the keys so far, calls with
several rows (the prompt) are causal; with ``state=OpState()`` the page extrema are kept up to date there
instead of being recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core.patterns import Causal
from ...ops.registry import register_op
from .base import GroupKV, Policy, Slot, causal_attend, masked_sdpa, register_policy


def page_extrema(keys: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per page of ``block`` keys the elementwise max and min: keys (B, n, T, D) -> 2 x (B, n, ceil(T/block), D)."""
    B, n, T, D = keys.shape
    pages = -(-T // block)
    pad = pages * block - T
    if pad:  # pad with the last key: it changes neither the max nor the min
        keys = torch.cat([keys, keys[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    blocks = keys.reshape(B, n, pages, block, D)
    return blocks.amax(dim=3), blocks.amin(dim=3)


def update_extrema(state: dict, keys: Tensor, past: int, block: int) -> None:
    """Refresh ``state["kmax"/"kmin"]`` after positions ``past ..`` of ``keys`` (B, n, T, D) arrived (only the
    pages they touch are recomputed)."""
    first = past // block
    kmax, kmin = page_extrema(keys[:, :, first * block:], block)
    if "kmax" in state and first > 0:
        kmax = torch.cat([state["kmax"][:, :, :first], kmax], dim=2)
        kmin = torch.cat([state["kmin"][:, :, :first], kmin], dim=2)
    state["kmax"], state["kmin"] = kmax, kmin


def quest_select(q: Tensor, kmax: Tensor, kmin: Tensor, pages: int) -> Tensor:
    """Pages read by one query row: q (B, H, 1, D), kmax/kmin (B, n, P, D) -> sorted page ids (B, n, min(pages, P))."""
    B, H, _, D = q.shape
    n = kmax.shape[1]
    qh = q[:, :, 0].reshape(B, n, H // n, 1, D)
    bound = torch.maximum(qh * kmax.unsqueeze(2), qh * kmin.unsqueeze(2)).sum(-1).amax(dim=2)  # (B, n, P)
    bound[..., -1] = float("inf")  # the page of the current token is always read
    return bound.topk(min(pages, bound.shape[-1]), dim=-1).indices.sort(dim=-1).values


def _page_keys(sel: Tensor, block: int, Tk: int) -> tuple[Tensor, Tensor]:
    """Key positions of the selected pages (B, n, nsel * block), clamped, and which of them exist."""
    idx = (sel.unsqueeze(-1) * block + torch.arange(block, device=sel.device)).flatten(-2)
    return idx.clamp(max=Tk - 1), idx < Tk


def quest_attend(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, block: int, scale: float,
                 mask: Tensor | None = None) -> Tensor:
    """One query row over the keys of the selected pages (gathered): q (B, H, 1, D), k, v (B, n, Tk, D)."""
    B, H = q.shape[:2]
    n, Tk = k.shape[1], k.shape[2]
    idx, valid = _page_keys(sel, block, Tk)
    kg = torch.gather(k, 2, idx.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
    vg = torch.gather(v, 2, idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
    allowed = valid.repeat_interleave(H // n, dim=1).unsqueeze(2)  # (B, H, 1, K)
    if mask is not None:
        cols = idx.repeat_interleave(H // n, dim=1).unsqueeze(2)
        allowed = allowed & mask.expand(B, H, 1, Tk).gather(-1, cols)
    return masked_sdpa(q, kg, vg, allowed, scale)


def _selected_mask(sel: Tensor, block: int, Tk: int, heads: int) -> Tensor:
    idx, valid = _page_keys(sel, block, Tk)
    idx = idx.masked_fill(~valid, Tk)  # entries past the last key land in a spare column, dropped below
    m = torch.zeros(*sel.shape[:2], Tk + 1, dtype=torch.bool, device=sel.device).scatter_(2, idx, True)[..., :Tk]
    return m.repeat_interleave(heads // sel.shape[1], dim=1).unsqueeze(2)


def _check(pages: int, block: int) -> None:
    for name, val in (("pages", pages), ("block", block)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"quest: option {name!r} must be an int >= 1, got {val!r}")


@register_policy
@dataclass(frozen=True)
class TopK(Policy):
    """Decode reads the ``pages`` pages of ``block`` keys with the highest score bound; the cache keeps all."""

    pages: int = 16
    block: int = 16

    kind = "topk"
    symbol = "q"
    op = "quest"
    renamed = {"k": "pages", "page": "block"}

    def __post_init__(self) -> None:
        if self.pages < 1 or self.block < 1:
            raise ValueError(f"topk policy needs pages >= 1 and block >= 1, got {self}")

    def label(self) -> str:
        return f"topk({self.pages}x{self.block})"

    def op_options(self) -> dict[str, Any]:
        return {"pages": self.pages, "block": self.block}

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        kb, vb = super().append(slot, k, v, past)
        update_extrema(slot.state, slot.keys, past, self.block)
        return kb, vb

    def _select(self, q: Tensor, view: GroupKV) -> Tensor | None:
        if q.shape[2] != 1:
            return None
        st = view.slot.state
        kmax, kmin = (st["kmax"], st["kmin"]) if view.cached and "kmax" in st else page_extrema(view.keys,
                                                                                                self.block)
        return quest_select(q, kmax, kmin, self.pages) if kmax.shape[2] > self.pages else None

    def attend(self, q: Tensor, view: GroupKV, *, scale: float, mask: Tensor | None = None) -> Tensor:
        sel = self._select(q, view)
        if sel is None:
            return causal_attend(q, view.keys, view.values, scale, mask)
        return quest_attend(q, view.keys, view.values, sel, self.block, scale, mask)

    def weights_mask(self, q: Tensor, view: GroupKV, *, kv_len: int) -> Tensor:
        sel = self._select(q, view)
        if sel is None:
            return super().weights_mask(q, view, kv_len=kv_len)
        return _selected_mask(sel, self.block, kv_len, q.shape[1])


def _quest_mask(q: Tensor, k: Tensor, *, q_offset: int, pages: int = 16, block: int = 16, **_: Any) -> Tensor:
    """What the op attends, from the formula page by page (independent of the gathered fast path)."""
    B, H, Tq, D = q.shape
    n, Tk = k.shape[1], k.shape[2]
    causal = Causal().dense(Tq, Tk, q_offset).to(q.device).unsqueeze(0)
    starts = list(range(0, Tk, block))
    if Tq != 1 or len(starts) <= pages:
        return causal
    out = torch.zeros(B, H, 1, Tk, dtype=torch.bool, device=q.device)
    for b in range(B):
        for j in range(n):
            heads = range(j * (H // n), (j + 1) * (H // n))
            bounds = []
            for s in starts:
                page = k[b, j, s: s + block]
                bounds.append(max(float(torch.maximum(q[b, h, 0] * page.max(0).values,
                                                      q[b, h, 0] * page.min(0).values).sum()) for h in heads))
            bounds[-1] = float("inf")
            for p in sorted(range(len(starts)), key=lambda i: -bounds[i])[:pages]:
                out[b, list(heads), 0, starts[p]: starts[p] + block] = True
    return out & causal


@register_op("quest", family="cache", summary="Quest query-aware pages: a decode step reads the top pages of "
             "block keys by the score bound q.max(kmax, kmin); the prompt is causal", options={"pages": 16,
             "block": 16}, causal_only=True, weights_mask=_quest_mask, dense_options={"pages": 1 << 20},
             example={"pages": 2, "block": 4},
             decodes=False)  # a decode step reads its top pages, the prompt is causal: not the full forward
def quest_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
             state: dict | None = None, pages: int = 16, block: int = 16):
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) (every key so far) -> (B, H, Tq, Dv) [, state]."""
    _check(pages, block)
    Tq, Tk = q.shape[2], k.shape[2]
    if state is not None:
        update_extrema(state, k, min(state.get("seen", 0), Tk), block)
        state["seen"] = Tk
        kmax, kmin = state["kmax"], state["kmin"]
    elif Tq == 1:
        kmax, kmin = page_extrema(k, block)
    if Tq == 1 and kmax.shape[2] > pages:
        out = quest_attend(q, k, v, quest_select(q, kmax, kmin, pages), block, scale, mask)
    elif q_offset == Tk - Tq:
        out = causal_attend(q, k, v, scale, mask)
    else:
        allowed = Causal().dense(Tq, Tk, q_offset).to(q.device).unsqueeze(0)
        out = masked_sdpa(q, k, v, allowed if mask is None else allowed & mask, scale)
    return out if state is None else (out, state)


__all__ = ["TopK", "page_extrema", "quest_attend", "quest_op", "quest_select", "update_extrema"]
