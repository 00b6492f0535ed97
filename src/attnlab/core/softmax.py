"""The one masked softmax, the one chunked weights generator, the one log-sum-exp merge, and the grouped-query
products every weights consumer uses (:func:`grouped_scores`, :func:`grouped_apply`).

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
    if not (torch.is_grad_enabled() and scores.requires_grad):
        # inference: a row with no finite score softmaxes to NaN; zero it in place (4x fewer passes than below)
        return torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    # autograd: NaN rows would poison the backward, so they never reach softmax
    has_any = torch.isfinite(scores).any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~has_any, 0.0), dim=-1) * has_any


def grouped_scores(q: Tensor, k: Tensor) -> Tensor:
    """q (B, H, R, D) . k (B, Hkv, Tk, D) -> (B, H, R, Tk), query head h reading kv head ``h // (H // Hkv)``.

    One batched matmul per kv head with its query heads' rows stacked (B, Hkv, g * R, D): broadcasting k over
    a group axis instead makes matmul expand k per query head, 15x slower for one decode row on CPU."""
    B, H, R, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    return (q.reshape(B, Hkv, (H // Hkv) * R, D) @ k.transpose(-1, -2)).view(B, H, R, Tk)


def grouped_apply(w: Tensor, v: Tensor) -> Tensor:
    """Weights (B, H, R, Tk) @ v (B, Hkv, Tk, Dv) -> (B, H, R, Dv), grouped as in :func:`grouped_scores`."""
    B, H, R, Tk = w.shape
    Hkv = v.shape[1]
    return (w.reshape(B, Hkv, (H // Hkv) * R, Tk) @ v).view(B, H, R, v.shape[-1])


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
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    dtype = dtype or q.dtype
    kd = k.to(dtype)
    if pattern is not None:
        pattern.check_heads(Hq)
    for s in range(0, Tq, rows):
        e = min(Tq, s + rows)
        sc = grouped_scores(q[:, :, s:e].to(dtype), kd) * scale
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


def lse_merge(parts: list, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact softmax over the union of disjoint key sets from per-set partial results.

    Each part is ``(out, lse)`` over the same rows -- ``out (..., Dv)``, ``lse (...)``, a row that saw no key
    in that set has ``lse = -inf`` -- or ``(out (n, Dv), lse (n,), row, ok)`` over some of ``rows`` flat rows:
    ``row (n,)`` long says which row each entry is (None: every row, in order; a row may appear in several
    entries of a part, e.g. one per selected key set) and ``ok (n,)`` bool marks the entries that count
    (None: all). Returns the merged ``(out, lse)`` (``(..., Dv)`` and ``(...)``, or ``(rows, Dv)`` and
    ``(rows,)`` with row indices); rows that saw no key at all give zeros and ``-inf``.

    Differentiable (plain tensor ops) when autograd is on; without autograd the accumulators are updated in
    place, so the merge touches every partial output once instead of copying the whole result per part.
    """
    full = [p if len(p) == 4 else (p[0], p[1], None, None) for p in parts]
    if not full:
        raise ValueError("lse_merge needs at least one part")
    lead = None
    if rows is None:
        if any(p[2] is not None for p in full):
            raise ValueError("lse_merge: parts with row indices need rows= (the number of output rows)")
        lead = full[0][1].shape  # every part covers the same rows, in order: merge them flat
        full = [(o.reshape(-1, o.shape[-1]), lse.reshape(-1), None, None if ok is None else ok.reshape(-1))
                for o, lse, _, ok in full]
        rows = full[0][1].numel()
    o0, ref = full[0][0], full[0][1]
    if len(full) == 1 and full[0][2] is None and full[0][3] is None:  # one part over every row, in order
        out, L = o0, ref
    else:
        out, L = _merge_rows(full, rows)
    if lead is not None:
        out, L = out.reshape(*lead, out.shape[-1]), L.reshape(lead)
    return out, L


def _merge_rows(parts: list, rows: int) -> tuple[Tensor, Tensor]:
    ref = parts[0][1]
    dev = ref.device
    inplace = not torch.is_grad_enabled()
    m = torch.full((rows,), float("-inf"), dtype=ref.dtype, device=dev)
    lses = []
    for _o, lse, row, ok in parts:
        if ok is not None:
            lse = lse.masked_fill(~ok, float("-inf"))
        lses.append(lse)
        m = torch.maximum(m, lse.detach()) if row is None else m.scatter_reduce(0, row, lse.detach(), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out_dtype = parts[0][0].dtype
    acc = torch.promote_types(out_dtype, ref.dtype)  # low-precision outputs are summed in the lse's precision
    Dv = parts[0][0].shape[-1]
    s = out = None
    for (o, _, row, _), lse in zip(parts, lses):
        if row is None and out is None:  # a part over every row starts the sums (no zero fill)
            s = torch.exp(lse - m)
            out = s.unsqueeze(-1) * o.to(acc)
            continue
        if out is None:
            s = torch.zeros(rows, dtype=ref.dtype, device=dev)
            out = torch.zeros(rows, Dv, dtype=acc, device=dev)
        if row is None:
            e = torch.exp(lse - m)
            if inplace:
                s += e
                out.addcmul_(e.unsqueeze(-1).to(acc), o.to(acc))
            else:
                s = s + e
                out = out + e.unsqueeze(-1) * o
        else:
            e = torch.exp(lse - m[row])
            if inplace:
                s.index_add_(0, row, e)
                out.index_add_(0, row, (e.unsqueeze(-1) * o).to(acc))
            else:
                s = s.index_add(0, row, e)
                out = out.index_add(0, row, (e.unsqueeze(-1) * o).to(acc))
    # every row that saw a key has s >= 1 (its largest part contributes exp(0)); s == 0 marks the others, and
    # the clamp keeps log's gradient finite there
    tiny = torch.finfo(s.dtype).tiny
    L = (m + torch.log(s.clamp(min=tiny))).masked_fill(s == 0, float("-inf"))
    norm = s.clamp(min=tiny).unsqueeze(-1)
    out = out.div_(norm) if inplace else out / norm
    return out.to(out_dtype), L


__all__ = ["DEFAULT_ROWS", "lse_merge", "masked_softmax", "weights_chunks"]
