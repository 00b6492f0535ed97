"""The preplan-and-anchor rhythm (I26): WAAD and FAI read through the seam's ``weights`` hook point.

Definitions (query ``i``, key ``j``, head weights ``a_ij``, causal: ``j <= i``; positions are absolute in the
analysed sequence, prompt + the model's own greedy continuation):

* **WAAD** (Windowed Average Attention Distance, convention ``waad-clip``):
  ``WAAD_i = sum_{j <= i} a_ij * min(i - j, W)``: the attention-weighted backward distance, each distance clipped
  at the window ``W`` (default 10), so a head on the previous token has WAAD 1 and a head on anything ``W`` or more
  back has WAAD ``W``;
* **FAI** (Future Attention Influence, convention ``fai-all-future``):
  ``FAI_j = (1 / (T - 1 - j)) sum_{i = j+1}^{T-1} a_ij``: the mean attention token ``j`` receives from every later
  query of the sequence (``T`` its length); undefined (NaN) for the last token.

Head classes (convention ``heads-per-sequence``): per analysed sequence, each head's mean WAAD over the response
tokens; the ``head_frac`` fraction of heads (over the chosen layers; default all) with the lowest mean are
**local**, the same fraction with the highest **global**. Signals per response token: WAAD averaged over the local
heads, FAI averaged over the global heads (the paper: local heads show the sawtooth of phrasal chunks, global heads
the tokens of broad downstream influence).

Tokens (convention ``top-fraction``): among the response tokens whose FAI is defined (all but the last), the
``top`` fraction (rounded up) with the highest WAAD signal are **preplan** tokens, the same number with the highest
FAI signal **anchor** tokens.

Statistic (convention ``coupling``): the coupling rate = the share of preplan tokens ``t`` with ``t`` or ``t + 1``
an anchor (the paper's "immediately followed by or coincides with"). Chance: the same number of anchors placed
uniformly at random among the eligible tokens, whose expected rate is exact:
``P(t or t+1 anchor) = 1 - (N - A)(N - A - 1) / (N (N - 1))`` when ``t + 1`` is eligible, ``A / N`` for the last
eligible token (``N`` eligible tokens, ``A`` anchors). Pooled over prompts: observed minus expected hits, and a
one-sided permutation p-value (anchors shuffled within each prompt, seeded).

Prompts (:func:`arithmetic_prompts`): seeded multi-step arithmetic ("x starts at 7; add 5; multiply by 3; ...
what is x?"), the chat template when the tokenizer has one; the continuation is the model's greedy answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf
from . import scoring as S


@dataclass(frozen=True)
class Rhythm:
    """Knobs of the analysis: ``window`` W of WAAD, ``head_frac`` of heads in each class, ``top`` fraction of
    response tokens marked preplan / anchor, ``layers`` analysed (None: all)."""

    window: int = 10
    head_frac: float = 0.25
    top: float = 0.15
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0 < self.head_frac <= 0.5:
            raise ValueError(f"head_frac must be in (0, 0.5], got {self.head_frac}")
        if not 0 < self.top <= 1:
            raise ValueError(f"top must be in (0, 1], got {self.top}")


# ---------------------------------------------------------------------------------------------------------
# WAAD and FAI
# ---------------------------------------------------------------------------------------------------------
def _rows(a: Tensor, q: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """For weights ``a`` (H, r, Tk) of query rows at absolute positions ``q`` (r,): WAAD of each row (H, r) and
    the attention each key receives from these rows' strictly later queries (H, Tk)."""
    qq = q.view(-1, 1)
    k = torch.arange(a.shape[-1]).view(1, -1)
    dist = (qq - k).clamp(min=0, max=window).to(torch.float64)
    a = a.to(torch.float64)
    return (a * dist).sum(-1), (a * (qq > k)).sum(1)


def _fai(received: Tensor) -> Tensor:
    """FAI ``(..., T)`` from the attention each key receives from later queries: divided by ``T - 1 - j``."""
    T = received.shape[-1]
    fai = received / torch.arange(T - 1, -1, -1, dtype=torch.float64)
    fai[..., T - 1] = float("nan")
    return fai


def waad_fai_from_weights(a: Tensor, window: int = 10) -> tuple[Tensor, Tensor]:
    """WAAD and FAI of full causal attention maps ``a`` (H, T, T) (rows: queries 0..T-1): two ``(H, T)``."""
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected weights (H, T, T), got {tuple(a.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    waad, received = _rows(a, torch.arange(a.shape[-1]), window)
    return waad, _fai(received)


@torch.no_grad()
def waad_fai(model: nn.Module, ids: Sequence[int], window: int = 10,
             layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """WAAD and FAI of every head of ``layers`` on ``ids`` (one forward pass; weights observed at
    ``blocks.{l}.attn.weights``, never stored whole).

    Returns ``(waad, fai)``, each ``(len(layers), H, T)`` float64; ``fai[..., T-1]`` is NaN.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    T = len(ids)
    if T < 2:
        raise ValueError(f"need at least 2 tokens, got {T}")
    L = hf.geometry(model).num_layers
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < L]
    if bad:
        raise ValueError(f"layers {bad} are outside the model's {L} layers")
    waad: dict[int, Tensor] = {}
    recv: dict[int, Tensor] = {}

    def observe(w: Tensor, ctx: Any) -> None:  # w: (1, H, r, Tk), query rows ctx.rows of this call
        s, e = ctx.rows
        rows, got = _rows(w[0], ctx.q_offset + torch.arange(s, e), window)
        if ctx.layer not in waad:
            waad[ctx.layer] = torch.zeros(w.shape[1], T, dtype=torch.float64)
            recv[ctx.layer] = torch.zeros(w.shape[1], T, dtype=torch.float64)
        waad[ctx.layer][:, ctx.q_offset + s:ctx.q_offset + e] = rows
        recv[ctx.layer][:, :got.shape[-1]] += got

    x = torch.tensor([list(ids)])
    with hf.hooks(model, {f"blocks.{lay}.attn.weights": observe for lay in layers}):
        model(input_ids=x, use_cache=False)
    return torch.stack([waad[lay] for lay in layers]), _fai(torch.stack([recv[lay] for lay in layers]))


# ---------------------------------------------------------------------------------------------------------
# head classes, tokens, coupling
# ---------------------------------------------------------------------------------------------------------
def head_classes(waad: Tensor, start: int, head_frac: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(local, global)`` heads as (layer index into ``waad``, head): lowest / highest mean WAAD over positions
    ``start..T-1``. waad: (L, H, T)."""
    Lw, H, T = waad.shape
    if not 0 <= start < T:
        raise ValueError(f"start must be in [0, {T}), got {start}")
    mean = waad[..., start:].mean(-1).reshape(-1)
    k = max(1, math.ceil(head_frac * Lw * H))
    order = torch.argsort(mean, stable=True).tolist()
    local = [(i // H, i % H) for i in order[:k]]
    glob = [(i // H, i % H) for i in order[::-1][:k]]
    return local, glob


def signals(waad: Tensor, fai: Tensor, local: Sequence[tuple[int, int]],
            glob: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """WAAD averaged over the local heads, FAI over the global heads: two ``(T,)`` traces."""
    li = torch.tensor([list(x) for x in local])
    gi = torch.tensor([list(x) for x in glob])
    return waad[li[:, 0], li[:, 1]].mean(0), fai[gi[:, 0], gi[:, 1]].mean(0)


def mark_tokens(waad_sig: Tensor, fai_sig: Tensor, start: int, top: float) -> tuple[list[int], list[int], list[int]]:
    """``(eligible, preplan, anchors)`` absolute positions: eligible = ``start..T-2`` (FAI defined); the
    ``ceil(top * N)`` highest WAAD signal / FAI signal among them (ties: earlier first)."""
    T = waad_sig.shape[0]
    eligible = list(range(start, T - 1))
    if not eligible:
        return [], [], []
    k = max(1, math.ceil(top * len(eligible)))
    idx = torch.tensor(eligible)

    def best(v: Tensor) -> list[int]:
        order = torch.argsort(-v[idx], stable=True)[:k]
        return sorted(idx[order].tolist())

    return eligible, best(waad_sig), best(fai_sig)


def coupling(preplan: Sequence[int], anchors: Sequence[int]) -> int:
    """How many preplan tokens ``t`` have ``t`` or ``t + 1`` among the anchors."""
    a = set(anchors)
    return sum(1 for t in preplan if t in a or t + 1 in a)


def expected_coupling(eligible: Sequence[int], preplan: Sequence[int], n_anchors: int) -> float:
    """Expected :func:`coupling` with ``n_anchors`` anchors drawn uniformly without replacement from
    ``eligible`` (contiguous positions)."""
    N, A = len(eligible), n_anchors
    if N == 0 or A == 0:
        return 0.0
    last = eligible[-1]
    two = 1.0 - (N - A) * (N - A - 1) / (N * (N - 1)) if N > 1 else 1.0
    return sum(A / N if t == last else two for t in preplan)


def permutation_p(prompts: Sequence[tuple[Sequence[int], Sequence[int], int]], observed: int, perms: int = 2000,
                  seed: int = 0) -> float:
    """One-sided p-value of ``observed`` pooled hits: anchors re-drawn uniformly within each prompt's eligible
    tokens ``perms`` times; ``(1 + #{perm >= observed}) / (1 + perms)``. prompts: (eligible, preplan, A)."""
    rng = random.Random(seed)
    ge = 0
    for _ in range(perms):
        hits = sum(coupling(pre, rng.sample(list(el), a)) for el, pre, a in prompts if el)
        ge += hits >= observed
    return (1 + ge) / (1 + perms)


def analyse(model: nn.Module, ids: Sequence[int], start: int, cfg: Rhythm = Rhythm()) -> dict[str, Any]:
    """WAAD / FAI of ``ids`` (response = positions ``start..``), head classes, traces, preplan and anchor tokens,
    coupling and its chance expectation."""
    waad, fai = waad_fai(model, ids, cfg.window, cfg.layers)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(waad.shape[0]))
    local, glob = head_classes(waad, start, cfg.head_frac)
    ws, fs = signals(waad, fai, local, glob)
    eligible, pre, anc = mark_tokens(ws, fs, start, cfg.top)
    hits = coupling(pre, anc)
    exp = expected_coupling(eligible, pre, len(anc))
    return {
        "tokens": len(ids), "start": start, "eligible": eligible, "preplan": pre, "anchors": anc,
        "hits": hits, "expected": exp,
        "coupling": hits / len(pre) if pre else float("nan"), "chance": exp / len(pre) if pre else float("nan"),
        "local": [(layers[a], b) for a, b in local], "global": [(layers[a], b) for a, b in glob],
        "local_waad": float(waad[[a for a, _ in local], [b for _, b in local]][:, start:].mean()),
        "global_waad": float(waad[[a for a, _ in glob], [b for _, b in glob]][:, start:].mean()),
        "waad_trace": ws.tolist(), "fai_trace": fs.tolist(),
    }


# ---------------------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------------------
_OPS = (("add", "+"), ("subtract", "-"), ("multiply", "*"))


def arithmetic_problem(seed: int, steps: int = 4) -> tuple[str, int]:
    """A seeded multi-step arithmetic question and its answer."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    rng = random.Random(f"rhythm:{seed}:{steps}")
    x = rng.randint(2, 9)
    lines = [f"Start with x = {x}."]
    for _ in range(steps):
        op, _sym = rng.choice(_OPS)
        v = rng.randint(2, 4) if op == "multiply" else rng.randint(1, 9)
        if op == "add":
            x, text = x + v, f"Add {v} to x."
        elif op == "subtract":
            x, text = x - v, f"Subtract {v} from x."
        else:
            x, text = x * v, f"Multiply x by {v}."
        lines.append(text)
    q = " ".join(lines) + " What is x at the end? Work it out step by step, then give the final value."
    return q, x


def arithmetic_prompts(tok: Any, n: int, seed: int = 0, steps: int = 4) -> list[tuple[list[int], int]]:
    """``n`` seeded prompts ``(ids, answer)`` (prompt seeds ``seed * 1000 + i``), chat-formatted when the
    tokenizer has a chat template."""
    out = []
    for i in range(n):
        q, ans = arithmetic_problem(seed * 1000 + i, steps)
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            ids = list(tok(q, add_special_tokens=True)["input_ids"])
        out.append(([int(t) for t in ids], ans))
    return out


# ---------------------------------------------------------------------------------------------------------
# as a score analysis of `attnlab eval --intervention rhythm`
# ---------------------------------------------------------------------------------------------------------
def measures(model: nn.Module, tok: Any, knobs: dict[str, Any], prompt: Sequence[int], new: Sequence[int],
             base: Any = None, eos: Any = None, max_new_tokens: int | None = None) -> dict[str, float]:
    """The scorer: coupling rate, its chance rate and the excess on the prompt + plain answer (response = the
    answer); NaN when the answer is too short to mark tokens."""
    cfg = Rhythm(int(knobs["window"]), float(knobs["head_frac"]), float(knobs["top"]))
    ids = list(prompt) + [int(t) for t in new]
    if len(new) < 2:
        nan = float("nan")
        return {"coupling": nan, "chance": nan, "excess": nan, "preplan": 0.0}
    r = analyse(model, ids, len(prompt), cfg)
    return {"coupling": r["coupling"], "chance": r["chance"], "excess": r["coupling"] - r["chance"],
            "preplan": float(len(r["preplan"])), "local_waad": r["local_waad"], "global_waad": r["global_waad"]}


S.register_scorer(S.Scorer("rhythm", measures, means=("coupling", "chance", "excess")))


def _register() -> None:
    from . import registry as R

    def build(model, tok, knobs, tensors) -> R.Applied:
        Rhythm(int(knobs["window"]), float(knobs["head_frac"]), float(knobs["top"]))  # checks the knobs
        return R.Applied("rhythm", S.KIND, dict(knobs))

    R.register(R.Spec(
        "rhythm", S.KIND, ("I26",),
        "preplan-and-anchor rhythm of the plain answer: WAAD (local heads) and FAI (global heads) per token, "
        "coupling rate of preplan tokens with anchors vs chance (its own arithmetic prompts: attnlab bench rhythm)",
        (R.Knob("window", "int", 10, "WAAD's distance clip W"),
         R.Knob("head_frac", "float", 0.25, "fraction of heads in each class (local: lowest mean WAAD)"),
         R.Knob("top", "float", 0.15, "fraction of response tokens marked preplan (WAAD) / anchor (FAI)")),
        ("faithful",), build))


_register()

__all__ = ["Rhythm", "analyse", "arithmetic_problem", "arithmetic_prompts", "coupling", "expected_coupling",
           "head_classes", "mark_tokens", "measures", "permutation_p", "signals", "waad_fai", "waad_fai_from_weights"]
