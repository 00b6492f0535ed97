"""``ada``: Ada-KV adaptive budget allocation on top of SnapKV (Feng et al. 2024, "Ada-KV: Optimizing KV Cache
Eviction by Adaptive Budget Allocation for Efficient LLM Inference"), with its safeguard.

* prompt: causal attention over every key (prefill densely, then compress: the kvpress protocol); the last
  ``window`` queries of the (last) prompt call record SnapKV's scores (:func:`~.snap.snap_scores`: their
  attention summed over those rows and the group's query heads);
* cache: at the first decode step the scores, max-pooled over ``kernel`` neighbours (as SnapKV), are compared
  across the group's ``n`` key/value heads: the group keeps ``n * budget`` prompt entries among positions
  ``0 .. prompt - window - 1`` -- each head first its own ``floor(alpha * budget)`` best (the safeguard), then
  the best remaining entries over the flattened (heads x positions) scores -- plus the last ``window``
  positions of every head. Heads attended sharply give budget to heads attended diffusely; each head holds
  between ``floor(alpha * budget) + window`` and ``n * budget + window`` entries, the group exactly
  ``n * (budget + window)``;
* decode: SDPA over each head's own entries (the current token included).

Storage (no padding is held): ``slot.keys``/``slot.values`` are ``(B, n, C + generated, D)`` with
``C = budget + window``. The first ``C`` columns are the group's ``n * C`` prompt entries *packed* (the flat
``(B, n * C, D)`` sequence ordered by (head, position), viewed as ``(n, C)``: a row there is not a head), the
columns after them one generated token per head each, as usual. ``state["lens"]`` ``(B, n)`` (entries per head in
the packed part) is all the metadata decoding needs and counts as held bytes, so ``Slot.nbytes()`` is
exactly the storage allocated and ``Slot.held()`` the mean length per head (``held_positions`` exact).
Positions of the packed entries (``state["_pos"]``, like SnapKV's ``_kept``) are bookkeeping for masks.

Each call rebuilds the buffer it attends to (transient, like a decode step's ``torch.cat``): per head its
packed entries padded to the longest head, then the generated ones. A padding cell repeats the head's last
packed entry (same key, value and position, so :meth:`LayerKV.dense` and weights masks stay exact) and is
masked out in :meth:`Ada.attend` (``state["_vvalid"]``): attention never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import GroupKV, Policy, Slot, causal_attend, masked_sdpa, register_policy
from .snap import add_lookahead, snap_scores
from .tova import first_decode_step, top_indices


def pooled_scores(scores: Tensor, length: int, kernel: int) -> Tensor:
    """SnapKV's scores of positions ``0 .. length - 1`` max-pooled over ``kernel`` neighbours (as
    :func:`~.snap.snap_select`): (B, n, >= length) -> (B, n, length)."""
    prefix = scores[:, :, :length]
    if kernel > 1:
        B, n, L = prefix.shape
        prefix = F.max_pool1d(prefix.reshape(B * n, 1, L), kernel, stride=1, padding=kernel // 2)
        prefix = prefix.reshape(B, n, -1)[:, :, :L]
    return prefix


def ada_select(scores: Tensor, prompt: int, *, budget: int, window: int, kernel: int, alpha: float) -> Tensor:
    """Which prompt positions each head keeps: bool (B, n, prompt) with ``n * (budget + window)`` True per
    sample: per head its ``floor(alpha * budget)`` best pooled scores, then the ``n * (budget - floor(alpha *
    budget))`` best remaining over the flattened heads, among ``0 .. prompt - window - 1``; plus the last
    ``window``. Ties go to the lower head, then the earlier position (max-pooling makes plateaus of equal
    scores: the rule matters). scores (B, n, >= prompt); needs ``prompt - window >= budget``."""
    L = prompt - window
    pooled = pooled_scores(scores, L, kernel)
    B, n, _ = pooled.shape
    floor = math.floor(alpha * budget)
    chosen = torch.zeros(B, n, prompt, dtype=torch.bool, device=scores.device)
    if floor:
        chosen.scatter_(2, top_indices(pooled, floor), True)
    # the rest of the group's budget: best remaining over the flattened (head, position) scores
    rest = pooled.masked_fill(chosen[:, :, :L], float("-inf")).reshape(B, n * L)  # flat index head * L + pos
    top = top_indices(rest, n * (budget - floor))
    flat = torch.zeros(B, n * L, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    chosen[:, :, :L] |= flat.view(B, n, L)
    chosen[:, :, L:] = True
    return chosen


def _check(budget: object, window: object, kernel: object, alpha: object) -> None:
    for name, val in (("budget", budget), ("window", window), ("kernel", kernel)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"ada policy: option {name!r} must be an int >= 1, got {val!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"ada policy: option 'alpha' must be a number in [0, 1], got {alpha!r}")


@register_policy
@dataclass(frozen=True)
class Ada(Policy):
    """SnapKV with the group's ``n * budget`` prompt entries allocated across its heads by score (Ada-KV),
    each head keeping at least ``floor(alpha * budget)`` of its own best; plus the last ``window``.

    ``kept(seq_len)`` is ``min(seq_len, budget + window)``: the mean held length per key/value head once a
    prompt of ``seq_len`` tokens is compressed (the group total is exact; one head may hold more, another less);
    every generated token then adds one entry per head.
    """

    budget: int = 256
    window: int = 32
    kernel: int = 7
    alpha: float = 0.2

    kind = "ada"
    symbol = "a"

    def __post_init__(self) -> None:
        _check(self.budget, self.window, self.kernel, self.alpha)

    def label(self) -> str:
        return f"ada({self.budget}/{self.window},a{self.alpha:g})"

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget + self.window)

    # ---- the cache ---------------------------------------------------------------------------------------
    def _compress(self, slot: Slot, scores: Tensor, prompt: int) -> None:
        """Hold the packed prompt entries (see the module docstring) and the index maps of the padded view."""
        chosen = ada_select(scores, prompt, budget=self.budget, window=self.window, kernel=self.kernel,
                            alpha=self.alpha)
        B, n, _ = chosen.shape
        C = self.budget + self.window
        # row-major nonzero of (B, n * prompt): per sample, ordered by (head, position); n * C entries each
        flat = chosen.reshape(B, n * prompt).nonzero()[:, 1].view(B, n * C)
        packed = [torch.gather(t.reshape(B, n * prompt, t.shape[-1]), 1,
                               flat.unsqueeze(-1).expand(-1, -1, t.shape[-1])).view(B, n, C, t.shape[-1])
                  for t in (slot.keys, slot.values)]
        slot.hold(*packed)
        lens = chosen.sum(-1)  # (B, n)
        # one spare padding cell when a head holds the whole prompt: a buffer as long as the positions seen
        # would read as "index = position" (GroupKV.positions), which the other heads' buffers are not
        longest = int(lens.max()) + int(int(lens.max()) == prompt)
        start = lens.cumsum(-1) - lens
        col = torch.arange(longest, device=lens.device)
        valid = col < lens.unsqueeze(-1)  # (B, n, longest)
        # a padding cell points at its head's last packed entry (a real one: dense() and masks stay exact)
        idx = start.unsqueeze(-1) + torch.minimum(col, lens.unsqueeze(-1) - 1)
        st = slot.state
        st["lens"] = lens
        st["_pos"] = (flat % prompt).gather(1, idx.reshape(B, n * longest)).view(B, n, longest)
        st["_idx"], st["_valid"], st["_from"] = idx, valid, prompt

    def _view(self, slot: Slot, kb: Tensor, vb: Tensor, end: int) -> tuple[Tensor, Tensor]:
        """The buffer a call attends to: per head its packed entries (padded) then the generated ones."""
        st = slot.state
        idx, valid = st["_idx"], st["_valid"]
        B, n, longest = idx.shape
        C = self.budget + self.window
        out = []
        for t in (kb, vb):
            D = t.shape[-1]
            packed = t[:, :, :C].reshape(B, n * C, D)
            mine = torch.gather(packed, 1, idx.reshape(B, n * longest, 1).expand(-1, -1, D)).view(B, n, longest, D)
            out.append(torch.cat([mine, t[:, :, C:]], dim=2))
        tail = kb.shape[2] - C
        st["_vvalid"] = torch.cat([valid, valid.new_ones(B, n, tail)], dim=-1)
        after = torch.arange(st["_from"], end, device=idx.device).expand(B, n, tail)
        st["_vpos"] = torch.cat([st["_pos"], after], dim=-1)
        return out[0], out[1]

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        st = slot.state
        scores = st.pop("_scores", None)
        if first_decode_step(st, k.shape[2], past) and scores is not None and past > self.budget + self.window:
            self._compress(slot, scores, past)
        kb, vb = super().append(slot, k, v, past)
        if "lens" not in st:
            return kb, vb
        return self._view(slot, kb, vb, past + k.shape[2])

    def positions(self, view: GroupKV) -> Tensor:
        """(B, n, buffer_len): each head's packed positions (padding repeats the last), then the generated."""
        return view.slot.state["_vpos"]

    # ---- computing ---------------------------------------------------------------------------------------
    def observe(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        if view.cached and q.shape[2] > 1 and "lens" not in view.slot.state:
            view.slot.state["_scores"] = snap_scores(q, view.keys, scale=scale, window=self.window)

    def look_ahead(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        add_lookahead(view.slot.state, q, view.keys, scale)

    def attend(self, q: Tensor, view: GroupKV, *, scale: float, mask: Tensor | None = None) -> Tensor:
        st = view.slot.state
        if not (view.cached and "lens" in st):
            return causal_attend(q, view.keys, view.values, scale, mask)
        B, H, Tq, _ = q.shape
        n, Tb = view.keys.shape[1], view.buffer_len
        # queries are the last Tq buffer entries; every packed entry precedes them
        qpos = torch.arange(Tb - Tq, Tb, device=q.device).view(Tq, 1)
        causal = torch.arange(Tb, device=q.device).view(1, Tb) <= qpos
        allowed = st["_vvalid"].repeat_interleave(H // n, dim=1).unsqueeze(2) & causal
        return masked_sdpa(q, view.keys, view.values, allowed if mask is None else allowed & mask, scale)


__all__ = ["Ada", "ada_select", "pooled_scores"]
