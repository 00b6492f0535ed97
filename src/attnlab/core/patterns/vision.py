"""Blocked vision patterns on 2-D (or any-rank) grids: HaloNet (P57) and MaxViT block / grid attention (P71).

All three are products over axes (see ``neighborhood.GridPattern``): the grid is row-major flattened and
``seq_len = prod(grid)``. Queries that share a key set exactly (a block, or a residue class of the grid
attention) are made consecutive by ``query_order``, so block-sparse groups waste nothing inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import int_tuple
from .neighborhood import GridPattern


@dataclass(frozen=True)
class HaloBlocks(GridPattern):
    """HaloNet blocked local attention (P57): query blocks of ``block`` per axis read the block plus a halo.

    A query in block ``c = i // block`` sees keys ``c*block - halo .. (c+1)*block + halo - 1`` on every
    axis, clipped to the grid. HaloNet pads the image with zeros and lets queries attend the padding;
    here padded positions simply do not exist (masked), so border blocks see fewer keys. A last partial
    block (axis length not a multiple of ``block``) is allowed.
    Keys per interior query: ``prod(block + 2*halo)``.
    """

    grid: tuple[int, ...]
    block: int | tuple[int, ...] = 8
    halo: int | tuple[int, ...] = 1

    def __post_init__(self):
        self._init_grid()
        object.__setattr__(self, "block", int_tuple("block", self.block, self.ndim))
        object.__setattr__(self, "halo", int_tuple("halo", self.halo, self.ndim, allow_zero=True))

    def _axis_mask(self, a, qi, kj):
        b, h = self.block[a], self.halo[a]
        lo = (qi // b) * b - h
        return (kj >= lo) & (kj < lo + b + 2 * h)

    def _axis_table(self, a):
        L, b, h = self.grid[a], self.block[a], self.halo[a]
        t = torch.zeros(L, L, dtype=torch.bool)
        for s in range(0, L, b):
            t[s : s + b, max(0, s - h) : s + b + h] = True
        return t

    def _axis_sizes(self, a):
        L, b, h = self.grid[a], self.block[a], self.halo[a]
        lo = (torch.arange(L) // b) * b
        return torch.clamp(lo + b + h, max=L) - torch.clamp(lo - h, min=0)

    def _axis_order(self, a, c):
        return c // self.block[a], c % self.block[a]


@dataclass(frozen=True)
class MaxViTBlock(GridPattern):
    """MaxViT block attention (P71): non-overlapping ``window`` x ``window`` windows (Swin-style, unshifted).

    A query sees the keys of its own window. MaxViT requires the grid to be a multiple of the window;
    here a last partial window is allowed. Keys per query: ``prod(window)`` for full windows.
    """

    grid: tuple[int, ...]
    window: int | tuple[int, ...] = 7

    def __post_init__(self):
        self._init_grid()
        object.__setattr__(self, "window", int_tuple("window", self.window, self.ndim))

    def _axis_mask(self, a, qi, kj):
        w = self.window[a]
        return qi // w == kj // w

    def _axis_table(self, a):
        L, w = self.grid[a], self.window[a]
        t = torch.zeros(L, L, dtype=torch.bool)
        for s in range(0, L, w):
            t[s : s + w, s : s + w] = True
        return t

    def _axis_sizes(self, a):
        L, w = self.grid[a], self.window[a]
        lo = (torch.arange(L) // w) * w
        return torch.clamp(lo + w, max=L) - lo

    def _axis_order(self, a, c):
        return c // self.window[a], c % self.window[a]


@dataclass(frozen=True)
class MaxViTGrid(GridPattern):
    """MaxViT grid attention (P71): a sparse, global ``grid_size`` x ``grid_size`` lattice per query.

    The axis of length ``L`` is viewed as ``(grid_size, L // grid_size)`` (MaxViT's grid partition), and
    attention mixes along the ``grid_size`` factor: a query at coordinate ``i`` sees the ``grid_size``
    keys ``j`` with ``j % (L // grid_size) == i % (L // grid_size)``, spaced ``L // grid_size`` apart
    (dilated global attention). ``L`` must be a multiple of ``grid_size``.
    Keys per query: ``prod(grid_size)``.
    """

    grid: tuple[int, ...]
    grid_size: int | tuple[int, ...] = 7

    def __post_init__(self):
        self._init_grid()
        g = int_tuple("grid_size", self.grid_size, self.ndim)
        for a, (L, n) in enumerate(zip(self.grid, g)):
            if L % n:
                raise ValueError(f"grid_size[{a}]={n} must divide grid[{a}]={L}")
        object.__setattr__(self, "grid_size", g)

    def _step(self, a: int) -> int:
        return self.grid[a] // self.grid_size[a]

    def _axis_mask(self, a, qi, kj):
        s = self._step(a)
        return qi % s == kj % s

    def _axis_table(self, a):
        L, s = self.grid[a], self._step(a)
        t = torch.zeros(L, L, dtype=torch.bool)
        for r in range(s):
            members = torch.arange(r, L, s)
            t[members[:, None], members[None, :]] = True
        return t

    def _axis_sizes(self, a):
        return torch.full((self.grid[a],), self.grid_size[a])

    def _axis_order(self, a, c):
        s = self._step(a)
        return c % s, c // s


__all__ = ["HaloBlocks", "MaxViTBlock", "MaxViTGrid"]
