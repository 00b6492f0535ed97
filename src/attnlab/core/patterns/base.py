"""The Pattern abstraction: which keys each query may see.

A pattern is a frozen dataclass (hashable by value, so it keys caches) with three views of one rule:

* ``mask_mod(b, h, q_idx, kv_idx)`` -- FlexAttention's mask function, written with tensor ops only so it
  runs under ``vmap`` and broadcasts over index grids. Positions are *absolute*: query ``i`` of a call
  sits at ``q_offset + i`` (bottom-right alignment, so decoding with a cache needs no special case).
* ``dense(q_len, kv_len, q_offset)`` -- a boolean ``(heads or 1, q_len, kv_len)`` tensor built by an
  independent construction (loops over windows, index arithmetic in numpy), so the two can check each other.
* ``count(q_len, kv_len, q_offset)`` -- the number of allowed pairs summed over heads and divided by the
  number of heads, from a formula, for FLOP accounting; ``density`` divides it by ``q_len * kv_len``.

Patterns compose with ``&`` and ``|``; ``PerHead([...])`` gives each head its own pattern. A pattern may
also say in which order queries are grouped for the block-sparse engine (``query_order``), so that a
group's queries share their keys (2-D tiles for neighborhood attention, residues for dilated patterns).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor


class Pattern:
    """Base class. Subclasses are ``@dataclass(frozen=True)`` and implement ``mask_mod`` and ``_dense``."""

    #: None: the same rule for every head; an int: a per-head pattern over that many heads.
    num_heads: int | None = None
    #: None: any length; an int: the pattern is built for this sequence length (grids, document ids).
    seq_len: int | None = None

    # ---- the three views -------------------------------------------------------------------------
    def mask_mod(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define mask_mod")

    def _dense(self, q_len: int, kv_len: int, q_offset: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define _dense")

    def dense(self, q_len: int, kv_len: int, q_offset: int = 0) -> Tensor:
        """Boolean ``(Hp, q_len, kv_len)`` with ``Hp = num_heads or 1``; True where a key is allowed."""
        self.check_lengths(q_len, kv_len, q_offset)
        m = self._dense(q_len, kv_len, q_offset)
        return m if m.dim() == 3 else m.unsqueeze(0)

    def count(self, q_len: int, kv_len: int, q_offset: int = 0) -> float:
        """Allowed pairs, averaged over heads. Subclasses override with a formula; this fallback counts."""
        return float(self.dense(q_len, kv_len, q_offset).sum(dtype=torch.float64)) / (self.num_heads or 1)

    def density(self, q_len: int, kv_len: int | None = None, q_offset: int = 0) -> float:
        kv_len = q_len if kv_len is None else kv_len
        return self.count(q_len, kv_len, q_offset) / (q_len * kv_len)

    # ---- helpers the engines use -----------------------------------------------------------------
    def check_lengths(self, q_len: int, kv_len: int, q_offset: int = 0) -> None:
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"empty sequence: q_len={q_len}, kv_len={kv_len}")
        if q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        if self.seq_len is not None and (kv_len != self.seq_len or q_offset + q_len > self.seq_len):
            raise ValueError(
                f"pattern {self!r} was built for sequence length {self.seq_len}, "
                f"but got kv_len={kv_len}, q positions {q_offset}..{q_offset + q_len - 1}"
            )

    def check_heads(self, heads: int) -> None:
        if self.num_heads is not None and self.num_heads != heads:
            raise ValueError(f"per-head pattern has {self.num_heads} heads, but the call has {heads} query heads")

    def eval_mask(self, q_pos: Tensor, kv_pos: Tensor, heads: Tensor | None = None) -> Tensor:
        """Evaluate ``mask_mod`` on broadcastable absolute index tensors (heads default: all of them)."""
        if heads is None:
            heads = torch.arange(self.num_heads or 1, device=q_pos.device)
            heads = heads.view(-1, *([1] * max(q_pos.dim(), kv_pos.dim())))
        zero = torch.zeros((), dtype=torch.long, device=q_pos.device)
        out = self.mask_mod(zero, heads, q_pos, kv_pos)
        return out.expand(torch.broadcast_shapes(out.shape, heads.shape, q_pos.shape, kv_pos.shape))

    def query_order(self, q_len: int, q_offset: int = 0) -> Tensor | None:
        """Optional permutation of query rows that makes groups of consecutive rows share keys."""
        return None

    @property
    def is_full(self) -> bool:
        return False

    @property
    def is_causal(self) -> bool:
        return False

    # ---- composition -----------------------------------------------------------------------------
    def __and__(self, other: Pattern) -> Pattern:
        return And((self, other))

    def __or__(self, other: Pattern) -> Pattern:
        return Or((self, other))


def _common(parts: tuple[Pattern, ...], attr: str) -> int | None:
    vals = {getattr(p, attr) for p in parts} - {None}
    if len(vals) > 1:
        raise ValueError(f"cannot combine patterns with different {attr}: {sorted(vals)}")
    return vals.pop() if vals else None


class _Combine(Pattern):
    """Shared body of And / Or: a tuple of parts folded with one boolean operator."""

    parts: tuple[Pattern, ...]
    _op = staticmethod(torch.logical_and)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{type(self).__name__} needs at least one pattern")
        object.__setattr__(self, "num_heads", _common(self.parts, "num_heads"))
        object.__setattr__(self, "seq_len", _common(self.parts, "seq_len"))

    def mask_mod(self, b, h, q_idx, kv_idx):
        return reduce(self._op, (p.mask_mod(b, h, q_idx, kv_idx) for p in self.parts))

    def _dense(self, q_len, kv_len, q_offset):
        return reduce(self._op, (p.dense(q_len, kv_len, q_offset) for p in self.parts))

    def count(self, q_len, kv_len, q_offset=0):
        return Pattern.count(self, q_len, kv_len, q_offset)

    def query_order(self, q_len, q_offset=0):
        orders = [p.query_order(q_len, q_offset) for p in self.parts]
        return next((o for o in orders if o is not None), None)


@dataclass(frozen=True)
class And(_Combine):
    """Intersection: a key is allowed when every part allows it."""

    parts: tuple[Pattern, ...]
    _op = staticmethod(torch.logical_and)

    @property
    def is_causal(self) -> bool:
        return any(p.is_causal for p in self.parts)

    def __and__(self, other):
        return And(self.parts + (other,))


@dataclass(frozen=True)
class Or(_Combine):
    """Union: a key is allowed when any part allows it."""

    parts: tuple[Pattern, ...]
    _op = staticmethod(torch.logical_or)

    @property
    def is_full(self) -> bool:
        return any(p.is_full for p in self.parts)

    @property
    def is_causal(self) -> bool:
        return all(p.is_causal for p in self.parts)

    def __or__(self, other):
        return Or(self.parts + (other,))


@dataclass(frozen=True)
class PerHead(Pattern):
    """Head ``h`` uses ``patterns[h]`` (S2-Attention shards, per-head windows of MoA / DuoAttention plans)."""

    patterns: tuple[Pattern, ...]

    def __post_init__(self) -> None:
        pats = tuple(self.patterns)
        if not pats:
            raise ValueError("PerHead needs one pattern per head, got none")
        if any(p.num_heads is not None for p in pats):
            raise ValueError("PerHead entries must be head-uniform patterns")
        object.__setattr__(self, "patterns", pats)
        object.__setattr__(self, "num_heads", len(pats))
        object.__setattr__(self, "seq_len", _common(pats, "seq_len"))

    def mask_mod(self, b, h, q_idx, kv_idx):
        out = None
        for i, p in enumerate(self.patterns):
            term = (h == i) & p.mask_mod(b, h, q_idx, kv_idx)
            out = term if out is None else out | term
        return out

    def _dense(self, q_len, kv_len, q_offset):
        return torch.cat([p.dense(q_len, kv_len, q_offset) for p in self.patterns], dim=0)

    def count(self, q_len, kv_len, q_offset=0):
        return sum(p.count(q_len, kv_len, q_offset) for p in self.patterns) / len(self.patterns)

    @property
    def is_causal(self) -> bool:
        return all(p.is_causal for p in self.patterns)
