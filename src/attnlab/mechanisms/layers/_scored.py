"""Shared machinery of the layers that are "multi-head attention with a different score or weight function".

``ProjectedAttention`` holds the q/k/v/output projections, optional RoPE, the causal flag and the key/value
cache; a subclass only writes how a block of query rows turns into outputs. ``visible`` is the boolean
mask of keys each query row may see (absolute positions, as everywhere in attnlab), ``by_rows`` runs a
row function over query chunks so a layer whose weights cannot go through SDPA still never holds more than
``chunk x kv_len`` scores at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attnlab.core.cache import KVCache
from attnlab.core.patterns import Causal

from ..base import AttentionLayer, check_hidden
from ..common import apply_rope, merge_heads, positions_for, split_heads


def check_config(name: str, dim: int, heads: int, *, even_head_dim: bool = False) -> int:
    """Validate ``dim``/``heads`` of a config; returns the head dimension."""
    for field_name, value in (("dim", dim), ("heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {field_name} must be a positive integer, got {value!r}")
    if dim % heads:
        raise ValueError(f"{name}: dim={dim} is not divisible by heads={heads}")
    d = dim // heads
    if even_head_dim and d % 2:
        raise ValueError(f"{name}: head dim {d} (dim / heads) must be even")
    return d


def check_positive(name: str, field_name: str, value: Any, *, integer: bool = True) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name}: {field_name} must be a positive {kind}, got {value!r}")


def visible(q_len: int, kv_len: int, q_offset: int, causal: bool, device: torch.device) -> Tensor:
    """Boolean ``(q_len, kv_len)``: True where query row ``i`` (at ``q_offset + i``) may see key ``j``."""
    if not causal:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    return Causal().dense(q_len, kv_len, q_offset)[0].to(device)


def by_rows(fn: Callable[[int, int], Tensor], q_len: int, chunk: int) -> Tensor:
    """Concatenate ``fn(start, stop)`` -- outputs ``(B, H, stop - start, d)`` -- over query chunks.

    When autograd records and there is more than one chunk, each chunk is checkpointed: its scores are
    recomputed in the backward pass instead of kept, so training memory stays ``chunk x kv_len`` per head
    too (about one extra forward of the score work).
    """
    spans = [(s, min(s + chunk, q_len)) for s in range(0, q_len, chunk)]
    if len(spans) > 1 and torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, a, b, use_reentrant=False) for a, b in spans], dim=2)
    return torch.cat([fn(a, b) for a, b in spans], dim=2)


class ProjectedAttention(AttentionLayer):
    """q, k, v, o projections of width ``dim`` split into ``heads``; optional RoPE; a ``KVCache`` when causal.

    ``proj`` names the input projections to create ("qkv"; layers that use the input itself as keys or values
    leave them out, and then provide their own ``project``).
    """

    def __init__(
        self, dim: int, heads: int, causal: bool, rope: bool = False, bias: bool = False, proj: str = "qkv"
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.causal, self.rope = dim, heads, causal, rope
        self.head_dim = dim // heads
        for p in proj:
            setattr(self, f"{p}_proj", nn.Linear(dim, dim, bias=bias))
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def init_cache(self, batch: int = 1) -> KVCache:
        if not self.causal:
            raise TypeError(f"{self.registry_name}: a non-causal layer cannot decode (causal=False)")
        return KVCache()

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len

    def check_cache(self, x: Tensor, cache: Any | None) -> int:
        """Validate the input; returns the number of cached positions (0 without a cache)."""
        check_hidden(x, self.dim)
        if cache is None:
            return 0
        if not self.causal:
            raise TypeError(f"{self.registry_name}: a cache needs causal=True")
        return cache.length

    def project(self, x: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, dim) -> q, k, v of shape (B, H, T, d); RoPE at absolute positions ``start ..``."""
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.rope:
            pos = positions_for(x, start)
            q, k = apply_rope(q, pos), apply_rope(k, pos)
        return q, k, v

    def qkv(self, x: Tensor, cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor, int]:
        """Project ``x`` and append to the cache; returns q (new rows), k, v (all rows) and the q offset."""
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        if cache is not None:
            k, v = cache.append(k, v)
        return q, k, v, start

    def out(self, o: Tensor) -> Tensor:
        """(B, H, T, d) -> (B, T, dim)."""
        return self.o_proj(merge_heads(o))


__all__ = ["ProjectedAttention", "by_rows", "check_config", "check_positive", "visible"]
