"""A per-head KV cache for Hugging Face models: each key/value head keeps only what its policy needs.

:class:`PlanCache` is a ``transformers`` ``Cache`` whose layers (:class:`PlanLayer`) split the key/value
heads of a layer into :class:`~attnlab.plans.policies.Slot` s of equal policy. The cache is generic: what
a slot holds and how it compresses is the policy's :meth:`~attnlab.plans.policies.Policy.append` (a
streaming slot keeps sinks + window, a snap slot its budget after the prompt, a dropped slot nothing), so
the memory really shrinks: :meth:`PlanCache.nbytes` sums the storage of the tensors actually held.

``update(k, v, layer_idx)`` does not return tensors: it returns a :class:`LayerKV` with, per slot, the
buffer this call attends to (held entries followed by the new ones). Only the plan runner
(:class:`attnlab.plans.runtime.PlanRunner`) reads it; ``transformers`` passes it through untouched
(``LayerKV.shape`` is the logical dense shape, so mask slicing by ``key.shape`` keeps working).
:meth:`LayerKV.dense` materializes absolute-position keys/values (zeros where nothing is held) for code
that needs plain tensors (weights hooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .plan import HeadPlan
from .policies import GroupKV, Policy, Slot


@dataclass(eq=False)
class LayerKV:
    """Returned by :meth:`PlanLayer.update` (and :meth:`PlanLayer.view`) in place of ``(keys, values)``."""

    layer: PlanLayer
    groups: list[GroupKV]
    past: int  # positions seen before this call (absolute position of the first query)
    q_len: int
    num_kv_heads: int
    batch: int = 1
    head_dim: int = 0
    cached: bool = True
    #: this call's keys and values over every kv head, ``(B, Hkv, q_len, D)`` (a cache-free view: every key)
    call: tuple[Tensor, Tensor] | None = None

    @property
    def kv_len(self) -> int:
        return self.past + self.q_len

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical dense shape ``(B, kv_heads, past + q_len, head_dim)`` (masks are sliced by it)."""
        return (self.batch, self.num_kv_heads, self.kv_len, self.head_dim)

    def dense(self) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, kv_heads, kv_len, D)`` at absolute positions; zeros where nothing is held
        (a weights mask from the runner never selects those)."""
        ref = next((g for g in self.groups if g.keys is not None), None)
        if ref is None:
            raise ValueError("every head of this layer is dropped: there are no keys")
        B, T = self.batch, self.kv_len
        k = ref.keys.new_zeros(B, self.num_kv_heads, T, ref.keys.shape[-1])
        v = ref.values.new_zeros(B, self.num_kv_heads, T, ref.values.shape[-1])
        for g in self.groups:
            if g.keys is None:
                continue
            pos = g.positions()
            n, Tb = g.keys.shape[1], g.buffer_len
            if pos is None:
                pos = torch.arange(Tb, device=g.keys.device)
            pos = pos.expand(B, n, Tb) if pos.dim() == 1 else pos
            for dst, src in ((k, g.keys), (v, g.values)):
                part = src.new_zeros(B, n, T, src.shape[-1])
                part.scatter_(2, pos.unsqueeze(-1).expand(-1, -1, -1, src.shape[-1]), src)
                dst.index_copy_(1, g.index, part)
        return k, v


def group_policies(policies: tuple[Policy, ...]) -> list[tuple[Policy, tuple[int, ...]]]:
    """Group key/value heads by equal policy, in order of first appearance."""
    out: dict[Policy, list[int]] = {}
    for h, p in enumerate(policies):
        out.setdefault(p, []).append(h)
    return [(p, tuple(hs)) for p, hs in out.items()]


class PlanLayer(CacheLayerMixin):
    """The cache of one layer under a plan (see the module docstring)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, policies: tuple[Policy, ...]) -> None:
        super().__init__()
        self.policies = tuple(policies)
        self.groups = [Slot(p, hs) for p, hs in group_policies(self.policies)]
        self.seen = 0
        self._index: dict[tuple[int, ...], Tensor] = {}

    # ---- the CacheLayerMixin contract ------------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.groups = [Slot(p, hs) for p, hs in group_policies(self.policies)]
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:  # pragma: no cover - no beam search here
        raise NotImplementedError("PlanCache does not support beam search")

    # ---- storage ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def held_positions(self) -> int:
        """Positions held summed over this layer's key/value heads."""
        return sum(g.held() * len(g.kv_heads) for g in self.groups)

    def _idx(self, heads: tuple[int, ...], device: torch.device) -> Tensor:
        t = self._index.get(heads)
        if t is None or t.device != device:
            t = torch.tensor(heads, dtype=torch.long, device=device)
            self._index[heads] = t
        return t

    def _split(self, t: Tensor, idx: Tensor) -> Tensor:
        return t if len(self.groups) == 1 else t.index_select(1, idx)

    def view(self, keys: Tensor, values: Tensor, q_len: int) -> LayerKV:
        """Slots over uncached ``(B, Hkv, kv_len, D)`` keys/values (a cache-free forward: nothing is stored)."""
        B, Hkv, T, D = keys.shape
        out = []
        for g in self.groups:
            idx = self._idx(g.kv_heads, keys.device)
            holds = g.policy.kept(T) > 0
            out.append(GroupKV(g, idx, self._split(keys, idx) if holds else None,
                               self._split(values, idx) if holds else None, T - q_len, q_len, cached=False))
        return LayerKV(self, out, T - q_len, q_len, Hkv, B, D, cached=False, call=(keys, values))

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[LayerKV, LayerKV]:
        """Store ``key_states``/``value_states`` ``(B, Hkv, q_len, D)``; return what this call attends to
        (twice: ``transformers`` unpacks ``keys, values``; the runner reads the first)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, C, D = key_states.shape
        if Hkv != len(self.policies):
            raise ValueError(f"plan layer has {len(self.policies)} kv heads, the model gave {Hkv}")
        past = self.seen
        out: list[GroupKV] = []
        for g in self.groups:
            idx = self._idx(g.kv_heads, key_states.device)
            kb, vb = g.policy.append(g, self._split(key_states, idx), self._split(value_states, idx), past)
            out.append(GroupKV(g, idx, kb, vb, past, C, cached=True))
        self.seen = past + C
        lkv = LayerKV(self, out, past, C, Hkv, B, D, cached=True, call=(key_states, value_states))
        return lkv, lkv


class PlanCache(Cache):
    """A ``transformers`` cache that follows a :class:`HeadPlan`, one :class:`PlanLayer` per layer."""

    def __init__(self, plan: HeadPlan) -> None:
        super().__init__(layers=[PlanLayer(row) for row in plan.policies])
        self.plan = plan

    def nbytes(self) -> int:
        """Bytes of the key/value (and page-summary) tensors actually held."""
        return sum(layer.nbytes() for layer in self.layers)

    def held_positions(self) -> int:
        return sum(layer.held_positions() for layer in self.layers)


def dense_cache_bytes(num_layers: int, num_kv_heads: int, seq_len: int, head_dim: int,
                      batch: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of a dense KV cache: keys and values of every position, layer and key/value head."""
    return 2 * batch * num_layers * num_kv_heads * seq_len * head_dim * dtype_bytes


__all__ = ["GroupKV", "LayerKV", "PlanCache", "PlanLayer", "dense_cache_bytes", "group_policies"]
