"""Generation loops of the interventions, with KV caches (the arms of the scoring runner call these).

Every loop has the signature ``loop(model, ids, max_new_tokens, new_cache, eos) -> (1, n) new tokens`` where
``ids`` is the prompt ``(1, T)``, ``new_cache()`` returns an empty cache for whatever runs the attention (the
model's own ``DynamicCache``, a plan's ``PlanCache``: see :class:`Base`) and decoding stops after ``eos``.

* :func:`greedy`        -- the plain model (and every hook intervention: the hooks are attached around it);
* :func:`decore_greedy` -- DeCoRe (I234): two caches, the model and the model with its retrieval heads masked,
  each prefilled once; per step ``decore_logits`` of :mod:`attnlab.plans.calibrate` picks the token;
* :func:`dagcd_greedy`  -- DAGCD (I242): the last query's attention of the chosen heads on the prompt's tokens
  (a ``weights`` observer on those layers, one row per step), spread onto the vocabulary and added with the
  entropy weight of :func:`attnlab.plans.calibrate.agcd_logits`; one pass per step;
* :func:`lookback_generate` -- Lookback-Lens guided decoding (A169): per chunk, sampled candidates from a copy of
  the cache, each scored by a linear detector on its lookback ratios (read by a ``weights`` observer on every
  layer as the candidate's tokens are fed), the best kept.

Lookback ratios here (:class:`LookbackRows`) are the definition of :func:`attnlab.plans.calibrate.lookback_ratios`
(mean attention on the ``n_context`` prompt keys over that plus the mean on the generated keys up to the
query) computed from absolute key positions, so a sliding-window layer whose cache keeps only its window
(Gemma 3) counts unseen keys as zero weight, as the full square would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..models import hf
from ..plans import calibrate as C

NewCache = Callable[[], Any]
Stop = int | Collection[int] | None


class Base:
    """How attention runs in every arm of a comparison: the model's own attention (on a model with
    sliding-window layers, attnlab's ``NativeRunner``, as ``attnlab eval`` does for its dense row) or a
    :class:`~attnlab.plans.plan.HeadPlan`. ``with Base(model, plan) as base: base.new_cache()``."""

    def __init__(self, model: nn.Module, plan: Any | None = None) -> None:
        self.model, self.plan, self.handle = model, plan, None

    def __enter__(self) -> Base:
        from ..frontier.run import dense_runner

        runner = self.plan if self.plan is not None else dense_runner(self.model)
        if runner is not None:
            self.handle = hf.use(self.model, runner)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def new_cache(self) -> Any:
        if self.handle is not None:
            return self.handle.new_cache()
        return DynamicCache(config=self.model.config)


def _step(model: nn.Module, tok: Tensor, cache: Any) -> Tensor:
    """Logits ``(1, V)`` of one fed token ``(1,)``."""
    return model(input_ids=tok.view(1, 1), cache=cache, use_cache=True).logits[:, -1]


def _prefill(model: nn.Module, ids: Tensor, cache: Any) -> Tensor:
    return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def _done(tok: Tensor, eos: Stop) -> bool:
    if eos is None:
        return False
    return int(tok) == eos if isinstance(eos, int) else int(tok) in eos


def stop_ids(model: nn.Module, tok: Any) -> frozenset[int] | None:
    """The ids that end a generation: the tokenizer's end-of-sequence token and the model's generation config's
    (an instruction-tuned model ends its turn with its own)."""
    ids = {getattr(tok, "eos_token_id", None)}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    ids.discard(None)
    return frozenset(int(i) for i in ids) or None


@torch.no_grad()
def greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: NewCache,
           eos: Stop = None) -> Tensor:
    """Plain greedy decoding with a cache: ``(1, n)`` tokens, ``n <= max_new_tokens``."""
    cache = new_cache()
    nxt = _prefill(model, ids, cache).argmax(-1)
    out = [nxt]
    while len(out) < max_new_tokens and not _done(nxt, eos):
        nxt = _step(model, nxt, cache).argmax(-1)
        out.append(nxt)
    return torch.stack(out, 1)


@torch.no_grad()
def decore_greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: NewCache, eos: Stop = None,
                  *, heads: Sequence[tuple[int, int]], alpha: float = 0.5, entropy_guided: bool = True) -> Tensor:
    """DeCoRe with caches: the base model and the model with ``heads`` ((layer, query head) pairs) masked each
    keep their own cache; per step the token maximizing ``decore_logits(base, masked, alpha)``."""
    geo = hf.geometry(model)
    mask = C.HeadMask.ablate(geo.num_layers, geo.num_heads, heads)
    base_cache, masked_cache = new_cache(), new_cache()
    base = _prefill(model, ids, base_cache)
    with mask.attach(model):
        masked = _prefill(model, ids, masked_cache)
    out: list[Tensor] = []
    while True:
        nxt = C.decore_logits(base, masked, alpha, entropy_guided).argmax(-1)
        out.append(nxt)
        if len(out) >= max_new_tokens or _done(nxt, eos):
            break
        base = _step(model, nxt, base_cache)
        with mask.attach(model):
            masked = _step(model, nxt, masked_cache)
    return torch.stack(out, 1)


def _abs_keys(ctx: Any, Tq: int, Tk: int, device: torch.device) -> Tensor:
    """Absolute positions ``(Tk,)`` of a call's keys: the newest ``Tk`` ending at the last query (a sliding
    cache keeps only its window, so key ``j`` is not position ``j``)."""
    end = int(ctx.q_offset or 0) + Tq
    return torch.arange(end - Tk, end, device=device)


class ContextRows:
    """A ``weights`` observer: for the chosen (layer, query head) pairs, the last query row's attention on the
    keys at absolute positions ``start .. n_context - 1``, summed over the heads: ``(n_context - start,)``."""

    def __init__(self, heads: Sequence[tuple[int, int]], n_context: int, start: int = 1) -> None:
        self.by_layer: dict[int, list[int]] = {}
        for layer, h in heads:
            self.by_layer.setdefault(int(layer), []).append(int(h))
        self.n_context, self.start = n_context, start
        self.acc: Tensor | None = None

    def hooks(self) -> dict[str, C.HookFn]:
        return {f"blocks.{layer}.attn.weights": self._observe for layer in sorted(self.by_layer)}

    def _observe(self, w: Tensor, ctx: Any) -> None:  # w (B, H, 1, Tk): attached to one-token calls only
        if w.shape[2] != 1:
            raise ValueError("ContextRows observes one-token calls (decode steps); got a call of "
                             f"{w.shape[2]} rows")
        Tk = w.shape[-1]
        pos = _abs_keys(ctx, 1, Tk, w.device)
        row = w[0, self.by_layer[ctx.layer], 0].float().sum(0)  # (Tk,)
        keep = (pos >= self.start) & (pos < self.n_context)
        vec = torch.zeros(self.n_context - self.start, device=w.device)
        vec[pos[keep] - self.start] = row[keep]
        self.acc = vec if self.acc is None else self.acc + vec

    def take(self) -> Tensor:
        out = self.acc if self.acc is not None else torch.zeros(self.n_context - self.start)
        self.acc = None
        return out


@torch.no_grad()
def dagcd_greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: NewCache, eos: Stop = None,
                 *, heads: Sequence[tuple[int, int]], weight: float = 1.0, start: int = 1) -> Tensor:
    """DAGCD: per step, ``agcd_logits(logits, attention of heads on prompt tokens start..T-1, their ids)``.

    The prompt is prefilled in two calls (``T - 1`` tokens, then the last one with the observer attached) so
    that only single-row calls pay for the observed weights. ``start=1`` leaves out the first token (the
    attention sink, whose mass says nothing about which context token is relevant)."""
    T = ids.shape[1]
    if T < start + 2:
        raise ValueError(f"DAGCD needs a prompt of at least {start + 2} tokens, got {T}")
    obs = ContextRows(heads, T, start)
    ctx_ids = ids[:, start:T]
    cache = new_cache()
    model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    out: list[Tensor] = []
    feed = ids[:, -1]
    while True:
        with hf.hooks(model, obs.hooks()):
            logits = _step(model, feed, cache)
        att = obs.take().view(1, -1)
        nxt = C.agcd_logits(logits, att, ctx_ids, weight).argmax(-1)
        out.append(nxt)
        if len(out) >= max_new_tokens or _done(nxt, eos):
            break
        feed = nxt
    return torch.stack(out, 1)


class LookbackRows:
    """A ``weights`` observer on every layer: per fed generated token, the lookback ratio of every
    (layer, query head), ``ctx / (ctx + gen)`` with ``ctx`` the mean weight on the ``n_context`` prompt keys and
    ``gen`` the mean on the generated keys up to the query (absolute positions). ``take()`` -> ``(rows, L*H)``."""

    def __init__(self, n_context: int, layers: int) -> None:
        self.n_context, self.layers = n_context, layers
        self.cur: dict[int, Tensor] = {}
        self.rows: list[Tensor] = []

    def hooks(self) -> dict[str, C.HookFn]:
        return {"blocks.*.attn.weights": self._observe}

    def _observe(self, w: Tensor, ctx: Any) -> None:  # w (B, H, 1, Tk): one-token calls only
        if w.shape[2] != 1:
            raise ValueError(f"LookbackRows observes one-token calls (decode steps); got {w.shape[2]} rows")
        Tk = w.shape[3]
        pos = _abs_keys(ctx, 1, Tk, w.device)
        q = int(ctx.q_offset or 0)  # the query's absolute position
        row = w[0, :, 0].double()
        ctx_m = row[:, pos < self.n_context].sum(-1) / self.n_context
        gen_m = row[:, pos >= self.n_context].sum(-1) / max(1, q - self.n_context + 1)
        self.cur[ctx.layer] = ctx_m / (ctx_m + gen_m).clamp_min(1e-30)
        if len(self.cur) == self.layers:
            self.rows.append(torch.cat([self.cur[i] for i in range(self.layers)]).float())
            self.cur = {}

    def take(self) -> Tensor:
        out = torch.stack(self.rows) if self.rows else torch.zeros(0, 0)
        self.rows, self.cur = [], {}
        return out


def detector_score(features: Tensor, weights: Tensor | None, bias: float = 0.0) -> float:
    """The linear detector on a candidate's mean lookback ratios ``(L*H,)`` (None: their mean, i.e. more
    attention on the context is better, the fallback of :func:`attnlab.plans.calibrate.lookback_guided_generate`)."""
    if weights is None:
        return float(features.mean())
    return float(features.double() @ weights.double().view(-1) + bias)


@torch.no_grad()
def sample_chunk(model: nn.Module, cache: Any, logits: Tensor, n: int, n_context: int, temperature: float,
                 gen: torch.Generator, eos: Stop = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sample up to ``n`` tokens from ``logits`` ``(1, V)`` on ``cache`` (modified in place), feeding each so that
    its lookback ratios are read. Returns the tokens ``(1, m)``, their ratios ``(m, L*H)`` and the next logits.
    ``temperature=0`` is greedy."""
    obs = LookbackRows(n_context, hf.geometry(model).num_layers)
    toks = []
    with hf.hooks(model, obs.hooks()):
        for _ in range(n):
            if temperature > 0:
                probs = torch.softmax(logits.double() / temperature, -1)
                nxt = torch.multinomial(probs, 1, generator=gen).view(1)
            else:
                nxt = logits.argmax(-1)
            toks.append(nxt)
            logits = _step(model, nxt, cache)
            if _done(nxt, eos):
                break
    return torch.stack(toks, 1), obs.take(), logits


@torch.no_grad()
def lookback_generate(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: NewCache,
                      eos: Stop = None, *, weights: Tensor | None = None, bias: float = 0.0,
                      chunk_len: int = 4, candidates: int = 4, temperature: float = 1.0, seed: int = 0) -> Tensor:
    """Lookback-Lens guided decoding: chunks of ``chunk_len`` tokens; per chunk ``candidates`` continuations
    sampled at ``temperature`` from a copy of the cache, the one whose mean lookback ratios (over the chunk's
    own tokens) the detector (``weights`` ``(L*H,)``, ``bias``) scores highest is kept."""
    gen = torch.Generator().manual_seed(int(seed))
    cache = new_cache()
    logits = _prefill(model, ids, cache)
    n_context = ids.shape[1]
    out: list[Tensor] = []
    produced = 0
    while produced < max_new_tokens:
        n = min(chunk_len, max_new_tokens - produced)
        best = None
        for _ in range(max(1, candidates)):
            c = copy.deepcopy(cache)
            toks, feats, nxt_logits = sample_chunk(model, c, logits, n, n_context, temperature, gen, eos)
            score = detector_score(feats.mean(0), weights, bias)
            if best is None or score > best[0]:
                best = (score, toks, c, nxt_logits)
        _, toks, cache, logits = best
        out.append(toks)
        produced += toks.shape[1]
        if _done(toks[0, -1], eos):
            break
    return torch.cat(out, 1)[:, :max_new_tokens]


__all__ = ["Base", "ContextRows", "LookbackRows", "dagcd_greedy", "decore_greedy", "detector_score", "greedy",
           "lookback_generate", "sample_chunk", "stop_ids"]
