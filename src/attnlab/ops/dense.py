"""Dense and static-pattern ops: ``sdpa`` (full or causal), ``pattern`` (any static pattern object),
``sliding_window`` and ``neighborhood`` -- all through :func:`attnlab.attention`, which picks the engine."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.attention import attention
from ..core.patterns import Causal, Full, Pattern
from .registry import register_op


def _causal_mask(q: Tensor, k: Tensor, *, q_offset: int, causal: bool = True, **_: Any) -> Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    return (Causal() if causal else Full()).dense(Tq, Tk, q_offset).unsqueeze(0)


@register_op("sdpa", family="dense", papers=("L203",), summary="softmax attention over every (past) key: PyTorch's "
             "fused kernel", options={"causal": True}, weights_mask=_causal_mask)
def sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
         state: dict | None = None, causal: bool = True) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    out = attention(q, k, v, pattern=Causal() if causal else Full(), scale=scale, q_offset=q_offset, mask=mask)
    return out if state is None else (out, state)


def _pattern_mask(q: Tensor, k: Tensor, *, q_offset: int, pattern: Pattern | None = None, **_: Any) -> Tensor:
    return pattern.dense(q.shape[2], k.shape[2], q_offset).unsqueeze(0)


@register_op("pattern", family="pattern", summary="any static attnlab pattern (composed with & and |, per head) "
             "on the sparse engine: only allowed tiles are computed", options={"pattern": None, "score_mod": None},
             weights_mask=_pattern_mask)
def pattern_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
               state: dict | None = None, pattern: Pattern | None = None, score_mod: Any = None):
    if not isinstance(pattern, Pattern):
        raise ValueError(f"op 'pattern' needs option pattern=<an attnlab Pattern>, got {pattern!r}")
    out = attention(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale, q_offset=q_offset, mask=mask)
    return out if state is None else (out, state)


__all__ = ["pattern_op", "sdpa"]
