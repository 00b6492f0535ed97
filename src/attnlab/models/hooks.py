"""Named hook points inside every attention layer of a Hugging Face model, and the hooks that run there.

Hook points (layer ``l``, shapes for a call with ``Tq`` new queries over ``Tk`` keys)::

    blocks.{l}.attn.q        (B, H, Tq, D)     queries as the model computed them (after RoPE / q_norm)
    blocks.{l}.attn.k        (B, Hkv, Tk, D)   keys the layer attends to this call (cached keys included)
    blocks.{l}.attn.v        (B, Hkv, Tk, Dv)  values, likewise
    blocks.{l}.attn.scores   (B, H, r, Tk)     scaled q.k scores of query rows ctx.rows = (start, end), before
                                               the mask and the softmax (chunked: r <= ctx.rows length)
    blocks.{l}.attn.weights  (B, H, r, Tk)     softmax weights of the same rows, zero where the runner's rule
                                               (``ctx.mask``) forbids
    blocks.{l}.attn.z        (B, H, Tq, Dv)    each head's output, before the output projection
    blocks.{l}.attn.out      (B, Tq, dim)      the layer's output, after the output projection

``"*"`` in place of the layer number matches every layer (``"blocks.*.attn.weights"``).

A hook is ``fn(value, ctx) -> None | Tensor``: returning None makes it an *observer*, returning a tensor of the
same shape makes it an *intervention* that replaces the value for everything downstream (later hooks on the
same point, the attention output, the rest of the model). Any number of hooks compose, in registration order.
``ctx`` is a :class:`HookContext`.

When a layer has any ``scores`` or ``weights`` hook, its output is computed from those same chunked weights
(one masked-softmax pass through :func:`attnlab.core.softmax.weights_chunks`, output = weights @ v, over what
the running op attends: ``runner.weights_mask``), so observers see exactly the weights that produce the output
and never recompute attention.

Registering hooks: :func:`attnlab.models.hf.add_hook`, :func:`attnlab.models.hf.hooks`,
:func:`attnlab.models.hf.run_with_cache` (this module holds the pieces they share).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

POINTS = ("q", "k", "v", "scores", "weights", "z", "out")
_NAME = re.compile(r"^blocks\.(\d+|\*)\.attn\.([a-z]+)$")

Hook = Callable[[Tensor, "HookContext"], "Tensor | None"]


@dataclass
class HookContext:
    """What a hook knows about the call it runs in.

    Attributes:
        name: the concrete hook point (``"blocks.3.attn.z"``), never a ``*`` pattern.
        layer: layer index.
        module: the model's attention module of that layer.
        q_offset: absolute position of the first query row of this call (tokens seen before it).
        scale: the score scale the model uses (``module.scaling``; Gemma 3: ``query_pre_attn_scalar ** -0.5``).
        rows: ``(start, end)`` query rows of this chunk (``scores`` / ``weights``); None elsewhere.
        runner: the runner computing this layer's attention (``OpRunner``, ``PlanRunner``, ...).
        mask: the free bool mask ``(B or 1, 1, Tq, Tk)`` of this call when it says more than the causal rule
            (padding, sliding window); on ``scores`` / ``weights`` hooks, the rows' full rule (what the weights
            may be non-zero on). None = the plain causal (or, for encoders, full) rule.
    """

    name: str
    layer: int
    module: nn.Module
    q_offset: int
    scale: float
    rows: tuple[int, int] | None = None
    runner: Any = None
    mask: Tensor | None = None


def parse_name(name: str, num_layers: int | None = None) -> tuple[int | None, str]:
    """``"blocks.3.attn.z"`` -> ``(3, "z")``; ``"blocks.*.attn.q"`` -> ``(None, "q")``. Bad names raise."""
    m = _NAME.match(name)
    if m is None or m.group(2) not in POINTS:
        raise ValueError(f"bad hook name {name!r}: use 'blocks.<layer or *>.attn.<point>' with point one of "
                         f"{', '.join(POINTS)}")
    layer = None if m.group(1) == "*" else int(m.group(1))
    if layer is not None and num_layers is not None and layer >= num_layers:
        raise ValueError(f"hook name {name!r}: the model has {num_layers} attention layers (0..{num_layers - 1})")
    return layer, m.group(2)


def hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.attn.{point}"


@dataclass
class _Entry:
    key: int
    layer: int | None
    point: str
    fn: Hook


class HookSet:
    """The hooks registered on one model, in registration order."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        self._next = 0

    def add(self, layer: int | None, point: str, fn: Hook) -> int:
        if not callable(fn):
            raise TypeError(f"a hook must be callable fn(value, ctx), got {type(fn).__name__}")
        self._next += 1
        self._entries.append(_Entry(self._next, layer, point, fn))
        return self._next

    def remove(self, key: int) -> None:
        self._entries = [e for e in self._entries if e.key != key]

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, layer: int, point: str) -> list[Hook]:
        return [e.fn for e in self._entries if e.point == point and (e.layer is None or e.layer == layer)]

    def has(self, layer: int, point: str) -> bool:
        return any(e.point == point and (e.layer is None or e.layer == layer) for e in self._entries)

    def run(self, value: Tensor, fns: list[Hook], ctx: HookContext) -> Tensor:
        """Apply ``fns`` in order; an intervention's result feeds the next hook. Shapes must not change."""
        for fn in fns:
            new = fn(value, ctx)
            if new is not None:
                if not isinstance(new, Tensor) or new.shape != value.shape:
                    got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                    raise ValueError(f"hook {getattr(fn, '__name__', fn)!r} on {ctx.name} returned {got}; an "
                                     f"intervention must return a tensor of shape {tuple(value.shape)}")
                value = new
        return value


class HookHandle:
    """Returned by ``add_hook``; ``remove()`` (or leaving a ``with`` block) unregisters the hook(s)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def remove(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class WeightsSummary:
    """What :func:`attnlab.models.hf.run_with_cache` keeps of a ``weights`` point unless asked for a slice.

    Attributes (float32, on the CPU):
        received: ``(B, H, Tk)`` attention each key receives, summed over every query row of the call.
        entropy: ``(B, H, Tq)`` entropy (nats) of each query row's weights.
        max: ``(B, H, Tq)`` the largest weight of each row.
        argmax: ``(B, H, Tq)`` the key each row weights most (int64).
    Memory is ``O(B * H * (Tq + Tk))``, never the ``Tq x Tk`` square.
    """

    received: Tensor
    entropy: Tensor
    max: Tensor
    argmax: Tensor


@dataclass
class _SummaryAcc:
    received: Tensor | None = None
    rows: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)

    def add(self, w: Tensor, start: int) -> None:
        w = w.detach().float()
        rec = w.sum(dim=2).cpu()
        self.received = rec if self.received is None else self.received + rec
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)
        mx, am = w.max(dim=-1)
        self.rows[start] = (ent.cpu(), mx.cpu(), am.cpu())

    def result(self) -> WeightsSummary:
        order = sorted(self.rows)
        ent = torch.cat([self.rows[s][0] for s in order], dim=2)
        mx = torch.cat([self.rows[s][1] for s in order], dim=2)
        am = torch.cat([self.rows[s][2] for s in order], dim=2)
        return WeightsSummary(self.received, ent, mx, am)


__all__ = ["POINTS", "Hook", "HookContext", "HookHandle", "HookSet", "WeightsSummary", "hook_name", "parse_name"]
