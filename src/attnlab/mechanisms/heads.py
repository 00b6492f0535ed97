"""The one heads config every layer shares, and the one projections + op base every layer builds on.

A registered layer is :class:`OpLayer` (q, k, v, o projections, rotary positions, the cache the op needs)
plus an op from :mod:`attnlab.ops` plus the layer's own extra parameters. Its frozen config subclasses
:class:`HeadsConfig`, which is validated once here; subclasses add checks in ``validate()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.cache import KVCache
from ..core.checks import positive_int
from ..ops.registry import OpSpec, OpState, get
from .base import AttentionLayer, check_hidden
from .common import RMSNorm, apply_rope, merge_heads, split_heads


@dataclass(frozen=True)
class HeadsConfig:
    """dim: model width; heads: query heads; kv_heads: key/value heads (None: heads; 1: multi-query);
    head_dim: per-head width (None: dim // heads); causal: queries see only past keys (decodable);
    rope: rotary positions on q and k; rope_base: the rotary base."""

    dim: int = 512
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    rope: bool = False
    rope_base: float = 10000.0

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
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be True or False, got {self.causal!r}")
        if self.rope and self.d % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.d}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
        self.validate()

    def validate(self) -> None:
        """Checks of a layer's own options (override; raise ValueError naming the option)."""

    @property
    def d(self) -> int:
        """Per-head width."""
        return self.head_dim or self.dim // self.heads

    @property
    def kvh(self) -> int:
        """Key/value heads."""
        return self.kv_heads or self.heads


class LayerCache:
    """What a layer carries while decoding: its keys and values (ops with ``cache == "kv"``) and the op's
    state. ``length`` is the number of positions seen (the absolute position of the next query)."""

    def __init__(self, kv: bool = True) -> None:
        self.kv = KVCache() if kv else None
        self.state = OpState()
        self.length = 0

    def nbytes(self) -> int:
        n = self.kv.nbytes() if self.kv is not None else 0
        for t in _tensors(self.state):
            n += t.numel() * t.element_size()
        return n


def _tensors(x: Any):
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


class OpLayer(AttentionLayer):
    """Projections + an op: ``(B, T, dim) -> (B, T, dim)``.

    ``op``: the op's name (or spec); ``op_options()`` gives its options from the config (override). Layers that
    change the projections override ``project``; layers that change what happens after the op override
    ``finish``. ``qk_norm`` adds RMSNorm on q and k per head; ``bias`` adds projection biases.
    """

    op: str | OpSpec = "sdpa"

    def __init__(self, cfg: HeadsConfig, *, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hkv, d = cfg.heads, cfg.kvh, cfg.d
        self.q_proj = nn.Linear(cfg.dim, H * d, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, Hkv * d, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, Hkv * d, bias=bias)
        self.o_proj = nn.Linear(H * d, cfg.dim, bias=bias)
        self.q_norm = RMSNorm(d) if qk_norm else None
        self.k_norm = RMSNorm(d) if qk_norm else None

    @property
    def spec(self) -> OpSpec:
        return get(self.op)

    def op_options(self) -> dict[str, Any]:
        """The op's options taken from the config (default: those whose names the op declares)."""
        return {k: getattr(self.cfg, k) for k in self.spec.options if hasattr(self.cfg, k)}

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) at absolute positions ``start..`` -> q (B, H, T, d), k, v (B, Hkv, T, d)."""
        cfg = self.cfg
        q = split_heads(self.q_proj(x), cfg.heads)
        k = split_heads(self.k_proj(x), cfg.kvh)
        v = split_heads(self.v_proj(x), cfg.kvh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.rope:
            pos = torch.arange(start, start + x.shape[1], device=x.device)
            q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: OpState | None) -> Tensor:
        """Run the op; q (B, H, T, d) over k, v (B, Hkv, Tk, d) -> (B, H, T, d)."""
        res = self.spec(q, k, v, scale=self.cfg.d**-0.5, q_offset=q_offset, state=state, **self.op_options())
        return res if state is None else res[0]

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """(B, H, T, d) op output -> (B, T, dim)."""
        return self.o_proj(merge_heads(o.to(self.o_proj.weight.dtype)))

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        check_hidden(x, self.cfg.dim)
        start = 0 if cache is None else cache.length
        q, k, v = self.project(x, start)
        if cache is not None:
            if cache.kv is not None:
                k, v = cache.kv.append(k, v)
            cache.length += x.shape[1]
        o = self.attend(q, k, v, start, None if cache is None else cache.state)
        return self.finish(o, x)

    def forward_with_aux(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(x, cache), {}

    def init_cache(self, batch: int = 1) -> LayerCache:
        if not self.cfg.causal:
            raise TypeError(f"{self.registry_name or type(self).__name__}: a non-causal layer cannot decode "
                            "(causal=False)")
        return LayerCache(kv=self.spec.cache == "kv")


__all__ = ["HeadsConfig", "LayerCache", "OpLayer"]
