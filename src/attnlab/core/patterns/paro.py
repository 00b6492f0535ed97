"""PAROAttention (paper P287): per-head token reordering into block patterns.

Visual attention heads attend along different axes of a ``(F, H, W)`` token grid (one frame's neighbours, one
pixel across frames, one row, ...). In the natural row-major order such a map is scattered stripes; reordering the
tokens so that the head's axis varies fastest turns it into near-diagonal blocks, which a block-sparse kernel
serves well. ``ParoBlocks`` is the resulting static per-head pattern:

* head ``h`` reorders tokens by the axis permutation ``orders[h]`` (first axis slowest, last fastest; ``(0, 1, 2)``
  is the natural row-major order), giving each token a rank ``r_h(p)``;
* a query at ``p`` may see a key at ``j`` when the block pair ``(r_h(p) // block, r_h(j) // block)`` is kept in
  ``keep[h]`` (a frozenset of block pairs).

The reordering is expressed in the mask (positions stay natural), so every engine runs it unchanged; an engine
that physically permuted tokens per head would compute the same thing. ``paro_calibrate`` chooses each head's
order and blocks offline from calibration queries and keys: for every permutation of the axes it sums the head's
softmax attention (float64, averaged over the batch) into block pairs, keeps the heaviest ``density`` fraction of
block pairs plus every diagonal block (so no row is empty), and takes the order whose kept blocks capture the most
attention mass (our reading of the paper's pattern-aware selection; the paper also quantizes blocks, not done here).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import positive_int
from .base import Pattern
from .neighborhood import as_grid


def _ranks(grid: tuple[int, ...], order: tuple[int, ...]) -> list[int]:
    """rank of each natural (row-major) position when the axes are nested as ``order`` (explicit loops)."""
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    ranks = [0] * math.prod(grid)
    for r, coords in enumerate(itertools.product(*(range(grid[a]) for a in order))):
        pos = sum(c * strides[a] for c, a in zip(coords, order))
        ranks[pos] = r
    return ranks


@dataclass(frozen=True)
class ParoBlocks(Pattern):
    """Per-head reordered block-sparse pattern on a row-major grid.

    Args:
        grid: token grid, e.g. ``(F, H, W)``; ``seq_len = prod(grid)``.
        orders: one axis permutation per head.
        block: tokens per block (in each head's order); the last block may be partial.
        keep: per head, the kept ``(query block, key block)`` pairs.
    """

    grid: tuple[int, ...]
    orders: tuple[tuple[int, ...], ...]
    block: int
    keep: tuple[frozenset, ...]

    def __post_init__(self) -> None:
        grid = as_grid(self.grid)
        positive_int("block", self.block)
        orders = tuple(tuple(o) for o in self.orders)
        if not orders:
            raise ValueError("orders must give one axis permutation per head, got none")
        for h, o in enumerate(orders):
            if sorted(o) != list(range(len(grid))):
                raise ValueError(f"orders[{h}] must be a permutation of the {len(grid)} grid axes, got {o!r}")
        keep = tuple(frozenset((int(a), int(b)) for a, b in kp) for kp in self.keep)
        if len(keep) != len(orders):
            raise ValueError(f"keep must have one set of block pairs per head ({len(orders)}), got {len(keep)}")
        nb = self.blocks
        for h, kp in enumerate(keep):
            bad = [p for p in kp if not (0 <= p[0] < nb and 0 <= p[1] < nb)]
            if bad:
                raise ValueError(f"keep[{h}] has block pairs outside 0..{nb - 1}: {sorted(bad)[:3]}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "num_heads", len(orders))
        object.__setattr__(self, "seq_len", math.prod(grid))

    @property
    def blocks(self) -> int:
        return -(-math.prod(as_grid(self.grid)) // self.block)

    def _tables(self, device) -> tuple[Tensor, Tensor]:
        """(H, n) block index of each natural position per head, (H, nb, nb) kept block pairs."""
        ranks = torch.tensor([_ranks(self.grid, o) for o in self.orders], device=device)
        kt = torch.zeros(len(self.orders), self.blocks, self.blocks, dtype=torch.bool, device=device)
        for h, kp in enumerate(self.keep):
            for a, b in kp:
                kt[h, a, b] = True
        return ranks // self.block, kt

    def mask_mod(self, b, h, q_idx, kv_idx):
        blk, kt = self._tables(q_idx.device)
        return kt[h, blk[h, q_idx], blk[h, kv_idx]]

    def _dense(self, q_len, kv_len, q_offset):
        n = self.seq_len
        out = torch.zeros(len(self.orders), n, n, dtype=torch.bool)
        for h, (order, kp) in enumerate(zip(self.orders, self.keep)):
            members: dict[int, list[int]] = {}
            for pos, r in enumerate(_ranks(self.grid, order)):
                members.setdefault(r // self.block, []).append(pos)
            for a, bk in kp:
                rows = torch.tensor(members[a])
                out[h, rows[:, None], torch.tensor(members[bk])[None, :]] = True
        return out[:, q_offset : q_offset + q_len, :kv_len]


def paro_calibrate(q: Tensor, k: Tensor, grid: tuple[int, ...], *, block: int, density: float,
                   scale: float | None = None) -> tuple[ParoBlocks, Tensor]:
    """Choose each head's axis order and kept blocks from calibration q (B, H, n, D), k (B, Hkv, n, D).

    Returns the pattern and the captured attention mass per head (H,) float64 (mean over rows of the kept share of
    each row's softmax weights). ``density``: the fraction of block pairs kept (diagonal blocks always kept)."""
    grid = as_grid(grid)
    positive_int("block", block)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    B, H, n, D = q.shape
    if n != math.prod(grid) or k.shape[2] != n:
        raise ValueError(f"q and k must have prod(grid) = {math.prod(grid)} positions, got {n} and {k.shape[2]}")
    scale = D**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(H // k.shape[1], 1)
    w = torch.softmax(q.double() @ kk.transpose(-1, -2) * scale, -1).mean(0)  # (H, n, n)
    nb = -(-n // block)
    n_keep = max(nb, math.ceil(density * nb * nb))
    orders, keeps, mass = [], [], []
    for h in range(H):
        best = None
        for order in itertools.permutations(range(len(grid))):
            perm = torch.argsort(torch.tensor(_ranks(grid, order)))  # natural positions in reordered sequence
            wp = w[h][perm][:, perm]
            pad = nb * block - n
            sums = torch.nn.functional.pad(wp, (0, pad, 0, pad)).view(nb, block, nb, block).sum((1, 3))
            score = sums.clone()
            score.fill_diagonal_(float("inf"))
            top = torch.topk(score.flatten(), n_keep).indices
            kept = frozenset((int(i) // nb, int(i) % nb) for i in top)
            captured = float(sum(sums[a, b] for a, b in kept)) / n
            if best is None or captured > best[2] + 1e-12:
                best = (order, kept, captured)
        orders.append(best[0])
        keeps.append(best[1])
        mass.append(best[2])
    return ParoBlocks(grid, tuple(orders), block, tuple(keeps)), torch.tensor(mass, dtype=torch.float64)


__all__ = ["ParoBlocks", "paro_calibrate"]
