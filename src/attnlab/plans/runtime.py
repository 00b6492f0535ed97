"""Run a Hugging Face model under a :class:`HeadPlan`: per-head attention in prefill and decoding.

:class:`PlanRunner` is the per-model callback of :func:`attnlab.models.hf.install`. For each layer it
splits the heads into policy groups and computes each group with the cheapest engine that is exact for it:

* full / snap / topk heads in the prompt: SDPA causal (``is_causal`` fast path);
* streaming heads in the prompt: ``attnlab.attention(..., pattern=Causal() & (Sinks(s) | SlidingWindow(w)),
  backend="blocksparse")``, so the blocks outside sinks + window are never computed;
* decoding (one query): plain SDPA over what the group's cache holds (streaming caches hold exactly what
  the query may see, so no mask is needed); Quest ``topk`` heads gather their top pages through the
  block-sparse engine (``plan_from_blocks`` / ``run_plan``);
* dropped heads output zero.

With a :class:`~attnlab.plans.cache.PlanCache` the caches really shrink; without one (``use_cache=False``
or a plain ``DynamicCache``) the same patterns run over the full key tensor.

Score modifiers and output gates of :mod:`attnlab.plans.calibrate` ride along (``interventions=``).

Shapes: q ``(batch, heads, q_len, head_dim)``; k, v ``(batch, kv_heads, kv_len, head_dim)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.attention import attention
from ..core.blocksparse import DEFAULT_GROUP, plan_from_blocks, run_plan
from ..core.patterns import Causal
from ..core.score_mods import ScoreMod
from ..models.hf import geometry, install
from .cache import GroupKV, LayerKV, PlanCache, PlanLayer
from .plan import HeadPlan, HeadPolicy

#: query rows below which streaming prefill uses one dense masked call instead of gathered tiles
BLOCKSPARSE_MIN_Q = 128


class HeadSubset(ScoreMod):
    """A score modifier restricted to a subset of query heads: head ``i`` of the call is ``heads[i]``."""

    def __init__(self, mod: ScoreMod, heads: Tensor, total_heads: int) -> None:
        self.mod, self.heads, self.total = mod, heads, total_heads
        self.kind = mod.kind

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.mod.score_mod(score, b, self.heads.to(h.device)[h], q_idx, kv_idx)

    def factor(self, heads, device, dtype):
        return self.mod.factor(self.total, device, dtype)[self.heads.to(device)]


def _q_index(kv: Tensor, q_per_kv: int) -> Tensor:
    """Query heads served by key/value heads ``kv`` (GQA: kv head j serves j*q_per_kv .. +q_per_kv-1)."""
    return (kv.view(-1, 1) * q_per_kv + torch.arange(q_per_kv, device=kv.device)).flatten()


def _visible_all(policy: HeadPolicy, buffer_len: int) -> bool:
    """True when a single (last) query may see every entry of the buffer."""
    if policy.kind == "stream":
        return buffer_len <= policy.sinks + policy.window
    return True


def _dense_group(q, k, v, policy: HeadPolicy, scaling, mask, mod) -> Tensor:
    """Exact masked attention over a buffer (padding masks, score modifiers)."""
    Tq, Tb = q.shape[2], k.shape[2]
    pat = policy.pattern() or Causal()
    if mask is None:
        backend = "auto" if mod is not None else ("blocksparse" if Tq >= BLOCKSPARSE_MIN_Q else "dense_mask")
        if type(pat) is Causal and mod is None:
            backend = "sdpa"
        return attention(q, k, v, pattern=pat, score_mod=mod, scale=scaling, backend=backend)
    allowed = pat.dense(Tq, Tb, Tb - Tq).to(q.device).unsqueeze(0) & mask  # (B or 1, 1, Tq, Tb)
    if mod is not None:
        from ..core.reference import index_grids

        q_pos, kv_pos = index_grids(Tq, Tb, Tb - Tq, q.device)
        b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
        h = torch.arange(q.shape[1], device=q.device).view(1, -1, 1, 1)
        s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scaling
        s = mod.score_mod(s, b, h, q_pos, kv_pos).masked_fill(~allowed, float("-inf"))
        w = torch.softmax(s, -1).nan_to_num(0.0)
        return w @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    empty = ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(empty, 0.0)


def _quest(q: Tensor, g: GroupKV, scaling: float) -> Tensor:
    """One decode query per head over the top-k pages (Quest's upper bound q.max(kmax, kmin))."""
    grp = g.group
    p = grp.policy
    B, H, _, D = q.shape
    n = len(grp.kv_heads)
    qpk = H // n
    Tb = g.keys.shape[2]
    pages = grp.kmax.shape[2]
    qh = q[:, :, 0].view(B, n, qpk, 1, D)
    bound = torch.maximum(qh * grp.kmax.unsqueeze(2), qh * grp.kmin.unsqueeze(2)).sum(-1)  # (B, n, qpk, P)
    bound = bound.amax(dim=2)
    bound[..., -1] = float("inf")  # the page of the current token is always read
    nsel = min(p.k, pages)
    sel = bound.topk(nsel, dim=-1).indices.sort(dim=-1).values.unsqueeze(2)  # (B, n, 1, nsel)
    gp = plan_from_blocks(sel, torch.ones_like(sel, dtype=torch.bool), 1, Tb, p.page, q_offset=Tb - 1)
    return run_plan(q, g.keys, g.values, gp, scaling)


def _record_snap(q: Tensor, g: GroupKV, scaling: float) -> None:
    """SnapKV observation: attention of the last ``window`` queries, summed per key/value head."""
    p = g.group.policy
    Tq, Tb = q.shape[2], g.keys.shape[2]
    obs = min(p.window, Tq)
    n = g.keys.shape[1]
    qo = q[:, :, Tq - obs:]
    s = (qo.view(q.shape[0], n, -1, obs, q.shape[-1]) @ g.keys.unsqueeze(2).transpose(-1, -2)) * scaling
    qpos = torch.arange(Tb - obs, Tb, device=q.device).view(obs, 1)
    s = s.masked_fill(torch.arange(Tb, device=q.device).view(1, Tb) > qpos, float("-inf"))
    g.group.pending_scores = torch.softmax(s, dim=-1).sum(dim=(2, 3))  # (B, n, Tb)


@dataclass
class Timer:
    """Wall time spent inside attention, per engine (filled when ``PlanRunner.timing`` is on)."""

    seconds: dict[str, float]

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


class PlanRunner:
    """Per-model attention callback that follows a plan (see the module docstring).

    Args:
        plan: the per-(layer, kv head) policies; must match the model's geometry.
        interventions: objects with ``score_mod(layer, num_heads) -> ScoreMod | None`` and/or
            ``head_scale(layer, num_heads) -> Tensor | None`` (``(heads,)`` output gates), applied in order.
    """

    def __init__(self, plan: HeadPlan, interventions: Sequence[Any] = (), q_per_kv: int | None = None) -> None:
        self.plan = plan
        self.interventions = list(interventions)
        self.q_per_kv = q_per_kv or plan.q_per_kv
        self.timer = Timer({})
        self.timing = False
        self._views: dict[int, PlanLayer] = {}

    # ---- intervention plumbing -------------------------------------------------------------------
    def _mod(self, layer: int, heads: int) -> ScoreMod | None:
        mods = [m for iv in self.interventions if hasattr(iv, "score_mod")
                if (m := iv.score_mod(layer, heads)) is not None]
        if not mods:
            return None
        if len(mods) == 1:
            return mods[0]
        from ..core.score_mods import Compose

        return Compose(tuple(mods))

    def _scale(self, layer: int, heads: int, device, dtype) -> Tensor | None:
        out = None
        for iv in self.interventions:
            if hasattr(iv, "head_scale"):
                s = iv.head_scale(layer, heads)
                if s is not None:
                    s = s.to(device=device, dtype=dtype)
                    out = s if out is None else out * s
        return out

    # ---- the callback ----------------------------------------------------------------------------
    def __call__(self, module: nn.Module, q: Tensor, k: Tensor | LayerKV, v: Tensor | None,
                 mask: Tensor | None, scaling: float, layer_idx: int) -> Tensor:
        if isinstance(k, LayerKV):
            lkv = k
        else:
            layer = self._views.get(layer_idx)
            if layer is None:
                layer = self._views[layer_idx] = PlanLayer(self.plan.policies[layer_idx])
            lkv = layer.view(k, v)
        H = q.shape[1]
        mod = self._mod(layer_idx, H)
        out = self._layer(q, lkv, scaling, mask, mod)
        scale = self._scale(layer_idx, H, q.device, q.dtype)
        if scale is not None:
            out = out * scale.view(1, -1, 1, 1)
        return out

    def _layer(self, q: Tensor, lkv: LayerKV, scaling: float, mask: Tensor | None, mod: ScoreMod | None) -> Tensor:
        B, H, Tq, D = q.shape
        qpk = H // lkv.num_kv_heads
        single = len(lkv.groups) == 1
        out = None if single else q.new_zeros(B, H, Tq, lkv.groups[0].keys.shape[-1] if lkv.groups[0].keys
                                              is not None else D)
        for g in lkv.groups:
            qidx = None if single else _q_index(g.index, qpk)
            if g.keys is None:  # dropped heads
                if single:
                    return q.new_zeros(B, H, Tq, D)
                continue
            qg = q if single else q.index_select(1, qidx)
            mg = None if mask is None else _buffer_mask(mask, g, lkv)
            modg = None if mod is None else (mod if single else HeadSubset(mod, qidx, H))
            t0 = time.perf_counter() if self.timing else 0.0
            og = self._group(qg, g, scaling, mg, modg, lkv)
            if self.timing:
                self.timer.add(f"{g.group.policy.kind}/{'decode' if Tq == 1 else 'prefill'}",
                               time.perf_counter() - t0)
            if single:
                return og
            out.index_copy_(1, qidx, og)
        return out

    def _group(self, q: Tensor, g: GroupKV, scaling: float, mask: Tensor | None, mod: ScoreMod | None,
               lkv: LayerKV) -> Tensor:
        p = g.group.policy
        k, v = g.keys, g.values
        Tq, Tb = q.shape[2], k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        if p.kind == "snap" and Tq > 1 and lkv.extras.get("cached", False):
            _record_snap(q, g, scaling)
        if mask is not None or mod is not None:
            return _dense_group(q, k, v, p, scaling, mask, mod)
        if Tq == 1 and p.kind == "topk" and g.group.kmax is not None and g.group.kmax.shape[2] > p.k:
            return _quest(q, g, scaling)
        if Tq == 1 and _visible_all(p, Tb):
            return F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=gqa)
        if p.kind == "stream":
            if Tq < BLOCKSPARSE_MIN_Q:
                return attention(q, k, v, pattern=p.pattern(), scale=scaling, backend="dense_mask")
            return attention(q, k, v, pattern=p.pattern(), scale=scaling, backend="blocksparse",
                             group=stream_group(p.window, q.device))
        if Tq == Tb:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        return attention(q, k, v, pattern=Causal(), scale=scaling, backend="sdpa")


def stream_group(window: int, device: torch.device) -> int:
    """Query rows per tile for a sinks + window head: a tile reads ``window + rows - 1`` keys, so rows
    beyond about a quarter of the window mostly add masked work (window 256: 64 rows beat the tuned 128
    by about 15% on CPU in the same run)."""
    tuned = DEFAULT_GROUP.get(device.type, 128)
    return max(32, min(tuned, 1 << max(5, (window // 4).bit_length() - 1)))


def _buffer_mask(mask: Tensor, g: GroupKV, lkv: LayerKV) -> Tensor:
    """Columns of an absolute ``(B or 1, 1, Tq, kv_len)`` mask that this group's buffer holds."""
    Tb = g.keys.shape[2]
    if mask.shape[-1] == Tb:
        return mask
    return mask.index_select(-1, _stream_positions(g, lkv).to(mask.device))


def _stream_positions(g: GroupKV, lkv: LayerKV) -> Tensor:
    p = g.group.policy
    Tb = g.keys.shape[2]
    end = lkv.past + lkv.q_len
    if p.kind != "stream":
        raise NotImplementedError(f"a padding mask with a compressed {p.kind} cache is not supported")
    tail = Tb - p.sinks
    return torch.cat([torch.arange(p.sinks), torch.arange(end - tail, end)])


# ---------------------------------------------------------------------------------------------------------
# model-level helpers
# ---------------------------------------------------------------------------------------------------------
def plan_for_model(model: nn.Module, plan: HeadPlan) -> HeadPlan:
    geo = geometry(model)
    plan.check_model(geo.num_layers, geo.num_kv_heads, geo.group)
    return plan


class use_plan:
    """``with use_plan(model, plan) as runner:`` -- the model's attention follows ``plan`` in the block."""

    def __init__(self, model: nn.Module, plan: HeadPlan, interventions: Sequence[Any] = ()) -> None:
        plan_for_model(model, plan)
        self.model = model
        self.runner = PlanRunner(plan, interventions)
        self.handle = None

    def __enter__(self) -> PlanRunner:
        self.handle = install(self.model, self.runner)
        return self.runner

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def new_cache(model: nn.Module, plan: HeadPlan) -> PlanCache:
    plan_for_model(model, plan)
    return PlanCache(plan)


@torch.no_grad()
def prefill(model: nn.Module, input_ids: Tensor, cache: PlanCache | None, chunk: int | None = None) -> Tensor:
    """Run the prompt ``(batch, seq)`` through the model (optionally in chunks); returns the last logits
    ``(batch, vocab)``."""
    T = input_ids.shape[1]
    step = chunk or T
    logits = None
    for s in range(0, T, step):
        ids = input_ids[:, s: s + step]
        out = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits


@torch.no_grad()
def greedy_generate(
    model: nn.Module, input_ids: Tensor, plan: HeadPlan, max_new_tokens: int = 8, chunk: int | None = None,
    interventions: Sequence[Any] = (), eos_token_id: int | None = None,
) -> dict[str, Any]:
    """Greedy decoding under ``plan`` with a :class:`PlanCache`.

    Returns ``{"tokens": (batch, new) LongTensor, "prefill_s", "decode_s", "decode_tok_s", "kv_bytes",
    "kv_positions"}``; ``kv_bytes`` is the storage the cache holds after decoding.
    """
    cache = new_cache(model, plan)
    with use_plan(model, plan, interventions):
        t0 = time.perf_counter()
        logits = prefill(model, input_ids, cache, chunk)
        t1 = time.perf_counter()
        toks = [logits.argmax(-1)]
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool((toks[-1] == eos_token_id).all()):
                break
            out = model(input_ids=toks[-1][:, None], past_key_values=cache, use_cache=True)
            toks.append(out.logits[:, -1].argmax(-1))
        t2 = time.perf_counter()
    steps = len(toks) - 1
    return {
        "tokens": torch.stack(toks, dim=1),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tok_s": steps / (t2 - t1) if steps and t2 > t1 else float("nan"),
        "kv_bytes": cache.nbytes(),
        "kv_positions": cache.held_positions(),
    }


__all__ = ["BLOCKSPARSE_MIN_Q", "HeadSubset", "PlanRunner", "greedy_generate", "new_cache", "plan_for_model", "stream_group",
           "prefill", "use_plan"]
