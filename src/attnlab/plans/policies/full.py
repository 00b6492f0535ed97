"""``full``: the head attends to every past key and the cache keeps every position (retrieval heads).

The base :class:`~attnlab.plans.policies.base.Policy` is this behaviour; the class only names it. Its op is
``sdpa`` (:mod:`attnlab.ops.dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core.patterns import Causal, Pattern
from .base import Policy, register_policy


@register_policy
@dataclass(frozen=True)
class Full(Policy):
    """Causal attention over every key; every position cached."""

    kind = "full"
    symbol = "F"
    op = "sdpa"

    def prefill_pattern(self) -> Pattern:
        return Causal()


__all__ = ["Full"]
