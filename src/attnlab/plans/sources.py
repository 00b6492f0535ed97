"""Where plans come from: head scores with a budget, DuoAttention gates, a MoA window search, baselines.

* :func:`from_scores` -- any ``(layers, kv_heads)`` retrieval score (the head atlas, :func:`probe_scores`)
  plus a budget of full heads -> full for the top heads, ``stream`` for the rest;
* :func:`probe_scores` -- retrieval-head scores measured here (Retrieval Head A28 / DuoAttention I30 idea):
  the attention mass the answer tokens of generated passkey prompts put on the needle, per kv head
  (max over the query heads sharing it);
* :func:`from_atlas` -- scores from :mod:`attnlab.inspect`'s ``HeadAtlas`` when it is available;
* :func:`duo_gates` -- DuoAttention (I30): a gate per kv head mixes full and streaming attention,
  ``out = a * full + (1 - a) * stream`` (a differentiable intervention on each head's output ``z``; the
  streaming output is computed from the layer's own q/k/v, read by observers at the same hook seam);
  gates are optimized on generated passkey prompts to keep the
  final hidden states of the full model (MSE) with an L1 push towards streaming. CPU scale: a handful of
  Adam steps on one or two prompts of a few hundred tokens (see ``steps``, ``length``);
* :func:`moa_plan` -- MoA (I58)-style: per head, the attention mass each candidate window would lose
  (profiled on generated prompts), then the cheapest per-head windows under a KV budget (greedy
  multiple-choice knapsack on lost mass per cached position);
* :func:`uniform` -- baselines: all full, all streaming, SnapKV-like eviction, Quest-like pages.

Models with sliding-window layers (Gemma 3: five local layers of window 512 per global layer): every plan
built here from a model goes through :func:`with_model_windows` (a local layer runs exactly the model's own
window, whatever the source chose for it), and budgets (``full_fraction``, MoA's ``kv_budget``) count only
the model's full layers, where a method has something to decide (:func:`budget_layers`).

Scores are ``torch.Tensor`` of shape ``(layers, kv_heads)``; higher means "needs the whole context".
Profiling reads attention weights through a ``weights`` observer on the hook seam of
:mod:`attnlab.models.hf` (only the rows asked for are kept), so it profiles whatever attention runs in the
model (its own, or a plan installed with ``hf.use``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.attention import attention
from ..core.patterns import Pattern
from ..inspect.capture import forward_kwargs, observe_rows
from ..models import hf
from ..models.hf import geometry
from .plan import HeadPlan, HeadPolicy
from .tasks import passkey


def model_windows(model: nn.Module) -> list[int | None]:
    """Each layer's own sliding window from the model's config (None: a full layer). Gemma 3: 512 on five
    layers of every six; Mistral: one window everywhere; Llama / SmolLM2: None everywhere."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = geometry(model).num_layers
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window:
        return [None] * n
    if types is None:
        return [int(window)] * n
    return [int(window) if t == "sliding_attention" else None for t in types[:n]]


def local_policy(window: int, budget: float | None = None) -> HeadPolicy:
    """The policy of a sliding-window layer: ``stream(0, window)`` (the model's own rule), or with ``budget``
    < 1 the window shrunk to hold about ``budget`` of its ``window - 1`` positions, StreamingLLM-style
    (4 sinks + a window; at least 8 keys)."""
    if budget is None or budget * (window - 1) >= window - 1:
        return HeadPolicy.stream(0, window)
    if not budget > 0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    w = max(8, int(round(budget * (window - 1))) - 3)
    if 4 + w - 1 >= window - 1:  # a window this short cannot shrink further
        return HeadPolicy.stream(0, window)
    return HeadPolicy.stream(4, w)


def with_model_windows(model: nn.Module, plan: HeadPlan, budget: float | None = None) -> HeadPlan:
    """``plan`` with the model's own sliding-window layers run as the model runs them: every key/value head
    of such a layer becomes ``stream(sinks=0, window=W)`` (exactly the causal window, and its cache keeps
    only the window), so a plan never lets a local layer see beyond what the model was trained with; the
    plan's methods act on the full layers. Plans of models without sliding layers come back unchanged.

    ``budget``: also shrink the local layers to that fraction of what they hold (:func:`local_policy`), so a
    budget can cover every layer's cache -- the only way under the local layers' share (on Gemma 3 at 4k
    tokens, 15 windows of 511 keys are 0.38x of the dense cache)."""
    windows = model_windows(model)
    if all(w is None for w in windows):
        return plan
    rows = [row if w is None else (local_policy(w, budget),) * len(row) for row, w in zip(plan.policies, windows)]
    kept = "kept" if budget is None or budget >= 1 else f"shrunk to {budget:g}"
    meta = tuple((k, v) for k, v in plan.meta if k != "model_windows") + (("model_windows", kept),)
    return HeadPlan(tuple(rows), plan.q_per_kv, plan.name, meta)


def budget_layers(model: nn.Module) -> list[bool] | None:
    """Layers a plan's budget is spent on: the model's full layers when it has sliding-window layers (those
    run the model's own window whatever the plan says), None (every layer) otherwise."""
    windows = model_windows(model)
    if all(w is None for w in windows):
        return None
    return [w is None for w in windows]


def uniform(model_or_geo: Any, kind: str = "full", sinks: int = 4, window: int = 256, budget: int = 256,
            k: int = 16, page: int = 16) -> HeadPlan:
    """All heads get one policy: ``full``, ``stream`` (sinks + window), ``snap`` (budget, window 32),
    ``topk`` (k pages of ``page``). Given a model, its sliding-window layers keep the model's own window
    (:func:`with_model_windows`)."""
    geo = geometry(model_or_geo) if isinstance(model_or_geo, nn.Module) else model_or_geo
    pol = {
        "full": HeadPolicy.full(),
        "stream": HeadPolicy.stream(sinks, window),
        "snap": HeadPolicy.snap(budget, 32),
        "topk": HeadPolicy.topk(k, page),
    }
    if kind not in pol:
        raise ValueError(f"uniform plans are {sorted(pol)}, got {kind!r}")
    plan = HeadPlan.uniform(geo.num_layers, geo.num_kv_heads, pol[kind], geo.group)
    return with_model_windows(model_or_geo, plan) if isinstance(model_or_geo, nn.Module) else plan


def from_scores(scores: Tensor, q_per_kv: int, full_fraction: float = 1 / 3, sinks: int = 4,
                window: int = 256, name: str | None = None, source: str = "scores",
                layers: Sequence[bool] | None = None) -> HeadPlan:
    """Full attention for the ``full_fraction`` highest-scoring kv heads, ``stream(sinks, window)`` else.

    ``scores``: ``(layers, kv_heads)``. ``layers``: which layers the budget covers (None: all); the fraction
    counts only their kv heads (``round(full_fraction * heads there)`` full heads), heads of the other layers
    are never ranked and get the streaming policy (a model's sliding layers, replaced by the model's own
    window in :func:`plan_from_scores` / :func:`with_model_windows`).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, kv_heads), got shape {tuple(scores.shape)}")
    if not 0.0 <= full_fraction <= 1.0:
        raise ValueError(f"full_fraction must be in [0, 1], got {full_fraction}")
    if layers is None:
        eligible = torch.ones(scores.shape, dtype=torch.bool)
    else:
        if len(layers) != scores.shape[0]:
            raise ValueError(f"layers must have one flag per layer ({scores.shape[0]}), got {len(layers)}")
        eligible = torch.tensor([bool(x) for x in layers], dtype=torch.bool).view(-1, 1).expand(scores.shape)
    idx = torch.nonzero(eligible.flatten()).squeeze(1)
    n_full = int(round(full_fraction * idx.numel()))
    # rank only the eligible heads (stable: ties keep layer order)
    order = idx[torch.argsort(scores.flatten().double()[idx], descending=True, stable=True)]
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[order[:n_full]] = True
    mask = keep.view(scores.shape).tolist()
    meta = (("source", source), ("full_fraction", full_fraction), ("sinks", sinks), ("window", window))
    if layers is not None:
        meta += (("budget_layers", [i for i, x in enumerate(layers) if x]),)
    return HeadPlan.from_mask(mask, HeadPolicy.stream(sinks, window), q_per_kv,
                              name or f"{source}-{n_full}full", meta)


def plan_from_scores(model: nn.Module, scores: Tensor, full_fraction: float = 1 / 3, sinks: int = 4,
                     window: int = 256, source: str = "scores", name: str | None = None) -> HeadPlan:
    """:func:`from_scores` for ``model``: its grouping, the budget over its full layers only when it has
    sliding-window layers (:func:`budget_layers`), and those layers run as the model runs them
    (:func:`with_model_windows`)."""
    plan = from_scores(scores, geometry(model).group, full_fraction, sinks, window, name=name, source=source,
                       layers=budget_layers(model))
    return with_model_windows(model, plan)


def atlas_scores(atlas: Any) -> Tensor:
    """Per kv head ``retrieval + (1 - streaming)`` from an ``attnlab.inspect`` HeadAtlas's ``kv_scores()``
    (retrieval: max over the group's query heads; streaming: min), unmeasured = 0: ``(layers, kv_heads)``
    float64, higher = keep whole."""
    kv = atlas.kv_scores()
    if "streaming" not in kv and "retrieval" not in kv:
        raise ValueError("the atlas has neither retrieval nor streaming scores")
    ref = next(iter(kv.values()))
    score = torch.zeros(ref.shape, dtype=torch.float64)
    if "retrieval" in kv:
        score += torch.nan_to_num(kv["retrieval"].double(), nan=0.0)
    if "streaming" in kv:
        score += 1.0 - torch.nan_to_num(kv["streaming"].double(), nan=1.0)
    return score


def from_atlas(atlas: Any, full_fraction: float = 1 / 3, sinks: int = 4, window: int = 256,
               model: nn.Module | None = None) -> HeadPlan:
    """Plan from an ``attnlab.inspect`` HeadAtlas: the kv heads ranked by :func:`atlas_scores`.

    ``model`` (the atlas's model): on a model with sliding-window layers the budget covers its full layers
    only and the sliding layers keep the model's window (:func:`plan_from_scores`)."""
    score = atlas_scores(atlas)
    if model is not None:
        geo = geometry(model)
        if (geo.num_layers, geo.num_kv_heads) != tuple(score.shape):
            raise ValueError(f"the atlas is for {tuple(score.shape)} (layers, kv heads), the model has "
                             f"{(geo.num_layers, geo.num_kv_heads)}")
        return plan_from_scores(model, score, full_fraction, sinks, window, source="atlas")
    q_per_kv = atlas.num_heads // atlas.num_kv_heads
    return from_scores(score, q_per_kv, full_fraction, sinks, window, source="atlas")


# ---------------------------------------------------------------------------------------------------------
# profiling prompts: attention weights of the last rows only
# ---------------------------------------------------------------------------------------------------------
def _prompts(tok: Any, n: int, length: int, seed: int) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """Passkey prompts with the answer appended: (ids, answer token positions, needle span)."""
    out = []
    for i in range(n):
        s = passkey(tok, length, seed=10_000 + seed * 100 + i, depth=0.1 + 0.8 * (i + 0.5) / n)
        ans = list(tok(" " + s.answers[0], add_special_tokens=False)["input_ids"])
        key_ids = list(tok(s.answers[0], add_special_tokens=False)["input_ids"])
        ids = list(s.ids)
        # the needle's first occurrence of the key digits
        start = next(j for j in range(len(ids)) if ids[j: j + len(key_ids)] == key_ids)
        full = ids + ans
        out.append((full, list(range(len(ids), len(full))), (start, start + len(key_ids))))
    return out


def _last_rows_weights(model: nn.Module, ids: list[int], rows: int) -> list[Tensor]:
    """Per layer, the attention weights ``(Hq, rows, T)`` of the last ``rows`` queries (float32), read by a
    weights observer (never the whole square)."""
    return observe_rows(model, torch.tensor([ids]), last=rows)


def probe_scores(model: nn.Module, tok: Any, n: int = 2, length: int = 1024, seed: int = 0,
                 rows: int = 24, sinks: int = 4, window: int = 256) -> Tensor:
    """Retrieval scores ``(layers, kv_heads)`` from one pass per generated passkey prompt (teacher-forced):
    the mean attention mass the answer tokens put on the needle (retrieval heads, A28) plus the mean mass
    the last ``rows`` queries put outside ``sinks + window`` (heads that read far, which a streaming
    head would cut off); max over the query heads of each kv head (a single kv head, as in Gemma 3, takes
    the max over all query heads of its layer).

    Every layer is measured as the model runs it; on a sliding-window layer the far mass is what its own
    window lets through, and plan builders (:func:`plan_from_scores`) do not rank those layers."""
    geo = geometry(model)
    acc = torch.zeros(geo.num_layers, geo.num_heads)
    for ids, ans_pos, (a, b) in _prompts(tok, n, length, seed):
        r = max(rows, len(ans_pos) + 1)
        ws = _last_rows_weights(model, ids, r)
        T = len(ids)
        qpos = torch.arange(T - r, T).view(r, 1)
        kpos = torch.arange(T).view(1, T)
        far = ~((kpos < sinks) | ((qpos - kpos) < window))
        na = len(ans_pos)
        for layer, w in enumerate(ws):
            # the query predicting answer token t sits at t - 1: rows -na-1 .. -2
            needle = w[:, r - na - 1: r - 1, a:b].sum(-1).mean(-1)
            acc[layer] += needle + (w * far).sum(-1).mean(-1)
    acc /= n
    return acc.view(geo.num_layers, geo.num_kv_heads, geo.group).amax(-1)


def probe_plan(model: nn.Module, tok: Any, full_fraction: float = 1 / 3, sinks: int = 4, window: int = 256,
               n: int = 2, length: int = 1024, seed: int = 0) -> HeadPlan:
    """:func:`probe_scores` then :func:`plan_from_scores` (source ``probe``)."""
    sc = probe_scores(model, tok, n=n, length=length, seed=seed, sinks=sinks, window=window)
    return plan_from_scores(model, sc, full_fraction, sinks, window, source="probe")


def window_loss_profile(model: nn.Module, tok: Any, windows: Sequence[int], sinks: int = 4, n: int = 2,
                        length: int = 1024, rows: int = 64, seed: int = 0) -> Tensor:
    """Attention mass lost per (layer, kv head, window): ``(layers, kv_heads, len(windows))``; the mass
    the last ``rows`` queries put outside ``sinks + window`` keys, max over the kv head's query heads."""
    geo = geometry(model)
    out = torch.zeros(geo.num_layers, geo.num_heads, len(windows))
    for ids, _, _ in _prompts(tok, n, length, seed):
        ws = _last_rows_weights(model, ids, rows)
        T = len(ids)
        for layer, w in enumerate(ws):
            r = w.shape[1]
            qpos = torch.arange(T - r, T).view(r, 1)
            kpos = torch.arange(T).view(1, T)
            for j, win in enumerate(windows):
                keep = (kpos < sinks) | ((qpos - kpos) < win)
                out[layer, :, j] += (w * (~keep)).sum(-1).mean(-1)
    out /= n
    return out.view(geo.num_layers, geo.num_kv_heads, geo.group, len(windows)).amax(2)


def moa_plan(model: nn.Module, tok: Any, kv_budget: float = 0.5, at_length: int = 2048,
             windows: Sequence[int] = (64, 128, 256, 512, 1024), sinks: int = 4, n: int = 2,
             length: int = 1024, seed: int = 0) -> HeadPlan:
    """MoA-style per-head windows: minimize profiled lost attention mass with the average cached fraction
    at ``at_length`` tokens at most ``kv_budget`` (full attention is the last candidate, losing nothing).

    On a model with sliding-window layers the search and the budget cover its full layers only
    (``kv_budget`` is a fraction of their dense cache); the sliding layers keep the model's own window
    (:func:`with_model_windows`)."""
    geo = geometry(model)
    lost = window_loss_profile(model, tok, windows, sinks, n, length, seed=seed)
    L, Hkv, W = lost.shape
    flags = budget_layers(model)
    searched = [layer for layer in range(L) if flags is None or flags[layer]]
    cands = [min(at_length, sinks + w - 1) for w in windows] + [at_length]
    cost = torch.tensor(cands, dtype=torch.float64)  # cached positions per head at at_length
    loss = torch.cat([lost.double(), torch.zeros(L, Hkv, 1, dtype=torch.float64)], dim=-1)
    choice = torch.zeros(L, Hkv, dtype=torch.long)  # start from the smallest window everywhere
    budget = kv_budget * at_length * len(searched) * Hkv
    used = float(cost[0]) * len(searched) * Hkv
    while True:
        # best upgrade: largest loss reduction per extra cached position (any higher candidate)
        best, best_gain = None, 0.0
        for layer in searched:
            for h in range(Hkv):
                c = int(choice[layer, h])
                for nxt in range(c + 1, W + 1):
                    extra = float(cost[nxt] - cost[c])
                    gain = float(loss[layer, h, c] - loss[layer, h, nxt])
                    if extra > 0 and used + extra <= budget and gain / extra > best_gain:
                        best, best_gain = (layer, h, nxt, extra), gain / extra
        if best is None:
            break
        layer, h, nxt, extra = best
        choice[layer, h] = nxt
        used += extra
    pol = []
    for layer in range(L):
        row = []
        for h in range(Hkv):
            c = int(choice[layer, h])
            row.append(HeadPolicy.full() if c == W else HeadPolicy.stream(sinks, windows[c]))
        pol.append(tuple(row))
    meta = (("source", "moa"), ("kv_budget", kv_budget), ("at_length", at_length), ("windows", list(windows)))
    if flags is not None:
        meta += (("budget_layers", searched),)
    return with_model_windows(model, HeadPlan(tuple(pol), geo.group, f"moa-{kv_budget:g}", meta))


# ---------------------------------------------------------------------------------------------------------
# DuoAttention gates
# ---------------------------------------------------------------------------------------------------------
def duo_hooks(gate: Callable[[int], Tensor], stream: Pattern, q_per_kv: int) -> dict[str, Callable]:
    """DuoAttention's mix as hooks: each head's output ``z`` becomes ``a * z + (1 - a) * stream(q, k, v)``
    with ``a = gate(layer)`` ``(kv_heads,)`` (differentiable: the gates may need grad) and ``stream`` the
    ``stream`` pattern's attention over the layer's own q, k, v (read by observers on the same seam, with
    their autograd graph). ``z`` is whatever the running attention produced (the model's own: full, or its
    window on a sliding layer). ``gate(layer)`` None leaves the layer's ``z`` as it is."""
    seen: dict[tuple[int, str], Tensor] = {}

    def keep(x: Tensor, ctx: Any) -> None:
        seen[ctx.layer, ctx.name.rsplit(".", 1)[1]] = x

    def mix(z: Tensor, ctx: Any) -> Tensor:  # z (B, H, T, Dv)
        q, k, v = (seen.pop((ctx.layer, n)) for n in "qkv")
        a = gate(ctx.layer)
        if a is None:
            return z
        out = attention(q, k, v, pattern=stream, scale=ctx.scale, q_offset=int(ctx.q_offset or 0))
        a = a.repeat_interleave(q_per_kv).view(1, -1, 1, 1).to(z.dtype)
        return a * z + (1 - a) * out.to(z.dtype)

    return {"blocks.*.attn.q": keep, "blocks.*.attn.k": keep, "blocks.*.attn.v": keep, "blocks.*.attn.z": mix}


def duo_gates(model: nn.Module, tok: Any, steps: int = 6, length: int = 512, n: int = 2, sinks: int = 4,
              window: int = 64, lr: float = 0.1, l1: float = 0.05, seed: int = 0) -> Tensor:
    """Optimize DuoAttention gates ``(layers, kv_heads)`` in [0, 1] (see the module docstring).

    Scale on CPU: ``steps`` Adam steps over ``n`` passkey prompts of ``length`` tokens; the window is scaled
    down with the prompt (``window`` < ``length``) so streaming heads actually lose the needle.

    On a model with sliding-window layers only the full layers' gates train (and count in the L1 term);
    the sliding layers run their own window untouched and come back as gate 1.0 (the model's own attention).
    """
    geo = geometry(model)
    g = geo.group
    flags = budget_layers(model)
    trained = torch.tensor([True] * geo.num_layers if flags is None else flags)
    logits = torch.full((geo.num_layers, geo.num_kv_heads), 2.0, requires_grad=True)  # sigmoid(2) ~ 0.88
    opt = torch.optim.Adam([logits], lr=lr)
    stream_pat = HeadPolicy.stream(sinks, window).pattern()
    prompts = _prompts(tok, n, length, seed)
    targets = []
    flags = [p.requires_grad for p in model.parameters()]  # restored at the end: only the gates train
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for ids, _, _ in prompts:
            out = model(**forward_kwargs(model, torch.tensor([ids]), output_hidden_states=True))
            targets.append(out.hidden_states[-1][0, -32:].clone())

    def gate(layer: int) -> Tensor | None:
        return torch.sigmoid(logits[layer]) if trained[layer] else None

    hooks = duo_hooks(gate, stream_pat, g)
    try:
        with hf.hooks(model, hooks):
            for step in range(steps):
                ids, _, _ = prompts[step % len(prompts)]
                # one row of logits: the loss reads hidden states (a 262k vocabulary would cost GBs here)
                out = model(**forward_kwargs(model, torch.tensor([ids]), output_hidden_states=True))
                h = out.hidden_states[-1][0, -32:]
                t = targets[step % len(prompts)]
                distill = ((h - t) ** 2).mean() / (t ** 2).mean()
                loss = distill + l1 * torch.sigmoid(logits[trained]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    gates = torch.sigmoid(logits.detach())
    gates[~trained] = 1.0
    return gates


def duo_plan(model: nn.Module, tok: Any, full_fraction: float = 1 / 3, sinks: int = 4, window: int = 256,
             **gate_kwargs: Any) -> HeadPlan:
    """DuoAttention plan: :func:`duo_gates`, then the ``full_fraction`` highest gates full
    (:func:`plan_from_scores`: the full layers only on a model with sliding-window layers)."""
    gates = duo_gates(model, tok, sinks=sinks, **gate_kwargs)
    return plan_from_scores(model, gates, full_fraction, sinks, window, source="duo")


__all__ = [
    "atlas_scores", "budget_layers", "duo_gates", "local_policy", "duo_hooks", "duo_plan", "from_atlas", "from_scores", "moa_plan",
           "model_windows", "plan_from_scores", "probe_plan", "probe_scores", "uniform", "window_loss_profile",
           "with_model_windows"]
