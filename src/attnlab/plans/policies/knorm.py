"""``knorm``: L2-norm prompt eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression").

The paper observes that keys with a *low* L2 norm receive high attention, so the norm alone (no attention
scores, no query) picks what to keep:

* prompt: causal attention over every key (prefill densely, then compress: the kvpress protocol);
* cache: everything during the prompt; at the first decode step (the first one-row call after the prompt) the
  cache keeps, per key/value head, the ``budget`` prompt keys of lowest L2 norm among positions
  ``0 .. prompt - window - 1`` plus the last ``window`` prompt positions (the question at the end of the
  prompt), ``budget + window`` in all, then appends each generated token;
* decode: SDPA over the held buffer (entries in increasing position order: causality at buffer indices is
  exact).

A prompt of at most ``budget + window`` tokens is kept whole (the head is then dense attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import GroupKV, Policy, Slot, register_policy
from .tova import top_indices


def knorm_select(keys: Tensor, prompt: int, *, budget: int, window: int) -> Tensor:
    """Prompt positions to keep, sorted: the ``budget`` keys of lowest L2 norm among ``0 .. prompt - window - 1``
    plus the last ``window`` (ties: the earlier). keys (B, n, >= prompt, D) -> (B, n, budget + window) long."""
    prefix = keys[:, :, : prompt - window]
    norms = prefix.to(torch.promote_types(prefix.dtype, torch.float32)).norm(dim=-1)  # (B, n, prompt - window)
    low = top_indices(norms, budget, largest=False)
    recent = torch.arange(prompt - window, prompt, device=low.device).expand(*low.shape[:2], window)
    return torch.cat([low, recent], dim=-1)


def _positive_int(kind: str, name: str, val: object) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{kind} policy: option {name!r} must be an int >= 1, got {val!r}")


@register_policy
@dataclass(frozen=True)
class KNorm(Policy):
    """Keep the ``budget`` prompt keys of lowest L2 norm plus the last ``window`` prompt keys.

    ``kept(seq_len)`` is ``min(seq_len, budget + window)``: the held length per key/value head once a prompt
    of ``seq_len`` tokens is compressed (the snap convention); every generated token then adds one entry.
    """

    budget: int = 256
    window: int = 32

    kind = "knorm"
    symbol = "n"

    def __post_init__(self) -> None:
        _positive_int("knorm", "budget", self.budget)
        _positive_int("knorm", "window", self.window)

    def label(self) -> str:
        return f"knorm({self.budget}/{self.window})"

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget + self.window)

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        st = slot.state
        # the first one-row call after a prompt is the first decode step: compress once, then only append
        if k.shape[2] == 1 and past > 0 and not st.get("_done", False):
            st["_done"] = True
            if past > self.budget + self.window:
                keep = knorm_select(slot.keys, past, budget=self.budget, window=self.window)
                idx = keep.unsqueeze(-1)
                slot.hold(*(torch.gather(t, 2, idx.expand(-1, -1, -1, t.shape[-1])).contiguous()
                            for t in (slot.keys, slot.values)))
                st["_kept"], st["_from"] = keep, past
        return super().append(slot, k, v, past)

    def positions(self, view: GroupKV) -> Tensor:
        """(B, n, buffer_len): the kept prompt positions, then every position from the first decode step on."""
        kept, start = view.slot.state["_kept"], view.slot.state["_from"]
        after = torch.arange(start, view.end, device=kept.device).expand(*kept.shape[:2], view.end - start)
        return torch.cat([kept, after], dim=-1)


__all__ = ["KNorm", "knorm_select"]
