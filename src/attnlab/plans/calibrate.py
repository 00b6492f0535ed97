"""Training-free calibrations and interventions on pretrained models (section I of shared/papers.md).

Every calibration is a hook on the seam of :mod:`attnlab.models.hf` (``blocks.{l}.attn.{scores,weights,z}``):
``c.hooks()`` gives ``{hook point: fn}`` and ``with c.attach(model): ...`` applies it. Hooks compose with
each other and with whatever runs the attention (``with hf.use(model, plan), c.attach(model): ...`` calibrates
the plan's attention):

* :class:`ZeroTuning` (I41)       -- head-specific scaling of the attention to the initial token
  (additive ``log(gamma)`` on key 0: weight ``w0 -> gamma w0 / (gamma w0 + 1 - w0)``); a ``scores``
  intervention;
* :class:`HeadMask`               -- head masking / ablation: per (layer, query head) output factors
  (0 ablates); a ``z`` intervention (each head's output before the output projection);
* :class:`PositionalCalibration` (I201, found-in-the-middle) -- subtract a per-position attention bias
  (estimated by :func:`estimate_position_bias` on neutral filler, a ``weights`` observer) from the scores,
  so attention follows relevance rather than position; a ``scores`` intervention;
* :class:`ScaleDimension` (I244)  -- scale one hidden-state dimension (the positional one, found by
  :func:`find_positional_dimension`) in chosen layers. It acts on the residual stream, not on attention, so
  it stays a forward pre-hook on the decoder layers (no attention hook point sees hidden states);
* :class:`ACT` (I31)              -- attention calibration: keys other than the first that receive more than
  ``alpha / kv_len`` average attention (hidden sinks) get their weight scaled by ``beta`` (renormalized);
  a ``weights`` intervention;
* :func:`decore_logits` / :func:`decore_generate` (I234) -- contrast the model with its retrieval heads
  masked (a ``z`` ablation): ``(1 + a) log p - a log p_masked``, ``a`` scaled by the base entropy;
* :func:`lookback_ratios` / :func:`lookback_guided_generate` (A169) -- per head, attention on the context
  over attention on context + generated tokens (a ``weights`` observer); guided decoding picks, among sampled
  candidate chunks, the one a (linear) lookback classifier scores highest;
* :func:`agcd_logits` (I242)      -- attention-guided context decoding: add to the next-token distribution
  the attention the last query puts on context tokens (mapped to their vocabulary ids), weighted by the
  model's uncertainty (entropy);
* :func:`pause_prompt` (I34)      -- PAUSE-token prompting baseline: insert pause markers into a prompt.

:func:`score_mod_hook` turns any per-layer :class:`~attnlab.core.score_mods.ScoreMod` source into a
``scores`` intervention (the score modifiers here are plain ScoreMods, also usable with
:func:`attnlab.attention`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.score_mods import ScoreMod
from ..inspect.capture import observe_rows
from ..models import hf

HookFn = Callable[[Tensor, Any], "Tensor | None"]


def _point(kind: str, layers: Sequence[int] | None = None) -> list[str]:
    """Hook names for ``kind`` (scores, weights, z) in ``layers`` (None: every layer)."""
    if layers is None:
        return [f"blocks.*.attn.{kind}"]
    return [f"blocks.{int(layer)}.attn.{kind}" for layer in layers]


class Intervention:
    """Base of the calibrations: ``hooks()`` -> ``{hook point: fn}``; ``attach(model)`` applies them."""

    def hooks(self) -> dict[str, HookFn]:
        raise NotImplementedError(f"{type(self).__name__} must define hooks() -> {{hook point: fn}}")

    def attach(self, model: nn.Module) -> AbstractContextManager:
        """``with calibration.attach(model): model(...)`` -- the hooks are removed when the block ends."""
        return hf.hooks(model, self.hooks())


def score_mod_hook(per_layer: Callable[[int, int], ScoreMod | None]) -> HookFn:
    """A ``scores`` intervention applying ``per_layer(layer, heads)`` (a ScoreMod or None) to each chunk of
    score rows ``(B, H, r, Tk)``; query positions are absolute (``ctx.q_offset + row``), keys ``0..Tk-1``."""

    def fn(scores: Tensor, ctx: Any) -> Tensor | None:
        B, H, r, Tk = scores.shape
        mod = per_layer(ctx.layer, H)
        if mod is None:
            return None
        dev = scores.device
        start, end = ctx.rows
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        q_idx = torch.arange(start, end, device=dev).view(1, 1, r, 1) + int(ctx.q_offset or 0)
        kv_idx = torch.arange(Tk, device=dev).view(1, 1, 1, Tk)
        return mod.score_mod(scores, b, h, q_idx, kv_idx)

    return fn


# ---------------------------------------------------------------------------------------------------------
# score modifiers
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class InitialTokenBias(ScoreMod):
    """Additive ``log(gamma[h])`` on the scores of key 0 (the initial token)."""

    log_gamma: Tensor  # (heads,)
    kind = "additive"

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + torch.where(kv_idx == 0, self.log_gamma.to(q_idx.device)[h], 0.0)


@dataclass(frozen=True, eq=False)
class ZeroTuning(Intervention):
    """ZeroTuning: ``gamma[layer, head]`` scales the attention weight of the initial token (before the
    renormalization of the rest). ``gamma > 1`` flattens the other tokens' attention, ``< 1`` sharpens it."""

    gamma: Tensor  # (layers, heads)

    @classmethod
    def uniform(cls, layers: int, heads: int, gamma: float, only_layers: Sequence[int] | None = None) -> ZeroTuning:
        g = torch.ones(layers, heads)
        rows = range(layers) if only_layers is None else only_layers
        for layer in rows:
            g[layer] = gamma
        return cls(g)

    def score_mod(self, layer: int, heads: int) -> ScoreMod | None:
        g = self.gamma[layer]
        if torch.all(g == 1):
            return None
        return InitialTokenBias(torch.log(g.float()))

    def hooks(self) -> dict[str, HookFn]:
        return {"blocks.*.attn.scores": score_mod_hook(self.score_mod)}


@dataclass(frozen=True, eq=False)
class HeadMask(Intervention):
    """Output factor per (layer, query head): 0 ablates a head, 1 keeps it."""

    factors: Tensor  # (layers, heads)

    @classmethod
    def ablate(cls, layers: int, heads: int, which: Sequence[tuple[int, int]]) -> HeadMask:
        f = torch.ones(layers, heads)
        for layer, h in which:
            f[layer, h] = 0.0
        return cls(f)

    def head_scale(self, layer: int, heads: int) -> Tensor | None:
        f = self.factors[layer]
        return None if torch.all(f == 1) else f

    def hooks(self) -> dict[str, HookFn]:
        def fn(z: Tensor, ctx: Any) -> Tensor | None:  # z (B, H, Tq, Dv)
            f = self.head_scale(ctx.layer, z.shape[1])
            return None if f is None else z * f.to(device=z.device, dtype=z.dtype).view(1, -1, 1, 1)

        return {"blocks.*.attn.z": fn}


@dataclass(frozen=True, eq=False)
class PositionBias(ScoreMod):
    """Additive ``-strength * bias[h, kv_idx]`` (absolute key positions; beyond the table: the last entry)."""

    bias: Tensor  # (heads, max_len)
    strength: float = 1.0
    kind = "additive"

    def score_mod(self, score, b, h, q_idx, kv_idx):
        t = self.bias.to(q_idx.device)
        return score - self.strength * t[h, kv_idx.clamp(max=t.shape[1] - 1)]


@dataclass(frozen=True, eq=False)
class PositionalCalibration(Intervention):
    """Found-in-the-middle: remove a per-(layer, head, key position) log-attention bias from the scores."""

    bias: Tensor  # (layers, heads, max_len) log attention on neutral text, centred per head
    strength: float = 1.0
    layers: tuple[int, ...] | None = None

    def score_mod(self, layer: int, heads: int) -> ScoreMod | None:
        if self.layers is not None and layer not in self.layers:
            return None
        return PositionBias(self.bias[layer], self.strength)

    def hooks(self) -> dict[str, HookFn]:
        return {name: score_mod_hook(self.score_mod) for name in _point("scores", self.layers)}


@torch.no_grad()
def estimate_position_bias(model: nn.Module, ids: Tensor, rows: int = 16) -> Tensor:
    """``(layers, heads, T)``: log of the mean attention the last ``rows`` queries of neutral ``ids`` (1, T)
    put on each key position, centred per head (the positional part of attention, I201)."""
    T = ids.shape[1]
    r = min(rows, T)
    out: list[Tensor] = []
    for w in observe_rows(model, ids, last=r):  # (H, r, T) per layer
        lw = torch.log(w[:, :, : T - r + 1].mean(1) + 1e-6)  # keys every row sees
        out.append(lw - lw.mean(-1, keepdim=True))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------
# hidden-state dimension scaling (I244)
# ---------------------------------------------------------------------------------------------------------
def find_positional_dimension(hidden: Tensor, skip_first: int = 1) -> int:
    """The hidden dimension most monotonic in position: ``hidden`` (T, dim) -> dim index with the largest
    |Spearman correlation| between value and position (the first ``skip_first`` positions ignored)."""
    h = hidden[skip_first:].double()
    T = h.shape[0]
    ranks = h.argsort(0).argsort(0).double()
    pos = torch.arange(T, dtype=torch.float64).view(T, 1)
    rc = ranks - ranks.mean(0)
    pc = pos - pos.mean()
    corr = (rc * pc).sum(0) / (rc.norm(dim=0) * pc.norm() + 1e-12)
    return int(corr.abs().argmax())


class ScaleDimension:
    """Multiply hidden-state dimension ``dim`` by ``factor`` at the input of the given decoder layers."""

    def __init__(self, layers: Sequence[nn.Module], dim: int, factor: float) -> None:
        self.layers, self.dim, self.factor = list(layers), dim, factor
        self.handles: list[Any] = []

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x = x.clone()
        x[..., self.dim] *= self.factor
        if args:
            return (x, *args[1:]), kwargs
        kwargs["hidden_states"] = x
        return args, kwargs

    def __enter__(self) -> ScaleDimension:
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------------------
# ACT: calibrating hidden attention sinks (I31)
# ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ACT(Intervention):
    """A ``weights`` intervention: in ``layers`` (None: all), keys j > 0 whose mean attention over the query
    rows exceeds ``alpha / kv_len`` are hidden sinks; their weights are multiplied by ``beta`` and every row is
    renormalized. Records how many sinks were calibrated per layer in ``found``.

    The mean runs over the rows the seam hands over together (``ctx.rows``: the whole prompt when it fits in
    one chunk of rows, 256 by default; the new token's row when decoding): a weights hook sees one chunk of
    rows at a time, never the whole square.
    """

    alpha: float = 5.0
    beta: float = 0.4
    layers: tuple[int, ...] | None = None
    found: dict[int, int] = field(default_factory=dict)

    def calibrate(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (B, H, Tq, Tk) attention weights -> calibrated weights and the sink mask (B, H, 1, Tk)."""
        Tk = w.shape[-1]
        sink = w.mean(dim=2, keepdim=True) > self.alpha / Tk
        sink[..., 0] = False  # the initial sink is kept: ACT calibrates the hidden ones
        w2 = torch.where(sink, w * self.beta, w)
        # rows that see no key stay zero (never NaN)
        return w2 / w2.sum(-1, keepdim=True).clamp_min(torch.finfo(w2.dtype).tiny), sink

    def _weights(self, w: Tensor, ctx: Any) -> Tensor:
        w2, sink = self.calibrate(w)
        if ctx.rows[0] == 0:
            self.found[ctx.layer] = 0
        self.found[ctx.layer] = self.found.get(ctx.layer, 0) + int(sink.sum())
        return w2

    def hooks(self) -> dict[str, HookFn]:
        return {name: self._weights for name in _point("weights", self.layers)}


# ---------------------------------------------------------------------------------------------------------
# contrastive and guided decoding
# ---------------------------------------------------------------------------------------------------------
def _entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def decore_logits(base: Tensor, masked: Tensor, alpha: float = 0.5, entropy_guided: bool = True) -> Tensor:
    """DeCoRe: ``(1 + a) log p - a log p_masked`` with ``a = alpha * H(p) / log(V)`` if entropy-guided.

    base, masked: ``(B, V)`` logits of the model and of the model with its retrieval heads masked."""
    lp, lm = torch.log_softmax(base.double(), -1), torch.log_softmax(masked.double(), -1)
    a = torch.full(lp.shape[:-1], alpha, dtype=lp.dtype)
    if entropy_guided:
        a = alpha * _entropy(lp) / math.log(lp.shape[-1])
    return ((1 + a.unsqueeze(-1)) * lp - a.unsqueeze(-1) * lm).to(base.dtype)


@torch.no_grad()
def decore_generate(model: nn.Module, ids: Tensor, retrieval_heads: Sequence[tuple[int, int]],
                    max_new_tokens: int = 8, alpha: float = 0.5, entropy_guided: bool = True) -> Tensor:
    """Greedy DeCoRe decoding; ``retrieval_heads`` are (layer, query head) pairs masked in the contrast
    model. Returns the new tokens ``(B, max_new_tokens)``."""
    geo = hf.geometry(model)
    mask = HeadMask.ablate(geo.num_layers, geo.num_heads, retrieval_heads)
    cur = ids
    out = []
    for _ in range(max_new_tokens):
        base = model(input_ids=cur, use_cache=False, logits_to_keep=1).logits[:, -1]
        with mask.attach(model):
            masked = model(input_ids=cur, use_cache=False, logits_to_keep=1).logits[:, -1]
        nxt = decore_logits(base, masked, alpha, entropy_guided).argmax(-1, keepdim=True)
        out.append(nxt)
        cur = torch.cat([cur, nxt], 1)
    return torch.cat(out, 1)


@torch.no_grad()
def lookback_ratios(model: nn.Module, ids: Tensor, n_context: int) -> Tensor:
    """Lookback Lens features ``(layers, heads, T - n_context)``: for each generated position, the mean
    attention on the ``n_context`` context tokens over that mean plus the mean on generated tokens (a weights
    observer on the generated rows of whatever attention runs in ``model``)."""
    feats: list[Tensor] = []
    for w in observe_rows(model, ids, start=n_context):  # (H, Tg, T): rows of generated positions
        ctx = w[..., :n_context].mean(-1)
        gen = torch.stack([w[:, i, n_context: n_context + i + 1].mean(-1) for i in range(w.shape[1])], -1)
        feats.append(ctx / (ctx + gen))
    return torch.stack(feats)


@torch.no_grad()
def lookback_guided_generate(model: nn.Module, ids: Tensor, weights: Tensor | None = None,
                             chunks: int = 2, chunk_len: int = 4, candidates: int = 4,
                             temperature: float = 1.0, seed: int = 0) -> Tensor:
    """Lookback-Lens guided decoding: per chunk, sample ``candidates`` continuations and keep the one whose
    mean lookback ratios (``(layers*heads,)`` features) score highest under the linear ``weights``
    (default: their mean -- more attention on the context is better). Returns the new tokens ``(1, n)``."""
    gen = torch.Generator().manual_seed(seed)
    n_context = ids.shape[1]
    cur = ids
    for _ in range(chunks):
        best, best_score = None, -float("inf")
        for _ in range(candidates):
            cand = cur
            for _ in range(chunk_len):
                logits = model(input_ids=cand, use_cache=False, logits_to_keep=1).logits[:, -1] / temperature
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
                cand = torch.cat([cand, nxt], 1)
            f = lookback_ratios(model, cand, n_context).mean(-1).flatten()
            score = float(f.mean() if weights is None else f @ weights.to(f.dtype))
            if score > best_score:
                best, best_score = cand, score
        cur = best
    return cur[:, n_context:]


def agcd_logits(logits: Tensor, context_attention: Tensor, context_ids: Tensor, weight: float = 1.0) -> Tensor:
    """Attention-guided context decoding: ``p' = p + weight * H(p) / log V * p_ctx`` where ``p_ctx``
    spreads the last query's context attention ``(B, T_ctx)`` onto the vocabulary ids ``(B, T_ctx)``.
    Returns log-probabilities ``(B, V)``."""
    lp = torch.log_softmax(logits.double(), -1)
    p = lp.exp()
    ctx = torch.zeros_like(p).scatter_add_(-1, context_ids, context_attention.double())
    ctx = ctx / ctx.sum(-1, keepdim=True).clamp_min(1e-12)
    u = _entropy(lp) / math.log(p.shape[-1])
    mixed = p + weight * u.unsqueeze(-1) * ctx
    return torch.log(mixed / mixed.sum(-1, keepdim=True))


def pause_prompt(ids: Sequence[int], tok: Any, every: int = 64, marker: str = " [PAUSE]") -> list[int]:
    """PAUSE-token prompting (baseline, I34): insert ``marker`` after every ``every`` tokens of the prompt
    (the question at the end is kept intact: the last ``every`` tokens get no marker)."""
    pause = list(tok(marker, add_special_tokens=False)["input_ids"])
    out: list[int] = []
    n = len(ids)
    for i in range(0, n, every):
        out.extend(ids[i: i + every])
        if i + every < n - every:
            out.extend(pause)
    return out


__all__ = ["ACT", "HeadMask", "InitialTokenBias", "Intervention", "PositionBias", "PositionalCalibration",
           "ScaleDimension", "ZeroTuning", "score_mod_hook", "agcd_logits", "decore_generate", "decore_logits", "estimate_position_bias",
           "find_positional_dimension", "lookback_guided_generate", "lookback_ratios", "pause_prompt"]
