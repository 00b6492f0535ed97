"""Training-free calibrations and interventions on pretrained models (section I of shared/papers.md).

Each is a reusable piece that plugs into :class:`~attnlab.plans.runtime.PlanRunner` (``interventions=``:
objects with ``score_mod(layer, heads)`` and/or ``head_scale(layer, heads)``), into
:func:`attnlab.models.hf.install` (callbacks), or wraps decoding:

* :class:`ZeroTuning` (I41)       -- head-specific scaling of the attention to the initial token
  (additive ``log(gamma)`` on key 0: weight ``w0 -> gamma w0 / (gamma w0 + 1 - w0)``);
* :class:`HeadMask`               -- head masking / ablation: per (layer, query head) output factors
  (0 ablates; dropped heads of a plan do the same and also free their cache);
* :class:`PositionalCalibration` (I201, found-in-the-middle) -- subtract a per-position attention bias
  (estimated by :func:`estimate_position_bias` on neutral filler) from the scores, so attention follows
  relevance rather than position;
* :class:`ScaleDimension` (I244)  -- scale one hidden-state dimension (the positional one, found by
  :func:`find_positional_dimension`) in chosen layers, via forward pre-hooks;
* :class:`ACT` (I31)              -- attention calibration: keys other than the first that receive more than
  ``alpha / kv_len`` average attention (hidden sinks) get their weight scaled by ``beta`` (renormalized);
  an attention callback for :func:`attnlab.models.hf.install`;
* :func:`decore_logits` / :func:`decore_generate` (I234) -- contrast the model with its retrieval heads
  masked: ``(1 + a) log p - a log p_masked``, ``a`` scaled by the base entropy;
* :func:`lookback_ratios` / :func:`lookback_guided_generate` (A169) -- per head, attention on the context
  over attention on context + generated tokens; guided decoding picks, among sampled candidate chunks,
  the one a (linear) lookback classifier scores highest;
* :func:`agcd_logits` (I242)      -- attention-guided context decoding: add to the next-token distribution
  the attention the last query puts on context tokens (mapped to their vocabulary ids), weighted by the
  model's uncertainty (entropy);
* :func:`pause_prompt` (I34)      -- PAUSE-token prompting baseline: insert pause markers into a prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core.score_mods import ScoreMod
from ..models.hf import attnlab_attention, default_attention, head_gates


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
class ZeroTuning:
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


@dataclass(frozen=True, eq=False)
class HeadMask:
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
class PositionalCalibration:
    """Found-in-the-middle: remove a per-(layer, head, key position) log-attention bias from the scores."""

    bias: Tensor  # (layers, heads, max_len) log attention on neutral text, centred per head
    strength: float = 1.0
    layers: tuple[int, ...] | None = None

    def score_mod(self, layer: int, heads: int) -> ScoreMod | None:
        if self.layers is not None and layer not in self.layers:
            return None
        return PositionBias(self.bias[layer], self.strength)


@torch.no_grad()
def estimate_position_bias(model: nn.Module, ids: Tensor, rows: int = 16) -> Tensor:
    """``(layers, heads, T)``: log of the mean attention the last ``rows`` queries of neutral ``ids`` (1, T)
    put on each key position, centred per head (the positional part of attention, I201)."""
    out: list[Tensor] = []

    def fn(module, q, k, v, mask, scaling, layer_idx):
        Tq, Tk = q.shape[2], k.shape[2]
        r = min(rows, Tq)
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        s = (q[:, :, Tq - r:] @ kk.transpose(-1, -2)) * scaling
        qpos = torch.arange(Tk - r, Tk).view(r, 1)
        s = s.masked_fill(torch.arange(Tk).view(1, Tk) > qpos, float("-inf"))
        w = torch.softmax(s.float(), -1)[0, :, :, : Tk - r + 1].mean(1)  # keys every row sees
        lw = torch.log(w + 1e-6)
        out.append(lw - lw.mean(-1, keepdim=True))
        return default_attention(module, q, k, v, mask, scaling)

    with attnlab_attention(model, fn):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
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
@dataclass
class ACT:
    """Attention callback: in ``layers`` (None: all), keys j > 0 whose mean attention over the queries
    exceeds ``alpha / kv_len`` are hidden sinks; their weights are multiplied by ``beta`` and every row is
    renormalized. Records how many sinks were calibrated per layer in ``found``."""

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
        return w2 / w2.sum(-1, keepdim=True), sink

    def __call__(self, module, q, k, v, mask, scaling, layer_idx):
        if self.layers is not None and layer_idx not in self.layers:
            return default_attention(module, q, k, v, mask, scaling)
        Tq, Tk = q.shape[2], k.shape[2]
        g = q.shape[1] // k.shape[1]
        s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        allowed = mask if mask is not None else (
            torch.arange(Tk).view(1, Tk) <= torch.arange(Tk - Tq, Tk).view(Tq, 1))
        s = s.masked_fill(~allowed, float("-inf"))
        w, sink = self.calibrate(torch.softmax(s, -1))
        self.found[layer_idx] = int(sink.sum())
        return w @ v.repeat_interleave(g, 1)


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
    cfg = model.config
    gates = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads)
    for layer, h in retrieval_heads:
        gates[layer, h] = 0.0
    cur = ids
    out = []
    for _ in range(max_new_tokens):
        base = model(input_ids=cur, use_cache=False, logits_to_keep=1).logits[:, -1]
        with attnlab_attention(model, head_gates(gates)):
            masked = model(input_ids=cur, use_cache=False, logits_to_keep=1).logits[:, -1]
        nxt = decore_logits(base, masked, alpha, entropy_guided).argmax(-1, keepdim=True)
        out.append(nxt)
        cur = torch.cat([cur, nxt], 1)
    return torch.cat(out, 1)


@torch.no_grad()
def lookback_ratios(model: nn.Module, ids: Tensor, n_context: int) -> Tensor:
    """Lookback Lens features ``(layers, heads, T - n_context)``: for each generated position, the mean
    attention on the ``n_context`` context tokens over that mean plus the mean on generated tokens."""
    feats: list[Tensor] = []

    def fn(module, q, k, v, mask, scaling, layer_idx):
        Tk = k.shape[2]
        g = q.shape[1] // k.shape[1]
        s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        s = s.masked_fill(torch.arange(Tk).view(1, Tk) > torch.arange(Tk).view(Tk, 1), float("-inf"))
        w = torch.softmax(s, -1)[0, :, n_context:]  # rows of generated positions (H, Tg, Tk)
        ctx = w[..., :n_context].mean(-1)
        gen = torch.stack([w[:, i, n_context: n_context + i + 1].mean(-1) for i in range(w.shape[1])], -1)
        feats.append(ctx / (ctx + gen))
        return default_attention(module, q, k, v, mask, scaling)

    with attnlab_attention(model, fn):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
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


__all__ = ["ACT", "HeadMask", "InitialTokenBias", "PositionBias", "PositionalCalibration", "ScaleDimension",
           "ZeroTuning", "agcd_logits", "decore_generate", "decore_logits", "estimate_position_bias",
           "find_positional_dimension", "lookback_guided_generate", "lookback_ratios", "pause_prompt"]
