"""``drop``: the head is ablated -- its query heads output zero and the cache holds nothing for it.

Op ``drop``: zero output (its weights mask allows nothing, so the masked softmax gives zero rows and the
float64 reference agrees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core.patterns import Pattern
from ...ops.registry import register_op
from .base import GroupKV, Policy, Slot, register_policy


@register_policy
@dataclass(frozen=True)
class Drop(Policy):
    """No attention, nothing cached."""

    kind = "drop"
    symbol = "."
    op = "drop"

    def pattern(self) -> Pattern | None:
        return None

    def kept(self, seq_len: int) -> int:
        return 0

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[None, None]:
        return None, None

    def attend(self, q: Tensor, view: GroupKV, *, scale: float, mask: Tensor | None = None) -> Tensor:
        return q.new_zeros(q.shape)


def _nothing(q: Tensor, k: Tensor, *, q_offset: int, **_: Any) -> Tensor:
    return torch.zeros(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)


@register_op("drop", family="cache", summary="head ablation: the output is zero (a plan's dropped heads also "
             "free their cache)", causal_only=True, weights_mask=_nothing)
def drop_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
            state: dict | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> zeros (B, H, Tq, Dv)."""
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    return out if state is None else (out, state)


__all__ = ["Drop", "drop_op"]
