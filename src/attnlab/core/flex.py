"""FlexAttention glue: block masks and compiled kernels, cached.

On CUDA this is the fast sparse path for forward and backward (the sparse executor's ``engine="flex"`` for
pattern plans). On CPU in torch 2.13 FlexAttention has a compiled forward but no backward, so the sparse engine's
tile path (:mod:`attnlab.core.sparse`) serves training there; this path stays available as ``backend="flex"``
for forward-only use and for comparison in the benchmark.
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
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """FlexAttention of a static pattern with a cached block mask; with ``return_lse`` also the ``(B, H, Tq)``
    log-sum-exp (``-inf`` and zero output for rows that see no key)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "FlexAttention on CPU has no backward in this torch; use backend='blocksparse' (the default) for training"
        )
    if return_lse and q.device.type == "cpu":
        raise RuntimeError("FlexAttention on CPU cannot return the log-sum-exp in this torch; use the sparse "
                           "engine's 'python' or 'native' engine for run_lse on CPU")
    bm = block_mask(pattern, q.shape[1], q.shape[2], k.shape[2], q_offset, block, str(q.device))
    mod = None
    if score_mod is not None:
        def mod(score, b, h, q_idx, kv_idx):
            return score_mod.score_mod(score, b, h, q_idx + q_offset, kv_idx)

    enable_gqa = q.shape[1] != k.shape[1]
    if not return_lse:
        return compiled_flex()(q, k, v, score_mod=mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa)
    out, lse = compiled_flex()(q, k, v, score_mod=mod, block_mask=bm, scale=scale, enable_gqa=enable_gqa,
                               return_lse=True)
    return out, lse
