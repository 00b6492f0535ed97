"""``attention()``: one entry point for every static pattern and score modifier, on every engine.

Engines (``backend=``):

* ``"sdpa"``        -- PyTorch's fused kernel; full and causal attention (the fastest there is for them).
* ``"blocksparse"`` -- the sparse engine (:mod:`attnlab.core.sparse`): the pattern's tile plan, computing only
  allowed work, forward and backward, on CPU and GPU (the native CPU kernel when it is built).
* ``"flex"``        -- compiled FlexAttention with a block mask (GPU training; CPU forward only).
* ``"dense_mask"``  -- SDPA with the whole boolean mask: the naive baseline every benchmark compares to.
* ``"reference"``   -- the float64 oracle (``reference.py``) in the input dtype; returns weights if asked.
* ``"auto"``        -- sdpa for full/causal, blocksparse for sparse patterns on CPU, flex on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import flex, sparse
from .checks import check_qkv, default_scale
from .patterns import Causal, Full, Pattern
from .reference import reference_attention
from .score_mods import ScoreMod, as_score_mod

BACKENDS = ("auto", "sdpa", "blocksparse", "flex", "dense_mask", "reference")


def _sdpa_ok(pattern: Pattern, mod: ScoreMod | None) -> bool:
    return (mod is None or mod.kind == "additive") and (pattern.is_full or type(pattern) is Causal)


def choose_backend(pattern: Pattern, mod: ScoreMod | None, device: torch.device, needs_grad: bool) -> str:
    if _sdpa_ok(pattern, mod):
        return "sdpa"
    if device.type == "cuda" and flex.flex_available():
        return "flex"
    return "blocksparse"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern | None = None,
    score_mod: ScoreMod | tuple | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_weights: bool = False,
    q_offset: int | None = None,
    q_block: int | None = None,
    mask: Tensor | None = None,
    **removed,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention restricted to ``pattern``, with an optional score modifier.

    Args:
        q: ``(batch, heads, q_len, head_dim)``; k, v: ``(batch, kv_heads, kv_len, head_dim)`` with
           ``heads`` a multiple of ``kv_heads`` (grouped-query attention).
        pattern: which keys each query may see (default: all).
        score_mod: ALiBi, SoftCap, Temperature, Bias or a tuple of them.
        q_offset: absolute position of the first query (default ``kv_len - q_len``: the queries are the
           last positions, as when decoding with a cache).
        q_block: query rows per tile of the sparse engine's pattern plan (default: the measured per-device
           choice, ``attnlab.core.sparse.DEFAULT_Q_BLOCK``).
        return_weights: also return the ``(batch, heads, q_len, kv_len)`` weights (uses the reference).
        mask: a free boolean ``(batch or 1, heads or 1, q_len, kv_len)`` (True = may attend; padding, per-batch
           rules) ANDed with ``pattern``; it has no block structure known in advance, so it runs as one masked
           dense call (``dense_mask``) unless the reference is asked for.
    Returns: ``(batch, heads, q_len, head_dim_v)`` in q's dtype (and the weights if asked).
    """
    if removed:
        name = next(iter(removed))
        if name == "group":
            raise TypeError("attention(): option 'group' was renamed to 'q_block' (query rows per tile)")
        raise TypeError(f"attention() got an unexpected keyword argument {name!r}")
    B, Hq, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if pattern is None:
        pattern = Full()
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnlab Pattern, got {type(pattern).__name__}")
    scale = default_scale(D, scale)
    q_offset = Tk - Tq if q_offset is None else q_offset
    pattern.check_lengths(Tq, Tk, q_offset)
    pattern.check_heads(Hq)
    mod = as_score_mod(score_mod)

    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (Tq, Tk):
            raise ValueError(f"mask must be a bool tensor (batch or 1, heads or 1, {Tq}, {Tk}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Hq):
            raise ValueError(f"mask batch/heads must be 1 or ({B}, {Hq}), got {tuple(mask.shape[:2])}")
    if return_weights or backend == "reference":
        res = reference_attention(q, k, v, pattern, mod, scale, q_offset, return_weights, dtype=None, mask=mask)
        return res
    if mask is not None:
        return _dense_mask(q, k, v, pattern, mod, scale, q_offset, mask)
    if backend == "auto":
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        backend = choose_backend(pattern, mod, q.device, needs_grad)
    if backend == "sdpa":
        return _sdpa(q, k, v, pattern, mod, scale, q_offset)
    if backend == "dense_mask":
        return _dense_mask(q, k, v, pattern, mod, scale, q_offset)
    if backend == "flex":
        return flex.flex_attention(q, k, v, pattern, scale, mod, q_offset)
    plan = sparse.plan_pattern(pattern, Tq, Tk, q_offset, q_block, q.device)
    # on CPU the engine picks the native kernel when it is built and can express the modifier, else the Python
    # tiles; off CPU the Python tiles (FlexAttention is its own backend here)
    engine = "auto" if q.device.type == "cpu" else "python"
    return sparse.run(q, k, v, plan, scale, mod, engine=engine)


def _sdpa(q, k, v, pattern, mod, scale, q_offset):
    gqa = q.shape[1] != k.shape[1]
    Tq, Tk = q.shape[2], k.shape[2]
    if not _sdpa_ok(pattern, mod):
        raise ValueError(f"backend='sdpa' serves full and causal attention only, not {pattern!r}")
    causal = not pattern.is_full
    top_left = q_offset == 0 and Tq <= Tk  # is_causal's own alignment
    sees_all = Tq == 1 and q_offset >= Tk - 1  # one query at (or past) the last key
    if mod is None and (not causal or top_left or sees_all):
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and top_left and Tq > 1, scale=scale, enable_gqa=gqa
        )
    return _dense_mask(q, k, v, pattern, mod, scale, q_offset)


def _dense_mask(q, k, v, pattern, mod, scale, q_offset, extra: Tensor | None = None):
    """SDPA with the whole mask materialized: correct for everything, skips nothing."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = pattern.dense(Tq, Tk, q_offset).to(q.device).unsqueeze(0)  # (1, Hp, Tq, Tk)
    if extra is not None:
        mask = mask & extra
    if mod is None:
        attn_mask = mask
    elif mod.kind == "additive":
        from .reference import index_grids

        q_pos, kv_pos = index_grids(Tq, Tk, q_offset, q.device)
        b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(q.shape[1], device=q.device).view(1, -1, 1, 1)
        attn_mask = mod.bias(b, h, q_pos, kv_pos).to(q.dtype).masked_fill(~mask, float("-inf"))
    else:
        return reference_attention(q, k, v, pattern, mod, scale, q_offset, dtype=None, mask=extra)
    empty = ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask | empty if mod is None else attn_mask.masked_fill(empty, 0.0),
        scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


__all__ = ["attention", "choose_backend", "BACKENDS", "Full"]
