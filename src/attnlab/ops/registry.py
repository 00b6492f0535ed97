"""The op registry: every attention method at the q/k/v level, registered by name.

An *op* computes attention from projected queries, keys and values. One signature for all::

    out = op(q, k, v, *, scale, q_offset, mask=None, **options)                 # stateless
    out, state = op(q, k, v, *, scale, q_offset, mask=None, state=st, **options) # decoding: state carried

Shapes: q ``(batch, heads, q_len, head_dim)``; k, v ``(batch, kv_heads, kv_len, head_dim)`` with ``heads`` a
multiple of ``kv_heads`` (grouped-query attention, never repeated in memory by the caller).

* ``q_offset``: absolute position of the first query row (``kv_len - q_len`` when None).
* Ops with ``spec.cache == "kv"`` see every key so far (the caller keeps the KV cache: ``kv_len`` is
  ``q_offset + q_len``). Ops with ``spec.cache == "recurrent"`` see only this call's keys (``kv_len == q_len``)
  and carry their memory in ``state``.
* ``mask``: optional bool ``(batch or 1, heads or 1, q_len, kv_len)`` (True = may attend), ANDed with what
  the op itself allows (padding, per-batch rules). Ops that cannot honour a free mask raise ``ValueError``.
* ``state``: an :class:`OpState` (a dict) the caller creates once per layer and passes back on every call
  (prefill, then each decode step); the op stores what it carries between calls there.
* ``options``: the op's own knobs; each op declares its defaults and an unknown name fails loudly,
  naming the option and listing the valid ones.

``spec.weights_mask(q, k, q_offset=..., **options)``, where an op is a masked softmax, returns the dense bool
``(B or 1, H or 1, q_len, kv_len)`` of the keys it attends (built independently of the fast path): hooks that
read weights and the float64 reference use it. ``spec.reference(q, k, v, *, scale, q_offset, **options)`` is the
op's formula written plainly (float64 oracle) where a mask does not describe it (linear forms, corrections).
``spec.dense_options``: options under which the op equals dense causal softmax attention (every block selected,
a window covering everything; dense *full* attention for ops that do not decode): the catalogue and model
tests use them. ``spec.decodes``: prefill then token by token with ``state=OpState()`` equals the full forward
(False for bidirectional ops, e.g. image grids). ``spec.example``: options that give a small, non-trivial
instance at length 24 (tiny blocks, a 4 x 6 grid), used by the catalogue test. ``spec.inference_only``: the
reason an op passes no gradient to q, k, v (empty for trainable ops; the catalogue test checks gradients
against the reference for every op without one).

``weights_mask`` functions take ``scale=`` too (default ``head_dim ** -0.5``) where the selection reads softmax
weights, and ``state=`` (read only) where it depends on earlier calls; :func:`reference` is the float64 oracle
of any op (``spec.reference`` if the op has one, else dense attention masked by ``weights_mask``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from ..core.checks import check_qkv, default_scale

FAMILIES = ("dense", "pattern", "routing", "linear", "cache")
CACHES = ("kv", "recurrent")


class OpState(dict):
    """What an op carries between calls of one layer (decoding). Create one per layer; pass it every call."""


@dataclass(frozen=True)
class OpSpec:
    """A registered op: its function, paper ids, summary, option defaults and how it decodes."""

    name: str
    fn: Callable[..., Any]
    family: str
    papers: tuple[str, ...]
    summary: str
    options: Mapping[str, Any] = field(default_factory=dict)
    cache: str = "kv"
    causal_only: bool = False
    weights_mask: Callable[..., Tensor] | None = None
    renamed: Mapping[str, str] = field(default_factory=dict)
    reference: Callable[..., Tensor] | None = None
    dense_options: Mapping[str, Any] | None = None
    decodes: bool = True
    example: Mapping[str, Any] = field(default_factory=dict)
    inference_only: str = ""

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults updated by ``options``; unknown or renamed names raise ``ValueError``."""
        for key in options:
            if key in self.renamed:
                raise ValueError(f"op {self.name!r}: option {key!r} was renamed to {self.renamed[key]!r}")
            if key not in self.options:
                valid = ", ".join(sorted(self.options)) or "none"
                raise ValueError(f"op {self.name!r} has no option {key!r} (valid options: {valid})")
        return {**self.options, **options}

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, q_offset: int | None = None,
                 mask: Tensor | None = None, state: OpState | None = None, **options: Any):
        opts = self.resolve(options)
        _, _, _, Tq, Tk, D = check_qkv(q, k, v)
        scale = default_scale(D, scale)
        if q_offset is None:
            q_offset = Tk - Tq if self.cache == "kv" else 0
        if self.causal_only and not opts.get("causal", True):
            raise ValueError(f"op {self.name!r} is causal only (causal=False given)")
        return self.fn(q, k, v, scale=scale, q_offset=q_offset, mask=mask, state=state, **opts)

    def as_dict(self) -> dict[str, Any]:
        from ..mechanisms.registry import paper_title

        return {
            "name": self.name, "family": self.family, "papers": list(self.papers),
            "titles": [paper_title(p) for p in self.papers], "summary": self.summary,
            "options": {k: _jsonable(v) for k, v in self.options.items()}, "cache": self.cache,
            "causal_only": self.causal_only, "decodes": self.decodes, "weights": self.weights_mask is not None,
            "reference": self.reference is not None, "renamed": dict(self.renamed),
            "inference_only": self.inference_only,
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
        return list(v)
    return repr(v)


_OPS: dict[str, OpSpec] = {}


def register_op(
    name: str,
    *,
    family: str,
    papers: tuple[str, ...] = (),
    summary: str,
    options: Mapping[str, Any] | None = None,
    cache: str = "kv",
    causal_only: bool = False,
    weights_mask: Callable[..., Tensor] | None = None,
    renamed: Mapping[str, str] | None = None,
    reference: Callable[..., Tensor] | None = None,
    dense_options: Mapping[str, Any] | None = None,
    decodes: bool = True,
    example: Mapping[str, Any] | None = None,
    inference_only: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn(q, k, v, *, scale, q_offset, mask, state, **options)`` as op ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _OPS:
            raise ValueError(f"op {name!r} is registered twice")
        _OPS[name] = OpSpec(name, fn, family, tuple(papers), summary, MappingProxyType(dict(options or {})), cache,
                            causal_only, weights_mask, MappingProxyType(dict(renamed or {})), reference,
                            None if dense_options is None else MappingProxyType(dict(dense_options)), decodes,
                            MappingProxyType(dict(example or {})), inference_only)
        return fn

    return deco


def _load_all() -> None:
    from . import _catalogue  # noqa: F401  (imports every op module once)


def names(family: str | None = None) -> list[str]:
    """Registered op names (sorted), optionally of one family."""
    _load_all()
    return sorted(n for n, s in _OPS.items() if family is None or s.family == family)


def get(name: str) -> OpSpec:
    """The op registered as ``name``; unknown names raise ``KeyError`` listing the valid ones."""
    _load_all()
    if isinstance(name, OpSpec):
        return name
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered ops: {', '.join(sorted(_OPS))}") from None


def reference(op: str | OpSpec, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              q_offset: int | None = None, mask: Tensor | None = None, **options: Any) -> Tensor:
    """The float64 oracle of an op: ``spec.reference`` where the op has one, else dense attention (float64) masked
    by ``spec.weights_mask`` (and ``mask``). q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv) float64."""
    from ..core.reference import reference_attention

    spec = get(op)
    opts = spec.resolve(options)
    scale = default_scale(q.shape[-1], scale)
    if q_offset is None:
        q_offset = k.shape[2] - q.shape[2] if spec.cache == "kv" else 0
    if spec.reference is not None:
        return spec.reference(q, k, v, scale=scale, q_offset=q_offset, mask=mask, **opts)
    if spec.weights_mask is None:
        raise ValueError(f"op {spec.name!r} has neither a reference nor a weights_mask")
    wm = spec.weights_mask(q, k, q_offset=q_offset, scale=scale, **opts)
    wm = wm if mask is None else wm & mask
    return reference_attention(q, k, v, scale=scale, q_offset=q_offset, mask=wm)


def specs(family: str | None = None) -> list[OpSpec]:
    return [get(n) for n in names(family)]


__all__ = ["CACHES", "FAMILIES", "OpSpec", "OpState", "get", "names", "reference", "register_op", "specs"]
