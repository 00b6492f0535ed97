"""``tova``: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

A fixed-size cache of ``budget`` entries per key/value head; whenever it would grow past ``budget`` the
entries the *current* query attends to least are dropped:

* prompt: causal attention over every key (prefill densely, then compress: the kvpress protocol); each prompt
  call records the weights of its last query row;
* cache: everything during the prompt; at the first decode step (the first one-row call after the prompt) the
  prompt is evicted down to ``budget`` with the last prompt query's weights, keeping the last prompt token;
* decode: the step attends to the ``budget`` held entries plus itself (SDPA over the buffer, entries in
  increasing position order), then its own weights evict down to ``budget`` again; the current token is
  always kept.

Weights: per key/value head, the softmax weights of the query heads it serves, averaged over those heads
(the paper averages over every head of the layer; here each key/value head group decides on its own, which
keeps grouped-query heads with different policies independent). The averaging is over query heads only: one
query row decides, as in the paper.

Storage is a plain ``(B, n, held, D)`` buffer, equal for every head of the group (each evicts as many).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.softmax import weights_chunks
from .base import GroupKV, Policy, Slot, register_policy


def score_dtype(t: Tensor) -> torch.dtype:
    """Attention scores in at least float32 (bf16 models), float64 for float64 inputs (exact tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def top_indices(x: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Indices of the ``k`` largest (or smallest) entries along the last axis, sorted ascending; ties go to
    the lower index (a stable sort: the same choice on every device, unlike ``topk``). (..., T) -> (..., k)."""
    return x.argsort(dim=-1, descending=largest, stable=True)[..., :k].sort(dim=-1).values


def gather_entries(t: Tensor, idx: Tensor) -> Tensor:
    """Entries ``idx`` (B, n, K) of a buffer ``t`` (B, n, T, D) -> new storage (B, n, K, D)."""
    return torch.gather(t, 2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1])).contiguous()


def last_query_weights(q: Tensor, keys: Tensor, *, scale: float) -> Tensor:
    """Softmax weights of the last query row over every buffer entry (it is the last entry: it sees all),
    averaged over the query heads of each key/value head: q (B, H, Tq, D), keys (B, n, Tb, D) -> (B, n, Tb)."""
    B, H = q.shape[:2]
    n, Tb = keys.shape[1], keys.shape[2]
    _, w = next(weights_chunks(q[:, :, -1:], keys, scale=scale, dtype=score_dtype(keys)))
    return w.view(B, n, H // n, Tb).mean(dim=2)


def tova_keep(weights: Tensor, budget: int) -> Tensor:
    """Buffer entries kept, sorted: the last (the current token) plus the ``budget - 1`` others of highest
    weight (ties: the earlier). weights (B, n, Tb), Tb > budget -> (B, n, budget) long."""
    Tb = weights.shape[-1]
    if Tb == budget + 1:  # a decode step drops one entry: the least weighted, the later of equals (no sort)
        drop = Tb - 2 - weights[..., : Tb - 1].flip(-1).argmin(dim=-1, keepdim=True)  # argmin: first of equals
        col = torch.arange(budget, device=weights.device)
        return col + (col >= drop)
    top = top_indices(weights[..., : Tb - 1], budget - 1)
    last = torch.full((*top.shape[:2], 1), Tb - 1, dtype=top.dtype, device=top.device)
    return torch.cat([top, last], dim=-1)


def view_positions(st: dict, past: int, q_len: int) -> None:
    """After an append: ``st["_vpos"]`` = absolute positions of the returned buffer (held ``_pos`` then the
    call's new positions) once something was evicted; absent while the buffer is still ``0 .. end - 1``."""
    pos = st.get("_pos")
    if pos is None:
        st.pop("_vpos", None)
        return
    new = torch.arange(past, past + q_len, device=pos.device).expand(*pos.shape[:2], q_len)
    st["_vpos"] = torch.cat([pos, new], dim=-1)


def first_decode_step(st: dict, q_len: int, past: int) -> bool:
    """True once, at the first one-row call after a prompt: the moment a "prefill densely, then compress"
    policy compresses the prompt."""
    if q_len == 1 and past > 0 and not st.get("_done", False):
        st["_done"] = True
        return True
    return False


def new_call(view: GroupKV) -> bool:
    """False when this call was already observed (a weights hook and the runner may both report it)."""
    st = view.slot.state
    mark = (view.past, view.q_len)
    if st.get("_obs") == mark:
        return False
    st["_obs"] = mark
    return True


@register_policy
@dataclass(frozen=True)
class Tova(Policy):
    """A cache of ``budget`` entries; the current query's weights (averaged over the group's query heads)
    evict the least attended entries; the current token always stays.

    ``kept(seq_len)`` is ``min(seq_len, budget)``: exact after the first decode step and after every later one.
    """

    budget: int = 256

    kind = "tova"
    symbol = "t"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"tova policy: option 'budget' must be an int >= 1, got {self.budget!r}")

    def label(self) -> str:
        return f"tova({self.budget})"

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget)

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        st = slot.state
        if first_decode_step(st, k.shape[2], past):
            last = st.pop("_last", None)  # the last prompt query's weights over the whole prompt
            if last is not None and slot.held() > self.budget:
                keep = tova_keep(last, self.budget)
                slot.hold(gather_entries(slot.keys, keep), gather_entries(slot.values, keep))
                st["_pos"] = keep  # the prompt buffer was 0 .. past - 1
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
        w = last_query_weights(q, view.keys, scale=scale)
        if not st.get("_done", False):
            st["_last"] = w  # a prompt call: evicted at the first decode step
            return
        if view.buffer_len > self.budget:  # the step saw budget + 1 entries: drop down to budget
            keep = tova_keep(w, self.budget)
            pos = st.get("_vpos")
            view.slot.hold(gather_entries(view.keys, keep), gather_entries(view.values, keep))
            st["_pos"] = keep if pos is None else pos.gather(2, keep)


__all__ = ["Tova", "gather_entries", "last_query_weights", "score_dtype", "top_indices", "tova_keep"]
