"""Built-in probes: seeded prompts whose structure tells each metric where to look.

* ``text``      -- a natural paragraph (or the user's text): sinks, entropy, distance, locality, previous
  token, massive activations, maps, rollout / flow.
* ``induction`` -- random tokens repeated twice (Olsson et al.): the induction / prefix-matching score.
* ``retrieval`` -- needle-copy: a haystack with a needle sentence, a question, and the needle copied as the
  answer (teacher-forced), for the retrieval score of Wu et al.
* ``basin``     -- a list of similar items then a question: the positional profile (attention basin).
* ``lookback``  -- a passage, then tokens the model generates itself: the Lookback Lens ratio.

A probe is plain data (``Probe``): token ids, token labels, a ``ProbeSpec`` and, for retrieval, the needle
positions and answer rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .metrics import ProbeSpec

PROBES = ("text", "induction", "retrieval", "basin", "lookback")
ALIASES = {"sinks": "text", "sink": "text", "local": "text", "prev": "text", "positions": "basin"}

TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the stones, and the baker opened her "
    "shutters to the smell of bread. Children ran past the church toward the school, where the old teacher "
    "was already writing the day's lesson on the board: the rivers of the world, their sources and their "
    "mouths. By noon the market was full, and the town talked about the storm that had passed in the night."
)

FILLER = [
    "The grass is green and the sky is blue.",
    "A train left the station at dawn and crossed the long bridge.",
    "The library keeps old maps of the coast in a wooden cabinet.",
    "Farmers sell apples, pears and honey at the Sunday market.",
    "Clouds gathered over the hills before the evening rain.",
    "The museum opened a new hall of ancient coins last spring.",
]
NOUNS = ["orange", "piano", "falcon", "marble", "cactus", "lantern", "velvet", "harbor", "tiger", "copper",
         "meadow", "rocket", "violet", "glacier", "pepper", "castle", "walnut", "saddle", "comet", "ribbon"]
COLORS = ["red", "blue", "green", "yellow", "purple", "white", "black", "brown"]


@dataclass(frozen=True)
class Probe:
    """One prompt to record: ids ``(1, T)``, labels (one string per token) and what the metrics need."""

    name: str
    input_ids: Tensor
    labels: tuple[str, ...]
    spec: ProbeSpec = ProbeSpec()
    needle_pos: Tensor | None = None
    answer_rows: Tensor | None = None
    logits_rows: int = 1
    info: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


def token_labels(tok, ids: list[int]) -> tuple[str, ...]:
    """Readable per-token strings (decoded one by one, so byte-level spaces show as spaces)."""
    return tuple(tok.decode([i]) for i in ids)


def _encode(tok, text: str, max_tokens: int | None = None):
    enc = tok(text, return_offsets_mapping=True, truncation=max_tokens is not None, max_length=max_tokens)
    return enc["input_ids"], enc["offset_mapping"]


def text_probe(tok, text: str = TEXT, max_tokens: int | None = None, name: str = "text") -> Probe:
    ids, _ = _encode(tok, text, max_tokens)
    return Probe(name, torch.tensor([ids]), token_labels(tok, ids), ProbeSpec(), info={"text": text[:2000]})


def _ordinary_ids(tok, rng: random.Random, n: int) -> list[int]:
    special = set(tok.all_special_ids)
    V = len(tok)
    lo = min(1000, V // 10)
    if V - lo - len(special & set(range(lo, V))) < n:
        raise ValueError(f"the tokenizer has {V} tokens: too few to draw {n} distinct ordinary ids "
                         f"(ids {lo}..{V - 1} without the special ones)")
    out: list[int] = []
    while len(out) < n:
        i = rng.randrange(lo, V)
        if i not in special and i not in out:
            out.append(i)
    return out


def _with_specials(tok, ids: list[int]) -> list[int]:
    """``ids`` wrapped in the special tokens the tokenizer adds to any text (BOS, [CLS] ... [SEP])."""
    probe = tok("a")["input_ids"]
    special = set(tok.all_special_ids)
    lead = 0
    while lead < len(probe) and probe[lead] in special:
        lead += 1
    trail = len(probe)
    while trail > lead and probe[trail - 1] in special:
        trail -= 1
    return probe[:lead] + ids + probe[trail:]


def induction_probe(tok, n: int = 40, seed: int = 0) -> Probe:
    """Random tokens ``x`` (no repeats within x), then ``x`` again, inside the tokenizer's special tokens."""
    x = _ordinary_ids(tok, random.Random(seed), n)
    ids = _with_specials(tok, x + x)
    return Probe("induction", torch.tensor([ids]), token_labels(tok, ids), ProbeSpec(tokens=tuple(ids)),
                 info={"repeat_len": n, "seed": seed})


def _span_tokens(offsets, start: int, end: int) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]


def retrieval_probe(tok, filler_sentences: int = 12, needle_words: int = 6, seed: int = 0) -> Probe:
    """Needle-copy prompt: haystack + needle + question + the needle copied as the answer (teacher-forced)."""
    rng = random.Random(seed)
    words = " ".join(rng.sample(NOUNS, needle_words))
    hay = [FILLER[i % len(FILLER)] for i in range(filler_sentences)]
    mid = len(hay) // 2
    before, after = " ".join(hay[:mid]), " ".join(hay[mid:])
    needle = f"The secret words are: {words}."
    prefix = f"{before} {needle} {after}\nQuestion: What are the secret words?\nAnswer: The secret words are: "
    text = prefix + words
    ids, offsets = _encode(tok, text)
    n0 = len(before) + 1 + len("The secret words are: ")
    needle_tok = _span_tokens(offsets, n0, n0 + len(words))
    ans_tok = _span_tokens(offsets, len(prefix), len(text))
    needle_ids = {ids[i] for i in needle_tok}
    rows = [i - 1 for i in ans_tok if ids[i] in needle_ids]
    # logits only from the first answer row on: the score reads predictions there, and all T rows would
    # cost T x vocab (Gemma 3's 262k vocabulary: 1 MiB per row)
    keep = len(ids) - min(rows) if rows else 1
    return Probe("retrieval", torch.tensor([ids]), token_labels(tok, ids), ProbeSpec(),
                 needle_pos=torch.tensor(needle_tok), answer_rows=torch.tensor(rows), logits_rows=keep,
                 info={"needle": words, "needle_tokens": len(needle_tok), "answer_rows": len(rows)})


def basin_probe(tok, items: int = 16, seed: int = 0) -> Probe:
    """Numbered items of the same form, then a question; the profile is read on the question's rows."""
    rng = random.Random(seed)
    lines = [f"Box {i + 1} holds a {rng.choice(COLORS)} {rng.choice(NOUNS)}." for i in range(items)]
    context = " ".join(lines)
    question = f"\nQuestion: which box holds the {rng.choice(NOUNS)}?"
    ids, offsets = _encode(tok, context + question)
    ctx = next((i for i, (a, b) in enumerate(offsets) if b > a and a >= len(context)), len(ids))
    return Probe("basin", torch.tensor([ids]), token_labels(tok, ids), ProbeSpec(context_len=ctx),
                 info={"items": items, "context_tokens": ctx})


def lookback_probe(model, tok, new_tokens: int = 16, text: str | None = None) -> Probe:
    """A passage plus an instruction, then ``new_tokens`` tokens the model generates greedily."""
    passage = text or (TEXT + "\nIn one sentence, what did the town talk about?\n")
    ids = tok(passage, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)
    N = ids.shape[1]
    return Probe("lookback", full, token_labels(tok, full[0].tolist()), ProbeSpec(context_len=N),
                 info={"context_tokens": N, "generated": tok.decode(full[0, N:].tolist())})


def build_probes(names: list[str], model, tok, causal: bool, text: str | None = None,
                 max_tokens: int | None = None, seed: int = 0) -> list[Probe]:
    """The named probes for this model (retrieval and lookback need a causal LM and are skipped otherwise)."""
    out = []
    for raw in names:
        name = ALIASES.get(raw, raw)
        if name not in PROBES:
            raise ValueError(f"unknown probe {raw!r}; choose from {', '.join(PROBES + tuple(ALIASES))}")
        if any(p.name == name for p in out):
            continue
        if name in ("retrieval", "lookback") and not causal:
            continue
        if name == "text":
            out.append(text_probe(tok, text or TEXT, max_tokens))
        elif name == "induction":
            out.append(induction_probe(tok, seed=seed))
        elif name == "retrieval":
            out.append(retrieval_probe(tok, seed=seed))
        elif name == "basin":
            out.append(basin_probe(tok, seed=seed))
        else:
            out.append(lookback_probe(model, tok))
    return out
