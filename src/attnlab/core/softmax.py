"""The one masked softmax, the one chunked weights generator and the one log-sum-exp merge.

Every consumer of attention *weights* (the float64 reference, the naive ``dense_mask`` baseline, selection
recall, the head atlas, SnapKV's observation window, calibrations, hooks on ``blocks.{l}.attn.weights``) goes
through :func:`masked_softmax` / :func:`weights_chunks`; every engine that merges partial results over
disjoint key sets goes through :func:`lse_merge`.

Conventions: a boolean mask is True where a query may attend; it broadcasts against the scores
``(batch, heads, q_len, kv_len)``. A row that sees no key gets zero weights (never NaN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

#: rows of weights yielded at once by :func:`weights_chunks` unless asked otherwise
DEFAULT_ROWS = 256


def masked_softmax(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax over the last axis restricted to ``mask``; rows with no allowed (finite) score give zeros.

    scores: ``(..., q_len, kv_len)``; mask: bool broadcastable to it, or None (scores may already hold -inf).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    has_any = torch.isfinite(scores).any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~has_any, 0.0), dim=-1) * has_any


MaskRows = Callable[[int, int], "Tensor | None"]


def weights_chunks(
    q: Tensor,
    k: Tensor,
    *,
    scale: float,
    q_offset: int = 0,
    mask: Tensor | MaskRows | None = None,
    pattern=None,
    score_mod=None,
    rows: int = DEFAULT_ROWS,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Attention weights ``(B, Hq, r, Tk)`` for query rows ``[start, start + r)``, chunk by chunk.

    q ``(B, Hq, Tq, D)``, k ``(B, Hkv, Tk, D)`` (grouped-query heads are read without repeating k in memory).
    ``mask``: a bool tensor ``(B or 1, Hq or 1, Tq, Tk)``, or ``mask(start, end)`` returning the rows'
    mask, or None. ``pattern`` (an attnlab Pattern, absolute positions from ``q_offset``) and ``score_mod``
    apply on top. Peak memory is ``B * Hq * rows * Tk`` weights, never the whole square.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dtype = dtype or q.dtype
    kd = k.to(dtype)
    if pattern is not None:
        pattern.check_heads(Hq)
    for s in range(0, Tq, rows):
        e = min(Tq, s + rows)
        qc = q[:, :, s:e].to(dtype).reshape(B, Hkv, g, e - s, D)
        sc = (qc @ kd.unsqueeze(2).transpose(-1, -2)).reshape(B, Hq, e - s, Tk) * scale
        qpos = torch.arange(q_offset + s, q_offset + e, device=q.device).view(-1, 1)
        kpos = torch.arange(Tk, device=q.device).view(1, -1)
        if score_mod is not None:
            b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
            h = torch.arange(Hq, device=q.device).view(1, Hq, 1, 1)
            sc = score_mod.score_mod(sc, b, h, qpos, kpos)
        m = None
        if mask is not None:
            m = mask(s, e) if callable(mask) else mask[..., s:e, :]
        if pattern is not None:
            pm = pattern.dense(e - s, Tk, q_offset + s).to(q.device).unsqueeze(0)  # (1, Hp, r, Tk)
            m = pm if m is None else (m & pm)
        yield s, masked_softmax(sc, m)


def lse_merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax over the union of disjoint key sets from per-set partial results.

    parts: ``(out (..., Dv), lse (...))`` per key set, all over the same rows; a row that saw no key in a set
    has ``lse = -inf`` there. Returns the merged ``(out, lse)``; rows that saw no key at all give zeros and
    ``-inf``. Differentiable (plain tensor ops).
    """
    if len(parts) == 1:
        o, lse = parts[0]
        return o, lse
    lses = torch.stack([lse for _, lse in parts])  # (P, ...)
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    out = None
    for o, lse in parts:
        w = torch.exp(lse - safe).unsqueeze(-1).to(o.dtype)
        out = w * o if out is None else out + w * o
    return out, total


__all__ = ["DEFAULT_ROWS", "lse_merge", "masked_softmax", "weights_chunks"]
