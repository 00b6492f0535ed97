"""Helpers of the ops whose weights are not a softmax of dot products (cog, relu_attn, gaam, neural_attn, mta).

``visible`` is the boolean mask of keys each query row may see (absolute positions, as everywhere in attnlab);
``allowed`` adds a free mask to it for a block of rows; ``by_rows`` runs a row function over query chunks so an op
whose weights cannot go through SDPA still never holds more than ``chunk x kv_len`` scores at once;
``grouped_scores`` / ``grouped_apply`` (from :mod:`attnlab.core.softmax`) handle grouped-query heads without
repeating keys or values;
``repeat_kv`` and ``dense_allowed`` serve the plain float64 references.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnlab.core.patterns import Causal
from attnlab.core.softmax import grouped_apply, grouped_scores
from attnlab.ops.sparse import check_mask


def visible(q_len: int, kv_len: int, q_offset: int, causal: bool, device: torch.device) -> Tensor:
    """Boolean ``(q_len, kv_len)``: True where query row ``i`` (at ``q_offset + i``) may see key ``j``."""
    if not causal:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return Causal().dense(q_len, kv_len, q_offset)[0].to(device)


def allowed(a: int, b: int, kv_len: int, q_offset: int, causal: bool, mask: Tensor | None,
            device: torch.device) -> Tensor:
    """Rows ``a..b`` of what the queries may see: ``(b - a, kv_len)``, or ``(B|1, H|1, b - a, kv_len)`` with a free
    ``mask`` (B|1, H|1, Tq, kv_len) ANDed in."""
    m = visible(b - a, kv_len, q_offset + a, causal, device)
    return m if mask is None else m & mask[:, :, a:b]


def check_free_mask(name: str, mask: Tensor | None, q: Tensor, k: Tensor) -> None:
    if mask is not None:
        check_mask(name, mask, q, k)


def by_rows(fn: Callable[[int, int], Tensor], q_len: int, chunk: int) -> Tensor:
    """Concatenate ``fn(start, stop)`` -- outputs ``(B, H, stop - start, d)`` -- over query chunks.

    When autograd records and there is more than one chunk, each chunk is checkpointed: its scores are
    recomputed in the backward pass instead of kept, so training memory stays ``chunk x kv_len`` per head
    too (about one extra forward of the score work).
    """
    spans = [(s, min(s + chunk, q_len)) for s in range(0, q_len, chunk)]
    if len(spans) > 1 and torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, a, b, use_reentrant=False) for a, b in spans], dim=2)
    return torch.cat([fn(a, b) for a, b in spans], dim=2)


def repeat_kv(t: Tensor, heads: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, heads, T, D), each kv head repeated for its query heads (references only)."""
    return t.repeat_interleave(heads // t.shape[1], 1)


def dense_allowed(Tq: int, Tk: int, q_offset: int, causal: bool, mask: Tensor | None, device) -> Tensor:
    """Plainly, for references: key ``j`` is seen by the query at ``q_offset + i`` iff ``j <= q_offset + i`` (if
    causal) and the free mask allows it; ``(B|1, H|1, Tq, Tk)`` bool."""
    i = torch.arange(Tq, device=device).view(-1, 1) + q_offset
    j = torch.arange(Tk, device=device).view(1, -1)
    m = (j <= i) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    m = m.view(1, 1, Tq, Tk)
    return m if mask is None else m & mask


def per_head(name: str, value: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """A per-head tensor option checked against ``shape`` and cast to ``like``'s dtype/device (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(value.shape) if isinstance(value, Tensor) else repr(value)
        raise ValueError(f"option {name} must be a tensor of shape {tuple(shape)}, got {got}")
    return value.to(dtype=like.dtype, device=like.device)


__all__ = ["allowed", "by_rows", "check_free_mask", "dense_allowed", "grouped_apply", "grouped_scores", "per_head",
           "repeat_kv", "visible"]
