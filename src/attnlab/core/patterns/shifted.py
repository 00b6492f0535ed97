"""Shifted chunk patterns, per head: LongLoRA's S2-Attn (as used by SinkLoRA, P32) and SCCA (P151).

Both split the sequence into chunks of ``chunk`` tokens and give some heads a shifted view so that
information crosses chunk borders when the heads are combined. Positions are absolute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import nonneg_int, positive_int
from .base import Pattern
from .basic import _rows, _span_count


@dataclass(frozen=True)
class ShiftedChunks(Pattern):
    """LongLoRA shifted sparse attention (S2-Attn): chunked attention, half the heads shifted.

    Heads ``h < num_heads // 2`` use chunks ``[c*chunk, (c+1)*chunk)``; heads ``h >= num_heads // 2``
    (LongLoRA shifts the second half) use chunk borders moved by ``shift`` (default ``chunk // 2``):
    chunks ``[c*chunk + shift, (c+1)*chunk + shift)``, the first one being ``[0, shift)``.
    Inside a chunk attention is causal when ``causal`` (LongLoRA fine-tunes causal LMs).

    Deviation: LongLoRA rolls the shifted heads' tokens cyclically, which joins the last half chunk
    with the first one (the leak SinkLoRA criticises). Here the shifted heads' first and last chunks
    are simply shorter, so the pattern is causal and does not depend on the sequence length.
    Add ``| Sinks(n)`` for SinkLoRA's sink tokens.
    """

    chunk: int
    num_heads: int
    causal: bool = True
    shift: int | None = None

    def __post_init__(self):
        positive_int("chunk", self.chunk)
        positive_int("num_heads", self.num_heads)
        shift = self.chunk // 2 if self.shift is None else nonneg_int("shift", self.shift)
        if shift >= self.chunk:
            raise ValueError(f"shift must be < chunk ({self.chunk}), got {shift}")
        object.__setattr__(self, "shift", shift)

    def _offset(self, h: int) -> int:
        """Added to positions before ``// chunk``: 0 for plain heads, ``chunk - shift`` for shifted ones."""
        return (self.chunk - self.shift) % self.chunk if h >= self.num_heads // 2 else 0

    def mask_mod(self, b, h, q_idx, kv_idx):
        off = (h >= self.num_heads // 2).to(q_idx.dtype) * ((self.chunk - self.shift) % self.chunk)
        same = (q_idx + off) // self.chunk == (kv_idx + off) // self.chunk
        return same & (kv_idx <= q_idx) if self.causal else same

    def _dense(self, q_len, kv_len, q_offset):
        out = torch.zeros(self.num_heads, q_len, kv_len, dtype=torch.bool)
        end = max(q_offset + q_len, kv_len)
        for h in range(self.num_heads):
            starts = [0] + list(range(self.chunk - self._offset(h) or self.chunk, end, self.chunk))
            starts = sorted(set(starts))
            for lo, hi in zip(starts, starts[1:] + [end]):
                for p in range(max(lo, q_offset), min(hi, q_offset + q_len)):
                    top = p + 1 if self.causal else hi
                    out[h, p - q_offset, lo : min(top, kv_len)] = True
        return out

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        total = 0.0
        for h in range(self.num_heads):
            off = self._offset(h)
            lo = torch.floor((r + off) / self.chunk) * self.chunk - off
            hi = r if self.causal else lo + self.chunk - 1
            total += _span_count(lo, hi, kv_len)
        return total / self.num_heads

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class ShiftedCrossChunk(Pattern):
    """SCCA shifted cross-chunk attention (P151): queries stay in their chunk, keys are shifted per head.

    Reading of "KV shifting": head ``h`` rolls keys and values back by ``s_h`` before chunked attention,
    so a query in chunk ``c`` sees keys ``j`` with ``(j + s_h) // chunk == c`` -- the chunk moved
    ``s_h`` tokens into the past, reaching into the previous chunk. Causal (default): also
    ``j + s_h <= p``, i.e. the query sees ``c*chunk - s_h .. p - s_h`` (causal attention of the rolled
    sequence). Shifts:

    * ``mode="fixed"`` (SCCA_fixed): ``s_h = 0`` for the first half of the heads, ``chunk // 2`` after;
    * ``mode="flow"``  (SCCA_flow):  ``s_h = h * chunk // num_heads``, a different shift per head, so the
      heads together cover the current and the previous chunk.

    Deviation: the roll is not cyclic; keys that would wrap around from the end do not exist, so the
    first ``s_h`` queries of a shifted head see no key (their output is zero, as for any empty row).
    """

    chunk: int
    num_heads: int
    mode: str = "fixed"
    causal: bool = True

    def __post_init__(self):
        positive_int("chunk", self.chunk)
        positive_int("num_heads", self.num_heads)
        if self.mode not in ("fixed", "flow"):
            raise ValueError(f"mode must be 'fixed' or 'flow', got {self.mode!r}")

    def shift_of(self, h: int) -> int:
        if self.mode == "fixed":
            return self.chunk // 2 if h >= self.num_heads // 2 else 0
        return h * self.chunk // self.num_heads

    def mask_mod(self, b, h, q_idx, kv_idx):
        if self.mode == "fixed":
            s = (h >= self.num_heads // 2).to(q_idx.dtype) * (self.chunk // 2)
        else:
            s = h * self.chunk // self.num_heads
        kk = kv_idx + s
        same = kk // self.chunk == q_idx // self.chunk
        return same & (kk <= q_idx) if self.causal else same

    def _dense(self, q_len, kv_len, q_offset):
        out = torch.zeros(self.num_heads, q_len, kv_len, dtype=torch.bool)
        for h in range(self.num_heads):
            s = self.shift_of(h)
            for i in range(q_len):
                p = q_offset + i
                c0 = (p // self.chunk) * self.chunk
                last = p if self.causal else c0 + self.chunk - 1
                for j in range(c0 - s, last - s + 1):
                    if 0 <= j < kv_len:
                        out[h, i, j] = True
        return out

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        c0 = torch.floor(r / self.chunk) * self.chunk
        last = r if self.causal else c0 + self.chunk - 1
        total = sum(_span_count(c0 - s, last - s, kv_len) for s in map(self.shift_of, range(self.num_heads)))
        return total / self.num_heads

    @property
    def is_causal(self) -> bool:
        return self.causal


__all__ = ["ShiftedChunks", "ShiftedCrossChunk"]
