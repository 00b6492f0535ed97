"""``snap``: SnapKV-style prompt eviction.

* prompt: causal attention over every key; the last ``window`` queries of the (last) prompt call record their
  attention, summed over the group's query heads (through :func:`attnlab.core.softmax.weights_chunks`);
* cache: everything during the prompt; at the first decode step the recorded scores, max-pooled over
  ``kernel`` neighbours, pick the ``budget`` prompt keys attended most, and the cache keeps those plus the
  last ``window`` prompt keys (``budget + window``), then appends each generated token; a later multi-row
  call (another turn over the same context) is appended too: the prompt is compressed once;
* ``chunk`` > 1 selects whole chunks instead of single keys (ChunkKV, Liu et al. 2025, arXiv 2502.00299): the
  positions before the window are cut into chunks of ``chunk`` consecutive keys from position 0, a chunk's
  score is the sum of its keys' scores, and the ``budget`` kept keys are taken chunk by chunk in decreasing
  chunk score (so a needle's tokens stay together; when ``budget`` is not a multiple of ``chunk`` the last
  chunk taken keeps its best-scored keys);
* decode: SDPA over the held buffer (its entries are in increasing position order, so causality at buffer
  indices is exact).

Op ``snap`` (options ``budget``, ``window``, ``kernel``, ``chunk``): stateless it is causal attention (the eviction is
defined by a prompt); with ``state=OpState()`` a prompt call records the scores, the first one-row call keeps
``state["kept"]`` (``(B, Hkv, budget + window)`` prompt positions) and every later call attends to the kept
positions plus everything after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.patterns import Causal
from ...core.softmax import weights_chunks
from ...ops.registry import register_op
from .base import GroupKV, Policy, Slot, causal_attend, masked_sdpa, register_policy


def _summed_weights(q: Tensor, k: Tensor, *, scale: float, q_offset: int) -> Tensor:
    """Causal attention weights of the rows of ``q`` (first at ``q_offset``) summed over rows and the query heads
    of each key/value head: q (B, H, Tq, D), k (B, Hkv, Tk, D) -> (B, Hkv, Tk) float32."""
    B, H = q.shape[:2]
    Hkv, Tk = k.shape[1], k.shape[2]
    total = q.new_zeros(B, Hkv, Tk, dtype=torch.float32)
    for _, w in weights_chunks(q, k, scale=scale, q_offset=q_offset, pattern=Causal(), dtype=torch.float32):
        total += w.view(B, Hkv, H // Hkv, -1, Tk).sum(dim=(2, 3))
    return total


def snap_scores(q: Tensor, k: Tensor, *, scale: float, window: int) -> Tensor:
    """Attention of the last ``window`` query rows (causal, bottom-right aligned over ``k``), summed over
    those rows and the query heads of each key/value head: q (B, H, Tq, D), k (B, Hkv, Tk, D) -> (B, Hkv, Tk)."""
    obs = min(window, q.shape[2])
    return _summed_weights(q[:, :, q.shape[2] - obs:], k, scale=scale, q_offset=k.shape[2] - obs)


def lookahead_scores(q: Tensor, k: Tensor, *, scale: float) -> Tensor:
    """Attention of query rows placed after every key of ``k`` (Lookahead Q-Cache's pseudo queries: each row
    sees the whole prompt, nothing else), summed over the rows and the query heads of each key/value head:
    q (B, H, G, D), k (B, Hkv, Tk, D) -> (B, Hkv, Tk)."""
    return _summed_weights(q, k, scale=scale, q_offset=k.shape[2])


def add_lookahead(state: dict, q: Tensor, keys: Tensor, scale: float) -> None:
    """Add the pseudo queries' attention to the recorded prompt scores ``state["_scores"]`` (over the
    prompt's keys: the first ``_scores.shape[-1]`` of ``keys``), if any are pending."""
    if "_scores" in state:
        prompt = state["_scores"].shape[-1]
        state["_scores"] = state["_scores"] + lookahead_scores(q, keys[:, :, :prompt], scale=scale)


def chunk_top(scores: Tensor, budget: int, chunk: int) -> Tensor:
    """ChunkKV's selection: ``budget`` positions taken whole chunk by whole chunk (chunks of ``chunk``
    consecutive positions from 0, the last one possibly shorter) in decreasing summed score; inside the last
    chunk taken, its best-scored positions first. Ties keep the earlier chunk / position.
    scores (B, n, L) -> (B, n, budget) long, unsorted."""
    B, n, L = scores.shape
    count = -(-L // chunk)
    sums = F.pad(scores, (0, count * chunk - L)).view(B, n, count, chunk).sum(-1)
    own = scores.argsort(dim=-1, descending=True, stable=True)  # keys by their own score, ties by position
    rank = sums.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # chunk rank, ties: earlier first
    # keys by their chunk's rank; the stable sort keeps the own-score order inside a chunk
    order = rank.gather(-1, torch.div(own, chunk, rounding_mode="floor")).argsort(dim=-1, stable=True)
    return own.gather(-1, order[:, :, :budget])


def snap_select(scores: Tensor, prompt: int, *, budget: int, window: int, kernel: int, chunk: int = 1) -> Tensor:
    """Prompt positions to keep, sorted: the ``budget`` best pooled scores among ``0 .. prompt - window - 1``
    (with ``chunk`` > 1, the best whole chunks: :func:`chunk_top`) plus the last ``window``.
    scores (B, n, >= prompt) -> (B, n, budget + window) long."""
    prefix = scores[:, :, : prompt - window].float()
    if kernel > 1:
        B, n, L = prefix.shape
        prefix = F.max_pool1d(prefix.reshape(B * n, 1, L), kernel, stride=1, padding=kernel // 2)
        prefix = prefix.reshape(B, n, -1)[:, :, :L]
    top = chunk_top(prefix, budget, chunk) if chunk > 1 else prefix.topk(budget, dim=-1).indices
    top = top.sort(dim=-1).values
    recent = torch.arange(prompt - window, prompt, device=top.device).expand(*top.shape[:2], window)
    return torch.cat([top, recent], dim=-1)


def _check(budget: int, window: int, kernel: int, chunk: int) -> None:
    for name, val in (("budget", budget), ("window", window), ("kernel", kernel), ("chunk", chunk)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"snap: option {name!r} must be an int >= 1, got {val!r}")


@register_policy
@dataclass(frozen=True)
class Snap(Policy):
    """Keep the ``budget`` prompt keys the last ``window`` prompt queries attend to most (in whole chunks of
    ``chunk`` keys when ``chunk`` > 1: ChunkKV), plus that window."""

    budget: int = 256
    window: int = 32
    kernel: int = 7
    chunk: int = 1

    kind = "snap"
    symbol = "k"
    op = "snap"

    def __post_init__(self) -> None:
        if self.budget < 1 or self.window < 1 or self.kernel < 1 or self.chunk < 1:
            raise ValueError(f"snap policy needs budget, window, kernel, chunk >= 1, got {self}")

    def label(self) -> str:
        return f"snap({self.budget}/{self.window})" + (f"c{self.chunk}" if self.chunk > 1 else "")

    def op_options(self) -> dict[str, Any]:
        return {"budget": self.budget, "window": self.window, "kernel": self.kernel, "chunk": self.chunk}

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.budget + self.window)

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        scores = slot.state.pop("_scores", None)
        if k.shape[2] == 1 and scores is not None and past > self.budget + self.window:
            keep = snap_select(scores, past, budget=self.budget, window=self.window, kernel=self.kernel,
                               chunk=self.chunk)
            idx = keep.unsqueeze(-1)
            slot.hold(*(torch.gather(t, 2, idx.expand(-1, -1, -1, t.shape[-1])).contiguous()
                        for t in (slot.keys, slot.values)))
            slot.state["_kept"], slot.state["_from"] = keep, past
        return super().append(slot, k, v, past)

    def positions(self, view: GroupKV) -> Tensor:
        kept, start = view.slot.state["_kept"], view.slot.state["_from"]
        after = torch.arange(start, view.end, device=kept.device).expand(*kept.shape[:2], view.end - start)
        return torch.cat([kept, after], dim=-1)

    def observe(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        # the prompt is compressed once: a later multi-row call (the next turn of a shared context) appends
        if view.cached and q.shape[2] > 1 and "_kept" not in view.slot.state:
            view.slot.state["_scores"] = snap_scores(q, view.keys, scale=scale, window=self.window)

    def look_ahead(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        add_lookahead(view.slot.state, q, view.keys, scale)


def _snap_allowed(k: Tensor, state: dict, Tq: int, q_offset: int, heads: int) -> Tensor:
    """(B, heads, Tq, Tk): kept prompt positions and everything after the prompt, causal."""
    B, Hkv, Tk = k.shape[0], k.shape[1], k.shape[2]
    held = torch.zeros(B, Hkv, Tk, dtype=torch.bool, device=k.device)
    held.scatter_(2, state["kept"].to(k.device), True)
    held[:, :, state["prompt"]:] = True
    causal = Causal().dense(Tq, Tk, q_offset).to(k.device).unsqueeze(0)
    return held.repeat_interleave(heads // Hkv, dim=1).unsqueeze(2) & causal


def _snap_mask(q: Tensor, k: Tensor, *, q_offset: int, state: dict | None = None, **_: Any) -> Tensor:
    """Causal; once ``state`` holds what was kept, the kept prompt keys plus everything after the prompt."""
    if state is not None and "kept" in state:
        return _snap_allowed(k, state, q.shape[2], q_offset, q.shape[1])
    return Causal().dense(q.shape[2], k.shape[2], q_offset).to(q.device).unsqueeze(0)


@register_op("snap", family="cache", summary="SnapKV prompt eviction: after the prompt keep the budget keys the "
             "last window queries attend to most (max-pooled; whole chunks with chunk > 1, ChunkKV) plus the "
             "window; state carries what was kept",
             options={"budget": 256, "window": 32, "kernel": 7, "chunk": 1}, causal_only=True,
             weights_mask=_snap_mask, dense_options={"budget": 1 << 20},
             example={"budget": 4, "window": 4, "kernel": 3, "chunk": 2},
             decodes=False)  # the decode steps read the kept keys only: by design not the full forward
def snap_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
            state: dict | None = None, budget: int = 256, window: int = 32, kernel: int = 7, chunk: int = 1):
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) (every key so far) -> (B, H, Tq, Dv) [, state]."""
    _check(budget, window, kernel, chunk)
    Tq, Tk = q.shape[2], k.shape[2]
    if state is not None:
        if Tq > 1 and "kept" not in state:
            state["scores"] = snap_scores(q, k, scale=scale, window=window)
            state["prompt"] = Tk
        elif "scores" in state and "kept" not in state:
            prompt = state.pop("prompt")
            scores = state.pop("scores")
            if prompt > budget + window:
                state["kept"] = snap_select(scores, prompt, budget=budget, window=window, kernel=kernel,
                                            chunk=chunk)
                state["prompt"] = prompt
    if state is not None and "kept" in state:
        allowed = _snap_allowed(k, state, Tq, q_offset, q.shape[1])
        out = masked_sdpa(q, k, v, allowed if mask is None else allowed & mask, scale)
    elif q_offset == Tk - Tq:
        out = causal_attend(q, k, v, scale, mask)
    else:
        allowed = Causal().dense(Tq, Tk, q_offset).to(q.device).unsqueeze(0)
        out = masked_sdpa(q, k, v, allowed if mask is None else allowed & mask, scale)
    return out if state is None else (out, state)


__all__ = ["Snap", "add_lookahead", "chunk_top", "lookahead_scores", "snap_op", "snap_scores", "snap_select"]
