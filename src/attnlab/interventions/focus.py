"""Focus directions (I128): contextual heads and a direction per head in query/key space that, added to the
head's queries, raises its attention to the relevant context.

* **relevant span** -- :func:`answer_span`: the tokens of the sentence that states the answer (for ``mdqa``, the
  gold document ``Document [i] (Title: ...) The capital of ... is <city>.``), found by the answer's text in the
  prompt (toolcall: its fields' values). Everything else between the first token and the last ``tail`` tokens (the
  question) is irrelevant context; the first token (the attention sink) is neither.
* **contextual heads** -- :func:`span_mass`: per (layer, query head), the attention the last prompt query puts on
  the relevant span, averaged over the validation prompts; the ``k`` heads with the most mass are contextual.
* **focus direction** (convention ``key-mean-diff``; the abstract names no estimator) -- per contextual head, the
  mean key (the model's keys after RoPE, read at the ``k`` hook point, of the head's key/value group) at relevant
  positions minus the mean key at irrelevant ones, per prompt, averaged over prompts, normalized to unit length.
* **intervention** -- :class:`FocusDirections`: a ``q`` hook adding ``alpha * s_h * d_h`` to every query of head
  ``h`` (``s_h``: the head's mean query norm on validation, so ``alpha`` is in query-norm units -- convention
  ``alpha-qnorm``). The score of key ``j`` moves by ``scale * alpha * s_h * (d_h . k_j)``, the same for every
  query: keys aligned with the direction gain attention. ``alpha = 0`` is the plain model.

:func:`fit_focus` sets heads and directions on the validation split and ``alpha`` by the validation NLL of the
gold answer (:func:`attnlab.interventions.fit.val_nll`; the identity first, a candidate must do strictly better).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..inspect.capture import observe_rows
from ..models import hf
from ..plans import calibrate as C
from . import specprefill as SP

#: alpha grids of the validation search (identity first)
ALPHAS_QUICK = (0.0, 0.25, 0.5, 1.0)
ALPHAS_FULL = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5)

Span = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------
# the relevant span
# ---------------------------------------------------------------------------------------------------------
def char_starts(tok: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The decoded text of ``ids`` and the character offset where each token starts in it."""
    ids = [int(i) for i in ids]
    pieces = [tok.decode([i]) for i in ids]
    text = "".join(pieces)
    if text == tok.decode(ids):
        starts, pos = [], 0
        for p in pieces:
            starts.append(pos)
            pos += len(p)
        return text, starts
    text = tok.decode(ids)  # tokens that only decode in context (multi-byte characters): prefix lengths
    return text, [len(tok.decode(ids[:i])) for i in range(len(ids))]


def answer_span(tok: Any, ids: Sequence[int], answer: str) -> Span:
    """``[start, end)`` token span of the sentence holding the first occurrence of ``answer`` in the prompt: from
    after the previous newline or ``". "`` to the next ``"."`` after the answer. Raises ValueError when the
    prompt does not contain ``answer``."""
    text, starts = char_starts(tok, ids)
    a = text.find(answer)
    if a < 0 or not answer:
        raise ValueError(f"the answer {answer!r} does not appear in the prompt")
    left = max(text.rfind("\n", 0, a) + 1, text.rfind(". ", 0, a) + 2 if text.rfind(". ", 0, a) >= 0 else 0)
    dot = text.find(".", a + len(answer))
    right = dot + 1 if dot >= 0 else a + len(answer)
    first = max(i for i, s in enumerate(starts) if s <= left)
    end = next((i for i, s in enumerate(starts) if s >= right), len(starts))
    return first, max(end, first + 1)


def sample_span(tok: Any, sample: Any) -> Span | None:
    """The relevant span of a task sample: its answer's sentence, else (toolcall) the first field value found;
    None when the prompt states none of them (in-context tasks)."""
    for text in [*(str(a) for a in getattr(sample, "answers", ())),
                 *(str(v) for _, v in getattr(sample, "fields", ()))]:
        try:
            return answer_span(tok, sample.ids, text)
        except ValueError:
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# contextual heads and directions
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def span_mass(model: nn.Module, ids: Tensor, span: Span, rows: int = 1) -> Tensor:
    """``(L, H)`` attention the last ``rows`` prompt queries put on keys ``span`` (mean over those rows)."""
    a, b = span
    return torch.stack([w[:, :, a:b].sum(-1).mean(-1) for w in observe_rows(model, ids, last=rows)])


def context_mask(T: int, span: Span, tail: int) -> tuple[Tensor, Tensor]:
    """Bool ``(T,)`` relevant (the span) and irrelevant (``1 .. T - tail - 1`` outside the span) positions."""
    rel = torch.zeros(T, dtype=torch.bool)
    rel[span[0]:span[1]] = True
    irr = torch.zeros(T, dtype=torch.bool)
    irr[1:max(1, T - tail)] = True
    irr &= ~rel
    if not bool(irr.any()):
        raise ValueError(f"no irrelevant context left around span {span} in a prompt of {T} tokens (tail {tail})")
    return rel, irr


@torch.no_grad()
def key_difference(model: nn.Module, ids: Tensor, span: Span, tail: int = 32) -> Tensor:
    """``(L, Hkv, D)``: mean key at the span's positions minus the mean at irrelevant positions, per layer and
    key/value head (keys after RoPE, as the ``k`` hook point gives them)."""
    return _qk_stats(model, ids, span, tail)[0]


@torch.no_grad()
def query_norms(model: nn.Module, ids: Tensor, rows: int = 16) -> Tensor:
    """``(L, H)`` mean query norm over the last ``rows`` prompt rows."""
    _, store = hf.run_with_cache(model, ids, ["blocks.*.attn.q"], logits_to_keep=1)
    return torch.stack([store[f"blocks.{layer}.attn.q"][0, :, -rows:].float().norm(dim=-1).mean(-1)
                        for layer in range(len(store))])


def _qk_stats(model: nn.Module, ids: Tensor, span: Span, tail: int, rows: int = 16) -> tuple[Tensor, Tensor]:
    """:func:`key_difference` and :func:`query_norms` from one forward pass."""
    T = ids.shape[1]
    rel, irr = context_mask(T, span, tail)
    _, store = hf.run_with_cache(model, ids, ["blocks.*.attn.q", "blocks.*.attn.k"], logits_to_keep=1)
    L = len(store) // 2
    ks = [store[f"blocks.{layer}.attn.k"][0].float() for layer in range(L)]  # (Hkv, T, D)
    diff = torch.stack([k[:, rel].mean(1) - k[:, irr].mean(1) for k in ks])
    qn = torch.stack([store[f"blocks.{layer}.attn.q"][0, :, -rows:].float().norm(dim=-1).mean(-1)
                      for layer in range(L)])
    return diff, qn


@dataclass(frozen=True, eq=False)
class FocusDirections(C.Intervention):
    """``q`` intervention: queries of head ``heads[i]`` = (layer, query head) get ``alpha * scales[i] *
    directions[i]`` added (every row, prompt and decoding).

    Attributes:
        heads: ``((layer, head), ...)``.
        directions: ``(n, D)`` unit directions (in the space of the keys after RoPE).
        scales: ``(n,)`` each head's query norm (alpha's unit); None: 1.
        alpha: strength.
    """

    heads: tuple[tuple[int, int], ...]
    directions: Tensor
    alpha: float = 1.0
    scales: Tensor | None = None
    by_layer: dict[int, list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        heads = tuple((int(a), int(b)) for a, b in self.heads)
        object.__setattr__(self, "heads", heads)
        if self.directions.dim() != 2 or self.directions.shape[0] != len(heads):
            raise ValueError(f"directions must be (n={len(heads)}, D), got {tuple(self.directions.shape)}")
        if self.scales is not None and tuple(self.scales.shape) != (len(heads),):
            raise ValueError(f"scales must be (n={len(heads)},), got {tuple(self.scales.shape)}")
        if len(set(heads)) != len(heads):
            raise ValueError(f"heads must be distinct, got {heads}")
        by: dict[int, list[int]] = {}
        for i, (layer, _) in enumerate(heads):
            by.setdefault(layer, []).append(i)
        object.__setattr__(self, "by_layer", by)

    def shift(self, layer: int, H: int, D: int) -> Tensor:
        """``(H, D)`` what layer ``layer``'s queries get added (zero rows for other heads)."""
        out = torch.zeros(H, D)
        for i in self.by_layer.get(layer, []):
            h = self.heads[i][1]
            if not 0 <= h < H:
                raise ValueError(f"head {self.heads[i]} is outside the layer's {H} query heads")
            s = 1.0 if self.scales is None else float(self.scales[i])
            out[h] += float(self.alpha) * s * self.directions[i].float()
        return out

    def hooks(self) -> dict[str, C.HookFn]:
        def fn(q: Tensor, ctx: Any) -> Tensor | None:  # q (B, H, Tq, D)
            if self.alpha == 0:
                return None
            d = self.shift(ctx.layer, q.shape[1], q.shape[-1]).to(device=q.device, dtype=q.dtype)
            return q + d.view(1, q.shape[1], 1, q.shape[-1])

        return {f"blocks.{layer}.attn.q": fn for layer in sorted(self.by_layer)}

    def with_alpha(self, alpha: float) -> FocusDirections:
        return FocusDirections(self.heads, self.directions, float(alpha), self.scales)


def estimate(model: nn.Module, items: Sequence[tuple[Tensor, Span]], k: int = 8, *, tail: int = 32,
             rows: int = 1) -> tuple[FocusDirections, dict[str, Any]]:
    """Contextual heads and focus directions from ``items`` = ``(ids (1, T), span)``: the ``k`` heads with the
    most mean :func:`span_mass`, each with its key/value group's normalized mean :func:`key_difference`, and its
    mean query norm as scale. Returns the intervention (alpha 1) and a trace (the heads' span mass)."""
    if not items:
        raise ValueError("focus directions need at least one (prompt, relevant span) pair")
    geo = hf.geometry(model)
    if not 1 <= k <= geo.num_layers * geo.num_heads:
        raise ValueError(f"k must lie in [1, {geo.num_layers * geo.num_heads}], got {k}")
    mass = torch.stack([span_mass(model, ids, span, rows) for ids, span in items]).mean(0)  # (L, H)
    top = torch.topk(mass.flatten(), k).indices.tolist()
    heads = [(i // geo.num_heads, i % geo.num_heads) for i in top]
    stats = [_qk_stats(model, ids, span, tail) for ids, span in items]
    diff = torch.stack([d for d, _ in stats]).mean(0)  # (L, Hkv, D)
    qn = torch.stack([q for _, q in stats]).mean(0)  # (L, H)
    g = geo.num_heads // geo.num_kv_heads
    dirs = torch.stack([diff[layer, h // g] for layer, h in heads])
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scales = torch.tensor([float(qn[layer, h]) for layer, h in heads])
    trace = {"heads": [f"{a}.{b}" for a, b in heads], "span_mass": [round(float(mass[a, b]), 4) for a, b in heads],
             "mean_span_mass_all_heads": round(float(mass.mean()), 4)}
    return FocusDirections(tuple(heads), dirs, 1.0, scales), trace


def fit_focus(fc: Any, knobs: dict[str, Any]) -> Any:
    """The registry's procedure on a :class:`attnlab.interventions.fit.FitContext`: heads and directions from the
    validation samples whose relevant span is found, then ``alpha`` (unless given) by validation NLL over
    :data:`ALPHAS_QUICK` / :data:`ALPHAS_FULL`. Returns a ``Fitted`` with knobs ``alpha``, ``k``, ``heads`` and
    tensors ``heads`` ``(n, 2)``, ``directions`` ``(n, D)``, ``scales`` ``(n,)``."""
    from . import fit as F

    items = []
    for s in fc.val:
        span = sample_span(fc.tok, s)
        if span is not None:
            items.append((torch.tensor([list(s.ids)]), span))
    if not items:
        raise ValueError("focus directions need validation prompts that state their answer (mdqa, faithful, kv, "
                         "passkey, niah, toolcall); none of these did")
    k = int(knobs.get("k") or 8)
    fd, trace = estimate(fc.model, items, k, tail=int(knobs.get("tail") or 32))
    fc.tick("focus heads")
    if knobs.get("alpha") is not None:
        alpha = float(knobs["alpha"])
    else:
        pairs = fc.pairs
        grid = ALPHAS_QUICK if fc.quick else ALPHAS_FULL
        cands = []
        for a in grid:
            cand = fd.with_alpha(a)
            cands.append((a, F.val_nll(fc.model, pairs, hooks=lambda c=cand: c.attach(fc.model))))
            fc.tick(f"focus alpha {a}")
        best = 0  # the identity (alpha 0) first; a candidate must be strictly better
        for i, (_, v) in enumerate(cands):
            if v < cands[best][1] - 1e-9:
                best = i
        alpha = cands[best][0]
        trace["alpha_search"] = [{"alpha": a, "val_nll": round(v, 6)} for a, v in cands]
    return F.Fitted({"alpha": alpha, "k": k, "heads": [list(h) for h in fd.heads]},
                    {"heads": torch.tensor(fd.heads, dtype=torch.int64), "directions": fd.directions,
                     "scales": fd.scales}, trace)


def from_tensors(tensors: dict[str, Tensor], alpha: float) -> FocusDirections:
    """The intervention from a fit's tensors (``heads``, ``directions``, ``scales``)."""
    heads = tuple((int(a), int(b)) for a, b in tensors["heads"].tolist())
    return FocusDirections(heads, tensors["directions"].float(), float(alpha), tensors.get("scales"))


@torch.no_grad()
def generate(model: nn.Module, tok: Any, ids: Tensor, max_new_tokens: int, config: FocusDirections, *,
             new_cache: SP.NewCache | None = None, eos: SP.Stop = None) -> dict[str, Any]:
    """Greedy decoding of ``ids`` ``(1, T)`` with the focus directions attached (``tok`` unused). Returns
    dict(tokens ``(1, n)``, prefill_s, decode_s, seconds, prompt_tokens)."""
    cache = new_cache() if new_cache is not None else DynamicCache(config=model.config)
    with config.attach(model):
        t0 = time.perf_counter()
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        t1 = time.perf_counter()
        toks = SP.decode_from(model, cache, logits, ids.shape[1], max_new_tokens, eos)
        t2 = time.perf_counter()
    return {"tokens": toks, "prefill_s": t1 - t0, "decode_s": t2 - t1, "seconds": t2 - t0,
            "prompt_tokens": int(ids.shape[1])}


__all__ = ["ALPHAS_FULL", "ALPHAS_QUICK", "FocusDirections", "answer_span", "char_starts", "context_mask",
           "estimate", "fit_focus", "from_tensors", "generate", "key_difference", "query_norms", "sample_span",
           "span_mass"]
