"""Dense and static-pattern ops: ``sdpa`` (full or causal), ``pattern`` (any static pattern object),
``sliding_window`` and ``neighborhood`` -- all through :func:`attnlab.attention`, which picks the engine.
The pattern ops are sparse ops (:func:`attnlab.ops.sparse.sparse_op`): they take ``delta`` (D99) too."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.attention import attention
from ..core.patterns import Causal, Full, Neighborhood, Pattern, SlidingWindow
from ..core.reference import reference_attention
from .registry import register_op
from .sparse import ALL, sparse_op


def _causal_mask(q: Tensor, k: Tensor, *, q_offset: int, causal: bool = True, **_: Any) -> Tensor:
    Tq, Tk = q.shape[2], k.shape[2]
    return (Causal() if causal else Full()).dense(Tq, Tk, q_offset).unsqueeze(0)


@register_op("sdpa", family="dense", papers=("L203",), summary="softmax attention over every (past) key: PyTorch's "
             "fused kernel", options={"causal": True}, weights_mask=_causal_mask, dense_options={})
def sdpa(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
         state: dict | None = None, causal: bool = True) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    out = attention(q, k, v, pattern=Causal() if causal else Full(), scale=scale, q_offset=q_offset, mask=mask)
    return out if state is None else (out, state)


# ---- any static pattern ------------------------------------------------------------------------------------


def _need_pattern(pattern: Any) -> Pattern:
    if not isinstance(pattern, Pattern):
        raise ValueError(f"op 'pattern' needs option pattern=<an attnlab Pattern>, got {pattern!r}")
    return pattern


def _pattern_mask(q: Tensor, k: Tensor, *, q_offset: int, pattern: Pattern | None = None, **_: Any) -> Tensor:
    return _need_pattern(pattern).dense(q.shape[2], k.shape[2], q_offset).unsqueeze(0).to(q.device)


def _pattern_dense(q, k, v, *, scale, q_offset, mask, dtype, pattern=None, score_mod=None):
    return reference_attention(q, k, v, _need_pattern(pattern), score_mod, scale, q_offset, dtype=dtype, mask=mask)


@sparse_op("pattern", family="pattern", papers=(), summary="any static attnlab pattern (composed with & and |, per "
           "head) on the sparse engine: only allowed tiles are computed", options={"pattern": None, "score_mod": None},
           weights_mask=_pattern_mask, dense=_pattern_dense, causal=lambda o: _need_pattern(o["pattern"]).is_causal,
           dense_options={"pattern": Causal()}, example={"pattern": SlidingWindow(5) | Causal() & SlidingWindow(2)})
def pattern_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict,
               pattern: Pattern | None = None, score_mod: Any = None) -> Tensor:
    """Attention restricted to ``pattern`` (absolute positions), with an optional score modifier.
    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    return attention(q, k, v, pattern=_need_pattern(pattern), score_mod=score_mod, scale=scale, q_offset=q_offset)


# ---- sliding window ----------------------------------------------------------------------------------------


def _window_mask(q: Tensor, k: Tensor, *, q_offset: int, window: int = 256, causal: bool = True, **_: Any) -> Tensor:
    """Plainly: key j is seen by the query at position i iff ``|i - j| < window`` (and ``j <= i`` if causal)."""
    i = (torch.arange(q.shape[2], device=q.device) + q_offset).view(-1, 1)
    j = torch.arange(k.shape[2], device=q.device).view(1, -1)
    m = (i - j < window) & (j - i < window)
    return (m & (j <= i) if causal else m).view(1, 1, *m.shape)


@sparse_op("sliding_window", family="pattern", papers=(), summary="local attention: the `window` newest keys "
           "(two-sided when causal=False), run on the sparse engine", options={"window": 256, "causal": True},
           weights_mask=_window_mask, dense_options={"window": ALL}, example={"window": 5})
def sliding_window(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, window: int,
                   causal: bool) -> Tensor:
    """Keys ``p - window + 1 .. p`` for the query at ``p`` (``|p - j| < window`` when not causal).
    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    return attention(q, k, v, pattern=SlidingWindow(window, causal), scale=scale, q_offset=q_offset)


# ---- neighborhood attention on a grid ----------------------------------------------------------------------


def _neighborhood(o: dict) -> Neighborhood:
    if o.get("grid") is None:
        raise ValueError("op 'neighborhood' needs option grid=<the token grid, e.g. (16, 16)>")
    return Neighborhood(o["grid"], o["kernel_size"], o["dilation"], o["stride"], o["causal"])


def _neighborhood_mask(q: Tensor, k: Tensor, *, q_offset: int, **o: Any) -> Tensor:
    return _neighborhood(o).dense(q.shape[2], k.shape[2], q_offset).unsqueeze(0).to(q.device)


@sparse_op("neighborhood", family="pattern", papers=("P101", "P50"), summary="neighborhood attention on a 1-D/2-D/"
           "3-D token grid (NAT; DiNAT dilation, GNA stride), run on the sparse engine",
           options={"grid": None, "kernel_size": 3, "dilation": 1, "stride": 1, "causal": False},
           weights_mask=_neighborhood_mask, causal=lambda o: False, decodes=False,
           dense_options={"kernel_size": 2 * ALL + 1}, example={"grid": (4, 6), "kernel_size": 3})
def neighborhood(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, **o: Any) -> Tensor:
    """Neighborhood attention on the row-major flattened ``grid`` (one length: ``prod(grid)``).
    q (B, H, T, D), k, v (B, Hkv, T, D) -> (B, H, T, Dv)."""
    return attention(q, k, v, pattern=_neighborhood(o), scale=scale, q_offset=q_offset)


__all__ = ["neighborhood", "pattern_op", "sdpa", "sliding_window"]
