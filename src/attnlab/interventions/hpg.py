"""Head perturbation guidance (I216): SoftPAG on chosen attention heads, guided decoding away from the perturbed
model, and the HeadHunter head search. A ``decode`` intervention, ``attnlab eval --intervention hpg``.

* **SoftPAG** (:class:`SoftPAG`): each selected head's attention weights are interpolated toward the identity
  map, ``A <- (1 - u) A + u I`` (``u`` in [0, 1]; ``u = 1`` is PAG's identity attention: each query attends only
  to itself, so the head outputs its own value vector), at the ``weights`` hook point. Rows stay normalized.
  The identity of a call's query row ``i`` (of ``Tq``) over ``Tk`` keys is key ``Tk - Tq + i`` (queries are
  bottom-right aligned in their keys; a sliding cache that keeps only its window included).
* **Guided decoding** (convention ``pag-guidance``, the CFG / PAG form): ``logits = l + w (l - l_p)`` with ``l``
  the plain model's next-token logits and ``l_p`` the perturbed model's; greedy on them. Two passes per step,
  each with its own cache (:func:`hpg_greedy`, as DeCoRe's two caches in :mod:`attnlab.interventions.decoding`).
* **HeadHunter** (:func:`headhunter`): iterative greedy head selection -- start empty; each round add the
  candidate whose perturbation gives the lowest validation objective; stop at ``k`` heads or when no candidate
  improves it strictly. The objective (convention ``val-nll``): the gold answer's mean NLL under the guided
  distribution ``log_softmax(l + w (l - l_p))``, teacher-forced.
* **Candidate screen** (convention ``hpg-screen``): every head is scored in one forward+backward per validation
  sample, ``s[l, h] = d NLL_p / d u[l, h]`` at ``u = 0`` (the perturbed model's answer NLL). At ``u = 0`` the
  guided NLL moves by ``-w s`` to first order, so heads whose perturbation hurts the answer most (largest
  ``s > 0``) are those whose guidance helps most; the top ``screen`` of them (``s > 0`` only) are HeadHunter's
  candidates. Search cost: ``k * screen * n_val`` perturbed forwards instead of ``k * L * H * n_val``.
* **Knobs** (:func:`fit_hpg`, identity-first like every fit): the heads by the screen + HeadHunter at the search
  strength (``u`` given or 1, ``w`` given or 1), then ``u`` and ``w`` from a small grid by the same objective; the
  plain model (no head) is the first candidate and wins ties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf
from . import decoding as D
from . import fit as F
from .registry import Applied, Knob, Spec, register

Head = tuple[int, int]

#: validation grids of u and w (quick / full) after the head search
HPG_QUICK: dict[str, Any] = {"u": (0.5, 1.0), "w": (0.5, 1.0, 2.0)}
HPG_FULL: dict[str, Any] = {"u": (0.25, 0.5, 0.75, 1.0), "w": (0.25, 0.5, 1.0, 2.0, 3.0)}


def _check_u(u: float) -> float:
    u = float(u)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"hpg: u (the SoftPAG interpolation toward the identity) must lie in [0, 1], got {u}")
    return u


def softpag_hooks(u: Tensor, layers: Sequence[int] | None = None) -> dict[str, Any]:
    """Hooks interpolating every head's weights toward the identity map by ``u[layer, head]`` ``(L, H)``
    (differentiable in ``u``): a ``q`` observer per layer records the call's query count ``Tq`` and a ``weights``
    intervention returns ``A + u (I - A)``. ``layers``: where to attach (None: the rows of ``u`` with a non-zero)."""
    if layers is None:
        layers = [int(i) for i in torch.nonzero((u != 0).any(-1)).flatten()]
    tq: dict[int, int] = {}

    def on_q(q: Tensor, ctx: Any) -> None:  # q (B, H, Tq, D)
        tq[ctx.layer] = q.shape[2]

    def on_w(w: Tensor, ctx: Any) -> Tensor:  # w (B, H, r, Tk): rows ctx.rows of the call's Tq queries
        s, e = ctx.rows
        Tk = w.shape[-1]
        keys = Tk - tq[ctx.layer] + torch.arange(s, e, device=w.device)  # each row's own key
        eye = torch.zeros(e - s, Tk, dtype=w.dtype, device=w.device)
        eye[torch.arange(e - s, device=w.device), keys] = 1.0
        uu = u[ctx.layer].to(device=w.device, dtype=w.dtype).view(1, -1, 1, 1)
        return w + uu * (eye - w)

    out: dict[str, Any] = {}
    for layer in layers:
        out[f"blocks.{layer}.attn.q"] = on_q
        out[f"blocks.{layer}.attn.weights"] = on_w
    return out


@dataclass(frozen=True)
class SoftPAG:
    """SoftPAG on ``heads`` ((layer, query head) pairs) with strength ``u`` in [0, 1]."""

    heads: tuple[Head, ...]
    u: float = 1.0

    def __post_init__(self) -> None:
        _check_u(self.u)

    def table(self, model: nn.Module) -> Tensor:
        g = hf.geometry(model)
        t = torch.zeros(g.num_layers, g.num_heads)
        for layer, h in self.heads:
            if not (0 <= layer < g.num_layers and 0 <= h < g.num_heads):
                raise ValueError(f"hpg: head {layer}.{h} is outside the model's {g.num_layers} layers x "
                                 f"{g.num_heads} heads")
            t[layer, h] = self.u
        return t

    def attach(self, model: nn.Module) -> AbstractContextManager:
        return hf.hooks(model, softpag_hooks(self.table(model)))


def guided_logits(plain: Tensor, perturbed: Tensor, w: float) -> Tensor:
    """Convention ``pag-guidance``: ``plain + w (plain - perturbed)`` (``w = 0``: the plain logits)."""
    return plain + w * (plain - perturbed)


@torch.no_grad()
def hpg_greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, new_cache: D.NewCache, eos: D.Stop = None,
               *, heads: Sequence[Head], u: float = 1.0, w: float = 1.0) -> Tensor:
    """Perturbation-guided greedy decoding: the plain model and the SoftPAG-perturbed one each keep their cache,
    each prefilled once; per step the token maximizing ``l + w (l - l_p)``. ``(1, n)`` new tokens."""
    pag = SoftPAG(tuple((int(a), int(b)) for a, b in heads), float(u))
    base_cache, pert_cache = new_cache(), new_cache()
    base = D._prefill(model, ids, base_cache)
    with pag.attach(model):
        pert = D._prefill(model, ids, pert_cache)
    out: list[Tensor] = []
    while True:
        nxt = guided_logits(base, pert, float(w)).argmax(-1)
        out.append(nxt)
        if len(out) >= max_new_tokens or D._done(nxt, eos):
            break
        base = D._step(model, nxt, base_cache)
        with pag.attach(model):
            pert = D._step(model, nxt, pert_cache)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------------
# the validation objective, the screen and HeadHunter
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def guided_nll(model: nn.Module, pairs: Sequence[F.Pair], heads: Sequence[Head], u: float, w: float,
               cache: dict[int, Tensor] | None = None) -> float:
    """Mean answer NLL of the guided distribution over ``pairs`` (plain logits kept in ``cache`` by pair index;
    no heads: the plain model's NLL)."""
    total = 0.0
    pag = SoftPAG(tuple(heads), u) if heads else None
    for i, (prompt, target) in enumerate(pairs):
        base = cache.get(i) if cache is not None else None
        if base is None:
            base = F.target_logits(model, prompt, target)
            if cache is not None:
                cache[i] = base
        if pag is None or u == 0 or w == 0:
            lp = torch.log_softmax(base.double(), -1)
        else:
            with pag.attach(model):
                pert = F.target_logits(model, prompt, target)
            lp = torch.log_softmax(guided_logits(base.double(), pert.double(), w), -1)
        total += float(F.nll_of(lp, target))
    return total / len(pairs)


def screen_heads(model: nn.Module, pairs: Sequence[F.Pair]) -> Tensor:
    """Convention ``hpg-screen``: ``d NLL_p / d u`` at ``u = 0`` per (layer, head) ``(L, H)`` (one forward and
    backward per pair; positive = perturbing the head hurts the answer, so guiding away from it helps)."""
    g = hf.geometry(model)
    layers = list(range(g.num_layers))
    return F.grad_screen(model, pairs, lambda u: softpag_hooks(u, layers), (g.num_layers, g.num_heads))


def screen_candidates(score: Tensor, n: int) -> list[Head]:
    """The top ``n`` heads by ``score`` among those with a positive score (ties: layer, then head order)."""
    ranked = F.ranked_heads(score, min(int(n), score.numel()))
    return [h for h in ranked if float(score[h]) > 0]


def headhunter(objective: Callable[[list[Head]], float], candidates: Sequence[Head], k: int,
               tick: Callable[[str], None] = lambda label: None) -> tuple[list[Head], list[dict[str, Any]]]:
    """Iterative greedy selection: start from no head (``objective([])``); each round add the candidate with the
    lowest ``objective(selected + [c])``; stop after ``k`` heads or when none is strictly better than the current
    set. Returns the heads in the order chosen and a trace (one entry per round)."""
    if k < 0:
        raise ValueError(f"hpg: k (heads to select) must be >= 0, got {k}")
    selected: list[Head] = []
    best = objective([])
    trace: list[dict[str, Any]] = [{"round": 0, "heads": [], "val_nll": round(best, 6)}]
    while len(selected) < k:
        tried = [(c, objective(selected + [c])) for c in candidates if c not in selected]
        if not tried:
            break
        c, v = min(tried, key=lambda cv: cv[1])  # first of equals: the screen's order
        tick(f"headhunter round {len(selected) + 1}")
        trace.append({"round": len(selected) + 1, "best": list(c), "val_nll": round(v, 6),
                      "tried": {f"{a}.{b}": round(x, 6) for (a, b), x in tried}})
        if not v < best - 1e-9:
            trace[-1]["stop"] = "no candidate improves the objective"
            break
        selected.append(c)
        best = v
    return selected, trace


def fit_hpg(fc: F.FitContext, knobs: dict[str, Any]) -> F.Fitted:
    """The screen and HeadHunter (unless ``heads`` are given) at the search strength, then ``u`` and ``w`` by
    validation NLL of the guided distribution; the plain model first (identity-first)."""
    model, pairs = fc.model, fc.pairs
    grids = HPG_QUICK if fc.quick else HPG_FULL
    u0 = _check_u(knobs["u"]) if knobs.get("u") is not None else 1.0
    w0 = float(knobs["w"]) if knobs.get("w") is not None else 1.0
    cache: dict[int, Tensor] = {}
    tensors: dict[str, Tensor] = {}
    trace: dict[str, Any] = {}
    if knobs.get("heads"):
        heads = [(int(a), int(b)) for a, b in knobs["heads"]]
        SoftPAG(tuple(heads), u0).table(model)  # checks the heads
    else:
        score = screen_heads(model, pairs)
        fc.tick("hpg screen")
        tensors["screen"] = score.float()
        cands = screen_candidates(score, int(knobs["screen"]))
        trace["candidates"] = [list(h) for h in cands]
        heads, rounds = headhunter(lambda hs: guided_nll(model, pairs, hs, u0, w0, cache), cands, int(knobs["k"]),
                                   fc.tick)
        trace["headhunter"] = rounds
    us = (u0,) if knobs.get("u") is not None else grids["u"]
    ws = (w0,) if knobs.get("w") is not None else grids["w"]
    grid: list[tuple[Any, float]] = [({"heads": 0, "u": 0.0, "w": 0.0}, guided_nll(model, pairs, [], 0.0, 0.0, cache))]
    if heads:
        for u in us:
            for w in ws:
                grid.append(({"heads": len(heads), "u": float(u), "w": float(w)},
                             guided_nll(model, pairs, heads, float(u), float(w), cache)))
                fc.tick(f"hpg u={u} w={w}")
    fixed = all(knobs.get(x) is not None for x in ("heads", "u", "w"))
    i, trace["grid"] = F._best(grid, fixed=fixed)
    best = grid[i][0]
    chosen = heads if best["heads"] else []
    return F.Fitted({"heads": [list(h) for h in chosen], "u": best["u"], "w": best["w"]}, tensors, trace)


# ---------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------
def _build_hpg(model: nn.Module, tok: Any, knobs: dict[str, Any], tensors: dict[str, Tensor]) -> Applied:
    heads = [(int(a), int(b)) for a, b in (knobs.get("heads") or [])]
    u = _check_u(knobs["u"]) if knobs.get("u") is not None else 0.0
    w = float(knobs.get("w") or 0.0)
    shown = {k: ([list(h) for h in v] if k == "heads" and v else v) for k, v in knobs.items()}
    if not heads or u == 0 or w == 0:
        return Applied("hpg", "decode", shown, loop=D.greedy)  # the fit kept the plain model
    SoftPAG(tuple(heads), u).table(model)
    return Applied("hpg", "decode", shown, loop=partial(hpg_greedy, heads=heads, u=u, w=w))


register(Spec(
    "hpg", "decode", ("I216",),
    "head perturbation guidance: SoftPAG (chosen heads' weights toward the identity, (1-u)A + uI) makes a weak "
    "model; decoding follows l + w (l - l_perturbed); heads by HeadHunter's greedy search on validation",
    (Knob("heads", "heads", None, "perturbed heads (3.1/5.2)", unset="HeadHunter on the validation split"),
     Knob("k", "int", 4, "HeadHunter: at most k heads"),
     Knob("screen", "int", 8, "HeadHunter: candidates, the top heads of the first-order screen"),
     Knob("u", "float", None, "SoftPAG strength in [0, 1] (1: identity attention)"),
     Knob("w", "float", None, "guidance scale")),
    ("faithful", "icl_cls", "mdqa"), _build_hpg, fit_hpg,
    lambda k: k["heads"] is None or k["u"] is None or k["w"] is None))


__all__ = ["HPG_FULL", "HPG_QUICK", "SoftPAG", "fit_hpg", "guided_logits", "guided_nll", "headhunter",
           "hpg_greedy", "screen_candidates", "screen_heads", "softpag_hooks"]
