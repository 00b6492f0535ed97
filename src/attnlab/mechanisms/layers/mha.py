"""Multi-head attention with grouped- and multi-query key/value heads (L203, Shazeer 2019).

Per head ``i``: ``Q_i = X W_Q^i``, ``K_g = X W_K^g``, ``V_g = X W_V^g`` for the key/value head
``g = i // (heads / kv_heads)``; ``O = sum_i softmax(mask(mod(Q_i K_g^T / sqrt(d)))) V_g W_O^i``.
``kv_heads = heads`` is standard MHA, ``kv_heads = 1`` is multi-query attention (one write head), anything
between is grouped-query attention. Options: rotary positions (RoPE), QK-norm (RMSNorm of queries and keys
per head, the remedy of "Small-scale proxies for large-scale Transformer training instabilities"), any static
pattern of ``attnlab.core.patterns`` (default causal), score modifiers, and a KV cache for decoding.

The helpers here (``cached_attention``, ``check_decodable``, ``head_slices``) are meant for other layers too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.attention import BACKENDS, attention
from ...core.cache import KVCache
from ...core.checks import positive_int
from ...core.patterns import Causal, Pattern
from ...core.reference import reference_attention
from ...core.score_mods import ScoreMod
from ..base import AttentionLayer, check_hidden
from ..common import RMSNorm, apply_rope, merge_heads, positions_for, split_heads
from ..registry import preset, register


# ---- helpers shared by the layers of this family -----------------------------------------------------
def check_decodable(pattern: Pattern | None, name: str) -> None:
    """Decoding with a cache equals the full forward only when no query sees a later key."""
    if pattern is None or not pattern.is_causal:
        raise TypeError(
            f"{name}: incremental decoding needs a causal pattern (e.g. Causal(), SlidingWindow(w), "
            f"pattern & Causal()), got {pattern!r}"
        )


def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache | None,
    pattern: Pattern | None,
    score_mod: ScoreMod | tuple | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of new queries over cached plus new keys.

    q: (B, H, T, d) at absolute positions ``cache.length .. cache.length + T - 1``; k, v: (B, Hkv, T, d) for
    the same new positions, appended to the cache first. Without a cache, k and v hold every key (Tk >= T)
    and the queries are the last T positions. Returns (B, H, T, dv).
    """
    q_offset = None if cache is None else cache.length
    if cache is not None:
        k, v = cache.append(k, v)
    return attention(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale, backend=backend, q_offset=q_offset)


def head_slices(weight: Tensor, heads: int) -> list[Tensor]:
    """Split an ``nn.Linear`` weight (heads * d, dim) into per-head (dim, d) matrices: ``x @ W_i``."""
    return [w.T for w in weight.chunk(heads, dim=0)]


# ---- the layer ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MHAConfig:
    """dim: model width; heads: query heads; kv_heads: key/value heads (None: heads; 1: multi-query);
    head_dim: per-head width (None: dim // heads); pattern: which keys a query sees (None: all);
    score_mod: ALiBi / SoftCap / ...; rope: rotary positions; qk_norm: RMSNorm of q and k per head."""

    dim: int = 512
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int | None = None
    pattern: Pattern | None = Causal()
    score_mod: ScoreMod | tuple[ScoreMod, ...] | None = None
    rope: bool = True
    rope_base: float = 10000.0
    qk_norm: bool = False
    bias: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        positive_int("dim", self.dim)
        positive_int("heads", self.heads)
        if self.kv_heads is not None:
            positive_int("kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) is not divisible by heads ({self.heads}); set head_dim")
        if self.head_dim is not None:
            positive_int("head_dim", self.head_dim)
        if self.rope and self.d % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.d}")
        if self.pattern is not None and not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be an attnlab Pattern or None, got {type(self.pattern).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def d(self) -> int:
        return self.head_dim or self.dim // self.heads

    @property
    def kvh(self) -> int:
        return self.kv_heads or self.heads


@register(
    "mha",
    family="layers",
    papers=("L203",),
    year=2019,
    summary="multi-head attention; grouped-/multi-query KV heads, RoPE, QK-norm, any pattern, KV cache",
    config=MHAConfig,
)
class MultiHeadAttention(AttentionLayer):
    """(B, T, dim) -> (B, T, dim). Cost: 2·T·dim·(2·H + 2·Hkv)·d projection FLOPs plus attention over the
    pattern's allowed pairs; KV cache 2·Hkv·d numbers per token (Hkv/H of MHA's)."""

    def __init__(self, cfg: MHAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hkv, d = cfg.heads, cfg.kvh, cfg.d
        self.q_proj = nn.Linear(cfg.dim, H * d, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.dim, Hkv * d, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.dim, Hkv * d, bias=cfg.bias)
        self.o_proj = nn.Linear(H * d, cfg.dim, bias=cfg.bias)
        self.q_norm = RMSNorm(d) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d) if cfg.qk_norm else None

    # the three steps, reusable by layers that change one of them
    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) at absolute positions start.. -> q (B, H, T, d), k, v (B, Hkv, T, d)."""
        q = split_heads(self.q_proj(x), self.cfg.heads)
        k = split_heads(self.k_proj(x), self.cfg.kvh)
        v = split_heads(self.v_proj(x), self.cfg.kvh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cfg.rope:
            pos = positions_for(x, start)
            q, k = apply_rope(q, pos, self.cfg.rope_base), apply_rope(k, pos, self.cfg.rope_base)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, H, T, d) queries over (B, Hkv, T, d) new keys/values (plus the cache) -> (B, H, T, d)."""
        return cached_attention(q, k, v, cache, self.cfg.pattern, self.cfg.score_mod, backend=self.cfg.backend)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        check_hidden(x, self.cfg.dim)
        q, k, v = self.project(x, 0 if cache is None else cache.length)
        return self.o_proj(merge_heads(self.attend(q, k, v, cache)))

    def forward_with_aux(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(x, cache), {}

    def reference(self, x: Tensor) -> Tensor:
        """The formula head by head: O = sum_i softmax(Q_i K_g^T / sqrt(d)) V_g W_O^i (dense scores)."""
        cfg = self.cfg
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        Wq, Wk, Wv = (head_slices(p.weight, n) for p, n in ((self.q_proj, cfg.heads), (self.k_proj, cfg.kvh),
                                                              (self.v_proj, cfg.kvh)))
        bq, bk, bv = (p.bias.chunk(n) if p.bias is not None else [0] * n
                      for p, n in ((self.q_proj, cfg.heads), (self.k_proj, cfg.kvh), (self.v_proj, cfg.kvh)))
        Wo = self.o_proj.weight.T.chunk(cfg.heads, dim=0)  # per head (d, dim)
        out = x.new_zeros(B, T, cfg.dim) + (self.o_proj.bias if self.o_proj.bias is not None else 0)
        group = cfg.heads // cfg.kvh
        for i in range(cfg.heads):
            g = i // group
            q, k, v = x @ Wq[i] + bq[i], x @ Wk[g] + bk[g], x @ Wv[g] + bv[g]  # (B, T, d)
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if cfg.rope:
                q, k = apply_rope(q[:, None], pos, cfg.rope_base)[:, 0], apply_rope(k[:, None], pos, cfg.rope_base)[:, 0]
            mod = _single_head_mod(cfg.score_mod, i)
            o = reference_attention(q[:, None], k[:, None], v[:, None], _head_pattern(cfg.pattern, i), mod, dtype=None)
            out = out + o[:, 0] @ Wo[i]
        return out

    def init_cache(self, batch: int = 1) -> KVCache:
        check_decodable(self.cfg.pattern, "mha")
        return KVCache()

    def state_size(self, seq_len: int) -> int:
        """Keys and values the next query reads after ``seq_len`` tokens: ``2 Hkv d`` per visible key
        (a sliding window of ``w``: ``2 Hkv d w``; causal: ``2 Hkv d T``), averaged over per-head patterns."""
        visible = seq_len if self.cfg.pattern is None else self.cfg.pattern.count(1, seq_len, seq_len - 1)
        return round(2 * self.cfg.kvh * self.cfg.d * visible)


def _head_pattern(pattern: Pattern | None, i: int) -> Pattern | None:
    """The pattern head ``i`` follows (per-head patterns pick their entry)."""
    from ...core.patterns import PerHead

    return pattern.patterns[i] if isinstance(pattern, PerHead) else pattern


class _OneHead(ScoreMod):
    """View a per-head modifier as the single head ``i`` (for head-by-head references)."""

    def __init__(self, mod: ScoreMod, i: int) -> None:
        self.mod, self.i, self.kind = mod, i, mod.kind

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.mod.score_mod(score, b, torch.full_like(h, self.i), q_idx, kv_idx)


def _single_head_mod(mod: ScoreMod | tuple | None, i: int) -> ScoreMod | None:
    from ...core.score_mods import as_score_mod

    mod = as_score_mod(mod)
    return None if mod is None else _OneHead(mod, i)


preset("mqa", "mha", kv_heads=1)
preset("gqa", "mha", kv_heads=2)
