"""Run a Hugging Face model under a :class:`HeadPlan`: per-head attention in prefill and decoding.

:class:`PlanRunner` implements the runner protocol of :mod:`attnlab.models.hf` (``attend``, ``weights_mask``,
``new_cache``). It is generic over policies: for each layer it splits the key/value heads into policy slots
and asks each policy (:mod:`attnlab.plans.policies`) for its output over what the slot's buffer holds --
the same call for a whole prompt, a prefill chunk or one decode step. Dropped heads output zero.

With a :class:`~attnlab.plans.cache.PlanCache` the caches really shrink and the runner receives
:class:`~attnlab.plans.cache.LayerKV` objects in place of k and v; without one (``use_cache=False`` or a
plain ``DynamicCache``) the same policies run over the full key tensors.

Calibrations and other interventions are hooks (:mod:`attnlab.models.hooks`, :mod:`attnlab.plans.calibrate`)
that compose with the plan: a layer with ``scores``/``weights`` hooks is computed from chunked weights over
:meth:`PlanRunner.weights_mask` and :meth:`PlanRunner.dense_kv` (:meth:`PlanRunner.attend_weights` is the same
computation inside the runner).

Shapes: q ``(batch, heads, q_len, head_dim)``; k, v ``(batch, kv_heads, kv_len, head_dim)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.attention import attention
from ..core.patterns import Pattern, PerHead, SlidingWindow
from ..core.score_mods import ScoreMod
from ..core.softmax import grouped_apply, weights_chunks
from ..models.hf import geometry, use
from .cache import LayerKV, PlanCache, PlanLayer
from .plan import HeadPlan
from .policies.stream import SPARSE_MIN_Q, stream_q_block

#: kept under its old name: query rows below which streaming prefill uses one dense masked call
BLOCKSPARSE_MIN_Q = SPARSE_MIN_Q
stream_group = stream_q_block


def _q_index(kv: Tensor, q_per_kv: int) -> Tensor:
    """Query heads served by key/value heads ``kv`` (GQA: kv head j serves j*q_per_kv .. +q_per_kv-1)."""
    return (kv.view(-1, 1) * q_per_kv + torch.arange(q_per_kv, device=kv.device)).flatten()


@dataclass
class Timer:
    """Wall time spent inside attention, per policy and phase (filled when ``PlanRunner.timing`` is on)."""

    seconds: dict[str, float]

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


def _model_window(module: nn.Module | None, mask: Tensor | None) -> int | None:
    """The layer's own sliding window when ``mask`` is exactly its causal band (a causal sliding-window layer,
    no padding), else None (the mask then says more and is applied as it is)."""
    if mask is None or module is None:
        return None
    call = module.__dict__.get("_attnlab_call")
    if call is None or not call.sliding or not getattr(module, "is_causal", False):
        return None
    if call.padding is not None and not bool(call.padding.all()):
        return None
    return int(call.sliding)


class PlanRunner:
    """The runner of a plan (see the module docstring).

    Args:
        plan: the per-(layer, kv head) policies; must match the model's geometry.
    """

    def __init__(self, plan: HeadPlan, **removed: Any) -> None:
        _removed(removed)
        self.plan = plan
        self.q_per_kv = plan.q_per_kv
        self.timer = Timer({})
        self.timing = False
        self._views: dict[int, PlanLayer] = {}
        self._prefill: dict[tuple, PerHead | None] = {}
        # layer -> (LayerKV, its dense keys): weights_mask called with keys from dense_kv reads the cache
        self._dense: dict[int, tuple[LayerKV, Tensor]] = {}

    # ---- the runner protocol ---------------------------------------------------------------------
    def new_cache(self, model: nn.Module | None = None) -> PlanCache:
        """A :class:`PlanCache` for this plan (checked against ``model``'s geometry when given)."""
        if model is not None:
            plan_for_model(model, self.plan)
        return PlanCache(self.plan)

    def layer_kv(self, layer: int, q: Tensor, k: Tensor | LayerKV, v: Tensor | LayerKV | None) -> LayerKV:
        """``k`` itself when the PlanCache sent a :class:`LayerKV`; else slots over the plain tensors."""
        if isinstance(k, LayerKV):
            return k
        held = self._dense.get(layer)
        if held is not None and held[1] is k:
            return held[0]
        view = self._views.get(layer)
        if view is None:
            view = self._views[layer] = PlanLayer(self.plan.policies[layer])
        return view.view(k, v, q.shape[2])

    def attend(self, layer: int, module: nn.Module | None, q: Tensor, k: Tensor | LayerKV, v: Tensor | LayerKV,
               *, mask: Tensor | None = None, scale: float, q_offset: int | None = None) -> Tensor:
        """Output ``(B, H, Tq, Dv)`` of layer ``layer``; ``mask``: bool ``(B or 1, 1, Tq, kv_len)`` over absolute
        keys (padding) or None (the causal rule). ``q_offset`` is implied by the cache (checked when given)."""
        lkv = self.layer_kv(layer, q, k, v)
        if q_offset is not None and q_offset != lkv.past:
            raise ValueError(f"layer {layer}: q_offset {q_offset} but the cache has seen {lkv.past} positions")
        self.observe(q, lkv, scale=scale)
        window = _model_window(module, mask)
        if window is not None and lkv.past == 0 and lkv.call is not None:
            # the model's sliding window on an unpadded prompt: its mask is exactly the causal band, so the
            # layer's prefill patterns ANDed with it replace the dense masked call (only the band is computed)
            pat = self.prefill_pattern(lkv, q.shape[1], window=window)
            if pat is not None:
                return self._timed("window/prefill", lambda: attention(q, *lkv.call, pattern=pat, scale=scale,
                                                                       q_offset=0))
        return self._attend(q, lkv, scale, mask)

    def dense_kv(self, layer: int, k: Tensor | LayerKV, *, q: Tensor | None = None,
                 scale: float | None = None) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, Hkv, kv_len, D)`` at absolute positions (zeros where the cache holds nothing)
        for code that computes the layer itself from weights (hooks); :meth:`weights_mask` given these keys
        reads the cache. With the call's ``q`` and ``scale`` the policies observe the call (as :meth:`attend`
        does: SnapKV's window is recorded even when hooks compute the output)."""
        if not isinstance(k, LayerKV):
            raise TypeError(f"dense_kv takes the LayerKV a PlanCache returned, got {type(k).__name__}")
        if q is not None and scale is not None:
            self.observe(q, k, scale=scale)
        dk, dv = k.dense()
        self._dense = {layer: (k, dk)}
        return dk, dv

    def weights_mask(self, layer: int, q: Tensor, k: Tensor | LayerKV, *, q_offset: int | None = None,
                     v: Tensor | None = None) -> Tensor:
        """Bool ``(B or 1, H, Tq, kv_len)``: the absolute keys each query head attends to in this call (``k``: the
        call's LayerKV, keys from :meth:`dense_kv`, or plain keys of a cache-free forward)."""
        lkv = self.layer_kv(layer, q, k, v if v is not None else k)
        B, H, Tq, _ = q.shape
        qpk = H // lkv.num_kv_heads
        parts = []
        for g in lkv.groups:
            qg = q.index_select(1, _q_index(g.index, qpk)) if len(lkv.groups) > 1 else q
            m = g.policy.weights_mask(qg, g, kv_len=lkv.kv_len)
            parts.append((g, m.expand(m.shape[0], qg.shape[1], Tq, lkv.kv_len)))
        if len(parts) == 1:
            return parts[0][1]
        Bm = max(m.shape[0] for _, m in parts)
        out = torch.zeros(Bm, H, Tq, lkv.kv_len, dtype=torch.bool, device=q.device)
        for g, m in parts:
            out.index_copy_(1, _q_index(g.index, qpk), m.expand(Bm, *m.shape[1:]))
        return out

    # ---- computing -------------------------------------------------------------------------------
    def observe(self, q: Tensor, lkv: LayerKV, *, scale: float) -> None:
        """Let each policy see the call before its output is computed (SnapKV records the prompt here)."""
        for g, qg in self._groups(q, lkv):
            g.policy.observe(qg, g, scale=scale)

    def look_ahead(self, q: Tensor, lkv: LayerKV, *, scale: float) -> None:
        """Show each policy queries of tokens after the prompt ``(B, H, G, D)`` before it compresses
        (:meth:`Policy.look_ahead <attnlab.plans.policies.base.Policy.look_ahead>`, Lookahead Q-Cache)."""
        for g, qg in self._groups(q, lkv):
            g.policy.look_ahead(qg, g, scale=scale)

    @staticmethod
    def _groups(q: Tensor, lkv: LayerKV):
        """(group, its query heads of ``q``) for the groups that hold keys."""
        qpk = q.shape[1] // lkv.num_kv_heads
        for g in lkv.groups:
            if g.keys is not None:
                yield g, (q if len(lkv.groups) == 1 else q.index_select(1, _q_index(g.index, qpk)))

    def prefill_pattern(self, lkv: LayerKV, heads: int, window: int | None = None) -> Pattern | None:
        """One per-query-head pattern for a layer's first call when every policy of the layer has a static
        prefill pattern (:meth:`Policy.prefill_pattern`) and there is more than one policy; else None.
        ``window``: the model's own sliding window on this layer, ANDed into every head's pattern (then a single
        policy gets its pattern too)."""
        pols = lkv.layer.policies
        key = (pols, heads, window)
        if key not in self._prefill:
            pats = [p.prefill_pattern() for p in pols]
            qpk = heads // len(pols)
            ok = (len(set(pols)) > 1 or window is not None) and all(p is not None for p in pats)
            if ok and window is not None:
                pats = [p & SlidingWindow(window) for p in pats]
            if not ok:
                self._prefill[key] = None
            elif len(set(pats)) == 1:
                self._prefill[key] = pats[0]
            else:
                self._prefill[key] = PerHead(tuple(pats[h // qpk] for h in range(heads)))
        return self._prefill[key]

    def _timed(self, label: str, fn: Any) -> Tensor:
        if not self.timing:
            return fn()
        t0 = time.perf_counter()
        out = fn()
        self.timer.add(label, time.perf_counter() - t0)
        return out

    def _attend(self, q: Tensor, lkv: LayerKV, scale: float, mask: Tensor | None) -> Tensor:
        B, H, Tq, D = q.shape
        qpk = H // lkv.num_kv_heads
        single = len(lkv.groups) == 1
        if mask is None and lkv.past == 0 and lkv.call is not None and not single:
            # first call of a mixed layer: every head in one per-head pattern call (K/V read in place, no
            # head split, one engine call instead of one per policy)
            pat = self.prefill_pattern(lkv, H)
            if pat is not None:
                return self._timed("per_head/prefill", lambda: attention(q, *lkv.call, pattern=pat, scale=scale,
                                                                         q_offset=0))
        out = None
        for g in lkv.groups:
            if g.keys is None and single:
                return q.new_zeros(B, H, Tq, D)
            if g.keys is None:  # dropped heads stay zero
                continue
            qidx = _q_index(g.index, qpk)
            qg = q if single else q.index_select(1, qidx)
            mg = None if mask is None else g.buffer_mask(mask, qg.shape[1])
            t0 = time.perf_counter() if self.timing else 0.0
            og = g.policy.attend(qg, g, scale=scale, mask=mg)
            if self.timing:
                self.timer.add(f"{g.policy.kind}/{'decode' if Tq == 1 else 'prefill'}", time.perf_counter() - t0)
            if single:
                return og
            if out is None:
                out = q.new_zeros(B, H, Tq, og.shape[-1])
            out.index_copy_(1, qidx, og)
        return out if out is not None else q.new_zeros(B, H, Tq, D)

    def attend_weights(self, layer: int, q: Tensor, lkv: LayerKV, *, mask: Tensor | None, scale: float,
                       score_mod: ScoreMod | None = None) -> Tensor:
        """The layer's output from chunked softmax weights over :meth:`weights_mask` (and ``mask``), with an
        optional score modifier over every query head: ``(B, H, Tq, Dv)``."""
        B, H, Tq, _ = q.shape
        if all(g.keys is None for g in lkv.groups):
            return q.new_zeros(q.shape)
        k, v = lkv.dense()
        allowed = self.weights_mask(layer, q, lkv)
        if mask is not None:
            allowed = allowed & mask
        out = q.new_empty(B, H, Tq, v.shape[-1])
        for s, w in weights_chunks(q, k, scale=scale, q_offset=lkv.past, mask=allowed, score_mod=score_mod):
            out[:, :, s: s + w.shape[2]] = grouped_apply(w.to(v.dtype), v)
        return out


# ---------------------------------------------------------------------------------------------------------
# model-level helpers
# ---------------------------------------------------------------------------------------------------------
def _removed(kwargs: dict[str, Any]) -> None:
    if "interventions" in kwargs:
        raise ValueError("option 'interventions' was removed: calibrations are hooks now -- "
                         "`with hf.use(model, plan), calibration.attach(model): ...`")
    if kwargs:
        raise TypeError(f"unexpected options {sorted(kwargs)}")


def plan_for_model(model: nn.Module, plan: HeadPlan) -> HeadPlan:
    geo = geometry(model)
    plan.check_model(geo.num_layers, geo.num_kv_heads, geo.group)
    return plan


class use_plan:
    """``with use_plan(model, plan) as runner:`` -- the model's attention follows ``plan`` in the block
    (:func:`attnlab.models.hf.use` with a :class:`PlanRunner`; hooks compose with it)."""

    def __init__(self, model: nn.Module, plan: HeadPlan, **removed: Any) -> None:
        _removed(removed)
        plan_for_model(model, plan)
        self.model = model
        self.runner = PlanRunner(plan)
        self.handle = None

    def __enter__(self) -> PlanRunner:
        self.handle = use(self.model, self.runner)
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
        out = model(input_ids=ids, cache=cache, use_cache=cache is not None, logits_to_keep=1)
        logits = out.logits[:, -1]
    return logits


@torch.no_grad()
def greedy_generate(
    model: nn.Module, input_ids: Tensor, plan: HeadPlan, max_new_tokens: int = 8, chunk: int | None = None,
    eos_token_id: int | None = None, **removed: Any,
) -> dict[str, Any]:
    """Greedy decoding under ``plan`` (installed by :func:`attnlab.models.hf.use`) with its :class:`PlanCache`.

    Returns ``{"tokens": (batch, new) LongTensor, "prefill_s", "decode_s", "decode_tok_s", "kv_bytes",
    "kv_positions"}``; ``kv_bytes`` is the storage the cache holds after decoding.
    """
    _removed(removed)
    plan_for_model(model, plan)
    with use(model, PlanRunner(plan)) as handle:
        cache = handle.new_cache()
        t0 = time.perf_counter()
        logits = prefill(model, input_ids, cache, chunk)
        t1 = time.perf_counter()
        toks = [logits.argmax(-1)]
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool((toks[-1] == eos_token_id).all()):
                break
            out = model(input_ids=toks[-1][:, None], cache=cache, use_cache=True)
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


__all__ = ["BLOCKSPARSE_MIN_Q", "PlanRunner", "greedy_generate", "new_cache", "plan_for_model", "prefill",
           "stream_group", "use_plan"]
