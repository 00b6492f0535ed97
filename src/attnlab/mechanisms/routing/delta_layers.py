"""DELTA [D42]: a few *selection layers* pick the tokens that the following sparse layers attend to.

Training-free decoding for deep models. Layers are split into three groups: the first layers run full
attention; a *selection layer* also runs full attention and, from its attention map, keeps the ``top_k``
positions with the most attention summed over its heads (and over the step's queries) -- one token set per
sequence, shared by all heads; the *sparse layers* after it attend only to that set (the full cache stays in
memory, so the next selection layer may pick different tokens). ``always`` recent positions (the newest
keys, including the current ones) are always kept.

Functional: :func:`select_tokens` (in the selection layer) and :func:`token_attention` (in a sparse layer),
which runs through the tile engine (``core.sparse``): one tile per (batch, head) gathers the selected
keys -- ``top_k + always`` keys instead of the whole cache.

The op (and layer) ``delta_select`` is one layer playing both roles for each decoding step (each position
past the prefill is a step of its own): its full scores (no gradient) sum over heads to pick the step's token
set, shared by the heads, and its output attends only to that set (:func:`select_row_sets`: per row, the
same rule as :func:`select_tokens` on one query). Prefill positions attend densely, as in the paper. In a
stack, the cross-layer reuse that makes DELTA fast is :func:`select_tokens` in one layer and
:func:`token_attention` in the next ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_scores, masked_softmax
from attnlab.ops._engine import Tiles, flat_key_index, key_set_tiles, tile_attention
from attnlab.ops.sparse import (
    ALL,
    causal_rows,
    check_prefill,
    nonneg_int,
    prefill_end,
    sampled_dense,
    sparse_op,
)

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def select_tokens(q: Tensor, k: Tensor, top_k: int, always: int = 1, scale: float | None = None) -> Tensor:
    """Selection layer: (B, Tk) bool, the ``top_k`` most attended positions (summed over heads and the step's
    queries, causal; queries at the last Tq positions) plus the last ``always`` positions.

    q (B, H, Tq, D), k (B, Hkv, Tk, D). The full attention map is what this layer computes anyway.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    positive_int("top_k", top_k)
    with torch.no_grad():
        s = grouped_scores(q, k) * default_scale(D, scale)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        score = masked_softmax(s, causal).sum((1, 2))  # (B, Tk)
        keep = torch.zeros(B, Tk, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, score.topk(min(top_k, Tk), dim=-1).indices, True)
        keep[:, max(0, Tk - always) :] = True
    return keep


def token_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float | None = None) -> Tensor:
    """Sparse layer: causal attention of the last Tq positions over the kept positions ``keep`` (B, Tk) only.

    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); rows that see no kept key give zero.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    dev = q.device
    n = max(1, int(keep.sum(-1).max()))
    kpos = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :n]  # (B, n)
    kok = torch.gather(keep, -1, kpos)
    kpos = kpos.view(B, 1, n).expand(B, H, n)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H, n)
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1) * Tq + torch.arange(Tq, device=dev)).reshape(B * H, Tq)
    qpos = torch.arange(Tk - Tq, Tk, device=dev).view(1, 1, Tq, 1)
    mask = (kok.view(B, 1, 1, n) & (kpos.unsqueeze(2) <= qpos)).reshape(B * H, Tq, n)
    tiles = Tiles(q_idx, k_idx, torch.ones_like(q_idx, dtype=torch.bool), None if bool(mask.all()) else mask)
    return tile_attention(q, k, v, [tiles], default_scale(D, scale))


def select_row_sets(q: Tensor, k: Tensor, top_k: int, always: int = 1, q_offset: int | None = None,
                    scale: float | None = None, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Per-row selection as key sets: for each query at ``q_offset + r`` on its own, the ``top_k`` visible
    positions with the most attention summed over heads, plus its last ``always`` positions (up to itself).

    q (B, H, Tq, D), k (B, Hkv, Tk, D) -> positions and validity (B, Tq, min(top_k, Tk) + always), distinct where
    valid. For one query this is :func:`select_tokens` over its prefix; rows are scored ``chunk`` at a time.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    positive_int("top_k", top_k)
    q_offset = Tk - Tq if q_offset is None else q_offset
    scale = default_scale(D, scale)
    n = min(top_k, Tk)
    qpos = (torch.arange(Tq, device=q.device) + q_offset).view(1, Tq, 1)
    top = torch.zeros(B, Tq, n, dtype=torch.long, device=q.device)
    with torch.no_grad():
        for r0 in range(0, Tq, chunk):
            r1 = min(Tq, r0 + chunk)
            vis = torch.arange(Tk, device=q.device).view(1, Tk) <= qpos[0, r0:r1]
            s = grouped_scores(q[:, :, r0:r1], k) * scale
            score = masked_softmax(s, vis).sum(1)  # (B, r, Tk)
            top[:, r0:r1] = score.topk(n, dim=-1).indices
    recent = qpos - always + 1 + torch.arange(always, device=q.device)  # (1, Tq, always)
    top_ok = (top <= qpos) & (top <= qpos - always)  # visible, and not already among the recent ones
    kpos = torch.cat([top, recent.clamp(min=0).expand(B, Tq, always)], -1)
    return kpos, torch.cat([top_ok, (recent >= 0).expand(B, Tq, always)], -1)


def select_rows(q: Tensor, k: Tensor, top_k: int, always: int = 1, q_offset: int | None = None,
                scale: float | None = None) -> Tensor:
    """:func:`select_row_sets` as a boolean (B, Tq, Tk) table."""
    kpos, ok = select_row_sets(q, k, top_k, always, q_offset, scale)
    keep = torch.zeros(*kpos.shape[:2], k.shape[2] + 1, dtype=torch.bool, device=q.device)
    return keep.scatter_(-1, torch.where(ok, kpos, k.shape[2]), True)[..., :-1]


# ---- the op and the layer ----------------------------------------------------------------------------------


def _check(top_k: int, always: int, prefill: int | None) -> None:
    positive_int("top_k", top_k)
    nonneg_int("always", always)
    check_prefill(prefill)


def _delta_select_weights(q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None,
                          state: dict | None = None, top_k: int = 64, always: int = 16, prefill: int | None = 1,
                          **_: Any) -> Tensor:
    """Plainly: per row, head-summed causal softmax, its top-k, the last ``always`` positions; rows of the prefill
    see every past key."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = default_scale(D, scale)
    vis = causal_rows(Tq, Tk, q_offset, q.device)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(H // k.shape[1], 1)) * scale
    score = masked_softmax(s, vis).sum(1)  # (B, Tq, Tk)
    mask = torch.zeros(B, Tq, Tk, dtype=torch.bool, device=q.device)
    mask.scatter_(-1, score.topk(min(top_k, Tk), dim=-1).indices, True)
    i = (torch.arange(Tq, device=q.device) + q_offset).view(Tq, 1)
    j = torch.arange(Tk, device=q.device).view(1, Tk)
    mask = (mask | (j > i - always)) & vis
    P = prefill if prefill is not None else (state or {}).get("prefill_end", Tq if q_offset == 0 else None)
    if P is None:
        raise ValueError("delta_select with prefill=None: the weights of a later call need the state (prefill_end)")
    mask = torch.where((i < P).view(1, Tq, 1), vis, mask)
    return mask.unsqueeze(1)


@sparse_op("delta_select", papers=("D42",), summary="DELTA: head-summed full attention picks one shared top-k "
           "token set per decoding step (+ recent)", options={"top_k": 64, "always": 16, "prefill": 1},
           weights_mask=_delta_select_weights, stateful=True, causal_only=True,
           dense_options={"top_k": ALL, "always": 0}, example={"top_k": 4, "always": 2, "prefill": 6})
def delta_select_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, top_k: int,
                    always: int, prefill: int | None) -> Tensor:
    """Each position past the prefill is a decoding step: its full scores (no gradient) summed over heads pick
    ``top_k`` positions + its newest ``always``, shared by the heads; prefill positions attend densely.
    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). ``prefill=None``: the first call is the prefill
    (``state["prefill_end"]``)."""
    _check(top_k, always, prefill)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    n = min(Tq, max(0, prefill_end(q_offset, Tq, state, prefill) - q_offset))  # dense prefill rows of this call
    parts = []
    if n:
        parts.append(sampled_dense(q, k, v, torch.arange(n, device=q.device), True, scale, q_offset).to(v.dtype))
    if n < Tq:
        kpos, kok = select_row_sets(q[:, :, n:], k, top_k, always, q_offset + n, scale)
        rows = torch.arange(Tq - n, device=q.device).view(-1, 1)
        tiles = key_set_tiles(rows, kpos.unsqueeze(1), kok.unsqueeze(1), B, H, Hkv, Tq - n, Tk, q_offset + n)
        parts.append(tile_attention(q[:, :, n:], k, v, [tiles], scale))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class DELTASelectConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    top_k: int = 64  # positions kept by head-summed attention per step
    always: int = 16  # the newest positions (the current one included) are always kept
    prefill: int | None = 1  # positions below it attend densely; None: the first call is the prefill
    delta: int = 0  # D99 sampling stride on top of the selection; 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        _check(self.top_k, self.always, self.prefill)
        self.check()


@register(
    "delta_select", family="routing", papers=("D42",), year=2025, config=DELTASelectConfig,
    summary="DELTA: head-summed full attention picks one shared top-k token set per decoding step (+ recent)",
)
class DELTASelectAttention(RoutingLayer):
    op = "delta_select"
