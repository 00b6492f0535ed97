"""``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models").

The cache holds ``budget`` entries per key/value head: the ``recent`` most recent positions plus the
``budget - recent`` heavy hitters, the entries with the largest *accumulated* attention (the sum, over every
query so far, of the softmax weights it gave the entry, summed over the group's query heads):

* prompt: causal attention over every key (prefill densely, then compress: the kvpress protocol); every
  prompt query's weights are added to the accumulators (chunked through
  :func:`attnlab.core.softmax.weights_chunks`, never the whole square);
* cache: everything during the prompt; at the first decode step (the first one-row call after the prompt)
  the last ``recent`` prompt positions plus the ``budget - recent`` best accumulated older ones stay;
* decode: the step attends to the ``budget`` held entries plus itself (SDPA over the buffer, entries in
  increasing position order), adds its weights to the accumulators of every entry it saw, then evicts the
  lowest-scoring entry outside the ``recent`` window (H2O's Algorithm 1: attend to ``S + {i}``, then drop
  ``argmin``).

The accumulators (``state["acc"]``, ``(B, n, held)``, at least float32) are the method's own memory: they
count as held bytes. Held entries stay in position order, so the recent window is always the last ``recent``
buffer entries (they are never evicted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.patterns import Causal
from ...core.softmax import weights_chunks
from .base import GroupKV, Policy, Slot, register_policy
from .tova import first_decode_step, gather_entries, new_call, score_dtype, top_indices, view_positions


def received_attention(q: Tensor, keys: Tensor, *, scale: float) -> Tensor:
    """Attention each buffer entry receives from the call's queries (the last ``Tq`` buffer entries, causal),
    summed over query rows and the query heads of each key/value head: q (B, H, Tq, D), keys (B, n, Tb, D)
    -> (B, n, Tb)."""
    B, H, Tq, _ = q.shape
    n, Tb = keys.shape[1], keys.shape[2]
    dtype = score_dtype(keys)
    total = torch.zeros(B, n, Tb, dtype=dtype, device=keys.device)
    for _, w in weights_chunks(q, keys, scale=scale, q_offset=Tb - Tq, pattern=Causal(), dtype=dtype):
        total += w.view(B, n, H // n, -1, Tb).sum(dim=(2, 3))
    return total


def h2o_keep(acc: Tensor, budget: int, recent: int) -> Tensor:
    """Buffer entries kept, sorted: the ``budget - recent`` best accumulated among all but the last ``recent``,
    then those last ``recent`` (ties: the earlier). acc (B, n, Tb), Tb > budget -> (B, n, budget) long."""
    Tb = acc.shape[-1]
    heavy = top_indices(acc[..., : Tb - recent], budget - recent)
    last = torch.arange(Tb - recent, Tb, device=acc.device).expand(*heavy.shape[:2], recent)
    return torch.cat([heavy, last], dim=-1)


@register_policy
@dataclass(frozen=True)
class H2O(Policy):
    """``recent`` most recent entries plus ``budget - recent`` heavy hitters by accumulated attention.

    ``kept(seq_len)`` is ``min(seq_len, budget)``: exact after the first decode step and after every later one.
    """

    budget: int = 256
    recent: int = 32

    kind = "h2o"
    symbol = "H"

    def __post_init__(self) -> None:
        for name in ("budget", "recent"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"h2o policy: option {name!r} must be an int >= 1, got {val!r}")
        if self.recent >= self.budget:
            raise ValueError(f"h2o policy: 'recent' ({self.recent}) must be below 'budget' ({self.budget}): "
                             "the heavy hitters are budget - recent")

    def label(self) -> str:
        return f"h2o({self.budget}/{self.recent})"

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget)

    def _evict(self, slot: Slot, keys: Tensor, values: Tensor, acc: Tensor, pos: Tensor | None) -> None:
        """Hold the ``budget`` entries :func:`h2o_keep` picks from ``keys``/``values`` (positions ``pos``;
        None: the buffer index is the position) with their accumulators."""
        keep = h2o_keep(acc, self.budget, self.recent)
        slot.hold(gather_entries(keys, keep), gather_entries(values, keep))
        slot.state["acc"] = acc.gather(2, keep).contiguous()
        slot.state["_pos"] = keep if pos is None else pos.gather(2, keep)

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        st = slot.state
        if first_decode_step(st, k.shape[2], past) and "acc" in st and slot.held() > self.budget:
            self._evict(slot, slot.keys, slot.values, st["acc"], st.get("_pos"))
        kb, vb = super().append(slot, k, v, past)
        view_positions(st, past, k.shape[2])
        return kb, vb

    def positions(self, view: GroupKV) -> Tensor:
        """(B, n, buffer_len): held positions, then the call's."""
        return view.slot.state["_vpos"]

    def observe(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        st = view.slot.state
        if not view.cached or not new_call(view):
            return
        acc = received_attention(q, view.keys, scale=scale)
        held = st.get("acc")
        if held is not None:  # the held entries are the first ones of the buffer
            acc[..., : held.shape[-1]] += held
        if st.get("_done", False) and view.buffer_len > self.budget:
            self._evict(view.slot, view.keys, view.values, acc, st.get("_vpos"))
        else:
            st["acc"] = acc


__all__ = ["H2O", "h2o_keep", "received_attention"]
