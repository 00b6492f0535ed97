"""Knob-setting procedures of the interventions, run on a validation split (seeds disjoint from the test split,
:mod:`attnlab.interventions.data`), and the store that keeps fitted knobs in the run folder.

Validation objective (convention ``val-nll``): the mean negative log-likelihood of the gold answer, teacher-forced
after the prompt (:func:`attnlab.interventions.data.target_text`), under the intervention's own next-token
distribution (hooks attached; DeCoRe's contrast; DAGCD's attention-mixed distribution; the PAUSE-transformed
prompt). With the handful of validation samples a CPU affords, accuracy cannot rank a grid of knob values (it
moves in steps of 1/n); the answer's log-likelihood can. Every grid contains the identity (the plain model),
listed first, and a candidate must be strictly better to win, so a fit never picks a change that does not help
on validation.

Procedures (``quick``: the sizes in :data:`QUICK`, else :data:`FULL`):

* ``zerotuning`` (I41) -- per-head sensitivity of the objective to the initial token's attention,
  ``s[l, h] = d NLL / d log gamma[l, h]`` at ``gamma = 1`` (``screen=grad``: one backward per validation sample;
  ``screen=scan``: the paper's head-by-head scaling, ``gamma_up`` on one head at a time). Heads with ``s < 0``
  gain from more attention on the initial token (up-effective), ``s > 0`` from less (down-effective). Then the
  scale, by validation NLL over the grid: ``gamma > 1`` on the up-effective heads, ``gamma < 1`` on the
  down-effective ones, or both at once (``gamma`` up, ``1 / gamma`` down).
* ``act`` (I31) -- the head filter: a gate ``t[l, h]`` mixes each head's weights with their ACT calibration,
  ``w + t (act(w) - w)``; heads whose ``d NLL / d t`` at 0 is negative are those where calibration helps. Of them,
  all / the top half / the top quarter (by gradient size), whichever gives the lowest validation NLL.
* ``fim`` (I201) -- the position bias: :func:`attnlab.plans.calibrate.estimate_position_bias` on neutral text
  (seeded sentences with no task content) at the validation prompts' length, averaged over prompts, kept on the
  context span only (:func:`span_bias`: not on the first token, the attention sink, nor on the last ``tail``
  positions, the local window and the question: removing those biases breaks the model rather than its
  positional preference among documents); then the strength and the layers (all full-attention layers / their later half; a model's sliding-window layers are
  never calibrated: their far keys carry no weight to estimate) by validation NLL.
* ``scale_dim`` (I244) -- the positional hidden dimension: :func:`find_positional_dimension` on each layer's input
  hidden states of the validation prompts, the most frequent answer over layers; then the factor and the layers
  (all / first half / second half) by validation NLL.
* ``decore`` (I234) -- retrieval heads from the head atlas (:func:`attnlab.inspect.atlas.build_atlas`'s
  ``retrieval`` metric, Wu et al.'s copy-paste score per query head, averaged over validation probe seeds); the
  number of masked heads and ``alpha`` by validation NLL of the DeCoRe distribution.
* ``dagcd`` (I242) -- a per-head probe: teacher-forced, how much of each head's attention on the prompt (first
  token excluded) lands on prompt tokens equal to the next gold token; the top heads, their number and the
  weight by validation NLL of the DAGCD distribution (all candidates read one forward pass per sample).
* ``lookback`` (A169) -- the Lookback-Lens detector, an L2-regularized logistic regression (standardized
  features, full-batch gradient descent from zero: same data, same weights) on the mean lookback ratios of a
  span. ``train=planted`` (default): the validation split of the ``planted`` task, whose summary span is
  supported by the report or carries a planted unsupported fact (the paper's span labels; the detector is
  meant to transfer across tasks); ``train=continuations`` (or without that task): sampled continuations of
  the task's validation prompts (and the greedy one), labelled by the task's score (>= 0.5: faithful). All
  labels equal: no detector (the mean-ratio fallback), said in the trace.
* ``pause`` (I34) -- PAUSE markers: how often (``every`` tokens) and how many per insertion by validation NLL.
* ``headmask`` -- no validation search: the ``top`` retrieval heads of the atlas, or the listed ones.
* ``moa`` (I58) -- MoA's elastic per-head length rules ``window = alpha + beta * N``: lost attention mass of
  every candidate rule profiled at two lengths, the rules chosen under a KV budget at both lengths
  (:func:`fit_moa`); at test time the plan for the prompt's own length (:func:`moa_plan_at`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..inspect.capture import forward_kwargs, transformer_blocks
from ..models import hf
from ..plans import calibrate as C
from . import data

Pair = tuple[list[int], list[int]]

#: validation sizes: samples, grids and screens (--quick)
QUICK: dict[str, Any] = {
    "n_val": 2, "zt_grid": (0.5, 1.5, 2.0), "act_keep": (1.0, 0.5), "fim_strength": (0.25, 0.5),
    "fim_neutral": 1, "sd_factor": (0.0, 0.5), "sd_layers": ("all", "late"), "decore_k": (4, 8),
    "decore_alpha": (0.5,), "atlas_seeds": 1, "dagcd_k": (4, 8), "dagcd_weight": (1.0,), "lb_candidates": 2,
    "lb_tokens": 12, "lb_planted": 8, "pause_every": (64, 128), "pause_count": (1,),
    "moa_alpha": (16, 64, 128), "moa_beta": (0.0, 0.25, 0.5), "moa_prompts": 1,
}
FULL: dict[str, Any] = {
    "n_val": 12, "zt_grid": (0.25, 0.5, 0.75, 1.25, 1.5, 2.0, 3.0), "act_keep": (1.0, 0.5, 0.25),
    "fim_strength": (0.1, 0.25, 0.5, 1.0), "fim_neutral": 4, "sd_factor": (-1.0, -0.5, 0.0, 0.5, 1.5),
    "sd_layers": ("all", "early", "late"), "decore_k": (5, 10, 20, 40), "decore_alpha": (0.25, 0.5, 1.0),
    "atlas_seeds": 4, "dagcd_k": (2, 4, 8, 16), "dagcd_weight": (0.5, 1.0, 2.0), "lb_candidates": 5,
    "lb_tokens": 32, "lb_planted": 40, "pause_every": (32, 64, 128, 256), "pause_count": (1, 2, 4),
    "moa_alpha": (16, 32, 64, 128, 256), "moa_beta": (0.0, 0.125, 0.25, 0.5, 0.75), "moa_prompts": 2,
}


@dataclass
class FitContext:
    """What a procedure sees: the model (with whatever runs its attention already installed), the tokenizer,
    validation samples, the sizes (``quick``), a seed and a progress callback ``tick(label)``."""

    model: nn.Module
    tok: Any
    val: list[Any]
    quick: bool = True
    seed: int = 0
    tick: Callable[[str], None] = lambda label: None
    base: Any = None  # the entered decoding.Base (its new_cache() fits what runs the attention), or None

    @property
    def sizes(self) -> dict[str, Any]:
        return QUICK if self.quick else FULL

    @property
    def pairs(self) -> list[Pair]:
        return data.pairs(self.tok, self.val)

    @property
    def geo(self) -> hf.ModelGeometry:
        return hf.geometry(self.model)


@dataclass
class Fitted:
    """Fitted knobs: JSON-able values (``knobs``), tensors (``tensors``, saved as safetensors) and what the
    search saw (``trace``: candidates and their validation NLL)."""

    knobs: dict[str, Any]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    trace: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# the validation objective
# ---------------------------------------------------------------------------------------------------------
def target_logits(model: nn.Module, prompt: Sequence[int], target: Sequence[int]) -> Tensor:
    """Logits ``(m, V)`` of the positions predicting the ``m`` target tokens (teacher-forced, no cache)."""
    ids = torch.tensor([list(prompt) + list(target)])
    m = len(target)
    return model(**forward_kwargs(model, ids, logits_rows=m + 1)).logits[0, :-1]


def nll_of(logprobs: Tensor, target: Sequence[int]) -> Tensor:
    """Mean negative log-likelihood of ``target`` under log-probabilities ``(m, V)``."""
    idx = torch.tensor(list(target), device=logprobs.device).view(-1, 1)
    return -logprobs.gather(-1, idx).mean()


@torch.no_grad()
def val_nll(model: nn.Module, pairs: Sequence[Pair], hooks: Callable[[], Any] | None = None,
            prompt_fn: Callable[[list[int]], list[int]] | None = None) -> float:
    """Mean answer NLL over ``pairs`` with ``hooks()`` (a context manager) around each forward pass and the
    prompts transformed by ``prompt_fn``."""
    total = 0.0
    for prompt, target in pairs:
        p = prompt_fn(prompt) if prompt_fn is not None else prompt
        with hooks() if hooks is not None else nullcontext():
            lp = torch.log_softmax(target_logits(model, p, target).double(), -1)
        total += float(nll_of(lp, target))
    return total / len(pairs)


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def grad_screen(model: nn.Module, pairs: Sequence[Pair], hooks_for: Callable[[Tensor], dict[str, Any]],
                shape: tuple[int, ...]) -> Tensor:
    """``d mean NLL / d g`` at ``g = 0`` for a gate tensor ``g`` of ``shape`` that ``hooks_for(g)`` applies (one
    forward and backward per pair; the model's parameters get no gradient)."""
    g = torch.zeros(shape, dtype=torch.float32, requires_grad=True)
    with _frozen(model), torch.enable_grad(), hf.hooks(model, hooks_for(g)):
        for prompt, target in pairs:
            lp = torch.log_softmax(target_logits(model, prompt, target).double(), -1)
            (nll_of(lp, target) / len(pairs)).backward()
    return g.grad.detach().clone() if g.grad is not None else torch.zeros(shape)


def _best(cands: list[tuple[Any, float]], fixed: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """Index of the lowest NLL (the first wins ties: the identity is listed first) and a JSON trace.
    ``fixed``: the user gave every searched knob, so the identity (index 0) is not a choice when another
    candidate exists."""
    first = 1 if fixed and len(cands) > 1 else 0
    best = first
    for i in range(first, len(cands)):
        if cands[i][1] < cands[best][1] - 1e-9:
            best = i
    return best, [{"candidate": c, "val_nll": round(v, 6)} for c, v in cands]


def _layers(spec: Sequence[int] | None, n: int) -> list[int]:
    return list(range(n)) if spec is None else [int(x) for x in spec if 0 <= int(x) < n]


# ---------------------------------------------------------------------------------------------------------
# ZeroTuning
# ---------------------------------------------------------------------------------------------------------
def zerotuning_hooks(log_gamma: Tensor) -> dict[str, Any]:
    """``scores`` hooks adding ``log_gamma[layer, head]`` on key 0 (differentiable in ``log_gamma``)."""
    return {"blocks.*.attn.scores": C.score_mod_hook(lambda layer, heads: C.InitialTokenBias(log_gamma[layer]))}


def fit_zerotuning(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    L, H = fc.geo.num_layers, fc.geo.num_heads
    pairs = fc.pairs
    layers = _layers(knobs.get("layers"), L)
    allowed = torch.zeros(L, H, dtype=torch.bool)
    allowed[layers] = True
    base = val_nll(fc.model, pairs)
    if knobs.get("heads") == "all":
        s = torch.zeros(L, H)
        up = down = allowed
    else:
        if knobs.get("screen") == "scan":
            s = torch.zeros(L, H)
            g_up = float(knobs.get("gamma") or 1.5)
            for layer in layers:
                for h in range(H):
                    gam = torch.ones(L, H)
                    gam[layer, h] = g_up
                    s[layer, h] = val_nll(fc.model, pairs, lambda gam=gam: C.ZeroTuning(gam).attach(fc.model)) - base
                fc.tick(f"zerotuning scan layer {layer}")
        else:
            s = grad_screen(fc.model, pairs, zerotuning_hooks, (L, H))
            fc.tick("zerotuning screen")
        s = torch.where(allowed, s, torch.zeros_like(s))
        up, down = allowed & (s < 0), allowed & (s > 0)
    grid = (float(knobs["gamma"]),) if knobs.get("gamma") is not None else fc.sizes["zt_grid"]
    cands: list[tuple[Any, float]] = [({"gamma": 1.0, "heads": 0, "side": "none"}, base)]
    tables = [torch.ones(L, H)]
    one = torch.ones(L, H)
    for g in grid:
        if g == 1:
            continue
        # gamma > 1 on the up-effective heads, < 1 on the down-effective ones, and (g > 1) both at once: g up,
        # 1/g down (each head moved the way its screen prefers)
        options = [("up", torch.where(up, torch.full((L, H), float(g)), one))] if g > 1 else \
            [("down", torch.where(down, torch.full((L, H), float(g)), one))]
        if g > 1 and knobs.get("heads") != "all":
            options.append(("both", torch.where(up, torch.full((L, H), float(g)),
                                                torch.where(down, torch.full((L, H), 1.0 / g), one))))
        for side, gam in options:
            if bool((gam == 1).all()):
                continue
            v = val_nll(fc.model, pairs, lambda gam=gam: C.ZeroTuning(gam).attach(fc.model))
            cands.append(({"gamma": g, "heads": int((gam != 1).sum()), "side": side}, v))
            tables.append(gam)
            fc.tick(f"zerotuning gamma {g} {side}")
    i, trace = _best(cands, fixed=knobs.get("gamma") is not None)
    return Fitted({"gamma": cands[i][0]["gamma"], "heads_tuned": cands[i][0]["heads"], "side": cands[i][0]["side"]},
                  {"gamma": tables[i], "sensitivity": s.float()},
                  {"grid": trace, "up_effective": int(up.sum()), "down_effective": int(down.sum())})


# ---------------------------------------------------------------------------------------------------------
# ACT
# ---------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class HeadACT(C.ACT):
    """:class:`attnlab.plans.calibrate.ACT` on the heads of ``heads`` ``(layers, heads)`` only (None: all)."""

    heads: Tensor | None = None

    def _weights(self, w: Tensor, ctx: Any) -> Tensor:
        w2 = super()._weights(w, ctx)
        if self.heads is None:
            return w2
        m = self.heads[ctx.layer].to(device=w.device, dtype=torch.bool).view(1, -1, 1, 1)
        return torch.where(m, w2, w)

    def hooks(self) -> dict[str, C.HookFn]:
        if self.heads is None:
            return super().hooks()
        rows = [int(i) for i in torch.nonzero(self.heads.bool().any(-1)).flatten()]
        if self.layers is not None:
            rows = [r for r in rows if r in self.layers]
        return {f"blocks.{layer}.attn.weights": self._weights for layer in rows}


def act_gate_hooks(act: C.ACT) -> Callable[[Tensor], dict[str, Any]]:
    def hooks_for(t: Tensor) -> dict[str, Any]:
        def fn(w: Tensor, ctx: Any) -> Tensor:
            w2, _ = act.calibrate(w)
            return w + t[ctx.layer].to(w.dtype).view(1, -1, 1, 1) * (w2 - w)

        return {"blocks.*.attn.weights": fn}

    return hooks_for


def fit_act(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    L, H = fc.geo.num_layers, fc.geo.num_heads
    pairs = fc.pairs
    alpha, beta = float(knobs["alpha"]), float(knobs["beta"])
    layers = _layers(knobs.get("layers"), L)
    allowed = torch.zeros(L, H, dtype=torch.bool)
    allowed[layers] = True
    base = val_nll(fc.model, pairs)
    s = grad_screen(fc.model, pairs, act_gate_hooks(C.ACT(alpha=alpha, beta=beta)), (L, H))
    s = torch.where(allowed, s, torch.zeros_like(s))
    fc.tick("act screen")
    helpful = allowed & (s < 0)
    order = torch.argsort(s.flatten(), stable=True)  # most negative first
    n_help = int(helpful.sum())
    cands: list[tuple[Any, float]] = [({"keep": 0.0, "heads": 0}, base)]
    masks = [torch.zeros(L, H)]
    for keep in fc.sizes["act_keep"]:
        k = int(math.ceil(keep * n_help))
        if k == 0:
            continue
        m = torch.zeros(L * H)
        m[order[:k]] = 1.0
        m = m.view(L, H)
        act = HeadACT(alpha=alpha, beta=beta, heads=m)
        cands.append(({"keep": keep, "heads": k}, val_nll(fc.model, pairs, lambda act=act: act.attach(fc.model))))
        masks.append(m)
        fc.tick(f"act keep {keep}")
    i, trace = _best(cands)
    return Fitted({"heads_calibrated": cands[i][0]["heads"]}, {"heads": masks[i], "sensitivity": s.float()},
                  {"grid": trace, "helpful": n_help})


# ---------------------------------------------------------------------------------------------------------
# found in the middle
# ---------------------------------------------------------------------------------------------------------
_NEUTRAL = (
    ("The morning", "A small boat", "The old road", "Our garden", "The long table", "A quiet river"),
    ("stayed", "looked", "seemed", "remained", "appeared", "felt"),
    ("calm", "grey", "still", "wide", "plain", "ordinary"),
    ("all day.", "as before.", "for a while.", "in the evening.", "again.", "once more."),
)


def neutral_ids(tok: Any, length: int, seed: int = 0) -> list[int]:
    """``length`` token ids of seeded neutral sentences (no task content), after the BOS token when the
    tokenizer adds one."""
    rng = random.Random(f"neutral-{seed}")
    bos = list(tok("x")["input_ids"][:1]) if getattr(tok, "bos_token_id", None) is not None else []
    if bos and bos[0] != tok.bos_token_id:
        bos = []
    out = list(bos)
    while len(out) < length:
        s = " ".join(rng.choice(part) for part in _NEUTRAL) + " "
        out += list(tok(s, add_special_tokens=False)["input_ids"])
    return out[:length]


def full_layers(model: nn.Module) -> list[int]:
    from ..plans.sources import model_windows

    return [i for i, w in enumerate(model_windows(model)) if w is None]


def span_bias(bias: Tensor, length: int, tail: int) -> Tensor:
    """``bias`` ``(L, H, K)`` (log attention per key position) limited to the context span: keys ``1 .. length -
    tail - 1`` keep their bias, centred over the span; the first key (the attention sink) and the last ``tail``
    positions (the local window and the question), and every later position (generated tokens), get 0. Returns
    ``(L, H, length + 1)`` (the table's last entry, 0, covers positions beyond it)."""
    L, H, K = bias.shape
    end = max(2, min(K, length - tail))
    out = torch.zeros(L, H, length + 1, dtype=bias.dtype)
    span = bias[..., 1:end]
    out[..., 1:end] = span - span.mean(-1, keepdim=True)
    return out


def fit_fim(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    pairs = fc.pairs
    length = max(len(p) for p, _ in pairs)
    rows = int(knobs["rows"])
    bias = None
    n = fc.sizes["fim_neutral"]
    for i in range(n):
        ids = torch.tensor([neutral_ids(fc.tok, length, seed=data.VAL_OFFSET * 7 + fc.seed * 100 + i)])
        b = C.estimate_position_bias(fc.model, ids, rows=rows)
        bias = b if bias is None else bias + b
    bias = span_bias(bias / n, length, int(knobs["tail"]))
    fc.tick("fim bias")
    full = full_layers(fc.model)
    layer_sets = {"all": full, "late": full[len(full) // 2:]}
    if knobs.get("layers") is not None:
        layer_sets = {"given": [x for x in knobs["layers"] if x in full]}
    strengths = (float(knobs["strength"]),) if knobs.get("strength") is not None else fc.sizes["fim_strength"]
    cands: list[tuple[Any, float]] = [({"strength": 0.0, "layers": []}, val_nll(fc.model, pairs))]
    for name, ls in layer_sets.items():
        for st in strengths:
            pc = C.PositionalCalibration(bias, st, tuple(ls))
            cands.append(({"strength": st, "layers": list(ls), "set": name},
                          val_nll(fc.model, pairs, lambda pc=pc: pc.attach(fc.model))))
            fc.tick(f"fim {name} {st}")
    i, trace = _best(cands, fixed=knobs.get("strength") is not None and knobs.get("layers") is not None)
    return Fitted({"strength": cands[i][0]["strength"], "layers": cands[i][0]["layers"]}, {"bias": bias.float()},
                  {"grid": trace, "length": length})


# ---------------------------------------------------------------------------------------------------------
# scaling one hidden dimension
# ---------------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return [block for _, block in transformer_blocks(model)]


@torch.no_grad()
def positional_dimension(model: nn.Module, prompts: Sequence[Sequence[int]]) -> tuple[int, dict[int, int]]:
    """The most frequent :func:`find_positional_dimension` over every layer's input hidden states and prompts
    (ties: the lowest index); returns it and the vote counts."""
    votes: Counter = Counter()
    for p in prompts:
        out = model(**forward_kwargs(model, torch.tensor([list(p)]), output_hidden_states=True))
        for h in out.hidden_states[:-1]:  # the inputs of the decoder layers
            votes[C.find_positional_dimension(h[0].float())] += 1
    top = max(votes.values())
    return min(d for d, c in votes.items() if c == top), dict(votes)


def fit_scale_dim(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    pairs = fc.pairs
    L = fc.geo.num_layers
    if knobs.get("dim") is not None:
        dim, votes = int(knobs["dim"]), {}
    else:
        dim, votes = positional_dimension(fc.model, [p for p, _ in pairs])
        fc.tick("scale_dim dimension")
    sets = {"all": list(range(L)), "early": list(range(L // 2)), "late": list(range(L // 2, L))}
    if knobs.get("layers") is not None:
        sets = {"given": _layers(knobs["layers"], L)}
    else:
        sets = {k: v for k, v in sets.items() if k in fc.sizes["sd_layers"]}
    factors = (float(knobs["factor"]),) if knobs.get("factor") is not None else fc.sizes["sd_factor"]
    blocks = decoder_layers(fc.model)
    cands: list[tuple[Any, float]] = [({"factor": 1.0, "layers": []}, val_nll(fc.model, pairs))]
    for name, ls in sets.items():
        for f in factors:
            sd = C.ScaleDimension([blocks[i] for i in ls], dim, f)
            cands.append(({"factor": f, "layers": ls, "set": name}, val_nll(fc.model, pairs, lambda sd=sd: sd)))
            fc.tick(f"scale_dim {name} {f}")
    i, trace = _best(cands, fixed=knobs.get("factor") is not None and knobs.get("layers") is not None)
    return Fitted({"dim": dim, "factor": cands[i][0]["factor"], "layers": cands[i][0]["layers"]}, {},
                  {"grid": trace, "votes": {str(k): v for k, v in votes.items()}})


# ---------------------------------------------------------------------------------------------------------
# retrieval heads (DeCoRe, head masks)
# ---------------------------------------------------------------------------------------------------------
_RETRIEVAL: dict[tuple[int, tuple[int, ...]], Tensor] = {}


def retrieval_scores(model: nn.Module, tok: Any, seeds: Sequence[int]) -> Tensor:
    """Wu et al.'s retrieval score per (layer, query head) ``(L, H)`` from the head atlas's needle-copy probe,
    averaged over probe ``seeds`` (unmeasured: 0). Kept per (model, seeds) for the process: every task's fit
    reads the same heads."""
    from ..inspect.atlas import build_atlas

    memo = (id(model), tuple(int(s) for s in seeds))
    if memo in _RETRIEVAL:
        return _RETRIEVAL[memo].clone()
    acc = None
    for s in seeds:
        atlas = build_atlas(model, tok, probes=["text", "retrieval"], importance="none", flow_tokens=0, seed=int(s))
        r = torch.nan_to_num(torch.tensor(atlas.metrics["retrieval"], dtype=torch.float64), nan=0.0)
        acc = r if acc is None else acc + r
    _RETRIEVAL[memo] = (acc / len(seeds)).float()
    return _RETRIEVAL[memo].clone()


def ranked_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring (layer, head) pairs (ties: layer order, then head order)."""
    L, H = scores.shape
    order = torch.argsort(-scores.flatten().double(), stable=True)[:k]
    return [(int(i) // H, int(i) % H) for i in order]


def _val_seeds(fc: FitContext, n: int) -> list[int]:
    return [data.VAL_OFFSET + fc.seed * 100 + i for i in range(n)]


def decore_nll(model: nn.Module, pairs: Sequence[Pair], heads: Sequence[tuple[int, int]], alpha: float,
               cache: dict | None = None) -> float:
    """Validation NLL of the DeCoRe distribution (base and masked logits of the target positions)."""
    geo = hf.geometry(model)
    mask = C.HeadMask.ablate(geo.num_layers, geo.num_heads, heads)
    total = 0.0
    with torch.no_grad():
        for i, (prompt, target) in enumerate(pairs):
            base = cache.get(i) if cache is not None else None
            if base is None:
                base = target_logits(model, prompt, target)
                if cache is not None:
                    cache[i] = base
            with mask.attach(model):
                masked = target_logits(model, prompt, target)
            lp = torch.log_softmax(C.decore_logits(base.double(), masked.double(), alpha).double(), -1)
            total += float(nll_of(lp, target))
    return total / len(pairs)


def fit_decore(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    """Retrieval heads from the atlas (unless ``heads`` are given), then ``k`` and ``alpha`` by validation NLL."""
    L, H = fc.geo.num_layers, fc.geo.num_heads
    tensors: dict[str, Tensor] = {}
    if knobs.get("heads"):
        given = [tuple(int(x) for x in h) for h in knobs["heads"]]
        ranked = lambda k: given  # noqa: E731 -- the listed heads, whatever k
        ks: tuple[int, ...] = (len(given),)
    else:
        scores = retrieval_scores(fc.model, fc.tok, _val_seeds(fc, fc.sizes["atlas_seeds"]))
        tensors["retrieval"] = scores
        fc.tick("decore retrieval heads")
        ranked = lambda k: ranked_heads(scores, k)  # noqa: E731
        ks = (int(knobs["k"]),) if knobs.get("k") is not None else fc.sizes["decore_k"]
        ks = tuple(sorted({min(k, L * H // 2) for k in ks if k > 0}))
    pairs = fc.pairs
    alphas = (float(knobs["alpha"]),) if knobs.get("alpha") is not None else fc.sizes["decore_alpha"]
    base_cache: dict = {}
    cands: list[tuple[Any, float]] = [({"k": 0, "alpha": 0.0}, decore_nll(fc.model, pairs, [], 0.0, base_cache))]
    for k in ks:
        for a in alphas:
            cands.append(({"k": k, "alpha": a}, decore_nll(fc.model, pairs, ranked(k), a, base_cache)))
            fc.tick(f"decore k={k} alpha={a}")
    fixed = knobs.get("alpha") is not None and (bool(knobs.get("heads")) or knobs.get("k") is not None)
    i, trace = _best(cands, fixed=fixed)
    k = cands[i][0]["k"]
    heads = ranked(k) if k else []
    return Fitted({"k": k, "alpha": cands[i][0]["alpha"], "heads": [list(x) for x in heads]}, tensors,
                  {"grid": trace})


def fit_headmask(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    scores = retrieval_scores(fc.model, fc.tok, _val_seeds(fc, fc.sizes["atlas_seeds"]))
    heads = ranked_heads(scores, int(knobs["top"]))
    return Fitted({"heads": [list(x) for x in heads]}, {"retrieval": scores}, {})


# ---------------------------------------------------------------------------------------------------------
# DAGCD
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def context_attention(model: nn.Module, prompt: Sequence[int], target: Sequence[int],
                      start: int = 1) -> tuple[Tensor, Tensor]:
    """Teacher-forced: logits ``(m, V)`` of the target positions and every head's attention on the prompt
    tokens ``start..T-1`` from those rows, ``(L, H, m, T - start)`` (one forward pass, a weights observer)."""
    T, m = len(prompt), len(target)
    ids = torch.tensor([list(prompt) + list(target)])
    logits_box: list[Tensor] = []
    from ..inspect.capture import WeightRows

    obs = WeightRows(start=T - 1)
    with hf.hooks(model, obs.hooks()):
        logits_box.append(model(**forward_kwargs(model, ids, logits_rows=m + 1)).logits[0, :-1])
    rows = obs.result()  # per layer (H, m + 1, T + m)
    att = torch.stack([w[:, :m, start:T] for w in rows])
    return logits_box[0], att


def fit_dagcd(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    L, H = fc.geo.num_layers, fc.geo.num_heads
    start = 1
    pairs = fc.pairs
    seen = []
    score = torch.zeros(L, H, dtype=torch.float64)
    rows = 0
    for prompt, target in pairs:
        logits, att = context_attention(fc.model, prompt, target, start)
        ctx_ids = torch.tensor(prompt[start:])
        seen.append((logits, att, ctx_ids, target))
        for t, y in enumerate(target):
            hit = ctx_ids == y
            if not bool(hit.any()):
                continue  # the gold token is not in the prompt: no head can point at it
            a = att[:, :, t].double()  # (L, H, T - start)
            score += (a * hit).sum(-1) / a.sum(-1).clamp_min(1e-12)
            rows += 1
    score = (score / max(rows, 1)).float()
    fc.tick("dagcd probe")

    def nll(heads: list[tuple[int, int]], weight: float) -> float:
        total = 0.0
        for logits, att, ctx_ids, target in seen:
            if heads:
                idx_l = torch.tensor([h[0] for h in heads])
                idx_h = torch.tensor([h[1] for h in heads])
                ca = att[idx_l, idx_h].sum(0)  # (m, T - start)
                lp = C.agcd_logits(logits.double(), ca.double(), ctx_ids.expand(len(target), -1), weight)
            else:
                lp = torch.log_softmax(logits.double(), -1)
            total += float(nll_of(lp, target))
        return total / len(seen)

    if knobs.get("heads"):
        given = [tuple(int(x) for x in h) for h in knobs["heads"]]
        ranked = lambda k: given  # noqa: E731 -- the listed heads, whatever k
        ks: tuple[int, ...] = (len(given),)
    else:
        ranked = lambda k: ranked_heads(score, k)  # noqa: E731
        ks = (int(knobs["k"]),) if knobs.get("k") is not None else fc.sizes["dagcd_k"]
        ks = tuple(sorted({min(k, L * H) for k in ks if k > 0}))
    ws = (float(knobs["weight"]),) if knobs.get("weight") is not None else fc.sizes["dagcd_weight"]
    cands: list[tuple[Any, float]] = [({"k": 0, "weight": 0.0}, nll([], 0.0))]
    for k in ks:
        for w in ws:
            cands.append(({"k": k, "weight": w}, nll(ranked(k), w)))
    fixed = knobs.get("weight") is not None and (bool(knobs.get("heads")) or knobs.get("k") is not None)
    i, trace = _best(cands, fixed=fixed)
    k = cands[i][0]["k"]
    heads = ranked(k) if k else []
    return Fitted({"k": k, "weight": cands[i][0]["weight"], "heads": [list(x) for x in heads]},
                  {"probe": score}, {"grid": trace, "probe_rows": rows})


# ---------------------------------------------------------------------------------------------------------
# Lookback Lens detector
# ---------------------------------------------------------------------------------------------------------
def logistic_fit(x: Tensor, y: Tensor, l2: float = 1e-2, steps: int = 500, lr: float = 0.5) -> tuple[Tensor, float]:
    """L2-regularized logistic regression on standardized features by full-batch gradient descent from zero
    (deterministic). ``x`` ``(n, d)``, ``y`` ``(n,)`` in {0, 1}. Returns weights and bias in the original
    feature space (``sigmoid(x @ w + b)``)."""
    x = x.double()
    y = y.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    b = torch.zeros((), dtype=torch.float64)
    n = x.shape[0]
    for _ in range(steps):
        p = torch.sigmoid(z @ w + b)
        gw = z.T @ (p - y) / n + l2 * w
        gb = (p - y).mean()
        w -= lr * gw
        b -= lr * gb
    w_orig = w / sd
    return w_orig.float(), float(b - (w * mu / sd).sum())


@torch.no_grad()
def planted_examples(model: nn.Module, samples: Sequence[Any]) -> tuple[Tensor, Tensor]:
    """Lookback Lens's training data from ``planted`` samples: per sample the mean lookback ratios ``(L*H,)`` of
    its summary span (context = the tokens before it; :func:`attnlab.plans.calibrate.lookback_ratios`, one
    teacher-forced pass) and its label, 1 = supported (the summary restates the report), 0 = planted."""
    feats, labels = [], []
    for s in samples:
        a, b = s.span
        r = C.lookback_ratios(model, torch.tensor([list(s.ids[:b])]), a)  # (L, H, b - a)
        feats.append(r.mean(-1).flatten().float())
        labels.append(float(1 - int(s.label)))
    return torch.stack(feats), torch.tensor(labels)


def _planted_val(fc: FitContext, length: int) -> list[Any] | None:
    if "planted" not in data.task_names():
        return None
    try:
        return data.make(fc.tok, "planted", length, fc.sizes["lb_planted"], fc.seed, "val")
    except ValueError:
        return None


def fit_lookback(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    """The Lookback-Lens detector: on ``planted`` validation samples (``train=planted``, the paper's setting:
    labelled spans, the detector transfers across tasks) or on sampled continuations of the task's own
    validation prompts labelled by its score (``train=continuations``, or when ``planted`` is unavailable)."""
    if knobs.get("train", "planted") == "planted":
        length = max(len(s.ids) for s in fc.val) if fc.val else 256
        val = _planted_val(fc, min(length, 256))
        if val is not None:
            x, y = planted_examples(fc.model, val)
            fc.tick("lookback planted spans")
            return _detector(x, y, {"examples": len(val), "faithful": int(y.sum()), "train": "planted"})
    return _fit_lookback_continuations(fc, knobs)


def _detector(x: Tensor, y: Tensor, trace: dict[str, Any]) -> Fitted:
    pos = int(y.sum())
    if pos in (0, len(y)):
        trace["detector"] = "none: every label is the same; the mean lookback ratio scores candidates"
        return Fitted({"detector": False, "bias": 0.0}, {}, trace)
    w, b = logistic_fit(x, y)
    acc = float(((torch.sigmoid(x.double() @ w.double() + b) > 0.5).double() == y.double()).double().mean())
    trace["train_accuracy"] = acc
    return Fitted({"detector": True, "bias": b}, {"weights": w}, trace)


def _fit_lookback_continuations(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    import copy

    from .decoding import Base, sample_chunk, stop_ids

    model, tok = fc.model, fc.tok
    cands = fc.sizes["lb_candidates"]
    feats, labels = [], []
    gen = torch.Generator().manual_seed(data.VAL_OFFSET + fc.seed)
    eos = stop_ids(model, tok)
    base = fc.base if fc.base is not None else Base(model)
    for s in fc.val:
        ids = torch.tensor([list(s.ids)])
        n = min(int(s.max_new_tokens), fc.sizes["lb_tokens"])
        with torch.no_grad():
            cache = base.new_cache()
            logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        for j in range(cands + 1):  # j = 0: the greedy continuation
            c = copy.deepcopy(cache)
            toks, f, _ = sample_chunk(model, c, logits, n, ids.shape[1], 0.0 if j == 0 else
                                      float(knobs["temperature"]), gen, eos)
            text = tok.decode(toks[0].tolist(), skip_special_tokens=True)
            feats.append(f.mean(0))
            labels.append(float(s.score(text) >= 0.5))
        fc.tick("lookback continuations")
    x, y = torch.stack(feats), torch.tensor(labels)
    return _detector(x, y, {"examples": len(labels), "faithful": int(y.sum()), "train": "continuations"})


# ---------------------------------------------------------------------------------------------------------
# PAUSE
# ---------------------------------------------------------------------------------------------------------
def fit_pause(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    pairs = fc.pairs
    marker = str(knobs["marker"])
    everies = (int(knobs["every"]),) if knobs.get("every") is not None else fc.sizes["pause_every"]
    counts = (int(knobs["count"]),) if knobs.get("count") is not None else fc.sizes["pause_count"]
    cands: list[tuple[Any, float]] = [({"every": 0, "count": 0}, val_nll(fc.model, pairs))]
    for e in everies:
        for c in counts:
            def fn(p: list[int], e: int = e, c: int = c) -> list[int]:
                return C.pause_prompt(p, fc.tok, every=e, marker=marker * c)

            cands.append(({"every": e, "count": c}, val_nll(fc.model, pairs, prompt_fn=fn)))
            fc.tick(f"pause every={e} count={c}")
    i, trace = _best(cands, fixed=knobs.get("every") is not None and knobs.get("count") is not None)
    return Fitted(dict(cands[i][0]), {}, {"grid": trace})


# ---------------------------------------------------------------------------------------------------------
# MoA's elastic per-head length rules
# ---------------------------------------------------------------------------------------------------------
def elastic_window(alpha: float, beta: float, length: int) -> int:
    """MoA's rule: the span of a head at input length ``N`` is ``alpha + beta * N`` keys (at least 1)."""
    return max(1, int(round(alpha + beta * length)))


def fit_moa(fc: FitContext, knobs: dict[str, Any]) -> Fitted:
    """Per (layer, kv head) an elastic rule ``window = alpha + beta * N`` from the candidate grid, chosen to
    minimize the attention mass lost at two profile lengths (half the validation prompts' length and that
    length) with the mean kept fraction at each length at most ``budget`` (greedy upgrades by lost mass saved per
    kept fraction, MoA's profile-then-optimize on CPU scale; full attention is the last candidate). Profiles:
    :func:`attnlab.plans.sources.window_loss_profile` on generated passkey prompts with validation seeds; on a
    model with sliding-window layers only its full layers are searched."""
    from ..plans.sources import budget_layers, window_loss_profile

    sinks, budget = int(knobs["sinks"]), float(knobs["budget"])
    if not 0 < budget <= 1:
        raise ValueError(f"moa: budget must be in (0, 1], got {budget}")
    n_top = max(len(s.ids) for s in fc.val)
    lengths = sorted({max(64, n_top // 2), n_top})
    rules = [(float(a), float(b)) for a in fc.sizes["moa_alpha"] for b in fc.sizes["moa_beta"]]
    per_len = []
    for N in lengths:
        wins = sorted({min(N, elastic_window(a, b, N)) for a, b in rules})
        lost = window_loss_profile(fc.model, fc.tok, wins, sinks, n=fc.sizes["moa_prompts"], length=N,
                                   seed=data.VAL_OFFSET + fc.seed)  # (L, Hkv, len(wins))
        per_len.append((N, wins, lost.double()))
        fc.tick(f"moa profile {N}")
    L, Hkv = per_len[0][2].shape[:2]
    R_ = len(rules) + 1  # the last candidate: full attention
    loss = torch.zeros(L, Hkv, R_, dtype=torch.float64)
    dens = torch.zeros(len(lengths), R_, dtype=torch.float64)  # kept fraction of a head at each length
    for j, (N, wins, lost) in enumerate(per_len):
        for r, (a, b) in enumerate(rules):
            w = min(N, elastic_window(a, b, N))
            loss[:, :, r] += lost[:, :, wins.index(w)]
            dens[j, r] = min(1.0, (sinks + w) / N)
        dens[j, -1] = 1.0
    order = torch.argsort(dens.sum(0), stable=True)  # candidates from cheapest to dearest
    flags = budget_layers(fc.model)
    searched = [layer for layer in range(L) if flags is None or flags[layer]]
    choice = torch.full((L, Hkv), int(order[0]))
    used = dens[:, order[0]].unsqueeze(-1).expand(-1, 1) * len(searched) * Hkv  # (lengths, 1)
    cap = budget * len(searched) * Hkv
    while True:
        best, gain_best = None, 0.0
        for layer in searched:
            for h in range(Hkv):
                c = int(choice[layer, h])
                for nxt in range(R_):
                    extra = dens[:, nxt] - dens[:, c]
                    if float(extra.sum()) <= 0 or bool(((used[:, 0] + extra) > cap + 1e-9).any()):
                        continue
                    gain = float(loss[layer, h, c] - loss[layer, h, nxt]) / float(extra.sum())
                    if gain > gain_best:
                        best, gain_best = (layer, h, nxt, extra), gain
        if best is None:
            break
        layer, h, nxt, extra = best
        choice[layer, h] = nxt
        used[:, 0] += extra
    alpha = torch.zeros(L, Hkv)
    beta = torch.zeros(L, Hkv)
    for layer in range(L):
        for h in range(Hkv):
            c = int(choice[layer, h])
            a, b = (rules[c] if c < len(rules) else (-1.0, -1.0))  # -1: full attention
            alpha[layer, h], beta[layer, h] = a, b
    trace = {"profile_lengths": lengths, "density": {str(N): round(float(used[j, 0]) / (len(searched) * Hkv), 4)
                                                     for j, N in enumerate(lengths)},
             "full_heads": int((alpha < 0).sum()), "elastic_heads": int(((alpha >= 0) & (beta > 0)).sum()),
             "fixed_heads": int(((alpha >= 0) & (beta == 0)).sum()), "searched_layers": searched}
    return Fitted({"budget": budget, "sinks": sinks}, {"alpha": alpha, "beta": beta}, trace)


def moa_plan_at(model: nn.Module, alpha: Tensor, beta: Tensor, sinks: int, length: int) -> Any:
    """The plan MoA's rules give at input length ``length``: ``stream(sinks, alpha + beta * N)`` per kv head
    (full where the rule says full, ``alpha < 0``, or the span covers the input); the model's sliding layers keep
    their own window."""
    from ..plans.plan import HeadPlan, HeadPolicy
    from ..plans.sources import with_model_windows

    g = hf.geometry(model)
    rows = []
    for layer in range(alpha.shape[0]):
        row = []
        for h in range(alpha.shape[1]):
            a, b = float(alpha[layer, h]), float(beta[layer, h])
            w = elastic_window(a, b, length) if a >= 0 else length
            row.append(HeadPolicy.full() if a < 0 or sinks + w >= length else HeadPolicy.stream(sinks, w))
        rows.append(tuple(row))
    return with_model_windows(model, HeadPlan(tuple(rows), g.group, f"moa-elastic-{length}",
                                              (("source", "moa-elastic"), ("length", length))))


# ---------------------------------------------------------------------------------------------------------
# the store of fitted knobs (JSON + safetensors in the run folder; no pickles)
# ---------------------------------------------------------------------------------------------------------
class FitStore:
    """``root/<key>.json`` (knobs, trace) and ``root/<key>.safetensors`` (tensors) per fit."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(model: str, name: str, scope: dict[str, Any], fixed: dict[str, Any], quick: bool, seed: int) -> str:
        blob = json.dumps({"fixed": fixed, "quick": quick, "seed": seed, "scope": scope}, sort_keys=True,
                          default=str)
        tag = "-".join(f"{k}{v}" for k, v in sorted(scope.items()))
        h = hashlib.sha1(blob.encode()).hexdigest()[:8]
        return "-".join(x for x in (model, name, tag, h) if x)

    def load(self, key: str) -> Fitted | None:
        js = self.root / f"{key}.json"
        if not js.is_file():
            return None
        meta = json.loads(js.read_text())
        tensors: dict[str, Tensor] = {}
        st = self.root / f"{key}.safetensors"
        if meta.get("tensors"):
            from safetensors.torch import load_file

            tensors = load_file(str(st))
        return Fitted(meta["knobs"], tensors, meta.get("trace", {}))

    def save(self, key: str, fitted: Fitted, info: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        if fitted.tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in fitted.tensors.items()},
                      str(self.root / f"{key}.safetensors"))
        meta = {"knobs": fitted.knobs, "trace": fitted.trace, "tensors": sorted(fitted.tensors), **(info or {})}
        path = self.root / f"{key}.json"
        path.write_text(json.dumps(meta, indent=1, default=str))  # written last: its presence marks a finished fit
        return path


__all__ = ["FULL", "QUICK", "FitContext", "FitStore", "Fitted", "HeadACT", "act_gate_hooks", "context_attention",
           "decore_nll", "fit_act", "fit_dagcd", "fit_decore", "fit_fim", "fit_headmask", "fit_lookback", "fit_pause",
           "fit_scale_dim", "fit_zerotuning", "grad_screen", "logistic_fit", "neutral_ids", "positional_dimension",
           "ranked_heads", "retrieval_scores", "target_logits", "val_nll", "zerotuning_hooks"]
