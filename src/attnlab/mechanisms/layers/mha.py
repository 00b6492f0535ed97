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
from typing import Any

import torch
from torch import Tensor

from ...core.attention import BACKENDS, attention
from ...core.cache import KVCache
from ...core.patterns import Causal, Full, Pattern
from ...core.reference import reference_attention
from ...core.score_mods import ScoreMod
from ..common import apply_rope
from ..heads import HeadsConfig, LayerCache, OpLayer, one_of
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
    cache: KVCache | LayerCache | None,
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
    if isinstance(cache, LayerCache):
        cache = cache.kv
    if cache is not None:
        k, v = cache.append(k, v)
    return attention(q, k, v, pattern=pattern, score_mod=score_mod, scale=scale, backend=backend, q_offset=q_offset)


def head_slices(weight: Tensor, heads: int) -> list[Tensor]:
    """Split an ``nn.Linear`` weight (heads * d, dim) into per-head (dim, d) matrices: ``x @ W_i``."""
    return [w.T for w in weight.chunk(heads, dim=0)]


# ---- the layer ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatternHeadsConfig(HeadsConfig):
    """Heads options plus pattern: which keys a query sees (any static pattern of ``attnlab.core.patterns``;
    None: all). ``causal`` follows the pattern unless given: ``causal=True`` with a non-causal pattern keeps its
    causal part (``pattern & Causal()``), ``causal=False`` with the default causal pattern means no pattern."""

    pattern: Pattern | None = Causal()
    causal: bool | None = None  # type: ignore[assignment]  (None: from the pattern)

    def prepare(self) -> None:
        p = self.pattern
        if p is not None and not isinstance(p, Pattern):
            raise TypeError(f"pattern must be an attnlab Pattern or None, got {type(p).__name__}")
        if self.causal is None:
            self.set("causal", p is not None and p.is_causal)
        elif self.causal is False and p == Causal():
            self.set("pattern", None)
        elif self.causal is True and (p is None or not p.is_causal):
            self.set("pattern", Causal() if p is None else p & Causal())


@dataclass(frozen=True)
class MHAConfig(PatternHeadsConfig):
    """dim: model width; heads: query heads; kv_heads: key/value heads (None: heads; 1: multi-query);
    head_dim: per-head width (None: dim // heads); pattern: which keys a query sees (None: all);
    score_mod: ALiBi / SoftCap / ...; rope: rotary positions; qk_norm: RMSNorm of q and k per head;
    backend: the engine (see ``attnlab.attention``)."""

    rope: bool = True
    score_mod: ScoreMod | tuple[ScoreMod, ...] | None = None
    qk_norm: bool = False
    bias: bool = False
    backend: str = "auto"

    def validate(self) -> None:
        one_of("backend", self.backend, BACKENDS)


class PatternLayer(OpLayer):
    """An :class:`OpLayer` whose rule is its config's ``pattern`` (and ``score_mod`` where it has one): op ``sdpa``
    for plain causal or full attention, op ``pattern`` (the sparse engine) otherwise; decodes when causal."""

    @property
    def op(self) -> str:  # type: ignore[override]
        c = self.cfg
        plain = getattr(c, "score_mod", None) is None and (c.pattern is None or c.pattern == Causal())
        return "sdpa" if plain else "pattern"

    def op_options(self) -> dict[str, Any]:
        c = self.cfg
        if self.op == "sdpa":
            return {"causal": c.pattern is not None}
        return {"pattern": c.pattern if c.pattern is not None else Full(), "score_mod": getattr(c, "score_mod", None)}

    def init_cache(self, batch: int = 1) -> LayerCache:
        check_decodable(self.cfg.pattern, self.registry_name or type(self).__name__)
        return super().init_cache(batch)


@register(
    "mha",
    family="layers",
    papers=("L203",),
    year=2019,
    summary="multi-head attention; grouped-/multi-query KV heads, RoPE, QK-norm, any pattern, KV cache",
    config=MHAConfig,
)
class MultiHeadAttention(PatternLayer):
    """(B, T, dim) -> (B, T, dim). Cost: 2·T·dim·(2·H + 2·Hkv)·d projection FLOPs plus attention over the
    pattern's allowed pairs; KV cache 2·Hkv·d numbers per token (Hkv/H of MHA's). Op ``pattern`` (``sdpa``
    without a pattern or modifier); a ``backend`` other than auto calls ``attnlab.attention`` with it."""

    def __init__(self, cfg: MHAConfig) -> None:
        super().__init__(cfg, bias=cfg.bias, qk_norm=cfg.qk_norm)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: Any = None) -> Tensor:
        if self.cfg.backend != "auto":
            return attention(q, k, v, pattern=self.cfg.pattern, score_mod=self.cfg.score_mod,
                             backend=self.cfg.backend, q_offset=q_offset)
        return super().attend(q, k, v, q_offset, state)

    def reference(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """The formula head by head: O = sum_i softmax(Q_i K_g^T / sqrt(d)) V_g W_O^i (dense scores); heads where
        ``skip`` (H,) bool is True are left out of the sum (HeadMask's masked heads)."""
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
            if skip is not None and bool(skip[i]):
                continue
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
