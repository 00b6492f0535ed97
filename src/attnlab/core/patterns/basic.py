"""Static 1-D patterns: full, causal, prefix-LM, documents, windows, sinks, dilated/strided, chunks.

Conventions: positions are absolute (query ``i`` of a call is position ``q_offset + i``); windows count the
query itself, so ``SlidingWindow(512)`` lets each query see 512 keys (itself and the 511 before it).
``count`` uses per-row arithmetic (O(q_len)), never the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import positive_int
from .base import Pattern


def _rows(q_len: int, q_offset: int) -> torch.Tensor:
    return torch.arange(q_offset, q_offset + q_len, dtype=torch.float64)


def _span_count(lo: torch.Tensor, hi: torch.Tensor, kv_len: int) -> float:
    """Sum over rows of |[lo, hi] ∩ [0, kv_len)|."""
    lo = lo.clamp(min=0)
    hi = hi.clamp(max=kv_len - 1)
    return float((hi - lo + 1).clamp(min=0).sum())


@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    def _dense(self, q_len, kv_len, q_offset):
        return torch.ones(q_len, kv_len, dtype=torch.bool)

    def count(self, q_len, kv_len, q_offset=0):
        return float(q_len * kv_len)

    @property
    def is_full(self) -> bool:
        return True


@dataclass(frozen=True)
class Causal(Pattern):
    """Query at position p sees keys 0..p."""

    def mask_mod(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def _dense(self, q_len, kv_len, q_offset):
        return torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=q_offset)

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        return _span_count(torch.zeros_like(r), r, kv_len)

    @property
    def is_causal(self) -> bool:
        return True


@dataclass(frozen=True)
class PrefixLM(Pattern):
    """Bidirectional over the first ``prefix`` tokens, causal after (T5 / UniLM prefix-LM)."""

    prefix: int

    def __post_init__(self):
        positive_int("prefix", self.prefix)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < self.prefix)

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=q_offset)
        m[:, : self.prefix] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        return _span_count(torch.zeros_like(r), torch.maximum(r, torch.full_like(r, self.prefix - 1)), kv_len)


@dataclass(frozen=True)
class Document(Pattern):
    """Packed sequences: a query sees keys of its own document only (combine with ``Causal()``).

    Built from document lengths, e.g. ``Document((100, 412))``, or ``Document.from_ids(ids)``.
    """

    lengths: tuple[int, ...]

    def __post_init__(self):
        lengths = tuple(int(n) for n in self.lengths)
        if not lengths:
            raise ValueError("Document needs at least one document length")
        for i, n in enumerate(lengths):
            positive_int(f"lengths[{i}]", n)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "seq_len", sum(lengths))

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> Document:
        """From a 1-D tensor of document ids, one per token, constant within a document."""
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        _, counts = torch.unique_consecutive(ids.cpu(), return_counts=True)
        return cls(tuple(counts.tolist()))

    def doc_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.repeat_interleave(
            torch.arange(len(self.lengths), device=device), torch.tensor(self.lengths, device=device)
        )

    def mask_mod(self, b, h, q_idx, kv_idx):
        ids = self.doc_ids(q_idx.device)
        return ids[q_idx] == ids[kv_idx]

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(self.seq_len, self.seq_len, dtype=torch.bool)
        start = 0
        for n in self.lengths:
            m[start : start + n, start : start + n] = True
            start += n
        return m[q_offset : q_offset + q_len, :kv_len]

    def count(self, q_len, kv_len, q_offset=0):
        ids = self.doc_ids()
        sizes = torch.tensor(self.lengths, dtype=torch.float64)
        return float(sizes[ids[q_offset : q_offset + q_len]].sum())


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local attention. Causal: keys p-window+1..p. Two-sided: keys with |p - j| < window."""

    window: int
    causal: bool = True

    def __post_init__(self):
        positive_int("window", self.window)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        if self.causal:
            return (d >= 0) & (d < self.window)
        return (d < self.window) & (d > -self.window)

    def _dense(self, q_len, kv_len, q_offset):
        ones = torch.ones(q_len, kv_len, dtype=torch.bool)
        upper = 0 if self.causal else self.window - 1
        return ones.tril(diagonal=q_offset + upper) & ones.triu(diagonal=q_offset - self.window + 1)

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        hi = r if self.causal else r + self.window - 1
        return _span_count(r - self.window + 1, hi, kv_len)

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class Sinks(Pattern):
    """Attention sinks (StreamingLLM): every query may see the first ``n`` keys."""

    n: int

    def __post_init__(self):
        positive_int("n", self.n)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) & (q_idx >= 0)

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        m[:, : self.n] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        return float(q_len * min(self.n, kv_len))


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """Longformer / BigBird global tokens: the first ``n`` positions see everything and are seen by all."""

    n: int

    def __post_init__(self):
        positive_int("n", self.n)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return (kv_idx < self.n) | (q_idx < self.n)

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        m[:, : self.n] = True
        rows = max(0, min(self.n - q_offset, q_len))
        m[:rows] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        g = max(0, min(self.n - q_offset, q_len))
        return float(g * kv_len + (q_len - g) * min(self.n, kv_len))


def _residue_order(q_len: int, q_offset: int, period: int) -> torch.Tensor:
    pos = torch.arange(q_offset, q_offset + q_len)
    return torch.argsort((pos % period) * (q_len + q_offset) + pos)


@dataclass(frozen=True)
class Dilated(Pattern):
    """Dilated window (LongNet / DiNAT 1-D): ``window`` keys spaced ``dilation`` apart.

    Causal: keys p, p-d, ..., p-(window-1)d. Two-sided: |p - j| = m*d with m < window.
    """

    window: int
    dilation: int
    causal: bool = True

    def __post_init__(self):
        positive_int("window", self.window)
        positive_int("dilation", self.dilation)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        on_grid = torch.remainder(d, self.dilation) == 0
        reach = self.window * self.dilation
        if self.causal:
            return on_grid & (d >= 0) & (d < reach)
        return on_grid & (d < reach) & (d > -reach)

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        steps = range(self.window) if self.causal else range(-self.window + 1, self.window)
        for i in range(q_len):
            p = q_offset + i
            for s in steps:
                j = p - s * self.dilation
                if 0 <= j < kv_len:
                    m[i, j] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        d = self.dilation
        # keys j = p - s*d for s in [s_lo, s_hi] with 0 <= j < kv_len
        s_hi = torch.minimum(torch.full_like(r, self.window - 1), torch.floor(r / d))
        lo_s = -self.window + 1 if not self.causal else 0
        s_lo = torch.maximum(torch.full_like(r, lo_s), torch.ceil((r - (kv_len - 1)) / d))
        return float((s_hi - s_lo + 1).clamp(min=0).sum())

    def query_order(self, q_len, q_offset=0):
        return _residue_order(q_len, q_offset, self.dilation)

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer's strided part: keys whose distance is a multiple of ``stride`` (all the way back).

    Usually combined with a local window: ``SlidingWindow(s) | Strided(s)``.
    """

    stride: int
    causal: bool = True

    def __post_init__(self):
        positive_int("stride", self.stride)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        on_grid = torch.remainder(d, self.stride) == 0
        return on_grid & (d >= 0) if self.causal else on_grid

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        for i in range(q_len):
            p = q_offset + i
            start = p % self.stride
            stop = p + 1 if self.causal else kv_len
            m[i, start : min(stop, kv_len) : self.stride] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        s = self.stride
        res = torch.remainder(r, s)
        top = torch.minimum(r, torch.full_like(r, kv_len - 1)) if self.causal else torch.full_like(r, kv_len - 1)
        n = torch.floor((top - res) / s) + 1
        return float(n.clamp(min=0).sum())

    def query_order(self, q_len, q_offset=0):
        return _residue_order(q_len, q_offset, self.stride)

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class Chunked(Pattern):
    """Block-local attention: a query sees keys of its own chunk of ``chunk`` tokens (causal inside if set)."""

    chunk: int
    causal: bool = False

    def __post_init__(self):
        positive_int("chunk", self.chunk)

    def mask_mod(self, b, h, q_idx, kv_idx):
        same = (q_idx // self.chunk) == (kv_idx // self.chunk)
        return same & (kv_idx <= q_idx) if self.causal else same

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        for i in range(q_len):
            p = q_offset + i
            lo = (p // self.chunk) * self.chunk
            hi = p + 1 if self.causal else lo + self.chunk
            m[i, lo : min(hi, kv_len)] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        lo = torch.floor(r / self.chunk) * self.chunk
        hi = r if self.causal else lo + self.chunk - 1
        return _span_count(lo, hi, kv_len)

    @property
    def is_causal(self) -> bool:
        return self.causal
