"""``attnlab bench scbench``: shared-context multi-turn evaluation of KV-cache methods (SCBench, B176).

One long context holding several retrievable items (``K`` needles "Remember: <word> = <7 digits>." at spread
depths in a haystack of varied sentences), prefilled **once**; then ``T`` turns, each a question about a
different item, appended after the previous turn's reply with the cache kept (SCBench's shared-context
multi-turn mode: the context is never prefilled again). Every frontier method whose cache persists
across turns runs through the seam (:mod:`attnlab.frontier.methods`: the same builders and budgets), and each
turn is scored separately, with the KV bytes the cache holds after it.

Protocols (a method runs under those of its own that are asked for):

* ``press`` -- **query-agnostic** (SCBench's setting): the context is prefilled densely and the method's cache
  rebuilt from the recorded queries/keys/values (:func:`attnlab.frontier.run.replay`); the compression
  happens before any question is seen (at the first token after the context), so a method that selects by its
  observation window's queries (SnapKV, PyramidKV, Ada-KV) selects with the *context's* last queries and is
  blind to every question;
* ``press+q1`` -- the kvpress way for turn 1 only: the context *and the first question* are prefilled densely,
  then compressed (SnapKV's window holds question 1); later questions find the cache that question 1 chose;
* ``prefill`` -- the method computes the context itself (streaming heads read their window, MoBA/MInference
  their selected blocks, Quest prefills densely and reads top pages while decoding).

Every token after the context (questions, replies) is fed one at a time. Feeding one token per call keeps
every policy on its decode path: a cache compressed after the context is never asked to absorb a second
multi-token "prompt" (the policies compress once, at the first one-row call after a prompt). What stays in
the history after a question (``--history``): ``gold`` (default) -- the reference reply, teacher-forced; a
turn is correct when greedy decoding would begin with the answer (the argmax before each answer token is that
token), so every method's cache sees the same tokens and a wrong answer never leaks into later turns;
``model`` -- the model's own greedy answer (as a chat server keeps it), scored by the answer in its text.

Metrics per (model, method, budget, protocol): accuracy of each turn (mean over samples, 95% percentile
bootstrap CI: :func:`attnlab.frontier.report.bootstrap_ci`), KV bytes held after each turn (ratio to the dense
run of the same sample after the same turn), and the **degradation** = turn-1 accuracy minus the mean of the
later turns (per sample, then mean and CI): the paper's finding is that sub-O(n)-memory methods lose later
turns while O(n)-memory sparse-prefill methods keep them.

Configurations ``(model, sample, method, budget, protocol)`` run through :func:`attnlab.sweep.run_sweep`; the
dense run of each sample is its own configuration (method ``dense``; it records the context's q, k, v for the
press configurations of the same sample that follow it in the same process; a press configuration without it
prefills the context itself). Output: ``runs/scbench-<stamp>/`` with ``results.jsonl`` (one line per
configuration), ``results.json``, ``results.md`` and one PNG per model and length (accuracy vs turn; KV held vs
turn). The report covers every configuration of the folder, so ``--resume`` with other methods or budgets
adds to it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_METHODS = ("stream", "snapkv", "pyramidkv", "adakv", "knorm", "tova", "h2o", "quest", "probe", "duo",
                   "moa", "moba", "minference")
QUICK_METHODS = ("stream", "snapkv", "knorm", "minference")
PROTOCOLS = ("press", "press+q1", "prefill")
DEFAULT_PROTOCOLS = ("press", "prefill")
DEFAULT_LENGTH = 1024
DEFAULT_TURNS = 4
#: generated tokens per answer under ``--history model`` (a 7-digit value is up to 8 tokens with its space)
ANSWER_TOKENS = 10

QUICK = {"models": ("smollm2",), "methods": QUICK_METHODS, "n": 2, "length": 1024, "budgets": (0.25,), "threads": 1}


# ---------------------------------------------------------------------------------------------------------
# the task: one shared context, several turns
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    """One question over the shared context: ``ids`` (its tokens, appended after the previous turn's answer),
    the ``answer`` a correct continuation contains, the ``item`` asked and its ``depth`` in the context;
    ``reply`` the reference reply's tokens (the answer's ``answer_len`` tokens, then a full stop)."""

    ids: tuple[int, ...]
    answer: str
    item: int
    depth: float
    reply: tuple[int, ...] = ()
    answer_len: int = 0
    max_new_tokens: int = ANSWER_TOKENS

    def score(self, text: str) -> float:
        """1.0 when the generated ``text`` contains the answer (the tasks' own rule, digits with spaces and
        commas removed: :meth:`attnlab.plans.tasks.Sample.score`)."""
        from ..plans.tasks import Sample

        return Sample("scbench", self.ids, (self.answer,), len(self.ids), self.depth, self.max_new_tokens).score(text)

    def score_forced(self, predicted: Sequence[int]) -> float:
        """1.0 when greedy decoding would begin with the answer: ``predicted[i]`` is the argmax after the
        question and the first ``i`` reference reply tokens, and each of the answer's tokens is predicted."""
        n = self.answer_len
        return float(list(predicted[:n]) == list(self.reply[:n]))

    def token_accuracy(self, predicted: Sequence[int]) -> float:
        """Fraction of the answer's tokens predicted (each given the reference tokens before it): partial
        credit, e.g. the first digits of a value."""
        n = self.answer_len
        return sum(int(a == b) for a, b in zip(predicted[:n], self.reply[:n])) / n


@dataclass(frozen=True)
class SharedSample:
    """A shared context of exactly ``length`` tokens holding ``items`` needles, and the turns asked on it."""

    context: tuple[int, ...]
    turns: tuple[Turn, ...]
    keys: tuple[str, ...]
    values: tuple[str, ...]
    depths: tuple[float, ...]
    length: int
    index: int

    @property
    def items(self) -> int:
        return len(self.keys)


HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
        "I will quiz you about the numbers afterwards.\n")


def needle(key: str, value: str) -> str:
    """The text of one item in the context."""
    return f"Remember: {key} = {value}. "


def question(key: str) -> str:
    """The text of a turn asking for ``key``'s value (it starts on a new line after the previous answer)."""
    return f"\nWhat does {key} equal? {key} ="


def shared_sample(tok: Any, length: int, *, turns: int = DEFAULT_TURNS, items: int | None = None, index: int = 0,
                  seed: int = 0) -> SharedSample:
    """A seeded shared-context sample sized in ``tok``'s tokens.

    Args:
        tok: the model's tokenizer; the context is exactly ``length`` of its tokens (BOS included when the
            tokenizer adds one).
        length: context length in tokens.
        turns: questions asked, each about a different item (``turns <= items``).
        items: needles in the context (default ``turns``); needle ``j`` sits at a depth drawn in the ``j``-th of
            ``items`` equal bands of 5%..95% of the haystack (distinct, increasing depths).
        index: the sample's index; turn ``t`` asks item ``(t + index) % items`` (a rotation, so over ``items``
            consecutive samples every turn asks every depth once: turn and depth are not confounded).
        seed: run seed; the generator seed is ``seed * 1000 + index``.
    Returns: a :class:`SharedSample`.
    Raises: ValueError for ``turns < 1``, ``items < turns`` or a length too short for the needles.
    """
    from ..plans.tasks import _WORDS, _assemble, _enc, _essay, _Hay

    items = turns if items is None else items
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    if items < turns:
        raise ValueError(f"items ({items}) must be at least turns ({turns}): each turn asks a different item")
    if items > len(_WORDS):
        raise ValueError(f"items must be at most {len(_WORDS)}, got {items}")
    rng = random.Random(f"scbench-{items}-{seed * 1000 + index}-{length}")
    words = rng.sample(_WORDS, items)
    values = [str(v) for v in rng.sample(range(1000000, 10000000), items)]
    band = 0.9 / items
    depths = [0.05 + band * (j + rng.uniform(0.2, 0.8)) for j in range(items)]
    needles = [(d, needle(w, v)) for d, w, v in zip(depths, words, values)]
    ids = _assemble(tok, length, HEAD, needles, "", _Hay(tok, _essay(rng, 64)))
    asked = [(t + index) % items for t in range(turns)]
    qs = []
    for j in asked:
        ans = _enc(tok, f" {values[j]}")
        qs.append(Turn(tuple(_enc(tok, question(words[j]))), values[j], j, depths[j], tuple(ans + _enc(tok, ".")),
                       len(ans)))
    qs = tuple(qs)
    return SharedSample(tuple(ids), qs, tuple(words), tuple(values), tuple(depths), length, index)


# ---------------------------------------------------------------------------------------------------------
# running the turns with the cache kept
# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def step(model: nn.Module, token: int, cache: Any) -> Tensor:
    """One token through the model with ``cache`` (the cache grows by it); returns its logits ``(vocab,)``."""
    out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    return out.logits[0, -1]


HISTORIES = ("gold", "model")


@torch.no_grad()
def run_turns(model: nn.Module, cache: Any, sample: SharedSample, *, first_logits: Tensor | None = None,
              keep_logits: bool = False, history: str = "gold") -> list[dict[str, Any]]:
    """Every turn of ``sample`` on a ``cache`` that holds the context (the model's attention already set up).

    Each question is fed one token per call; then the reply, one token per call as well:

    * ``history="gold"``: the reference reply is fed (teacher forcing) and the argmax before each of its
      tokens is recorded -- the turn is correct when greedy decoding would begin with the answer
      (:meth:`Turn.score_forced`); every method's cache then sees the same tokens, and a wrong answer never
      enters the history;
    * ``history="model"``: ``max_new_tokens`` greedy tokens are generated and fed (the model's own answer
      stays in the history, as a chat server keeps it); scored by :meth:`Turn.score` on the text.

    ``first_logits``: turn 1's question was prefilled with the context (``press+q1``); these are its last
    logits and turn 1 starts at its reply.

    Returns one dict per turn: ``tokens`` (the argmax before each reply token), ``fed`` (the reply tokens fed),
    ``kv_bytes`` (held after the whole turn, reply included), ``seen`` (positions the cache has seen),
    ``seconds``, and ``logits`` ``(reply, vocab)`` (where each ``tokens`` entry was taken) when ``keep_logits``.
    """
    from ..frontier.run import cache_bytes

    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    out = []
    for t, turn in enumerate(sample.turns):
        t0 = time.perf_counter()
        logits = first_logits if (t == 0 and first_logits is not None) else None
        if logits is None:
            for tok_id in turn.ids:
                logits = step(model, tok_id, cache)
        pred, fed, kept = [], [], []
        for i in range(len(turn.reply) if history == "gold" else turn.max_new_tokens):
            pred.append(int(logits.argmax()))
            fed.append(turn.reply[i] if history == "gold" else pred[-1])
            if keep_logits:
                kept.append(logits.clone())
            logits = step(model, fed[-1], cache)
        rec = {"tokens": pred, "fed": fed, "kv_bytes": cache_bytes(cache), "seen": int(cache.get_seq_length()),
               "seconds": time.perf_counter() - t0}
        if keep_logits:
            rec["logits"] = torch.stack(kept)
        out.append(rec)
    return out


def history(sample: SharedSample, turns: Sequence[dict[str, Any]]) -> list[int]:
    """The whole token sequence a multi-turn run has fed: context, then each question and its reply."""
    ids = list(sample.context)
    for turn, res in zip(sample.turns, turns):
        ids += list(turn.ids) + list(res["fed"])
    return ids


@torch.no_grad()
@torch.no_grad()
def run_dense(model: nn.Module, sample: SharedSample, *, keep_logits: bool = False, capture: bool = False,
              history: str = "gold") -> dict[str, Any]:
    """Dense: the context prefilled once, then every turn on the kept cache. ``capture``: also return the
    context's recorded q, k, v (``captured``) and last logits (``logits``), what the press configurations
    replay."""
    from ..frontier.run import prefill_dense

    t0 = time.perf_counter()
    cache, logits, captured, handle, _ = prefill_dense(model, sample.context, capture=capture)
    context_s = time.perf_counter() - t0
    try:
        turns = run_turns(model, cache, sample, keep_logits=keep_logits, history=history)
    finally:
        if handle is not None:
            handle.remove()
    out = {"turns": turns, "context_s": context_s}
    if capture:
        out.update(captured=captured, logits=logits)
    return out


@torch.no_grad()
def run_press(model: nn.Module, plan: Any, captured: dict, sample: SharedSample, *,
              first_logits: Tensor | None = None, keep_logits: bool = False, history: str = "gold") -> dict[str, Any]:
    """A plan's cache rebuilt from the dense capture (:func:`attnlab.frontier.run.replay`), then every turn
    under the plan. ``first_logits``: the capture covered turn 1's question too (``press+q1``)."""
    from ..frontier.run import replay
    from ..models import hf

    t0 = time.perf_counter()
    cache, runner = replay(plan, captured)
    context_s = time.perf_counter() - t0
    with hf.use(model, runner):
        turns = run_turns(model, cache, sample, first_logits=first_logits, keep_logits=keep_logits,
                          history=history)
    return {"turns": turns, "context_s": context_s}


@torch.no_grad()
def run_prefill(model: nn.Module, setup: Any, sample: SharedSample, *, keep_logits: bool = False,
                history: str = "gold") -> dict[str, Any]:
    """The method prefills the context itself (its plan or ops), then every turn on its cache."""
    from ..frontier.run import method_runner
    from ..models import hf

    with hf.use(model, method_runner(model, setup)) as handle:
        cache = handle.new_cache()
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([list(sample.context)]), cache=cache, use_cache=True, logits_to_keep=1)
        context_s = time.perf_counter() - t0
        turns = run_turns(model, cache, sample, keep_logits=keep_logits, history=history)
    return {"turns": turns, "context_s": context_s}


# ---------------------------------------------------------------------------------------------------------
# configurations (one per model, sample, method, budget, protocol) through attnlab.sweep
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One configuration of a run. ``method == "dense"`` has ``budget None`` and protocol ``"dense"``.
    ``store``: the folder where the model's calibrations (probe, DuoAttention, MoA) are kept between
    configurations and runs (not part of the key)."""

    model: str
    sample: int
    method: str
    budget: float | None
    protocol: str
    length: int
    turns: int = DEFAULT_TURNS
    items: int | None = None
    seed: int = 0
    local: str = "shrink"
    history: str = "gold"
    store: str | None = None

    @property
    def key(self) -> str:
        items = self.items or self.turns
        return (f"{self.model}|L{self.length}|T{self.turns}|K{items}|s{self.seed}|{self.local}|{self.history}|"
                f"{self.sample}|{self.method}|{self.budget}|{self.protocol}")


#: per-process caches: a worker loads each model once, builds each sample once, keeps the last capture
_CONTEXTS: dict[tuple, Any] = {}
_SAMPLES: dict[tuple, SharedSample] = {}
_CAPTURE: dict[tuple, tuple[dict, Tensor]] = {}


def model_and_tokenizer(name: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``name``, loaded once per process (:func:`attnlab.models.hf.shared_model`)."""
    from ..models import hf

    return hf.shared_model(name)


def _sample(cfg: Config, tok: Any) -> SharedSample:
    key = (cfg.model, cfg.length, cfg.turns, cfg.items, cfg.seed, cfg.sample)
    if key not in _SAMPLES:
        _SAMPLES[key] = shared_sample(tok, cfg.length, turns=cfg.turns, items=cfg.items, index=cfg.sample,
                                      seed=cfg.seed)
    return _SAMPLES[key]


def _context(cfg: Config, model: nn.Module, tok: Any) -> Any:
    from ..frontier.run import context

    key = (cfg.model, cfg.local, cfg.store)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = context(model, tok, Path(cfg.store) if cfg.store else None, cfg.local)
    return _CONTEXTS[key]


def _capture_key(cfg: Config, with_q1: bool) -> tuple:
    return (cfg.model, cfg.length, cfg.turns, cfg.items, cfg.seed, cfg.sample, with_q1)


def _capture(cfg: Config, model: nn.Module, sample: SharedSample, with_q1: bool) -> tuple[dict, Tensor]:
    """The dense capture of the context (with turn 1's question for ``press+q1``); the last one is kept."""
    key = _capture_key(cfg, with_q1)
    if key not in _CAPTURE:
        _CAPTURE.clear()  # one capture at a time: it holds every layer's q, k, v
        ids = list(sample.context) + (list(sample.turns[0].ids) if with_q1 else [])
        from ..frontier.run import prefill_dense

        _, logits, captured, handle, _ = prefill_dense(model, ids, capture=True)
        if handle is not None:
            handle.remove()
        _CAPTURE[key] = (captured, logits)
    return _CAPTURE[key]


def run_config(cfg: Config) -> dict[str, Any]:
    """One configuration: its turns' scores and KV bytes (a JSON-able dict; errors are recorded, not raised).
    Top-level and picklable: the function :func:`attnlab.sweep.run_sweep` maps over the configurations."""
    base = {"model": cfg.model, "sample": cfg.sample, "method": cfg.method, "budget": cfg.budget,
            "protocol": cfg.protocol, "length": cfg.length, "turns_asked": cfg.turns, "items": cfg.items or cfg.turns,
            "seed": cfg.seed, "local": cfg.local, "history": cfg.history}
    try:
        model, tok = model_and_tokenizer(cfg.model)
        sample = _sample(cfg, tok)
        t0 = time.perf_counter()
        if cfg.method == "dense":  # its capture serves the press configurations of this sample that follow
            res, family = run_dense(model, sample, capture=True, history=cfg.history), "dense"
            _CAPTURE.clear()
            _CAPTURE[_capture_key(cfg, False)] = (res.pop("captured"), res.pop("logits"))
        else:
            from ..frontier import methods as M

            meth = M.get(cfg.method)
            if cfg.protocol not in _protocols_of(meth):
                raise ValueError(f"method {cfg.method!r} runs under {_protocols_of(meth)}, not {cfg.protocol!r}")
            setup = meth.build(_context(cfg, model, tok), cfg.budget, cfg.length)
            if setup.lookahead:
                raise ValueError(f"method {cfg.method!r} decodes pseudo tokens before compressing (LAQ): it runs "
                                 "in attnlab frontier's single-turn press protocol only")
            family = meth.family
            if cfg.protocol == "prefill":
                res = run_prefill(model, setup, sample, history=cfg.history)
            else:
                captured, logits = _capture(cfg, model, sample, cfg.protocol == "press+q1")
                res = run_press(model, setup.plan, captured, sample, history=cfg.history,
                                first_logits=logits if cfg.protocol == "press+q1" else None)
        total_s = time.perf_counter() - t0
    except Exception as e:  # one broken configuration must not lose the run: recorded (and retried on resume)
        return {**base, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=-3)}
    turns = []
    for t, (turn, r) in enumerate(zip(sample.turns, res["turns"])):
        text = tok.decode(r["tokens"], skip_special_tokens=True)
        gold = cfg.history == "gold"
        turns.append({"turn": t + 1, "item": turn.item, "depth": round(turn.depth, 4), "answer": turn.answer,
                      "text": text, "score": turn.score_forced(r["tokens"]) if gold else turn.score(text),
                      "token_acc": turn.token_accuracy(r["tokens"]) if gold else None,
                      "kv_bytes": r["kv_bytes"], "seen": r["seen"], "seconds": round(r["seconds"], 4)})
    return {**base, "family": family, "context_s": round(res["context_s"], 4), "seconds": round(total_s, 3),
            "turns": turns}


def _protocols_of(meth: Any) -> tuple[str, ...]:
    """A method's protocols here: its frontier protocols, ``press`` adding ``press+q1``."""
    return tuple(p for p in PROTOCOLS if p in meth.protocols or (p == "press+q1" and "press" in meth.protocols))


def configs(models: Sequence[str], methods: Sequence[str], budgets: Sequence[float], protocols: Sequence[str],
            n: int, length: int, *, turns: int = DEFAULT_TURNS, items: int | None = None, seed: int = 0,
            local: str = "shrink", history: str = "gold", store: Path | None = None) -> list[Config]:
    """Every configuration, grouped by (model, sample) with dense first (consecutive configurations share the
    capture). ``store``: the run folder; calibrations go to ``store/calibration-<model>``."""
    from ..frontier import methods as M

    out = []
    for model in models:
        st = str(store / f"calibration-{model}") if store is not None else None
        common = dict(length=length, turns=turns, items=items, seed=seed, local=local, history=history, store=st)
        for i in range(n):
            out.append(Config(model, i, "dense", None, "dense", **common))
            for name in methods:
                if name == "dense":
                    continue
                meth = M.get(name)
                for b in budgets:
                    for p in _protocols_of(meth):
                        if p in protocols:
                            out.append(Config(model, i, name, float(b), p, **common))
    return out


# ---------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------
def _ci(xs: Sequence[float]) -> tuple[float, float]:
    from ..frontier.report import bootstrap_ci

    return bootstrap_ci(xs)


def degradation(scores: Sequence[float]) -> float:
    """Turn-1 score minus the mean of the later turns' scores (0 with a single turn)."""
    return scores[0] - statistics.mean(scores[1:]) if len(scores) > 1 else 0.0


def _setting(r: dict[str, Any]) -> tuple:
    """What makes runs comparable: model, context length, turns, items, seed, local windows, history."""
    return (r["model"], r.get("length"), r.get("turns_asked"), r.get("items"), r.get("seed"), r.get("local"),
            r.get("history"))


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, method, budget, protocol) -- setting = (model, length, turns, items, seed, local
    windows): per-turn accuracy (mean and 95% CI over samples), per-turn KV ratio to the dense run of the same
    sample after the same turn, degradation (mean and CI). Rows with an ``error`` are left out."""
    ok = [r for r in rows if "error" not in r]
    dense = {(*_setting(r), r["sample"]): r for r in ok if r["method"] == "dense"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        groups.setdefault((_setting(r), r["method"], r["budget"], r["protocol"]), []).append(r)
    out = []
    for (setting, method, budget, protocol), rs in groups.items():
        T = min(len(r["turns"]) for r in rs)
        scores = [[r["turns"][t]["score"] for t in range(T)] for r in rs]
        acc = [statistics.mean(s[t] for s in scores) for t in range(T)]
        cis = [_ci([s[t] for s in scores]) for t in range(T)]
        kv = []
        for t in range(T):
            ratios = [r["turns"][t]["kv_bytes"] / d["turns"][t]["kv_bytes"] for r in rs
                      if (d := dense.get((*setting, r["sample"]))) is not None and len(d["turns"]) > t]
            kv.append(statistics.mean(ratios) if ratios else None)
        deg = [degradation(s) for s in scores]
        tok_acc = None
        if all(r["turns"][t].get("token_acc") is not None for r in rs for t in range(T)):
            tok_acc = [statistics.mean(r["turns"][t]["token_acc"] for r in rs) for t in range(T)]
        model, length, turns, items, seed, local, hist = setting
        out.append({"model": model, "length": length, "turns": turns, "items": items, "seed": seed, "local": local,
                    "history": hist,
                    "method": method, "budget": budget, "protocol": protocol,
                    "family": rs[0].get("family"), "n": len(rs), "accuracy": acc, "ci": cis, "token_accuracy": tok_acc,
                    "kv_ratio": kv,
                    "kv_bytes": [statistics.mean(r["turns"][t]["kv_bytes"] for r in rs) for t in range(T)],
                    "mean": statistics.mean(a for a in acc), "degradation": statistics.mean(deg),
                    "degradation_ci": _ci(deg), "seconds": statistics.median(r["seconds"] for r in rs)})
    out.sort(key=lambda r: (r["model"], str(r["length"]), str(r["turns"]), r["method"] != "dense", r["method"],
                            -(r["budget"] or 1), r["protocol"]))
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table: accuracy per turn [CI], KV held after the first and last turn, degradation [CI]."""
    if not rows:
        return "(no results)\n"
    T = max(len(r["accuracy"]) for r in rows)
    head = ("| model | length | method | budget | protocol | " + " | ".join(f"turn {t + 1}" for t in range(T))
            + " | KV held (turn 1 / last) | degradation [95% CI] | n |")
    lines = [head, "|" + "---|" * (9 + T)]
    for r in rows:
        turns = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, (lo, hi) in zip(r["accuracy"], r["ci"])]
        turns += [""] * (T - len(turns))
        kv = f"{_fmt(r['kv_ratio'][0], 3)} / {_fmt(r['kv_ratio'][-1], 3)}"
        lo, hi = r["degradation_ci"]
        model = r["model"] + (" (model history)" if r.get("history") == "model" else "")
        lines.append(f"| {model} | {r['length']} | {r['method']} | {_fmt(r['budget'], 3) if r['budget'] else '-'} | "
                     f"{r['protocol']} | " + " | ".join(turns)
                     + f" | {kv} | {r['degradation']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {r['n']} |")
    partial = [r for r in rows if r.get("token_accuracy")]
    if partial:
        lines += ["", "Answer-token accuracy per turn (teacher-forced: each answer token predicted given the "
                  "reference tokens before it; partial credit):", "",
                  "| model | length | method | budget | protocol | " + " | ".join(f"turn {t + 1}" for t in range(T))
                  + " | turn 1 - later |", "|" + "---|" * (6 + T)]
        for r in partial:
            ta = r["token_accuracy"]
            drop = ta[0] - statistics.mean(ta[1:]) if len(ta) > 1 else 0.0
            cells = [f"{a:.2f}" for a in ta] + [""] * (T - len(ta))
            lines.append(f"| {r['model']} | {r['length']} | {r['method']} | "
                         f"{_fmt(r['budget'], 3) if r['budget'] else '-'} | {r['protocol']} | " + " | ".join(cells)
                         + f" | {drop:+.2f} |")
    return "\n".join(lines) + "\n"


def _label(r: dict[str, Any]) -> str:
    return r["method"] if r["method"] == "dense" else f"{r['method']}@{r['budget']:g} {r['protocol']}"


def plot(rows: Sequence[dict[str, Any]], run_dir: Path, model: str, length: int) -> Path | None:
    """``scbench-<model>-<length>.png``: accuracy per turn (one line per method/budget/protocol; dense in black,
    prefill protocol dashed, press+q1 dotted) and KV held per turn (ratio to dense after the same turn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in rows if r["model"] == model and r["length"] == length]
    if not rs:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(rs):
        x = list(range(1, len(r["accuracy"]) + 1))
        style = dict(color="black", lw=2.5) if r["method"] == "dense" else dict(color=cmap(i % 20), lw=1.4)
        ls = "--" if r["protocol"] == "prefill" else (":" if r["protocol"] == "press+q1" else "-")
        # accuracies take few values (k / n): each method's line is offset a little (at most +-0.03; dense not)
        # so equal lines stay visible
        dy = 0.0 if r["method"] == "dense" else 0.06 * (i / max(1, len(rs) - 1) - 0.5)
        a1.plot(x, [a + dy for a in r["accuracy"]], marker="o", ls=ls, label=_label(r), **style)
        if all(k is not None for k in r["kv_ratio"]):
            a2.plot(x, r["kv_ratio"], marker="o", ls=ls, label=_label(r), **style)
    a1.set(xlabel="turn", ylabel="accuracy (method lines offset by up to 0.03)",
           title=f"{model}, {length}-token shared context: accuracy per turn", ylim=(-0.15, 1.15))
    a2.set(xlabel="turn", ylabel="KV held / dense (same turn)", title="KV held after each turn")
    for a in (a1, a2):
        a.set_xticks(range(1, max(len(r["accuracy"]) for r in rs) + 1))
        a.grid(alpha=0.3)
    a2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = run_dir / f"scbench-{model.replace(':', '_')}-{length}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: Sequence[dict[str, Any]], run_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """``results.json`` (meta + rows), ``results.md`` (the table + plots) and one PNG per model and length."""
    import json

    (run_dir / "results.json").write_text(json.dumps({"kind": "scbench", "meta": meta, "rows": list(rows)},
                                                     indent=2))
    lines = ["# attnlab bench scbench", "", *(f"- {k}: {v}" for k, v in meta.items()), "", markdown(rows)]
    paths = [run_dir / "results.json", run_dir / "results.md"]
    for model, length in dict.fromkeys((r["model"], r["length"]) for r in rows):
        p = plot(rows, run_dir, model, length)
        if p is not None:
            paths.append(p)
            lines.append(f"![{p.stem}]({p.name})")
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    return paths


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    T = max(len(r["accuracy"]) for r in rows)
    table = Table(title="attnlab bench scbench (accuracy per turn, KV held after the last turn)")
    for c in ["model", "method", "budget", "protocol", *(f"t{t + 1}" for t in range(T)), "KV", "degr.", "n"]:
        table.add_column(c)
    for r in rows:
        table.add_row(r["model"], r["method"], _fmt(r["budget"], 3) if r["budget"] else "-", r["protocol"],
                      *(f"{a:.2f}" for a in r["accuracy"]), _fmt(r["kv_ratio"][-1], 3), f"{r['degradation']:+.2f}",
                      str(r["n"]))
    Console(width=max(120, 12 * (8 + T))).print(table)


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def _csv(text: str | None, cast=str) -> tuple | None:
    return None if text is None else tuple(cast(x) for x in str(text).split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    from ..frontier.methods import LOCAL_MODES
    from ..sweep import add_executor_args

    p = sub.add_parser("scbench", help="shared-context multi-turn evaluation (SCBench): one context prefilled "
                                       "once, T questions with the cache kept; accuracy per turn and KV held")
    p.add_argument("--models", default=None, help="comma-separated: smollm2,gemma3 (default both)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated frontier methods (dense always runs); default {','.join(DEFAULT_METHODS)}")
    p.add_argument("--budgets", default=None, help="KV / density fractions (default 0.25)")
    p.add_argument("--protocols", default=None,
                   help=f"of {','.join(PROTOCOLS)} (default {','.join(DEFAULT_PROTOCOLS)}); press = compress after "
                        "the context only (query-agnostic), press+q1 = after the context and question 1")
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="questions per context")
    p.add_argument("--items", type=int, default=None, help="needles in the context (default: --turns)")
    p.add_argument("--length", type=int, default=None, help=f"context tokens (default {DEFAULT_LENGTH})")
    p.add_argument("--n", type=int, default=None, help="samples per model (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", choices=HISTORIES, default="gold",
                   help="what stays in the history after each question: gold = the reference reply, fed token by "
                        "token (a turn is right when greedy decoding would begin with the answer); model = the "
                        "model's own greedy answer (scored by the answer in its text)")
    p.add_argument("--local-windows", dest="local", choices=LOCAL_MODES, default="shrink",
                   help="sliding-window layers (Gemma 3) under a budget: shrink to the same fraction, keep, or min "
                        "(4 sinks + a short window; the full layers get the rest of the budget)")
    p.add_argument("--quick", action="store_true",
                   help=f"SmolLM2, {','.join(QUICK_METHODS)}, n=2, 1024 tokens, budget 0.25, 1 thread (a few minutes)")
    p.add_argument("--resume", default=None, help="a run folder to continue (finished configurations are skipped)")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per configuration (1 is fastest on a loaded machine; default: leave)")
    add_executor_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.common import machine_info, new_run_dir
    from ..frontier import methods as M
    from ..sweep import Executor, load_rows, run_sweep

    q = QUICK if args.quick else {}
    models = _csv(args.models) or q.get("models", ("smollm2", "gemma3"))
    names = _csv(args.methods) or q.get("methods", DEFAULT_METHODS)
    for name in names:
        if name != "dense":
            M.get(name)  # unknown names fail before anything loads
    budgets = _csv(args.budgets, float) or q.get("budgets", (0.25,))
    if any(not 0 < b <= 1 for b in budgets):
        raise SystemExit(f"--budgets are fractions in (0, 1], got {budgets}")
    protocols = _csv(args.protocols) or DEFAULT_PROTOCOLS
    if set(protocols) - set(PROTOCOLS):
        raise SystemExit(f"--protocols takes {', '.join(PROTOCOLS)}, got {args.protocols!r}")
    if args.turns < 1:
        raise SystemExit(f"--turns must be >= 1, got {args.turns}")
    if args.items is not None and args.items < args.turns:
        raise SystemExit(f"--items ({args.items}) must be at least --turns ({args.turns})")
    length = args.length or q.get("length", DEFAULT_LENGTH)
    threads = args.threads or q.get("threads")
    n = args.n or q.get("n", 4)
    run_dir = Path(args.resume) if args.resume else new_run_dir("scbench", args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfgs = configs(models, names, budgets, protocols, n, length, turns=args.turns, items=args.items,
                   seed=args.seed, local=args.local, history=args.history, store=run_dir)
    print(f"scbench run in {run_dir}: {len(cfgs)} configurations")
    t0 = time.perf_counter()
    results = run_sweep(run_config, cfgs, key=lambda c: c.key, path=run_dir / "results.jsonl",
                        executor=Executor.from_args(args, threads=threads), description="scbench",
                        label=lambda r: f"{r['model']} {r['sample']} {r['method']} {r['budget']} {r['protocol']}")
    errors = sorted({f"{r['model']} {r['method']} {r['budget']} {r['protocol']}: {r['error']}"
                     for r in results if "error" in r})
    # every configuration of the folder (a resumed run may have asked for other methods or budgets before)
    rows = aggregate(load_rows(run_dir / "results.jsonl"))
    meta = {"models": list(models), "methods": list(names), "budgets": list(budgets), "protocols": list(protocols),
            "turns": args.turns, "items": args.items or args.turns, "length": length, "n": n, "seed": args.seed,
            "local_windows": args.local, "history": args.history, "threads": threads, "answer_tokens": ANSWER_TOKENS, "wall_s": round(time.perf_counter() - t0, 1),
            "errors": errors, **machine_info()}
    write(rows, run_dir, meta)
    print_table(rows)
    for e in errors:
        print(f"error: {e}")
    print(f"wrote {run_dir}")
    return 0


__all__ = ["ANSWER_TOKENS", "Config", "DEFAULT_METHODS", "HISTORIES", "PROTOCOLS", "QUICK", "SharedSample", "Turn",
           "aggregate", "configs", "degradation", "history", "markdown", "model_and_tokenizer",
           "needle", "plot", "question", "register", "run", "run_config", "run_dense", "run_prefill",
           "run_press", "run_turns", "shared_sample", "step", "write"]
