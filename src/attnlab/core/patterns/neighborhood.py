"""Neighborhood attention on 1-D, 2-D and 3-D token grids (NAT P101, DiNAT dilation, GNA P50 stride, P52).

Tokens are a row-major flattened grid of shape ``grid`` (the last axis varies fastest), so position
``p`` of a ``(H, W)`` grid is the pixel ``(p // W, p % W)``. Every grid pattern here is a *product over
axes*: a key is allowed when each axis allows its coordinate pair. ``GridPattern`` implements the
three views once from three per-axis pieces:

* ``_axis_mask(a, qi, kj)``  -- tensor rule on coordinates (``mask_mod``),
* ``_axis_table(a)``         -- an ``(L, L)`` boolean table built with explicit loops (``dense``),
* ``_axis_sizes(a)``         -- keys allowed per query coordinate, by formula (``count``),

and a ``query_order`` from per-axis sort keys. Grid patterns are built for one length
(``seq_len = prod(grid)``); calls with another key length raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor

from ..checks import int_tuple
from .base import Pattern


def as_grid(grid: int | tuple[int, ...]) -> tuple[int, ...]:
    """Validate a grid shape: an int (1-D) or a tuple of positive ints."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    try:
        grid = tuple(grid)
    except TypeError:
        raise ValueError(f"grid must be an int or a tuple of positive ints, got {grid!r}") from None
    if not grid:
        raise ValueError("grid must have at least one axis")
    return int_tuple("grid", grid, len(grid))


def as_bools(name: str, value: bool | tuple[bool, ...], ndim: int) -> tuple[bool, ...]:
    vals = (value,) * ndim if isinstance(value, bool) else tuple(value)
    if len(vals) != ndim or not all(isinstance(v, bool) for v in vals):
        raise ValueError(f"{name} must be a bool or {ndim} bools (one per axis), got {value!r}")
    return vals


def morton_key(coords: list[Tensor], bits: int) -> Tensor:
    """Interleave the bits of per-axis coordinates (Z-order); axis 0 takes the highest bit of each level.

    Any aligned run of ``2**m`` consecutive keys is then a near-square tile of the grid (8x8 for 64,
    8x16 for 128, 16x16 for 256 in 2-D), which is what the block-sparse engine's query groups want.
    """
    n = len(coords)
    key = torch.zeros_like(coords[0])
    for b in range(bits):
        for a, c in enumerate(coords):
            key |= ((c >> b) & 1) << (b * n + (n - 1 - a))
    return key


@dataclass(frozen=True)
class GridPattern(Pattern):
    """Base of the grid patterns: a product of per-axis rules over a row-major flattened grid."""

    grid: tuple[int, ...]

    def _init_grid(self) -> None:
        object.__setattr__(self, "grid", as_grid(self.grid))
        object.__setattr__(self, "seq_len", math.prod(self.grid))

    @property
    def ndim(self) -> int:
        return len(self.grid)

    def coords(self, idx: Tensor) -> list[Tensor]:
        """Per-axis coordinates of flattened positions (row-major), each shaped like ``idx``."""
        out = []
        rem = idx
        for L in reversed(self.grid):
            out.append(rem % L)
            rem = rem // L
        return out[::-1]

    # ---- per-axis pieces, defined by subclasses ----------------------------------------------------
    def _axis_mask(self, a: int, qi: Tensor, kj: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _axis_table(self, a: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _axis_sizes(self, a: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _axis_order(self, a: int, c: Tensor) -> tuple[Tensor, Tensor]:
        """(major, minor) sort keys: queries with equal majors on every axis should share keys."""
        return torch.zeros_like(c), c

    # ---- the three views -----------------------------------------------------------------------
    def mask_mod(self, b, h, q_idx, kv_idx):
        qc, kc = self.coords(q_idx), self.coords(kv_idx)
        return reduce(torch.logical_and, (self._axis_mask(a, qc[a], kc[a]) for a in range(self.ndim)))

    def _dense(self, q_len, kv_len, q_offset):
        m = self._axis_table(0)
        for a in range(1, self.ndim):
            t = self._axis_table(a)
            n, L = m.shape[0], t.shape[0]
            m = (m[:, None, :, None] & t[None, :, None, :]).reshape(n * L, n * L)
        return m[q_offset : q_offset + q_len, :kv_len]

    def count(self, q_len, kv_len, q_offset=0):
        self.check_lengths(q_len, kv_len, q_offset)
        rows = torch.arange(q_offset, q_offset + q_len)
        per_row = torch.ones(q_len, dtype=torch.float64)
        for a, c in enumerate(self.coords(rows)):
            per_row = per_row * self._axis_sizes(a).to(torch.float64)[c]
        return float(per_row.sum())

    def query_order(self, q_len, q_offset=0):
        pos = torch.arange(q_offset, q_offset + q_len)
        keys = [self._axis_order(a, c) for a, c in enumerate(self.coords(pos))]
        # lexicographic: every axis' major key first, then the minors (stable sorts, least significant first)
        order = torch.arange(q_len)
        for k in [m for _, m in reversed(keys)] + [M for M, _ in reversed(keys)]:
            order = order[torch.sort(k[order], stable=True).indices]
        return order


@dataclass(frozen=True)
class Neighborhood(GridPattern):
    """Neighborhood attention (NA / DiNA / GNA) on a row-major flattened grid.

    Args:
        grid: grid shape, e.g. ``(96, 96)``; ``seq_len = prod(grid)``.
        kernel_size: keys per axis (int or per-axis tuple; odd or even).
        dilation: per axis, split the axis into ``dilation`` interleaved groups (positions with equal
            ``i % dilation``); the window lives inside the query's group, with neighbours ``dilation`` apart.
        stride: GNA stride; per axis, consecutive runs of ``stride`` queries (in group coordinates) share
            the window of their leader (the centre of the run, or its last query on a causal axis).
            ``stride == kernel_size`` is blocked (window) attention.
        causal: per axis; a causal axis allows keys at or before the query, the window being the
            ``kernel_size`` positions ending at the leader (the query itself when ``stride == 1``).

    Window on a non-causal axis, in group coordinates (``ii = i // d`` inside a group of length ``Lg``):
    ``start = clamp(leader - k//2, 0, Lg - k)``, keys ``start .. start + k - 1``: centred, shifted at the
    borders so every query sees exactly ``k`` positions when ``Lg >= k`` (the whole group otherwise).
    An even ``k`` follows NATTEN: ``k/2`` keys before the leader and ``k/2 - 1`` after it, i.e.
    ``leader - k/2 .. leader + k/2 - 1`` in the interior (the same ``start`` formula covers both parities).
    """

    grid: tuple[int, ...]
    kernel_size: int | tuple[int, ...] = 3
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False

    def __post_init__(self):
        self._init_grid()
        n = self.ndim
        k = int_tuple("kernel_size", self.kernel_size, n)
        d = int_tuple("dilation", self.dilation, n)
        s = int_tuple("stride", self.stride, n)
        c = as_bools("causal", self.causal, n)
        for a in range(n):
            if s[a] > k[a]:
                raise ValueError(f"stride[{a}] must be <= kernel_size[{a}] (GNA), got {s[a]} > {k[a]}")
        for name, v in (("kernel_size", k), ("dilation", d), ("stride", s), ("causal", c)):
            object.__setattr__(self, name, v)

    # group length along axis a for the group of coordinate residue g (tensor or int)
    def _group_len(self, a, g):
        L, d = self.grid[a], self.dilation[a]
        return (L - g + d - 1) // d

    def _axis_mask(self, a, qi, kj):
        k, d, s = self.kernel_size[a], self.dilation[a], self.stride[a]
        if d == 1:  # same rule with the group terms folded into constants: fewer full-size ops for plans
            L = self.grid[a]
            if self.causal[a]:
                lead = qi if s == 1 else torch.clamp((qi // s) * s + s - 1, max=L - 1)
                return (kj <= qi) & (kj > lead - k)
            lead = qi if s == 1 else torch.clamp((qi // s) * s + s // 2, max=L - 1)
            start = torch.clamp(lead - k // 2, min=0, max=max(L - k, 0))
            return (kj >= start) & (kj < start + k)
        g = qi % d
        same = g == kj % d
        ii, jj = qi // d, kj // d
        last = self._group_len(a, g) - 1
        if self.causal[a]:
            lead = torch.minimum((ii // s) * s + s - 1, last)
            return same & (jj <= ii) & (jj > lead - k)
        lead = torch.minimum((ii // s) * s + s // 2, last)
        start = torch.clamp(torch.minimum(lead - k // 2, last + 1 - k), min=0)
        return same & (jj >= start) & (jj < start + k)

    def _axis_table(self, a):
        L, k, d, s = self.grid[a], self.kernel_size[a], self.dilation[a], self.stride[a]
        t = torch.zeros(L, L, dtype=torch.bool)
        for g in range(d):
            members = list(range(g, L, d))
            n = len(members)
            for ii, pos in enumerate(members):
                first = (ii // s) * s
                if self.causal[a]:
                    lead = min(first + s - 1, n - 1)
                    window = [m for m in members[max(0, lead - k + 1) : lead + 1] if m <= pos]
                else:
                    # neighbours before / after the leader: (k-1)/2 each when odd, k/2 and k/2 - 1 when even
                    before, after = k // 2, (k - 1) // 2
                    lead = min(first + s // 2, n - 1)
                    if n <= k:
                        window = members
                    elif lead - before < 0:
                        window = members[:k]
                    elif lead + after >= n:
                        window = members[n - k :]
                    else:
                        window = members[lead - before : lead + after + 1]
                t[pos, window] = True
        return t

    def _axis_sizes(self, a):
        L, k, d, s = self.grid[a], self.kernel_size[a], self.dilation[a], self.stride[a]
        i = torch.arange(L)
        glen = self._group_len(a, i % d)
        if not self.causal[a]:
            return torch.clamp(glen, max=k)
        ii = i // d
        lead = torch.minimum((ii // s) * s + s - 1, glen - 1)
        return ii - torch.clamp(lead - k + 1, min=0) + 1

    def query_order(self, q_len, q_offset=0):
        """Residue groups of the dilation first, then Z-order over group coordinates (near-square tiles)."""
        pos = torch.arange(q_offset, q_offset + q_len)
        coords = self.coords(pos)
        residue = torch.zeros_like(pos)
        for c, d in zip(coords, self.dilation):
            residue = residue * d + c % d
        gc = [c // d for c, d in zip(coords, self.dilation)]
        bits = max(1, max(math.ceil(L / d) for L, d in zip(self.grid, self.dilation)).bit_length())
        key = residue * (1 << (bits * self.ndim)) + morton_key(gc, bits)
        return torch.argsort(key)


__all__ = ["GridPattern", "Neighborhood", "as_grid", "morton_key"]
