"""S2-Attention (P25): heterogeneous strided context shards per head, whose union is the full context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import positive_int
from .base import Pattern
from .basic import _rows


@dataclass(frozen=True)
class StridedShards(Pattern):
    """Head ``h`` sees the key blocks ``kb`` with ``kb % shards == h % shards``, plus a dense local window.

    Keys are cut into blocks of ``block`` tokens (``kb = j // block``). Every head also sees its
    ``local_blocks`` most recent blocks (query block ``qb``: ``qb - local_blocks < kb <= qb``; two-sided
    ``|qb - kb| < local_blocks`` when not causal). Causal (default): keys ``j <= p``. With
    ``shards <= num_heads`` (default ``shards = num_heads``) the shards of the heads partition the key
    blocks, so the union over heads is the whole (causal) context, as S2-Attention requires.
    Density of one head ~ ``1 / shards`` plus the local window.
    """

    block: int
    num_heads: int
    local_blocks: int = 1
    shards: int | None = None
    causal: bool = True

    def __post_init__(self):
        positive_int("block", self.block)
        positive_int("num_heads", self.num_heads)
        positive_int("local_blocks", self.local_blocks)
        shards = self.num_heads if self.shards is None else positive_int("shards", self.shards)
        if shards > self.num_heads:
            raise ValueError(
                f"shards ({shards}) must be <= num_heads ({self.num_heads}) "
                "so the union of the heads covers the context"
            )
        object.__setattr__(self, "shards", shards)

    def mask_mod(self, b, h, q_idx, kv_idx):
        qb, kb = q_idx // self.block, kv_idx // self.block
        shard = kb % self.shards == h % self.shards
        if self.causal:
            return (kv_idx <= q_idx) & (shard | (qb - kb < self.local_blocks))
        return shard | ((qb - kb < self.local_blocks) & (kb - qb < self.local_blocks))

    def _dense(self, q_len, kv_len, q_offset):
        out = torch.zeros(self.num_heads, q_len, kv_len, dtype=torch.bool)
        nblocks = -(-max(kv_len, q_offset + q_len) // self.block)
        for h in range(self.num_heads):
            mine = list(range(h % self.shards, nblocks, self.shards))
            for i in range(q_len):
                p = q_offset + i
                qb = p // self.block
                near = range(qb - self.local_blocks + 1, qb + (1 if self.causal else self.local_blocks))
                for kb in set(mine) | {x for x in near if x >= 0}:
                    out[h, i, kb * self.block : (kb + 1) * self.block] = True
        if self.causal:
            out &= torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=q_offset)
        return out

    def _shard_keys_below(self, m: torch.Tensor, o: int) -> torch.Tensor:
        """Keys j in [0, m) whose block is in shard ``o``."""
        period = self.shards * self.block
        full, rest = torch.floor(m / period), torch.remainder(m, period)
        return full * self.block + (rest - o * self.block).clamp(min=0, max=self.block)

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        qb = torch.floor(r / self.block)
        upper = torch.clamp(r + 1, max=kv_len) if self.causal else torch.full_like(r, kv_len)
        lo = torch.clamp((qb - self.local_blocks + 1) * self.block, min=0)
        hi = r + 1 if self.causal else (qb + self.local_blocks) * self.block
        L1 = torch.minimum(lo, upper)
        H1 = torch.maximum(torch.minimum(hi, upper), L1)  # local window is [L1, H1)
        total = 0.0
        for h in range(self.num_heads):
            o = h % self.shards
            below = self._shard_keys_below
            outside = below(L1, o) + below(upper, o) - below(H1, o)
            total += float((H1 - L1 + outside).sum())
        return total / self.num_heads

    @property
    def is_causal(self) -> bool:
        return self.causal


__all__ = ["StridedShards"]
