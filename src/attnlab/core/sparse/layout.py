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


__all__ = ["BlockLayout"]
