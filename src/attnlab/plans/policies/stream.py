"""``stream``: attention sinks plus a causal window (streaming heads, DuoAttention I30 / StreamingLLM).

* prompt: ``Causal() & (Sinks(sinks) | SlidingWindow(window))`` on the sparse engine (only the tiles near
  the diagonal and the sink columns are computed);
* cache: the first ``sinks`` positions and the last ``window - 1`` -- at most ``sinks + window - 1``
  entries whatever the length (the truncated tensors are new storage: memory really shrinks);
* decode: plain SDPA over the held buffer (it holds exactly what the query may see).

Buffer coordinates: the held buffer is ``[sinks | recent | new]``. Distances inside ``recent | new`` are
exact and the sinks stay the first entries, so the pattern evaluated at buffer indices (queries are the last
entries) gives the absolute answer, for chunked prefill and decoding alike.

Op ``stream`` (options ``sinks``, ``window``): the same computation over every key so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core.attention import attention
from ...core.patterns import Causal, Pattern, Sinks, SlidingWindow
from ...core.sparse import DEFAULT_Q_BLOCK
from ...ops.registry import register_op
from .base import GroupKV, Policy, Slot, register_policy

#: query rows below which a streaming call uses one dense masked call instead of gathered tiles
SPARSE_MIN_Q = 128


def stream_pattern(sinks: int, window: int) -> Pattern:
    """``Causal() & (Sinks(sinks) | SlidingWindow(window))`` (``SlidingWindow`` is causal already)."""
    local = SlidingWindow(window)
    return Causal() & (Sinks(sinks) | local) if sinks else local


def stream_q_block(window: int, device: torch.device) -> int:
    """Query rows per tile for a sinks + window head: a tile reads ``window + rows - 1`` keys, so rows
    beyond about a quarter of the window mostly add masked work (window 256: 64 rows beat the tuned 128
    by about 15% on CPU in the same run)."""
    tuned = DEFAULT_Q_BLOCK.get(device.type, 128)
    return max(32, min(tuned, 1 << max(5, (window // 4).bit_length() - 1)))


def _check(sinks: int, window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"stream: option 'window' must be an int >= 1, got {window!r}")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"stream: option 'sinks' must be an int >= 0, got {sinks!r}")


def stream_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, sinks: int, window: int,
                     mask: Tensor | None = None) -> Tensor:
    """Sinks + window attention of queries at ``q_offset ..`` over keys ``0 .. Tk - 1`` (the engine picked
    by size: SDPA when one query sees every key, a dense masked call for few rows, sparse tiles else)."""
    Tq, Tk = q.shape[2], k.shape[2]
    pat = stream_pattern(sinks, window)
    if mask is not None:
        return attention(q, k, v, pattern=pat, scale=scale, q_offset=q_offset, mask=mask)
    if Tq == 1 and q_offset == Tk - 1 and Tk <= sinks + window:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])
    if Tq < SPARSE_MIN_Q:
        return attention(q, k, v, pattern=pat, scale=scale, q_offset=q_offset, backend="dense_mask")
    return attention(q, k, v, pattern=pat, scale=scale, q_offset=q_offset, backend="blocksparse",
                     q_block=stream_q_block(window, q.device))


@register_policy
@dataclass(frozen=True)
class Stream(Policy):
    """``sinks`` first tokens plus a causal window of ``window`` keys; the cache keeps ``sinks + window - 1``."""

    sinks: int = 4
    window: int = 256

    kind = "stream"
    symbol = "s"
    op = "stream"

    def __post_init__(self) -> None:
        if self.window < 1 or self.sinks < 0:
            raise ValueError(f"stream policy needs window >= 1 and sinks >= 0, got {self}")

    def label(self) -> str:
        return f"stream({self.sinks}+{self.window})"

    def op_options(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "window": self.window}

    def pattern(self) -> Pattern:
        return stream_pattern(self.sinks, self.window)

    def prefill_pattern(self) -> Pattern:
        return stream_pattern(self.sinks, self.window)

    def kept(self, seq_len: int) -> int:
        return min(seq_len, self.sinks + self.window - 1)

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor, Tensor]:
        kb, vb = slot.extend(k, v)
        keep = self.sinks + self.window - 1
        if kb.shape[2] <= keep:
            slot.hold(kb, vb)
        else:  # sinks are the first entries of the buffer, the recent part its tail
            tail = self.window - 1
            slot.hold(*(torch.cat([t[:, :, : self.sinks], t[:, :, t.shape[2] - tail:]], dim=2) for t in (kb, vb)))
        return kb, vb

    def positions(self, view: GroupKV) -> Tensor:
        tail = view.buffer_len - self.sinks
        dev = view.keys.device
        return torch.cat([torch.arange(self.sinks, device=dev), torch.arange(view.end - tail, view.end, device=dev)])

    def attend(self, q: Tensor, view: GroupKV, *, scale: float, mask: Tensor | None = None) -> Tensor:
        Tb = view.buffer_len
        return stream_attention(q, view.keys, view.values, scale=scale, q_offset=Tb - q.shape[2], sinks=self.sinks,
                                window=self.window, mask=mask)


def _stream_mask(q: Tensor, k: Tensor, *, q_offset: int, sinks: int = 4, window: int = 256, **_: Any) -> Tensor:
    return stream_pattern(sinks, window).dense(q.shape[2], k.shape[2], q_offset).to(q.device).unsqueeze(0)


@register_op("stream", family="cache", papers=("I30",), summary="streaming head: attention sinks plus a causal "
             "window (StreamingLLM; DuoAttention's streaming heads); the sparse engine computes only the window "
             "tiles and the sink columns", options={"sinks": 4, "window": 256}, causal_only=True,
             weights_mask=_stream_mask, dense_options={"sinks": 0, "window": 1 << 20},
             example={"sinks": 2, "window": 6})
def stream_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
              state: dict | None = None, sinks: int = 4, window: int = 256) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    _check(sinks, window)
    out = stream_attention(q, k, v, scale=scale, q_offset=q_offset, sinks=sinks, window=window, mask=mask)
    return out if state is None else (out, state)


__all__ = ["SPARSE_MIN_Q", "Stream", "stream_attention", "stream_op", "stream_pattern", "stream_q_block"]
