"""Projections, rotary positions and the cache shared by the routing layers (kept tiny on purpose)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnlab.core.cache import KVCache

from ..base import AttentionLayer, check_hidden
from ..common import apply_rope, merge_heads, split_heads


class ProjectedLayer(AttentionLayer):
    """q, k, v, o projections over ``(B, T, dim)``; subclasses implement ``attend`` and ``attend_reference``."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None, rope: bool) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if dim % heads or heads % kv_heads:
            raise ValueError(f"dim ({dim}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
        self.dim, self.heads, self.kv_heads, self.rope = dim, heads, kv_heads, rope
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def qkv(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, dim) -> q (B, H, T, d), k, v (B, Hkv, T, d); rotary at absolute positions start..start+T-1."""
        check_hidden(x, self.dim)
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.kv_heads)
        v = split_heads(self.v_proj(x), self.kv_heads)
        if self.rope:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        return q, k, v

    def out(self, o: Tensor) -> Tensor:
        return self.o_proj(merge_heads(o.to(self.o_proj.weight.dtype)))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        start = 0 if cache is None else cache.length
        q, k, v = self.qkv(x, start)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.out(self.attend(q, k, v, start))

    def reference(self, x: Tensor) -> Tensor:
        """The dense formula with materialized scores; run it on a float64 copy of the layer (``.double()``)."""
        q, k, v = self.qkv(x)
        return self.out(self.attend_reference(q, k, v))

    def init_cache(self, batch: int = 1) -> KVCache:
        return KVCache()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError
