"""AttnRank (A170, "Attention Basin: Why Contextual Position Matters in Large Language Models").

A170 finds an *attention basin*: given a sequence of structured items (retrieved documents, few-shot
examples), a model attends more to the first and last items than to the middle ones. AttnRank (i) estimates
the model's positional preference over item *slots* on a small calibration set and (ii) reorders new items so
that the most relevant one sits in the most attended slot, the second most relevant in the second, and so on.

Here (conventions ours, named):

* **Slot attention** of a prompt: for each item slot, the attention mass the question rows (the tokens from
  the question on) put on the item's tokens, averaged over every layer, head and question row
  (``blocks.*.attn.weights``: the weights the model really used). The calibration profile is its mean over
  calibration prompts (whose relevant item sits in a random slot), normalized to sum to 1;
  :func:`attnlab.inspect.metrics.basin_score` of it (ends over middle, > 1: a basin) is reported.
* **Reordering** (:func:`attnrank_order`): item of relevance rank ``r`` goes to the slot of attention rank
  ``r``. By the rearrangement inequality this maximizes ``sum_s relevance[item at s] * profile[s]`` (tested by
  brute force over permutations).
* **Generated task** (offline, seeded): ``k`` records "The code of the <noun> is <4 digits>." and the question
  "What is the code of the <noun>?"; one record is relevant. The simulated retriever gives the relevant record
  the top relevance and the distractors lower random ones, so "retrieval order" puts it first. Measured per
  arrangement: teacher-forced log-probability of the answer (sum over its tokens) and greedy exact match
  (greedy decoding reproduces the code's tokens; read from the same forward pass). Arrangements: ``retrieval`` (relevant first),
  ``reverse`` (relevant last), ``random``, ``attnrank``, and the relevant record in every slot (``slot<s>``:
  the basin measured on the task itself). Differences are paired over prompts with a 95% bootstrap CI.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import permutations

import torch
from torch import Tensor, nn

from ..models import hf
from .metrics import basin_score
from .probes import NOUNS

NOUN_POOL = tuple(NOUNS) + ("violin", "candle", "anchor", "pepper", "saddle", "walrus", "kettle", "meadow",
                            "rocket", "pillow", "tunnel", "quartz")


def attnrank_order(relevance: Tensor | list[float], profile: Tensor | list[float]) -> list[int]:
    """``relevance (K,)`` per item, ``profile (K,)`` attention per slot -> ``order`` with ``order[s]`` the item
    placed in slot ``s``: the ``r``-th most relevant item in the ``r``-th most attended slot."""
    rel, prof = torch.as_tensor(relevance, dtype=torch.float64), torch.as_tensor(profile, dtype=torch.float64)
    if rel.dim() != 1 or rel.shape != prof.shape:
        raise ValueError(f"relevance and profile must be (K,) of the same K, got {tuple(rel.shape)} and "
                         f"{tuple(prof.shape)}")
    items = rel.argsort(descending=True, stable=True).tolist()
    slots = prof.argsort(descending=True, stable=True).tolist()
    order = [0] * len(items)
    for item, slot in zip(items, slots, strict=True):
        order[slot] = item
    return order


def best_order_brute_force(relevance: list[float], profile: list[float]) -> float:
    """``max over orders of sum_s relevance[order[s]] * profile[s]`` (K! orders; for tests and small K)."""
    return max(sum(relevance[o] * p for o, p in zip(order, profile, strict=True))
               for order in permutations(range(len(relevance))))


def slot_attention(weights: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """``weights (..., r, T)`` of the question rows -> ``(K,)``: mean over everything but the key axis of the
    mass on each item span ``[start, end)``."""
    if not spans:
        raise ValueError("spans must name at least one item")
    w = weights.double().reshape(-1, weights.shape[-1])
    return torch.stack([w[:, a:b].sum(-1).mean() for a, b in spans])


@dataclass(frozen=True)
class RankPrompt:
    """One generated prompt: ids ``(1, T)``, each slot's token span, where the question starts, the answer."""

    ids: Tensor
    spans: list[tuple[int, int]]
    question_start: int
    answer: str
    gold_slot: int


@dataclass(frozen=True)
class RecordSet:
    """``k`` records (noun, code); ``gold`` is the one asked about; ``relevance`` from the simulated retriever."""

    nouns: tuple[str, ...]
    codes: tuple[str, ...]
    gold: int
    relevance: tuple[float, ...]


def make_records(k: int, seed: int) -> RecordSet:
    if not 2 <= k <= len(NOUN_POOL):
        raise ValueError(f"k must be in 2..{len(NOUN_POOL)}, got {k}")
    rng = random.Random(seed)
    nouns = tuple(rng.sample(NOUN_POOL, k))
    codes = tuple(str(rng.randint(1000, 9999)) for _ in range(k))
    gold = rng.randrange(k)
    rel = [rng.uniform(0.0, 0.9) for _ in range(k)]
    rel[gold] = 1.0
    return RecordSet(nouns, codes, gold, tuple(rel))


def build_prompt(tok, rec: RecordSet, order: list[int]) -> RankPrompt:
    """The records in ``order`` (``order[s]`` = record in slot s), then the question; spans from offsets."""
    if sorted(order) != list(range(len(rec.nouns))):
        raise ValueError(f"order must be a permutation of 0..{len(rec.nouns) - 1}, got {order}")
    head = "Read the records, then answer the question.\n"
    lines = [f"The code of the {rec.nouns[i]} is {rec.codes[i]}." for i in order]
    char_spans, pos = [], len(head)
    for line in lines:
        char_spans.append((pos, pos + len(line)))
        pos += len(line) + 1
    body = head + "\n".join(lines) + "\n"
    g = rec.nouns[rec.gold]
    text = body + f"Question: What is the code of the {g}?\nAnswer: The code of the {g} is"
    enc = tok(text, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    spans = []
    for a, b in char_spans:
        toks = [t for t, (x, y) in enumerate(offs) if y > x and x < b and y > a]
        spans.append((toks[0], toks[-1] + 1))
    qs = next(t for t, (x, y) in enumerate(offs) if y > x and x >= len(body))
    return RankPrompt(torch.tensor([ids]), spans, qs, " " + rec.codes[rec.gold], order.index(rec.gold))


@torch.no_grad()
def prompt_slot_attention(model: nn.Module, p: RankPrompt) -> Tensor:
    """``(K,)`` slot attention of one prompt (question rows, all layers and heads)."""
    T = p.ids.shape[1]
    _, cache = hf.run_with_cache(model, p.ids, ["blocks.*.attn.weights"], rows=(p.question_start, T))
    return torch.stack([slot_attention(v[0], p.spans) for v in cache.values()]).mean(0)


@torch.no_grad()
def answer_scores(model: nn.Module, tok, p: RankPrompt) -> dict[str, float]:
    """Teacher-forced ``logp`` of the answer tokens and greedy ``exact``, both from one forward pass over
    prompt + answer: greedy decoding reproduces the answer exactly when the argmax at every answer position
    is the answer's token (while it matches, the greedy prefix *is* the answer prefix)."""
    ans = torch.tensor(tok(p.answer, add_special_tokens=False)["input_ids"])
    full = torch.cat([p.ids, ans.view(1, -1)], 1)
    T = p.ids.shape[1]
    logits = model(input_ids=full, use_cache=False).logits[0, T - 1:T - 1 + len(ans)].double()
    lp = torch.log_softmax(logits, -1)
    return {"logp": float(lp[torch.arange(len(ans)), ans].sum()),
            "exact": float(bool((logits.argmax(-1) == ans).all()))}


@dataclass
class AttnRankResult:
    k: int
    profile: list[float]
    basin: float
    rows: list[dict] = field(default_factory=list)  # one per (prompt, arrangement)

    def table(self) -> list[dict]:
        """Per arrangement: mean logp / exact, and the paired change against ``retrieval`` with a 95% CI."""
        from ..frontier.report import bootstrap_ci

        arrs = list(dict.fromkeys(r["arrangement"] for r in self.rows))
        base = {r["prompt"]: r for r in self.rows if r["arrangement"] == "retrieval"}
        out = []
        for a in arrs:
            rs = [r for r in self.rows if r["arrangement"] == a]
            d = [r["logp"] - base[r["prompt"]]["logp"] for r in rs if r["prompt"] in base]
            lo, hi = bootstrap_ci(d) if d else (float("nan"), float("nan"))
            out.append({"arrangement": a, "n": len(rs), "logp": sum(r["logp"] for r in rs) / len(rs),
                        "exact": sum(r["exact"] for r in rs) / len(rs),
                        "gold_slot": sum(r["gold_slot"] for r in rs) / len(rs),
                        "d_logp_vs_retrieval": sum(d) / len(d) if d else float("nan"), "ci_lo": lo, "ci_hi": hi})
        return out

    def to_dict(self) -> dict:
        return {"k": self.k, "profile": self.profile, "basin": self.basin, "table": self.table(), "rows": self.rows}


def calibrate(model: nn.Module, tok, k: int, n: int, seed: int = 1000, progress=None) -> Tensor:
    """Mean slot attention over ``n`` calibration prompts (relevant record in a random slot), sums to 1."""
    prof = torch.zeros(k, dtype=torch.float64)
    for s in range(n):
        rec = make_records(k, seed + s)
        order = list(range(k))
        random.Random(seed + s).shuffle(order)
        prof += prompt_slot_attention(model, build_prompt(tok, rec, order))
        if progress:
            progress()
    return prof / prof.sum()


def attnrank_eval(model: nn.Module, tok, k: int = 8, n_eval: int = 20, n_calib: int = 10, seed: int = 0,
                  slots: bool = True, progress=None) -> AttnRankResult:
    """Calibrate on ``n_calib`` prompts, then score every arrangement on ``n_eval`` new prompts (module doc)."""
    if n_eval < 1 or n_calib < 1:
        raise ValueError(f"n_eval and n_calib must be >= 1, got {n_eval}, {n_calib}")
    profile = calibrate(model, tok, k, n_calib, seed=seed + 100_000, progress=progress)
    res = AttnRankResult(k, profile.tolist(), float(basin_score(profile)))
    for p in range(n_eval):
        rec = make_records(k, seed + p)
        rel = list(rec.relevance)
        retrieval = sorted(range(k), key=lambda i: -rel[i])
        shuffled = list(range(k))
        random.Random(seed + p + 7).shuffle(shuffled)
        arrs = {"retrieval": retrieval, "reverse": retrieval[::-1], "random": shuffled,
                "attnrank": attnrank_order(rel, profile)}
        if slots:
            for s in range(k):
                o = [i for i in retrieval if i != rec.gold]
                arrs[f"slot{s}"] = o[:s] + [rec.gold] + o[s:]
        for name, order in arrs.items():
            pr = build_prompt(tok, rec, order)
            res.rows.append({"prompt": p, "arrangement": name, "gold_slot": pr.gold_slot,
                             **answer_scores(model, tok, pr)})
        if progress:
            progress()
    return res


__all__ = ["AttnRankResult", "RankPrompt", "RecordSet", "attnrank_eval", "attnrank_order", "best_order_brute_force",
           "build_prompt", "calibrate", "make_records", "prompt_slot_attention", "slot_attention"]
