"""The sparse-engine interface: a :class:`BlockLayout` says which key blocks each query block visits.

In the spirit of FlexAttention's ``BlockMask``: per (batch or 1, head or 1, query block) a list of key blocks,
split into *full* blocks (every pair allowed: no mask work) and *partial* blocks (an exact per-element mask).
Static patterns and dynamic selections are both planned into this one form; an engine (the native CPU kernel,
the Python tile engine, FlexAttention on GPU) executes it and returns the output and its log-sum-exp.

Fields (``Bp`` is 1 or batch, ``Hp`` is 1 or the number of *query* heads; grouped-query attention: query head
``h`` reads key/value head ``h // (Hq // Hkv)``; K/V are never repeated):

* ``q_block``, ``k_block``: query rows per query block, keys per key block.
* ``q_len``, ``kv_len``: lengths of this call; ``q_offset``: absolute position of query row 0 (key ``j`` sits at
  absolute position ``j``). Rows ``>= q_len`` and keys ``>= kv_len`` of a last, short block do not exist.
* ``kv_index``: ``(Bp, Hp, Gq, N)`` int32 key-block ids visited by query block ``g`` (``Gq = ceil(q_len /
  q_block)``), in increasing order; entries at ``n >= kv_count`` are padding.
* ``kv_count``: ``(Bp, Hp, Gq)`` int32.
* ``full``: ``(Bp, Hp, Gq, N)`` bool, True where every (query, key) pair of the block pair is allowed.
* ``bits``: ``(Bp, Hp, Gq, N, q_block, k_block)`` bool or None: the exact mask of every listed block pair
  (True = allowed; rows/keys out of range are False). None only when every listed block is full.
* ``pairs``: allowed (query, key) pairs per (batch, head), averaged, for FLOP accounting.

A query row that sees no key gets zero output, log-sum-exp ``-inf`` and zero gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class BlockLayout:
    q_block: int
    k_block: int
    q_len: int
    kv_len: int
    q_offset: int
    kv_index: Tensor
    kv_count: Tensor
    full: Tensor
    bits: Tensor | None
    pairs: float

    @property
    def num_q_blocks(self) -> int:
        return self.kv_index.shape[2]

    @property
    def num_k_blocks(self) -> int:
        return -(-self.kv_len // self.k_block)

    @property
    def computed_pairs(self) -> int:
        """Pairs an engine computes per (batch, head): every listed block pair in full."""
        n = self.kv_count.sum().item() / (self.kv_count.shape[0] * self.kv_count.shape[1])
        return int(n * self.q_block * self.k_block)

    @classmethod
    def from_dense(cls, mask: Tensor, q_block: int, k_block: int, q_offset: int = 0) -> BlockLayout:
        """The layout of a dense boolean mask ``(Bp, Hp, Tq, Tk)`` (True = may attend), built directly from it.

        Lists, per query block, every key block holding at least one allowed pair; a block is ``full`` when
        every existing pair of it is allowed. Meant for tests and small shapes (it materializes the mask).
        """
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a bool (Bp, Hp, Tq, Tk) tensor, got {mask.dtype} {tuple(mask.shape)}")
        if q_block < 1 or k_block < 1:
            raise ValueError(f"q_block and k_block must be positive, got {q_block}, {k_block}")
        Bp, Hp, Tq, Tk = mask.shape
        Gq, Nk = -(-Tq // q_block), -(-Tk // k_block)
        dev = mask.device

        def tiled(x: Tensor) -> Tensor:  # (Bp, Hp, Tq, Tk) -> (Bp, Hp, Gq, Nk, q_block, k_block), zero-padded
            pad = torch.zeros(Bp, Hp, Gq * q_block, Nk * k_block, dtype=torch.bool, device=dev)
            pad[..., :Tq, :Tk] = x
            return pad.view(Bp, Hp, Gq, q_block, Nk, k_block).permute(0, 1, 2, 4, 3, 5)

        tiles = tiled(mask)
        exists = tiled(torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=dev).expand(Bp, Hp, Tq, Tk))
        listed = tiles.any(-1).any(-1)  # (Bp, Hp, Gq, Nk)
        full = (tiles | ~exists).all(-1).all(-1) & listed
        count = listed.sum(-1)
        N = max(1, int(count.max()))
        # a stable descending sort of the 0/1 flags puts the listed block ids first, in increasing order
        idx = torch.sort(listed.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :N]
        used = torch.arange(N, device=dev) < count.unsqueeze(-1)
        idx = torch.where(used, idx, torch.zeros_like(idx))
        full_l = torch.gather(full, -1, idx) & used
        bits = None
        if not bool((full_l | ~used).all()):
            gidx = idx.view(Bp, Hp, Gq, N, 1, 1).expand(Bp, Hp, Gq, N, q_block, k_block)
            bits = torch.gather(tiles, 3, gidx) & used.view(Bp, Hp, Gq, N, 1, 1)
        pairs = float(mask.sum(dtype=torch.float64)) / (Bp * Hp)
        return cls(q_block, k_block, Tq, Tk, q_offset, idx.to(torch.int32), count.to(torch.int32), full_l, bits,
                   pairs)

    def to_dense(self) -> Tensor:
        """The dense boolean ``(Bp, Hp, q_len, kv_len)`` mask this layout allows (for tests and references)."""
        Bp, Hp, Gq, N = self.kv_index.shape
        qb, kb = self.q_block, self.k_block
        Nk = self.num_k_blocks
        dev = self.kv_index.device
        used = torch.arange(N, device=dev) < self.kv_count.long().unsqueeze(-1)
        if self.bits is None:
            blk = torch.ones(Bp, Hp, Gq, N, qb, kb, dtype=torch.bool, device=dev)
        else:
            blk = self.bits | self.full.view(Bp, Hp, Gq, N, 1, 1)
        blk = blk & used.view(Bp, Hp, Gq, N, 1, 1)
        dense = torch.zeros(Bp, Hp, Gq, Nk, qb, kb, dtype=torch.bool, device=dev)
        idx = self.kv_index.long().clamp(0, Nk - 1).view(Bp, Hp, Gq, N, 1, 1).expand_as(blk)
        dense.scatter_reduce_(3, idx, blk, "amax")
        dense = dense.permute(0, 1, 2, 4, 3, 5).reshape(Bp, Hp, Gq * qb, Nk * kb)
        return dense[..., : self.q_len, : self.kv_len].contiguous()


__all__ = ["BlockLayout"]
