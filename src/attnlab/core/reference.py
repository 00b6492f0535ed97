"""The oracle: dense attention that materializes every score, in float64 by default.

Every fast path in attnlab is tested against this function. It is written for clarity, not speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_qkv, default_scale
from .patterns import Pattern
from .score_mods import ScoreMod, as_score_mod
from .softmax import masked_softmax


def index_grids(Tq: int, Tk: int, q_offset: int, device) -> tuple[Tensor, Tensor]:
    """Absolute query positions ``(Tq, 1)`` and key positions ``(1, Tk)``."""
    q_pos = torch.arange(q_offset, q_offset + Tq, device=device).view(Tq, 1)
    kv_pos = torch.arange(Tk, device=device).view(1, Tk)
    return q_pos, kv_pos


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    q_offset: int | None = None,
    return_weights: bool = False,
    dtype: torch.dtype | None = torch.float64,
    mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(mask(mod(q k^T * scale))) v for ``(B, H, T, D)`` tensors.

    ``mask``: an optional free boolean ``(B or 1, Hq or 1, Tq, Tk)`` (True = may attend: padding, per-batch
    rules) ANDed with the pattern. Rows with no allowed key give zero output (and zero weights), never NaN.
    Returns the output in ``dtype`` (float64 by default; None keeps q's dtype), plus the ``(B, Hq, Tq, Tk)``
    weights if asked.
    """
    B, Hq, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    dtype = dtype or q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)

    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    q_pos, kv_pos = index_grids(Tq, Tk, q_offset, q.device)
    mod = as_score_mod(score_mod)
    if mod is not None:
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
        h = torch.arange(Hq, device=q.device).view(1, Hq, 1, 1)
        scores = mod.score_mod(scores, b, h, q_pos, kv_pos)
    allowed = None if mask is None else mask.to(q.device)
    if pattern is not None:
        pattern.check_heads(Hq)
        pm = pattern.dense(Tq, Tk, q_offset).to(q.device).unsqueeze(0)  # (1, Hp, Tq, Tk)
        allowed = pm if allowed is None else allowed & pm
    weights = masked_softmax(scores, allowed)
    out = weights @ v
    return (out, weights) if return_weights else out
