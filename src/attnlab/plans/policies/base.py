"""The plan policy base class: what one key/value head does, in one place.

A policy is a frozen dataclass (its fields are its knobs, saved in the plan's JSON) that answers three
questions for the key/value heads of a layer that share it:

* **the prompt** -- :meth:`Policy.pattern` (what a query may see; the float64 reference and the grid read
  it) and :meth:`Policy.attend` (how it is computed, chunked prefill and decoding alike);
* **the cache** -- :meth:`Policy.append` stores a call's keys/values in a :class:`Slot` and returns what
  the call attends to; it compresses what it holds (a streaming head keeps sinks + window, a snap head its
  budget); :meth:`Policy.positions` says which absolute positions the held buffer covers and
  :meth:`Policy.kept` predicts its size;
* **the decode step** -- :meth:`Policy.attend` with one query row (Quest reads its top pages there).

:meth:`Policy.weights_mask` says, in absolute key positions, what a call attended (weights hooks, the
interim score-modifier path and tests read it). The base class is the ``full`` behaviour: causal over every
key, everything kept. A subclass overrides what differs and registers itself with :func:`register_policy`
(one file: see ``docs/plans.md``, "Adding a policy"). ``HeadPolicy("stream", window=64)`` (the base called
with a kind) builds the registered class of that kind, so JSON plans load by kind.

Shapes: q ``(batch, heads, q_len, head_dim)`` (the query heads of the group's key/value heads); buffers
``(batch, n_kv, buffer_len, head_dim)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.patterns import Causal, Pattern

_POLICIES: dict[str, type[Policy]] = {}


class _PolicyMeta(type):
    """``Policy(kind, **knobs)`` dispatches to the registered class; every class checks its knob names."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Policy:
            if args:
                kind, args = args[0], args[1:]
            else:
                kind = kwargs.pop("kind", "full")
            return policy_class(kind)(*args, **kwargs)
        if "kind" in kwargs and kwargs.pop("kind") != cls.kind:
            raise ValueError(f"{cls.__name__} is the {cls.kind!r} policy")
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        for key in kwargs:
            if key in cls.renamed:
                raise ValueError(f"{cls.kind} policy: option {key!r} was renamed to {cls.renamed[key]!r}")
            if key not in names:
                raise ValueError(f"{cls.kind} policy has no option {key!r} (valid options: "
                                 f"{', '.join(names) or 'none'})")
        return super().__call__(*args, **kwargs)


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` (a frozen dataclass subclass of :class:`Policy`) a plan policy kind."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls is Policy:
        raise TypeError(f"register_policy takes a subclass of Policy, got {cls!r}")
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind or "kind" in cls.__dict__.get("__dataclass_fields__", {}):
        raise ValueError(f"{cls.__name__} needs a class attribute kind = '<name>'")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise TypeError(f"policy {kind!r}: decorate {cls.__name__} with @dataclass(frozen=True)")
    if kind in _POLICIES and _POLICIES[kind] is not cls:
        raise ValueError(f"policy kind {kind!r} is registered twice ({_POLICIES[kind].__name__}, {cls.__name__})")
    if len(cls.symbol) != 1:
        raise ValueError(f"policy {kind!r}: symbol must be one character, got {cls.symbol!r}")
    taken = {c.symbol: k for k, c in _POLICIES.items() if k != kind}
    if cls.symbol in taken:
        raise ValueError(f"policy {kind!r}: grid symbol {cls.symbol!r} is taken by {taken[cls.symbol]!r}")
    _POLICIES[kind] = cls
    return cls


def policy_class(kind: str) -> type[Policy]:
    """The class registered for ``kind``; unknown kinds raise ``ValueError`` naming the registered ones."""
    _load_builtin()
    try:
        return _POLICIES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"policy kind must be one of {kinds()}, got {kind!r}") from None


#: the built-in kinds, in the order :func:`kinds` lists them
BUILTIN = ("full", "stream", "snap", "topk", "drop")


def kinds() -> tuple[str, ...]:
    """Registered policy kinds, built-in ones first, then in registration order."""
    _load_builtin()
    return BUILTIN + tuple(k for k in _POLICIES if k not in BUILTIN)


def _load_builtin() -> None:
    import attnlab.plans.policies  # noqa: F401  (imports every policy file; each registers its class)


def _storage_bytes(*ts: Tensor | None) -> int:
    return sum(t.untyped_storage().nbytes() for t in ts if t is not None)


@dataclass(eq=False)
class Slot:
    """What the cache holds for the key/value heads of one layer that share a policy.

    ``state`` is the policy's own memory (Quest's page extrema, SnapKV's pending scores); tensors under keys
    not starting with ``_`` count as held cache bytes.
    """

    policy: Policy
    kv_heads: tuple[int, ...]
    keys: Tensor | None = None  # (B, n, held, D)
    values: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        extra = [t for name, t in self.state.items() if isinstance(t, Tensor) and not name.startswith("_")]
        return _storage_bytes(self.keys, self.values, *extra)

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Held keys/values followed by the new ones (a new tensor; nothing is stored)."""
        if self.keys is None:
            return k, v
        return torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)

    def hold(self, keys: Tensor | None, values: Tensor | None) -> None:
        self.keys, self.values = keys, values


@dataclass(eq=False)
class GroupKV:
    """What one policy group attends to in one call.

    ``keys``/``values``: the buffer ``(B, n, buffer_len, D)`` (held entries, then the call's new ones; None
    for groups that hold nothing); ``past``: absolute position of the call's first query; ``cached``: True
    when the buffer comes from a :class:`~attnlab.plans.cache.PlanCache` (False: a cache-free forward, the
    buffer is every key so far).
    """

    slot: Slot
    index: Tensor  # (n,) kv head ids
    keys: Tensor | None
    values: Tensor | None
    past: int
    q_len: int
    cached: bool = True

    @property
    def policy(self) -> Policy:
        return self.slot.policy

    @property
    def end(self) -> int:
        """Absolute position after the call's last query (= keys seen so far)."""
        return self.past + self.q_len

    @property
    def buffer_len(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def positions(self) -> Tensor | None:
        """Absolute position of each buffer entry: ``(buffer_len,)`` or ``(B, n, buffer_len)``; None when
        buffer index equals position."""
        if self.keys is None or self.buffer_len == self.end:
            return None
        return self.policy.positions(self)

    def held_mask(self, kv_len: int, heads: int) -> Tensor | None:
        """Bool ``(B or 1, heads or 1, 1, kv_len)``: absolute positions the buffer holds (None: all)."""
        pos = self.positions()
        if self.keys is None:
            return torch.zeros(1, 1, 1, kv_len, dtype=torch.bool)
        if pos is None:
            return None
        dev = pos.device
        if pos.dim() == 1:
            m = torch.zeros(kv_len, dtype=torch.bool, device=dev)
            m[pos] = True
            return m.view(1, 1, 1, kv_len)
        B, n, _ = pos.shape
        m = torch.zeros(B, n, kv_len, dtype=torch.bool, device=dev).scatter_(2, pos, True)
        return m.repeat_interleave(heads // n, dim=1).unsqueeze(2)

    def buffer_mask(self, mask: Tensor, heads: int) -> Tensor:
        """The columns of an absolute bool mask ``(B or 1, 1 or heads, Tq, kv_len)`` this buffer holds."""
        pos = self.positions()
        if pos is None:
            return mask[..., : self.buffer_len]
        pos = pos.to(mask.device)
        if pos.dim() == 1:
            return mask.index_select(-1, pos)
        B, n, Tb = pos.shape
        Tq = mask.shape[2]
        idx = pos.repeat_interleave(heads // n, dim=1).unsqueeze(2).expand(B, heads, Tq, Tb)
        return mask.expand(B, heads, Tq, mask.shape[-1]).gather(-1, idx)


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """SDPA restricted to a bool ``allowed`` (broadcast to ``(B, H, Tq, Tk)``); rows seeing nothing give 0."""
    empty = ~allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty, 0.0) if bool(empty.any()) else out


def causal_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """Causal attention of the last ``q_len`` buffer entries over the whole (contiguous) buffer."""
    Tq, Tb = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        if Tq == 1 or Tq == Tb:
            return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=scale, enable_gqa=gqa)
        return masked_sdpa(q, k, v, Causal().dense(Tq, Tb, Tb - Tq).to(q.device).unsqueeze(0), scale)
    allowed = Causal().dense(Tq, Tb, Tb - Tq).to(q.device).unsqueeze(0) & mask
    return masked_sdpa(q, k, v, allowed, scale)


class Policy(metaclass=_PolicyMeta):
    """Base of every plan policy (the ``full`` behaviour; see the module docstring)."""

    kind: ClassVar[str] = ""
    #: one character in the printed grid
    symbol: ClassVar[str] = "?"
    #: the op (``attnlab.ops``) computing this policy over a whole key/value sequence
    op: ClassVar[str | None] = None
    #: old knob name -> new name (loading an old plan fails naming the new knob)
    renamed: ClassVar[Mapping[str, str]] = {}

    # ---- the vocabulary of the old string policies (HeadPolicy.stream(4, 256), ...) ----------------------
    @classmethod
    def full(cls) -> Policy:
        return policy_class("full")()

    @classmethod
    def stream(cls, sinks: int = 4, window: int = 256) -> Policy:
        return policy_class("stream")(sinks=sinks, window=window)

    @classmethod
    def snap(cls, budget: int = 256, window: int = 32, kernel: int = 7) -> Policy:
        return policy_class("snap")(budget=budget, window=window, kernel=kernel)

    @classmethod
    def topk(cls, pages: int = 16, block: int = 16) -> Policy:
        return policy_class("topk")(pages=pages, block=block)

    @classmethod
    def drop(cls) -> Policy:
        return policy_class("drop")()

    # ---- description -------------------------------------------------------------------------------------
    def knobs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(
            self) else {}

    def label(self) -> str:
        knobs = self.knobs()
        return f"{self.kind}({','.join(str(v) for v in knobs.values())})" if knobs else self.kind

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.knobs()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        return Policy(**dict(d))

    def op_options(self) -> dict[str, Any]:
        """Options of :attr:`op` that compute this policy."""
        return {}

    # ---- the prompt --------------------------------------------------------------------------------------
    def pattern(self) -> Pattern | None:
        """What a query may see without a cache (None: nothing, the head outputs zero)."""
        return Causal()

    def prefill_pattern(self) -> Pattern | None:
        """The static pattern :meth:`attend` computes on a layer's first call (nothing held yet, no padding
        mask), or None when it is not one. A layer whose every policy answers runs its first call as one
        per-head pattern call over all heads (no head split); None keeps the per-policy path."""
        return None

    # ---- the cache ---------------------------------------------------------------------------------------
    def kept(self, seq_len: int) -> int:
        """Positions the cache holds per key/value head after ``seq_len`` tokens (prompt + generated)."""
        return seq_len

    def append(self, slot: Slot, k: Tensor, v: Tensor, past: int) -> tuple[Tensor | None, Tensor | None]:
        """Store a call's keys/values ``(B, n, q_len, D)``; return the buffer the call attends to."""
        kb, vb = slot.extend(k, v)
        slot.hold(kb, vb)
        return kb, vb

    def positions(self, view: GroupKV) -> Tensor:
        """Absolute positions of the buffer entries when they are not ``0 .. end - 1`` (a compressed
        cache): ``(buffer_len,)`` or per head ``(B, n, buffer_len)``."""
        raise NotImplementedError(f"policy {self.kind!r} holds a non-contiguous buffer but defines no positions")

    # ---- computing ---------------------------------------------------------------------------------------
    def observe(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        """Called once per call before the output is computed (by :meth:`attend` or by a weights hook):
        a policy that learns from the prompt (SnapKV) records it here."""

    def look_ahead(self, q: Tensor, view: GroupKV, *, scale: float) -> None:
        """Queries of tokens *after* the prompt (Lookahead Q-Cache's pseudo queries, ``(B, heads, G, D)``),
        shown to the policy after :meth:`observe` and before it compresses: a policy that keeps keys by
        attention score (SnapKV, Ada-KV) adds these rows' attention over the prompt to its scores. Others
        ignore them."""

    def attend(self, q: Tensor, view: GroupKV, *, scale: float, mask: Tensor | None = None) -> Tensor:
        """Output ``(B, heads, q_len, Dv)`` of the group's query heads; ``mask``: bool over buffer columns
        ``(B or 1, 1 or heads, q_len, buffer_len)`` (padding), or None. Prefill chunks and decode steps."""
        return causal_attend(q, view.keys, view.values, scale, mask)

    def weights_mask(self, q: Tensor, view: GroupKV, *, kv_len: int) -> Tensor:
        """Bool ``(B or 1, heads or 1, q_len, kv_len)``: the absolute keys this call attends to."""
        pat = self.pattern()
        Tq = q.shape[2]
        if pat is None or view.keys is None:
            return torch.zeros(1, 1, Tq, kv_len, dtype=torch.bool, device=q.device)
        m = pat.dense(Tq, kv_len, kv_len - Tq).to(q.device).unsqueeze(0)
        held = view.held_mask(kv_len, q.shape[1])
        return m if held is None else m & held.to(q.device)


__all__ = ["GroupKV", "Policy", "Slot", "causal_attend", "kinds", "masked_sdpa", "policy_class",
           "register_policy"]
