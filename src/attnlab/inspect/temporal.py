"""Temporal heads (A206, "Does Time Have Its Place? Temporal Heads: Where Language Models Recall Time-specific
Information"), located by ablation on time-conditioned fact prompts generated offline.

A206 finds heads whose removal degrades the recall of time-specific facts ("In 2004, X was ...") while
time-invariant recall survives. The prompts here are generated offline and put the facts in context (a small
model holds few dated facts in its weights; this is our adaptation, named):

* **temporal**: "In 2004, Mara lived in Paris. In 2011, Mara lived in Cairo. In 2004, Mara lived in" -> Paris;
  the two facts differ only by their year, so the answer depends on the time condition alone.
* **control** (time-invariant knowledge, as in A206): "The capital of France is" -> Paris, against another
  capital of the list.
* **alias** (A206's textual alias check): the temporal prompts with "In the year 2004" conditions.

Metric per prompt: ``logit(answer) - logit(other)`` at the last position (first token of each city). A head is
ablated by zeroing its output before ``o_proj`` (``blocks.{l}.attn.z``), every head one at a time, batched.
Per head and set: ``drop = mean(metric clean - metric ablated) / mean(metric clean)`` (share of the logit
difference lost). Temporal score = ``drop_temporal - drop_control``: temporal heads hurt the time-conditioned
recall and not the time-invariant one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .capture import forward_kwargs
from .importance import each_head_zeroed

NAMES = ("Mara", "Tobias", "Lena", "Victor", "Nadia", "Oscar", "Irene", "Felix", "Clara", "Hugo", "Alma", "Ruben")
CAPITALS = {"Paris": "France", "Cairo": "Egypt", "Tokyo": "Japan", "Berlin": "Germany", "Madrid": "Spain",
            "Lima": "Peru", "Oslo": "Norway", "Rome": "Italy", "Dublin": "Ireland", "Vienna": "Austria",
            "Athens": "Greece", "Prague": "the Czech Republic", "Moscow": "Russia", "Ottawa": "Canada"}
CITIES = tuple(CAPITALS)
SETS = ("temporal", "control", "alias")


@dataclass(frozen=True)
class FactPrompt:
    """One prompt: ``ids (1, T)``, the answer's and the other option's first token."""

    text: str
    ids: Tensor
    answer: int
    other: int
    kind: str


def _first(tok, word: str) -> int:
    return tok(" " + word, add_special_tokens=False)["input_ids"][0]


def make_prompts(tok, n: int, seed: int = 0) -> dict[str, list[FactPrompt]]:
    """``n`` prompts of each set (``SETS``), generated from one seed; the same answer and other city per index
    across sets."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    cities = [c for c in CITIES]
    firsts = {c: _first(tok, c) for c in cities}
    cities = [c for c in cities if list(firsts.values()).count(firsts[c]) == 1]  # distinct first tokens only
    out: dict[str, list[FactPrompt]] = {s: [] for s in SETS}
    for _ in range(n):
        name = rng.choice(NAMES)
        c1, c2 = rng.sample(cities, 2)
        y1, y2 = sorted(rng.sample(range(1950, 2024), 2))
        ask_first = rng.random() < 0.5
        ans, oth = (c1, c2) if ask_first else (c2, c1)
        texts = {
            "temporal": f"In {y1}, {name} lived in {c1}. In {y2}, {name} lived in {c2}. "
                        f"In {y1 if ask_first else y2}, {name} lived in",
            "control": f"The capital of {CAPITALS[ans]} is",
            "alias": f"In the year {y1}, {name} lived in {c1}. In the year {y2}, {name} lived in {c2}. "
                     f"In the year {y1 if ask_first else y2}, {name} lived in",
        }
        for kind, text in texts.items():
            ids = torch.tensor([tok(text)["input_ids"]])
            out[kind].append(FactPrompt(text, ids, firsts[ans], firsts[oth], kind))
    return out


def logit_diff(logits: Tensor, p: FactPrompt) -> Tensor:
    """``(B,)`` ``logit(answer) - logit(other)`` at the last position of ``logits (B, T or 1, V)``."""
    return logits[:, -1, p.answer].double() - logits[:, -1, p.other].double()


@torch.no_grad()
def head_ablation(model: nn.Module, ids: Tensor, metric: Callable[[Tensor], Tensor], batch: int = 16) -> tuple[float, Tensor]:
    """``ids (1, T)`` -> ``(clean metric, (L, H) metric with each head's z zeroed)``; ``metric(logits (B, t, V))
    -> (B,)`` reads the last position (only the last row of logits is computed where the model allows).
    Copy ``b`` of a batch zeroes its own head."""
    with torch.no_grad():
        clean = float(metric(model(**forward_kwargs(model, ids)).logits)[0])
    out = each_head_zeroed(model, lambda n: metric(model(**forward_kwargs(model, ids.expand(n, -1))).logits), batch)
    return clean, out


@dataclass(frozen=True)
class TemporalHeads:
    """Per set (``SETS``): ``clean`` mean metric, ``drop (L, H)`` share of it lost when each head is zeroed, and
    the clean accuracy (answer's logit above the other's)."""

    clean: dict[str, float]
    accuracy: dict[str, float]
    drop: dict[str, Tensor]
    n: int

    @property
    def score(self) -> Tensor:
        """``(L, H)`` ``drop_temporal - drop_control``."""
        return self.drop["temporal"] - self.drop["control"]

    def top(self, k: int = 10) -> list[dict]:
        flat = self.score.flatten()
        H = self.score.shape[1]
        rows = []
        for i in flat.argsort(descending=True)[:k].tolist():
            layer, h = i // H, i % H
            rows.append({"head": f"{layer}.{h}", "score": float(flat[i]),
                         **{f"drop_{s}": float(self.drop[s][layer, h]) for s in self.drop}})
        return rows

    def to_dict(self) -> dict:
        return {"n": self.n, "clean": self.clean, "accuracy": self.accuracy, "top": self.top(),
                "drop": {k: v.tolist() for k, v in self.drop.items()}, "score": self.score.tolist()}


def temporal_heads(model: nn.Module, tok, n: int = 8, seed: int = 0, sets: Sequence[str] = SETS, batch: int = 16,
                   progress=None) -> TemporalHeads:
    """Ablate every head on ``n`` prompts of each set and score it (module docstring)."""
    bad = [s for s in sets if s not in SETS]
    if bad or "temporal" not in sets or "control" not in sets:
        raise ValueError(f"sets must include temporal and control, from {SETS}; got {list(sets)}")
    prompts = make_prompts(tok, n, seed)
    clean, acc, drop = {}, {}, {}
    for s in sets:
        cs, ab = [], []
        for p in prompts[s]:
            c, a = head_ablation(model, p.ids, lambda lg, p=p: logit_diff(lg, p), batch)
            cs.append(c)
            ab.append(a)
            if progress:
                progress()
        mc = sum(cs) / len(cs)
        clean[s] = mc
        acc[s] = sum(c > 0 for c in cs) / len(cs)
        # a share of the clean logit difference: undefined when the model does not solve the set
        drop[s] = (mc - torch.stack(ab).mean(0)) / mc if mc > 0 else torch.full_like(ab[0], float("nan"))
    return TemporalHeads(clean, acc, drop, n)


__all__ = ["FactPrompt", "SETS", "TemporalHeads", "head_ablation", "logit_diff", "make_prompts", "temporal_heads"]
