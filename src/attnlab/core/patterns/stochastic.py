"""Stochastic subsampled attention (SSA) for training: a seeded random subset of key blocks per query."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import nonneg_int, positive_int
from .base import Pattern
from .basic import _rows

_M32 = 0xFFFFFFFF


def block_hash(seed, qb, kb):
    """A 32-bit integer hash of (seed, query block, key block); works on Python ints and int64 tensors.

    Only ``* + ^ >> &`` on non-negative values below 2**62, so Python ints, int64 tensors (eager, vmap,
    broadcasting) and any device give the same bits.
    """
    x = (qb * 0x9E3779B1 + kb * 0x85EBCA77 + seed * 0xC2B2AE3D + 0x165667B1) & _M32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & _M32
    return x ^ (x >> 16)


@dataclass(frozen=True)
class Stochastic(Pattern):
    """Each query block keeps each key block with probability ``keep``, fixed by ``seed``.

    Positions are cut into blocks of ``block`` tokens; block pair ``(qb, kb)`` is kept when
    ``block_hash(seed, qb, kb) < keep * 2**32`` -- a deterministic pseudo-random draw, so ``mask_mod``,
    ``dense`` and every engine agree, and a new ``seed`` (e.g. the training step) draws a new pattern.
    The ``local_blocks`` nearest blocks are always kept (causal: ``qb - local_blocks < kb <= qb``;
    two-sided ``|qb - kb| < local_blocks``), so no row is empty. Causal (default) adds ``j <= p``.
    Expected density ~ ``keep`` (causal: of the causal triangle) plus the local part.
    ``count`` evaluates the hash once per (query block, key block) pair, not per token pair.
    """

    keep: float
    block: int = 16
    seed: int = 0
    local_blocks: int = 1
    causal: bool = True

    def __post_init__(self):
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep must be a number in (0, 1], got {self.keep!r}")
        positive_int("block", self.block)
        nonneg_int("seed", self.seed)
        if self.seed >= 1 << 31:
            raise ValueError(f"seed must be < 2**31, got {self.seed}")
        positive_int("local_blocks", self.local_blocks)

    @property
    def threshold(self) -> int:
        return int(round(self.keep * (1 << 32)))

    def _kept(self, qb, kb):
        return block_hash(self.seed, qb, kb) < self.threshold

    def mask_mod(self, b, h, q_idx, kv_idx):
        qb = q_idx.to(torch.int64) // self.block
        kb = kv_idx.to(torch.int64) // self.block
        d = qb - kb
        if self.causal:
            return (kv_idx <= q_idx) & ((d < self.local_blocks) | self._kept(qb, kb))
        return (torch.abs(d) < self.local_blocks) | self._kept(qb, kb)

    def _dense(self, q_len, kv_len, q_offset):
        B = self.block
        nq = -(-(q_offset + q_len) // B)
        nk = -(-kv_len // B)
        blocks = torch.zeros(nq, nk, dtype=torch.bool)
        for qb in range(nq):
            for kb in range(nk):
                near = qb - self.local_blocks < kb <= qb if self.causal else abs(qb - kb) < self.local_blocks
                blocks[qb, kb] = near or block_hash(self.seed, qb, kb) < self.threshold
        m = blocks.repeat_interleave(B, 0).repeat_interleave(B, 1)[q_offset : q_offset + q_len, :kv_len]
        if self.causal:
            m &= torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=q_offset)
        return m

    def count(self, q_len, kv_len, q_offset=0):
        B = self.block
        r = _rows(q_len, q_offset).to(torch.int64)
        qb = r // B
        ub = torch.unique(qb)  # the query blocks of this call
        kb = torch.arange(-(-kv_len // B))
        size = (torch.clamp((kb + 1) * B, max=kv_len) - kb * B).to(torch.float64)  # tokens per key block
        d = ub[:, None] - kb[None, :]
        near = ((d >= 0) & (d < self.local_blocks)) if self.causal else (d.abs() < self.local_blocks)
        kept = near | self._kept(ub[:, None], kb[None, :])
        if not self.causal:
            per_block = (kept * size).sum(-1)
            return float(per_block[torch.searchsorted(ub, qb)].sum())
        # causal: blocks before the query's own block count in full; the own block up to the query
        before = (kept & (d > 0)) * size
        per_block = before.sum(-1)[torch.searchsorted(ub, qb)]
        own = (torch.clamp(r, max=kv_len - 1) - qb * B + 1).clamp(min=0)
        return float((per_block + own).sum())

    @property
    def is_causal(self) -> bool:
        return self.causal


__all__ = ["Stochastic", "block_hash"]
