"""A per-head KV cache for Hugging Face models: each key/value head keeps only what its policy needs.

:class:`PlanCache` is a ``transformers`` ``Cache`` whose layers (:class:`PlanLayer`) split the key/value
heads of a layer into groups of equal policy and store each group as its own tensor:

* ``full`` / ``topk`` groups keep every position ``(batch, n, seq, head_dim)`` (``topk`` also keeps the
  per-page key minima and maxima Quest needs);
* ``stream`` groups keep the first ``sinks`` positions and the last ``window - 1``:
  ``(batch, n, <= sinks + window - 1, head_dim)``, whatever the sequence length;
* ``snap`` groups keep everything during the prompt, then the selected ``budget`` keys plus the last
  ``window`` once decoding starts;
* ``drop`` groups keep nothing.

So the memory really shrinks: :meth:`PlanCache.nbytes` sums the storage of the tensors actually held.

``update(k, v, layer_idx)`` does not return tensors: it returns a :class:`LayerKV` with, per group, the
keys and values this call must attend to (held positions followed by the new ones). Only the attention
function of :mod:`attnlab.plans.runtime` reads it; ``transformers`` passes it through untouched.

Buffer coordinates: a streaming group's buffer is ``[sinks | recent | new]``, with a gap in absolute
positions between sinks and recent once the window has slid. Distances inside ``recent | new`` are
exact and sinks stay the first ``sinks`` entries, so the head's pattern
``Causal() & (Sinks(s) | SlidingWindow(w))`` evaluated at buffer indices gives exactly the absolute
answer (queries are the last entries: ``q_offset = buffer_len - q_len``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .plan import HeadPlan, HeadPolicy


def _storage_bytes(*ts: Tensor | None) -> int:
    return sum(t.untyped_storage().nbytes() for t in ts if t is not None)


@dataclass(eq=False)
class Group:
    """Held state of the key/value heads of one layer that share a policy."""

    policy: HeadPolicy
    kv_heads: tuple[int, ...]
    keys: Tensor | None = None  # (B, n, held, D)
    values: Tensor | None = None
    # snap: pooled attention of the last prompt queries, (B, n, prompt_len), set by the attention function
    pending_scores: Tensor | None = None
    # topk: per-page key extrema, (B, n, pages, D)
    kmax: Tensor | None = None
    kmin: Tensor | None = None

    def nbytes(self) -> int:
        return _storage_bytes(self.keys, self.values, self.kmax, self.kmin)

    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


@dataclass(eq=False)
class GroupKV:
    """What one group attends to in this call: keys/values ``(B, n, buffer_len, D)`` (None for drop)."""

    group: Group
    index: Tensor  # (n,) kv head ids
    keys: Tensor | None
    values: Tensor | None
    contiguous: bool  # True when buffer index == absolute position (no gap)


@dataclass(eq=False)
class LayerKV:
    """Returned by :meth:`PlanLayer.update` in place of ``(keys, values)``."""

    layer: PlanLayer
    groups: list[GroupKV]
    past: int  # positions seen before this call (absolute position of the first query)
    q_len: int
    num_kv_heads: int
    batch: int = 1
    extras: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The logical dense shape ``(B, kv_heads, past + q_len, head_dim)`` (masks are sliced by it)."""
        dims = [g.keys.shape[-1] for g in self.groups if g.keys is not None]
        return (self.batch, self.num_kv_heads, self.past + self.q_len, dims[0] if dims else 0)


def group_policies(policies: tuple[HeadPolicy, ...]) -> list[tuple[HeadPolicy, tuple[int, ...]]]:
    """Group key/value heads by equal policy, in order of first appearance."""
    out: dict[HeadPolicy, list[int]] = {}
    for h, p in enumerate(policies):
        out.setdefault(p, []).append(h)
    return [(p, tuple(hs)) for p, hs in out.items()]


class PlanLayer(CacheLayerMixin):
    """The cache of one layer under a plan (see the module docstring)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, policies: tuple[HeadPolicy, ...]) -> None:
        super().__init__()
        self.policies = tuple(policies)
        self.groups = [Group(p, hs) for p, hs in group_policies(self.policies)]
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
        self.groups = [Group(p, hs) for p, hs in group_policies(self.policies)]
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

    def view(self, keys: Tensor, values: Tensor) -> LayerKV:
        """Groups over uncached ``(B, Hkv, kv_len, D)`` keys/values (no cache: nothing is stored)."""
        B, Hkv = keys.shape[:2]
        whole = len(self.groups) == 1
        out = []
        for g in self.groups:
            idx = self._idx(g.kv_heads, keys.device)
            if g.policy.kind == "drop":
                out.append(GroupKV(g, idx, None, None, True))
            else:
                k = keys if whole else keys.index_select(1, idx)
                v = values if whole else values.index_select(1, idx)
                out.append(GroupKV(g, idx, k, v, True))
        return LayerKV(self, out, 0, keys.shape[2], Hkv, B)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[LayerKV, LayerKV]:
        """Store ``key_states``/``value_states`` ``(B, Hkv, q_len, D)``; return what this call attends to
        (twice: ``transformers`` unpacks ``keys, values``; the attention function reads the first)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, C, _ = key_states.shape
        if Hkv != len(self.policies):
            raise ValueError(f"plan layer has {len(self.policies)} kv heads, the model gave {Hkv}")
        past = self.seen
        out: list[GroupKV] = []
        whole = len(self.groups) == 1
        for g in self.groups:
            idx = self._idx(g.kv_heads, key_states.device)
            if g.policy.kind == "drop":
                out.append(GroupKV(g, idx, None, None, True))
                continue
            k_new = key_states if whole else key_states.index_select(1, idx)
            v_new = value_states if whole else value_states.index_select(1, idx)
            if g.policy.kind == "snap" and C == 1 and g.pending_scores is not None:
                _snap_compress(g, past)
            contiguous = g.held() == past
            kb = k_new if g.keys is None else torch.cat([g.keys, k_new], dim=2)
            vb = v_new if g.values is None else torch.cat([g.values, v_new], dim=2)
            out.append(GroupKV(g, idx, kb, vb, contiguous))
            self._store(g, kb, vb, past, C)
        self.seen = past + C
        lkv = LayerKV(self, out, past, C, Hkv, B, {"cached": True})
        return lkv, lkv

    def _store(self, g: Group, kb: Tensor, vb: Tensor, past: int, C: int) -> None:
        p = g.policy
        if p.kind == "stream":
            keep = p.sinks + p.window - 1
            if kb.shape[2] > keep:
                # sinks are the first entries of the buffer; the recent part is its tail
                tail = p.window - 1
                parts_k = [kb[:, :, : p.sinks]] + ([kb[:, :, kb.shape[2] - tail:]] if tail else [])
                parts_v = [vb[:, :, : p.sinks]] + ([vb[:, :, vb.shape[2] - tail:]] if tail else [])
                kb, vb = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)  # new storage: memory shrinks
        g.keys, g.values = kb, vb
        if p.kind == "topk":
            _update_pages(g, past, C)


def _update_pages(g: Group, past: int, C: int) -> None:
    """Maintain per-page key maxima/minima (Quest) for positions ``[past, past + C)``."""
    page = g.policy.page
    keys = g.keys
    first = past // page  # first page touched
    start = first * page
    chunk = keys[:, :, start:]
    n = chunk.shape[2]
    pages = -(-n // page)
    pad = pages * page - n
    if pad:
        # pad with the last key so it changes neither the max nor the min
        chunk = torch.cat([chunk, chunk[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    blocks = chunk.reshape(chunk.shape[0], chunk.shape[1], pages, page, chunk.shape[3])
    kmax, kmin = blocks.amax(dim=3), blocks.amin(dim=3)
    if g.kmax is None or first == 0:
        g.kmax, g.kmin = kmax, kmin
    else:
        g.kmax = torch.cat([g.kmax[:, :, :first], kmax], dim=2)
        g.kmin = torch.cat([g.kmin[:, :, :first], kmin], dim=2)


def _snap_compress(g: Group, past: int) -> None:
    """SnapKV: keep the ``budget`` prompt keys with the highest pooled scores plus the last ``window``."""
    p = g.policy
    scores = g.pending_scores  # (B, n, past)
    g.pending_scores = None
    if past <= p.budget + p.window:
        return
    prefix = scores[:, :, : past - p.window]
    if p.kernel > 1:
        B, n, L = prefix.shape
        prefix = F.max_pool1d(prefix.reshape(B * n, 1, L), p.kernel, stride=1, padding=p.kernel // 2)
        prefix = prefix.reshape(B, n, -1)[:, :, :L]
    top = prefix.topk(p.budget, dim=-1).indices.sort(dim=-1).values  # (B, n, budget)
    recent = torch.arange(past - p.window, past, device=top.device).expand(*top.shape[:2], p.window)
    keep = torch.cat([top, recent], dim=-1).unsqueeze(-1)
    D = g.keys.shape[-1]
    g.keys = torch.gather(g.keys, 2, keep.expand(-1, -1, -1, D)).contiguous()
    g.values = torch.gather(g.values, 2, keep.expand(-1, -1, -1, g.values.shape[-1])).contiguous()


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
