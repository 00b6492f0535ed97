"""The one heads config every layer shares, and the one projections + op base every layer builds on.

A registered layer is :class:`OpLayer` (q, k, v, o projections, rotary positions, the cache the op needs)
plus an op from :mod:`attnlab.ops` plus the layer's own extra parameters. Its frozen config subclasses
:class:`HeadsConfig`, which is validated once here; subclasses add checks in ``validate()`` (raise
``ValueError`` naming the option), may fill derived fields in ``prepare()``, list the heads options they do
not take in ``fixed`` (those must keep their defaults and are not offered as options) and old option names in
``renamed`` (``{old: new}``: the registry refuses the old name, naming the new one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

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

    fixed: ClassVar[tuple[str, ...]] = ()  # heads options this layer does not take (kept at their defaults)
    renamed: ClassVar[dict[str, str]] = {}  # old option name -> new one

    def __post_init__(self) -> None:
        self.prepare()
        for name in self.fixed:
            if getattr(self, name) != _field_default(type(self), name):
                raise ValueError(f"{type(self).__name__}: option {name!r} is not supported by this layer")
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
        if isinstance(self.rope_base, bool) or not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ValueError(f"rope_base must be a number > 1, got {self.rope_base!r}")
        self.validate()

    def prepare(self) -> None:
        """Fill fields derived from others before validation (override; use ``self.set(name, value)``)."""

    def validate(self) -> None:
        """Checks of a layer's own options (override; raise ValueError naming the option)."""

    def set(self, name: str, value: Any) -> None:
        """Set a field of the frozen config (only from ``prepare``)."""
        object.__setattr__(self, name, value)

    @classmethod
    def options(cls) -> list[str]:
        """The option names this layer takes (its fields minus ``fixed``)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.fixed]

    @property
    def d(self) -> int:
        """Per-head width."""
        return self.head_dim or self.dim // self.heads

    @property
    def kvh(self) -> int:
        """Key/value heads."""
        return self.kv_heads or self.heads


def _field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise TypeError(f"{cls.__name__}.fixed names {name!r}, which is not one of its fields")


def positive_number(name: str, value: Any) -> float:
    """A positive int or float (not a bool); returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class LayerCache:
    """What a layer carries while decoding: its keys and values (``kv``, for ops with ``cache == "kv"``) and
    the op's state (an :class:`OpState` dict; layers keep their own extras there too). ``length`` is the
    number of positions seen (the absolute position of the next query)."""

    def __init__(self, kv: bool = True) -> None:
        self.kv = KVCache() if kv else None
        self.state = OpState()
        self._length = 0

    @property
    def length(self) -> int:
        return self.kv.length if self.kv is not None else self._length

    @length.setter
    def length(self, n: int) -> None:
        if self.kv is not None:
            raise AttributeError("the length of a key/value cache grows with what is appended")
        self._length = n

    def tensors(self) -> list[Tensor]:
        """Tensors held in the state that are not views of the key/value cache."""
        shared: set[int] = set()
        if self.kv is not None and self.kv._k is not None:
            shared = {self.kv._k.untyped_storage().data_ptr(), self.kv._v.untyped_storage().data_ptr()}
        return [t for t in _tensors(self.state) if t.untyped_storage().data_ptr() not in shared]

    def numel(self) -> int:
        """Numbers held: cached keys/values plus the state."""
        n = 0
        if self.kv is not None and self.kv._k is not None:
            n = self.kv.nbytes() // self.kv._k.element_size()
        return n + sum(t.numel() for t in self.tensors())

    def nbytes(self) -> int:
        n = self.kv.nbytes() if self.kv is not None else 0
        return n + sum(t.numel() * t.element_size() for t in self.tensors())


def _tensors(x: Any):
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, KVCache):
        if x._k is not None:
            yield x._k[:, :, : x.length]
            yield x._v[:, :, : x.length]
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
    ``finish``; layers whose core is not one op call override ``attend`` (or ``forward``). ``proj`` names the
    projections to create (``"qkvo"``; a layer that uses the input itself as keys or values leaves them out);
    ``qk_norm`` adds RMSNorm on q and k per head; ``bias`` adds projection biases; ``qk_dim`` sets a query/key
    width per head other than the value width. ``op = None``: the layer's core is its own code, not one op. ``kv_cache``: whether the
    decoding cache keeps keys and values (default: what the op needs).
    """

    op: str | OpSpec | None = "sdpa"
    kv_cache: bool | None = None

    def __init__(self, cfg: HeadsConfig, *, bias: bool = False, qk_norm: bool = False, proj: str = "qkvo",
                 qk_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        H, Hkv, d = cfg.heads, cfg.kvh, cfg.d
        dq = qk_dim or d  # query/key width per head (linear layers with their own feature width)
        widths = {"q": (cfg.dim, H * dq), "k": (cfg.dim, Hkv * dq), "v": (cfg.dim, Hkv * d), "o": (H * d, cfg.dim)}
        for p in proj:
            setattr(self, f"{p}_proj", nn.Linear(*widths[p], bias=bias))
        self.q_norm = RMSNorm(d) if qk_norm else None
        self.k_norm = RMSNorm(d) if qk_norm else None

    # the shape of the layer, as every layer names it
    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def heads(self) -> int:
        return self.cfg.heads

    @property
    def head_dim(self) -> int:
        return self.cfg.d

    @property
    def causal(self) -> bool:
        return self.cfg.causal

    @property
    def spec(self) -> OpSpec:
        if self.op is None:
            raise TypeError(f"{self.registry_name or type(self).__name__} computes attention itself (op = None)")
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
            q, k = self.rotate(q, start), self.rotate(k, start)
        return q, k, v

    def rotate(self, t: Tensor, start: int) -> Tensor:
        """RoPE of (B, H, T, d) at absolute positions ``start..``."""
        pos = torch.arange(start, start + t.shape[2], device=t.device)
        return apply_rope(t, pos, self.cfg.rope_base)

    def check_cache(self, x: Tensor, cache: LayerCache | None) -> int:
        """Validate the input; returns the absolute position of its first row (0 without a cache)."""
        check_hidden(x, self.cfg.dim)
        if cache is None:
            return 0
        if not self.cfg.causal:
            raise TypeError(f"{self.registry_name or type(self).__name__}: a cache needs causal=True")
        return cache.length

    def qkv_cached(self, x: Tensor, cache: LayerCache | None) -> tuple[Tensor, Tensor, Tensor, int]:
        """Project ``x`` and append to the cache; returns q (new rows), k, v (all rows) and the q offset."""
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        if cache is not None:
            k, v = self.remember(cache, k, v, x.shape[1])
        return q, k, v, start

    def remember(self, cache: LayerCache, k: Tensor, v: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Append this call's keys/values (kv caches) or count its ``n`` positions (recurrent state)."""
        if cache.kv is not None:
            return cache.kv.append(k, v)
        cache.length += n
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: OpState | None) -> Tensor:
        """Run the op; q (B, H, T, d) over k, v (B, Hkv, Tk, d) -> (B, H, T, d)."""
        res = self.spec(q, k, v, scale=self.cfg.d**-0.5, q_offset=q_offset, state=state, **self.op_options())
        return res if state is None else res[0]

    def out(self, o: Tensor) -> Tensor:
        """(B, H, T, d) -> (B, T, dim) through the output projection."""
        return self.o_proj(merge_heads(o.to(self.o_proj.weight.dtype)))

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """(B, H, T, d) op output -> (B, T, dim)."""
        return self.out(o)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        q, k, v, start = self.qkv_cached(x, cache)
        o = self.attend(q, k, v, start, None if cache is None else cache.state)
        return self.finish(o, x)

    def forward_with_aux(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(x, cache), {}

    def init_cache(self, batch: int = 1) -> LayerCache:
        if not self.cfg.causal:
            raise TypeError(f"{self.registry_name or type(self).__name__}: a non-causal layer cannot decode "
                            "(causal=False)")
        kv = self.kv_cache if self.kv_cache is not None else self.spec.cache == "kv"
        return LayerCache(kv=kv)

    def state_size(self, seq_len: int) -> int:
        """Numbers held per sequence to decode after ``seq_len`` tokens: keys and values of every position."""
        return 2 * self.cfg.kvh * self.cfg.d * seq_len


__all__ = ["HeadsConfig", "LayerCache", "OpLayer", "one_of", "positive_number"]
