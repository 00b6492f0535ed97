"""FlexAttention glue: block masks and compiled kernels, cached.

On CUDA this is the fast sparse path for forward and backward. On CPU in torch 2.13 FlexAttention has a
compiled forward but no backward, so the block-sparse engine (``blocksparse.py``) serves training there;
this path stays available as ``backend="flex"`` for forward-only use and for comparison in the benchmark.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .patterns import Pattern
from .score_mods import ScoreMod

_COMPILED: dict[str, object] = {}


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


def compiled_flex():
    """One compiled FlexAttention per process (torch.compile caches the graphs by shapes and mods)."""
    fn = _COMPILED.get("flex")
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False)
        _COMPILED["flex"] = fn
    return fn


def _shifted(pattern: Pattern, q_offset: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.mask_mod(b, h, q_idx + q_offset, kv_idx)

    return mask_mod


@lru_cache(maxsize=64)
def block_mask(pattern: Pattern, heads: int, Tq: int, Tk: int, q_offset: int, block: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    H = heads if pattern.num_heads is not None else None
    return create_block_mask(
        _shifted(pattern, q_offset), B=None, H=H, Q_LEN=Tq, KV_LEN=Tk, device=device, BLOCK_SIZE=block
    )


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    scale: float,
    score_mod: ScoreMod | None,
    q_offset: int,
    block: int = 128,
) -> Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "FlexAttention on CPU has no backward in this torch; use backend='blocksparse' (the default) for training"
        )
    bm = block_mask(pattern, q.shape[1], q.shape[2], k.shape[2], q_offset, block, str(q.device))
    mod = None
    if score_mod is not None:
        def mod(score, b, h, q_idx, kv_idx):
            return score_mod.score_mod(score, b, h, q_idx + q_offset, kv_idx)

    enable_gqa = q.shape[1] != k.shape[1]
    return compiled_flex()(q, k, v, score_mod=mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa)
