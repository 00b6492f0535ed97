"""Tasks that training-free attention interventions target, generated offline and seeded, sized in the model's
own tokens.

Every generator takes a tokenizer, a length in tokens and a seed and returns a :class:`TaskSample` (a
:class:`attnlab.plans.tasks.Sample` with a few more fields), so the scoring runner treats these like the
long-context tasks of :mod:`attnlab.plans.tasks`:

* ``mdqa``     -- multi-document QA (lost in the middle): ``docs`` short documents, each stating the capital of
  a different fictional country; the question asks one of them. ``depth`` is the gold document's position,
  0.0 = the first document, 1.0 = the last (:func:`position_sweep` puts it at every position);
* ``faithful`` -- context faithfulness: the passage states a counterfactual capital of a real country the model
  knows (:data:`FACTS`); the sample scores the context's answer and keeps the model's prior answer in
  ``prior`` (:meth:`TaskSample.score_prior`), so a runner reports faithful and prior rates;
* ``icl_cls``  -- in-context classification: ``shots`` labelled reviews (half positive, half negative), the labels
  two arbitrary words whose assignment is drawn per sample, so it can only be read from the demonstrations;
* ``icl_map``  -- in-context word mapping: words of ``classes`` categories (animals, fruits, ...) each mapped to an
  arbitrary label word, ``shots`` pairs shown (balanced over the classes); the query is a held-out word;
* ``toolcall`` -- extraction into a fixed format: after a worked example, a shop log of ``records`` purchases; the
  one asked about is written as ``call(name="<customer>", value=<amount>)`` (exact score, and a field-level
  :meth:`~TaskSample.partial`);
* ``planted``  -- a report, then a one-sentence summary that either restates one of its facts (supported, label 0)
  or swaps that fact for a value found nowhere in the report (planted, label 1). ``span`` marks the summary's
  tokens (what Lookback Lens reads; the context is everything before it); the prompt ends with a yes/no question
  whether the summary is supported, which is what the plain model answers.

The haystack tasks (mdqa, faithful, planted) are *exactly* ``length`` tokens (whole filler sentences with the
needles between them, the last sentence cut to fit); icl_cls, icl_map and toolcall are as long as their
demonstrations and log, and ``length`` is their cap. ``chat=True`` wraps the request in the tokenizer's chat
template (an instruction-tuned model's user turn; the answer cue opens the assistant's turn).

:func:`make` draws ``n`` samples of a task; ``split="val"`` draws from a stream disjoint from ``"test"`` (for fitting
an intervention's knobs). :func:`solvability` checks that the plain model solves a task above chance, by a
one-sided exact binomial test (:func:`binomial_test`).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..plans.tasks import Sample, _enc, _essay, _wants_bos

TASKS = ("mdqa", "faithful", "icl_cls", "icl_map", "toolcall", "planted")
SPLITS = ("test", "val")
#: prompt length (tokens) each task is checked at; the in-context tasks' cap
DEFAULT_LENGTHS = {"mdqa": 1024, "faithful": 256, "icl_cls": 512, "icl_map": 512, "toolcall": 384, "planted": 384}
#: significance level of the solvability test
ALPHA = 0.05
SOLVABILITY_TEST = "one-sided exact binomial test of accuracy > chance"

_MARK = "\x00attnlab-user\x00"  # stands for the user's text when splitting a chat template


@dataclass(frozen=True)
class TaskSample(Sample):
    """A :class:`~attnlab.plans.tasks.Sample` with what these tasks add.

    ``mode`` (besides the base class's ``"all"`` / ``"recall"``): ``"first"`` -- the first of ``choices`` named in
    the continuation must be ``answers[0]``; ``"call"`` -- the continuation must start with the tool call
    ``answers[0]`` exactly.
    """

    choices: tuple[str, ...] = ()  # closed-set tasks: the candidates the continuation is read against
    prior: str | None = None  # faithful: the answer the model knows (the context says otherwise)
    label: int | None = None  # planted: 1 = the summary holds a planted (unsupported) claim, 0 = supported
    span: tuple[int, int] | None = None  # planted: [start, end) of the summary's tokens in ids
    fields: tuple[tuple[str, str], ...] = ()  # toolcall: (field, expected value) pairs
    shots: int | None = None  # icl tasks: demonstrations in the prompt
    chance: float = 0.0  # accuracy of a guess (see the task's docstring)
    split: str = "test"

    def score(self, text: str) -> float:
        """1.0 when the continuation ``text`` gives the answer (the rule depends on ``mode``), else 0.0."""
        if self.mode == "first":
            return float(first_named(text, self.choices) == self.answers[0])
        if self.mode == "call":
            return float(text.strip().startswith(self.answers[0]))
        return super().score(text)

    def score_prior(self, text: str) -> float:
        """faithful: 1.0 when the first answer named is the model's prior (not the context's)."""
        if self.prior is None:
            raise ValueError(f"task {self.task!r} has no prior answer (only 'faithful' does)")
        return float(first_named(text, self.choices) == self.prior)

    def partial(self, text: str) -> float:
        """toolcall: the fraction of fields right in the first ``name=...`` / ``value=...`` found, whatever the
        format around them; other tasks: :meth:`score`."""
        if not self.fields:
            return self.score(text)
        right = 0
        for key, want in self.fields:
            m = re.search(rf'\b{key}\s*=\s*"?([^",)\n]*)', text)
            got = m.group(1).strip() if m else None
            if got is not None and (got.lower() == want.lower() if not want.isdigit() else _num(got) == int(want)):
                right += 1
        return right / len(self.fields)

    @property
    def lookback_ids(self) -> tuple[int, ...]:
        """planted: the context and the summary (``ids[:span[1]]``), without the question that follows."""
        if self.span is None:
            raise ValueError(f"task {self.task!r} has no summary span (only 'planted' does)")
        return self.ids[: self.span[1]]


def _num(s: str) -> int | None:
    s = s.replace(",", "")
    return int(s) if s.isdigit() else None


def first_named(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate named earliest in ``text`` (whole words, case-insensitive; at one position the longest), or
    None when none is named."""
    best: tuple[int, int, str] | None = None
    for c in candidates:
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(c)}(?![A-Za-z0-9])", text, re.IGNORECASE)
        if m and (best is None or (m.start(), -len(c)) < best[:2]):
            best = (m.start(), -len(c), c)
    return None if best is None else best[2]


# ---------------------------------------------------------------------------------------------------------
# prompt framing
# ---------------------------------------------------------------------------------------------------------
def _frame(tok: Any, chat: bool) -> tuple[list[int], list[int]]:
    """Ids before and after the user's text: none for a plain prompt; the chat template's user turn and the
    assistant's generation prompt for ``chat`` (without the BOS, which :func:`_bos` adds where the tokenizer
    wants one)."""
    if not chat:
        return [], []
    if not getattr(tok, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template; this tokenizer has none")
    text = tok.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True, tokenize=False)
    pre, post = text.split(_MARK)
    bos = getattr(tok, "bos_token", None)
    if bos and _wants_bos(tok) and pre.startswith(bos):
        pre = pre[len(bos):]
    return _enc(tok, pre), _enc(tok, post)


def _bos(tok: Any) -> list[int]:
    return [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None and _wants_bos(tok) else []


def _fill(tok: Any, room: int, needles: list[tuple[float, str]], rng: random.Random, min_room: int = 8) -> list[int]:
    """Filler sentences (:func:`attnlab.plans.tasks._essay`) with ``needles`` between them at relative depths,
    exactly ``room`` tokens. Needles sit at sentence boundaries (0.0: before the first sentence, 1.0: after the
    last); only the last filler sentence is cut, to fit."""
    placed = [(d, _enc(tok, s)) for d, s in sorted(needles, key=lambda x: x[0])]
    free = room - sum(len(x) for _, x in placed)
    if free < min_room:
        raise ValueError(f"length is too short for this task by {min_room - free} tokens")
    sents: list[list[int]] = []
    used = 0
    while used < free:
        s = _enc(tok, _essay(rng, 1)[0])[: free - used]
        sents.append(s)
        used += len(s)
    out: list[int] = []
    pos = 0
    for depth, ids in placed:
        cut = round(depth * len(sents))
        out += [t for s in sents[pos:cut] for t in s] + ids
        pos = max(pos, cut)
    return out + [t for s in sents[pos:] for t in s]


def _haystack(tok: Any, length: int, head: str, needles: list[tuple[float, str]], question: str, cue: str,
              rng: random.Random, chat: bool, after: list[int] | None = None) -> tuple[list[int], int]:
    """``[BOS] frame head | filler with needles | [after] question frame cue``, exactly ``length`` tokens.
    Returns the ids and where ``after`` starts."""
    pre, post = _frame(tok, chat)
    start = _bos(tok) + pre + _enc(tok, head)
    tail = (after or []) + _enc(tok, question) + post + _enc(tok, cue.lstrip() if chat else cue)
    body = _fill(tok, length - len(start) - len(tail), needles, rng)
    ids = start + body + tail
    assert len(ids) == length
    return ids, len(start) + len(body)


def _short(tok: Any, length: int, head: str, body: str, cue: str, chat: bool) -> list[int]:
    """``[BOS] frame head body frame cue`` with no filler; ``length`` is a cap."""
    pre, post = _frame(tok, chat)
    ids = _bos(tok) + pre + _enc(tok, head + body) + post + _enc(tok, cue.lstrip() if chat else cue)
    if len(ids) > length:
        raise ValueError(f"length {length} is too short for this prompt ({len(ids)} tokens); raise length or "
                         "lower shots")
    return ids


# ---------------------------------------------------------------------------------------------------------
# synthetic names
# ---------------------------------------------------------------------------------------------------------
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st",
           "tr", "sh", "th", "pl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CITY_ENDS = ("ton", "burg", "ville", "grad", "mar", "port")


def _word(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def _names(rng: random.Random, n: int, make: Callable[[], str], taken: Sequence[str] = (),
           tok: Any = None) -> list[str]:
    """``n`` names from ``make``, none a substring of another or of ``taken`` (so scoring by substring is exact);
    with ``tok``, each also ends in a token of its own (so the token before "is" in "The capital of <name> is"
    tells the names apart, as it would for real names)."""
    out: list[str] = []
    last: set[int] = set()
    while len(out) < n:
        w = make()
        low = w.lower()
        end = _enc(tok, " " + w)[-1] if tok is not None else None
        if all(low not in o.lower() and o.lower() not in low for o in [*out, *taken]) and end not in last:
            out.append(w)
            if end is not None:
                last.add(end)
    return out


def _country(rng: random.Random) -> str:
    return _word(rng, 3).capitalize()


def _city(rng: random.Random) -> str:
    return (_word(rng) + rng.choice(_CITY_ENDS)).capitalize()


def _spread(i: int, n: int) -> float:
    return 0.05 + 0.9 * (i + 0.5) / n


def _rng(task: str, split: str, seed: Any, *extra: Any) -> random.Random:
    # a str seed goes through sha512: the same on every run and platform; the split keeps the streams apart
    return random.Random("-".join(str(x) for x in (task, split, seed, *extra)))


# ---------------------------------------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------------------------------------
def mdqa(tok: Any, length: int = DEFAULT_LENGTHS["mdqa"], seed: Any = 0, depth: float | None = None, *,
         docs: int = 10, split: str = "test", chat: bool = False) -> TaskSample:
    """Multi-document QA: ``docs`` documents ``Document [i] (Title: <country>) The capital of <country> is <city>.``
    each followed by filler; the question asks the capital of the gold document's country. ``depth`` in [0, 1]
    picks the gold document ``round(depth * (docs - 1))`` (the sample's ``depth`` is that index / (docs - 1)).
    Score: the gold city appears in the continuation (containment). Chance: 1 / docs (one document's city)."""
    if docs < 2:
        raise ValueError(f"docs must be >= 2, got {docs}")
    rng = _rng("mdqa", split, seed, docs)
    countries = _names(rng, docs, lambda: _country(rng), tok=tok)
    cities = _names(rng, docs, lambda: _city(rng), taken=countries)
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    gold = round(depth * (docs - 1))
    needles = [(i / docs, f"\nDocument [{i + 1}] (Title: {c}) The capital of {c} is {city}. ")
               for i, (c, city) in enumerate(zip(countries, cities))]
    head = "Answer the question using the documents below. Each document is about a different country.\n"
    question = f"\n\nQuestion: What is the capital of {countries[gold]}?"
    cue = f"\nAnswer: The capital of {countries[gold]} is"
    ids, _ = _haystack(tok, length, head, needles, question, cue, rng, chat)
    return TaskSample("mdqa", tuple(ids), (cities[gold],), length, gold / (docs - 1), 8,
                      chance=1.0 / docs, split=split)


#: (country, capital) pairs for ``faithful``: the 52 of 70 candidates both SmolLM2-135M-Instruct and Gemma 3 270M
#: name closed-book, by :func:`known_facts` (the UK, Israel and Mexico left out: a shared or disputed capital, or
#: one containing the country's name)
FACTS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Argentina", "Buenos Aires"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
    ("Peru", "Lima"), ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Vietnam", "Hanoi"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Chile", "Santiago"), ("Nigeria", "Abuja"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("Czech Republic", "Prague"), ("Saudi Arabia", "Riyadh"), ("England", "London"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Taiwan", "Taipei"), ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Ethiopia", "Addis Ababa"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"), ("Afghanistan", "Kabul"),
    ("Jamaica", "Kingston"),
)


def fact_split(country: str) -> str:
    """Which split a fact belongs to: a fixed hash of the country puts about a quarter in ``"val"``."""
    return "val" if hashlib.sha1(country.encode()).digest()[0] % 4 == 0 else "test"


def faithful(tok: Any, length: int = DEFAULT_LENGTHS["faithful"], seed: Any = 0, depth: float | None = None, *,
             facts: Sequence[tuple[str, str]] | None = None, hint: bool = True, split: str = "test",
             chat: bool = False) -> TaskSample:
    """Context faithfulness: a passage of filler states ``The capital of <country> is <other capital>.`` for a
    real country (from ``facts``, default :data:`FACTS`, restricted to the split's facts by :func:`fact_split`);
    the question asks the capital -- ``hint``: "according to the text" (instruction, question and answer cue);
    without it the request is a plain question, where the prior competes harder. Score: the first capital named
    is the context's; ``prior`` holds the real one. Chance: 0.5 (a coin between the two)."""
    facts = FACTS if facts is None else tuple(facts)
    pool = [f for f in facts if fact_split(f[0]) == split]
    if not pool:
        raise ValueError(f"no fact of split {split!r} among the {len(facts)} facts given")
    rng = _rng("faithful", split, seed)
    country, prior = rng.choice(pool)
    others = sorted({c for _, c in (*facts, *FACTS)} - {prior})
    context = rng.choice(others)
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    needle = f"The capital of {country} is {context}. "
    if hint:
        head = "Read the text and answer the question according to the text.\n\n"
        question = f"\n\nQuestion: According to the text, what is the capital of {country}?"
        cue = f"\nAnswer: According to the text, the capital of {country} is"
    else:
        head = "Read the text and answer the question.\n\n"
        question = f"\n\nQuestion: What is the capital of {country}?"
        cue = f"\nAnswer: The capital of {country} is"
    ids, _ = _haystack(tok, length, head, [(depth, needle)], question, cue, rng, chat)
    return TaskSample("faithful", tuple(ids), (context,), length, depth, 6, mode="first", choices=(context, prior),
                      prior=prior, chance=0.5, split=split)


_POS = ("wonderful", "excellent", "delicious", "lovely", "delightful", "fantastic", "superb", "pleasant",
        "brilliant", "charming")
_NEG = ("terrible", "awful", "disgusting", "horrible", "dreadful", "boring", "nasty", "miserable", "rude",
        "dull")
_ITEMS = ("meal", "movie", "hotel", "concert", "trip", "book", "service", "party", "game", "show", "room", "play")
_LABEL_WORDS = ("foo", "bar", "zip", "zap", "blick", "dax", "wug", "toma", "fep", "lorp", "kiki", "bouba")


def _balanced(rng: random.Random, classes: int, shots: int) -> list[int]:
    """Class of each demonstration: every class ``shots // classes`` times (the remainder to distinct classes),
    in random order."""
    order = [c for c in range(classes) for _ in range(shots // classes)]
    order += rng.sample(range(classes), shots % classes)
    rng.shuffle(order)
    return order


def icl_cls(tok: Any, length: int = DEFAULT_LENGTHS["icl_cls"], seed: Any = 0, depth: float | None = None, *,
            shots: int = 16, target: int | None = None, split: str = "test", chat: bool = False) -> TaskSample:
    """In-context classification: ``shots`` reviews ``The <item> was <adjective>.`` labelled with two arbitrary
    words (positive -> one, negative -> the other, drawn per sample; the instruction names both in random
    order), balanced; the query review is none of the demonstrations and has class ``target`` (0 positive,
    1 negative; None: drawn). Score: the first label word named. Chance: 0.5."""
    if not 0 <= shots <= 100:
        raise ValueError(f"shots must lie in [0, 100], got {shots}")
    rng = _rng("icl_cls", split, seed)
    words = rng.sample(_LABEL_WORDS, 2)  # words[0] labels positive reviews
    target = rng.randrange(2) if target is None else target
    query = f"The {rng.choice(_ITEMS)} was {rng.choice((_POS, _NEG)[target])}."
    # demonstrations are drawn after the query and by a stream of their own, so a sample's first k demos are the
    # same whatever shots is (a k sweep changes only how many are shown)
    drng = _rng("icl_cls-demos", split, seed)
    pool: list[tuple[str, int]] = []
    while len(pool) < 2 * max(shots, 1):
        cls = len(pool) % 2
        s = f"The {drng.choice(_ITEMS)} was {drng.choice((_POS, _NEG)[cls])}."
        if s != query and s not in (p for p, _ in pool):
            pool.append((s, cls))
    by_cls = [[p for p in pool if p[1] == c] for c in (0, 1)]
    demos = [by_cls[c].pop(0) for c in _balanced(_rng("icl_cls-order", split, seed, shots), 2, shots)]
    shown = rng.sample(words, 2)
    head = f"Label each review as {shown[0]} or {shown[1]}.\n\n"
    body = "".join(f"Review: {s}\nLabel: {words[c]}\n\n" for s, c in demos) + f"Review: {query}\n"
    ids = _short(tok, length, head, body, "Label:", chat)
    return TaskSample("icl_cls", tuple(ids), (words[target],), len(ids), 0.0, 4, mode="first",
                      choices=tuple(words), shots=shots, chance=0.5, split=split)


_CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "mouse", "bear", "wolf", "goat"),
    "fruit": ("apple", "banana", "orange", "grape", "lemon", "cherry", "peach", "pear", "mango", "plum", "melon"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "gray"),
    "number": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    "body": ("hand", "foot", "nose", "ear", "eye", "arm", "leg", "knee", "elbow", "mouth"),
}


def icl_map(tok: Any, length: int = DEFAULT_LENGTHS["icl_map"], seed: Any = 0, depth: float | None = None, *,
            shots: int = 12, classes: int = 3, target: int | None = None, split: str = "test",
            chat: bool = False) -> TaskSample:
    """In-context word mapping: ``classes`` categories (of animals, fruits, colours, numbers, body parts) each
    mapped to an arbitrary label word; ``shots`` pairs ``<word> -> <label>`` balanced over the classes; the
    query is a word not shown, of class ``target`` (None: drawn). Score: the first label word named.
    Chance: 1 / classes."""
    if not 2 <= classes <= len(_CATEGORIES):
        raise ValueError(f"classes must lie in [2, {len(_CATEGORIES)}], got {classes}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    rng = _rng("icl_map", split, seed, classes)
    cats = rng.sample(sorted(_CATEGORIES), classes)
    labels = rng.sample(_LABEL_WORDS, classes)
    target = rng.randrange(classes) if target is None else target
    pools = [rng.sample(_CATEGORIES[c], len(_CATEGORIES[c])) for c in cats]
    query = pools[target].pop()  # held out: never a demonstration
    need = [0] * classes
    order = _balanced(_rng("icl_map-order", split, seed, shots, classes), classes, shots)
    for c in order:
        need[c] += 1
    if any(need[c] > len(pools[c]) for c in range(classes)):
        raise ValueError(f"shots={shots} needs more distinct words per class than there are; lower shots")
    demos = [pools[c][sum(1 for x in order[:i] if x == c)] for i, c in enumerate(order)]
    shown = rng.sample(labels, classes)
    head = f"Each word maps to one of the labels {', '.join(shown)}.\n\n"
    body = "".join(f"{w} -> {labels[c]}\n" for w, c in zip(demos, order)) + f"{query} ->"
    ids = _short(tok, length, head, body, "", chat)
    return TaskSample("icl_map", tuple(ids), (labels[target],), len(ids), 0.0, 4, mode="first",
                      choices=tuple(labels), shots=shots, chance=1.0 / classes, split=split)


_GOODS = ("lamp", "chair", "kettle", "bicycle", "clock", "mirror", "blanket", "teapot", "guitar", "backpack",
          "helmet", "umbrella", "camera", "toaster", "wallet", "violin", "tent", "ladder", "basket", "hammock")
_ADJS = ("blue", "red", "green", "black", "orange", "purple", "golden", "silver", "yellow", "brown")


_FIRST = ("Maria", "John", "Aisha", "Pedro", "Yuki", "Olga", "Kwame", "Lena", "Omar", "Grace", "Ivan", "Sofia",
          "Raj", "Nora", "Diego", "Hana", "Felix", "Zara", "Tomas", "Mei")
_LAST = ("Lopez", "Baker", "Khan", "Silva", "Tanaka", "Petrov", "Mensah", "Fischer", "Haddad", "Okafor",
         "Novak", "Rossi", "Patel", "Berg", "Castro", "Kim", "Weber", "Ali", "Horvat", "Chen")
# the worked example's names and items, none of which a sample draws
_TOOL_EXAMPLE = (
    "Example:\nShop log:\nThe pink vase was bought by Ann Lee for 37 dollars.\n"
    "The gray desk was bought by Tim Cole for 82 dollars.\nThe white rug was bought by Eve Moss for 59 dollars.\n"
    'Who bought the pink vase, and for how much?\nTool call: call(name="Ann Lee", value=37)\n'
    'Who bought the white rug, and for how much?\nTool call: call(name="Eve Moss", value=59)\n\n'
)


def _real_names(rng: random.Random, n: int) -> list[str]:
    return [f"{f} {la}" for f, la in zip(rng.sample(_FIRST, n), rng.sample(_LAST, n))]


def toolcall(tok: Any, length: int = DEFAULT_LENGTHS["toolcall"], seed: Any = 0, depth: float | None = None, *,
             records: int = 5, split: str = "test", chat: bool = False) -> TaskSample:
    """Extraction into a fixed format: after a worked example (a 3-line log, two of its purchases written as
    calls), a shop log of ``records`` lines ``The <colour> <item> was bought by <customer> for <amount>
    dollars.``; asked about one item (record ``round(depth * (records - 1))``), the answer is ``call(name="<customer>",
    value=<amount>)``. Score: the continuation starts with exactly that call; :meth:`TaskSample.partial` scores
    the fields. Chance: 1 / records (one record's fields copied). ``length`` is a cap."""
    if not 1 <= records <= len(_ADJS):
        raise ValueError(f"records must lie in [1, {len(_ADJS)}], got {records}")
    rng = _rng("toolcall", split, seed, records)
    goods = [f"{a} {g}" for a, g in zip(rng.sample(_ADJS, records), rng.sample(_GOODS, records))]
    people = _real_names(rng, records)
    amounts = rng.sample(range(11, 1000), records)
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    gold = round(depth * (records - 1))
    head = 'Answer with a tool call written exactly as call(name="<customer>", value=<amount>).\n\n'
    body = _TOOL_EXAMPLE + "Shop log:\n" + "".join(
        f"The {g} was bought by {p} for {a} dollars.\n" for g, p, a in zip(goods, people, amounts))
    body += f"Who bought the {goods[gold]}, and for how much?\n"
    ids = _short(tok, length, head, body, "Tool call:", chat)
    call = f'call(name="{people[gold]}", value={amounts[gold]})'
    new = len(_enc(tok, " " + call)) + 2  # the call and a little slack; a longer continuation can't score more
    return TaskSample("toolcall", tuple(ids), (call,), len(ids), gold / max(records - 1, 1), new, mode="call",
                      fields=(("name", people[gold]), ("value", str(amounts[gold]))), chance=1.0 / records,
                      split=split)


# two worked examples (one supported, one planted), naming no day or number a sample's claims could use
_PLANTED_EXAMPLES = (
    "Check whether each summary is supported by its report.\n\n"
    "Report: The fair in Dunbridge was organized by Ann Lee. The first prize went to Tom Hart.\n"
    "Summary: The fair was organized by Ann Lee.\n"
    "Question: Is every fact in the summary stated in the report? Answer yes or no.\nAnswer: yes\n\n"
    "Report: The race in Millford was organized by Eve Moss. The first prize went to Sam Reed.\n"
    "Summary: The first prize of the race went to Bob Stone.\n"
    "Question: Is every fact in the summary stated in the report? Answer yes or no.\nAnswer: no\n\n"
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_EVENTS = ("festival", "fair", "race", "concert", "market", "contest")


def planted(tok: Any, length: int = DEFAULT_LENGTHS["planted"], seed: Any = 0, depth: float | None = None, *,
            label: int | None = None, split: str = "test", chat: bool = False) -> TaskSample:
    """A report of four facts about an event (organizer, day, visitors, winner) spread through filler, then
    ``Summary: <one of the facts>.`` -- restated (``label`` 0, supported) or with its value swapped for one the
    report never mentions (``label`` 1, planted; None: drawn). ``span`` holds the summary's tokens. The prompt
    ends asking whether the summary is supported; the answer is ``yes`` (0) or ``no`` (1). Chance: 0.5."""
    rng = _rng("planted", split, seed)
    label = rng.randrange(2) if label is None else label
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (supported), 1 (planted) or None, got {label}")
    event, town = rng.choice(_EVENTS), _city(rng)
    organizer, winner, fake_person = _real_names(rng, 3)
    day, fake_day = rng.sample(_DAYS, 2)
    visitors, fake_visitors = rng.sample(range(120, 990, 10), 2)
    facts = [
        (f"The {event} in {town} was organized by {organizer}. ", "The {e} was organized by {v}.", organizer,
         fake_person),
        (f"It took place on a {day}. ", "The {e} took place on a {v}.", day, fake_day),
        (f"About {visitors} people came. ", "About {v} people came to the {e}.", str(visitors), str(fake_visitors)),
        (f"The first prize went to {winner}. ", "The first prize of the {e} went to {v}.", winner, fake_person),
    ]
    asked = rng.randrange(len(facts))
    depths = sorted(rng.uniform(0.05, 0.95) for _ in facts)
    _, claim, true, fake = facts[asked]
    summary = "\nSummary: " + claim.format(e=event, v=fake if label else true)
    head = _PLANTED_EXAMPLES + "Report: "
    question = "\nQuestion: Is every fact in the summary stated in the report? Answer yes or no."
    cue = "\nAnswer:"
    ids, start = _haystack(tok, length, head, [(d, f[0]) for d, f in zip(depths, facts)], question, cue, rng, chat,
                           after=_enc(tok, summary))
    span = (start, start + len(_enc(tok, summary)))
    return TaskSample("planted", tuple(ids), ("no" if label else "yes",), length, depths[asked], 3, mode="first",
                      choices=("yes", "no"), label=label, span=span, chance=0.5, split=split)


GENERATORS: dict[str, Callable[..., TaskSample]] = {
    "mdqa": mdqa, "faithful": faithful, "icl_cls": icl_cls, "icl_map": icl_map, "toolcall": toolcall,
    "planted": planted,
}


def _check(task: str, n: int, split: str) -> None:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def make(tok: Any, task: str, length: int | None = None, n: int = 20, seed: int = 0, split: str = "test", *,
         chat: bool = False, **options: Any) -> list[TaskSample]:
    """``n`` seeded samples of ``task``.

    Args:
        tok: the model's tokenizer (prompts are built from its tokens).
        task: one of :data:`TASKS`.
        length: prompt length in tokens (None: :data:`DEFAULT_LENGTHS`); exact for the haystack tasks, a cap for
            ``icl_cls`` / ``icl_map``.
        n: samples; sample ``i`` is generated from seed ``f"{seed}-{i}"``.
        seed: the same (tok, task, length, n, seed, split, options) give the same samples.
        split: ``"test"`` or ``"val"`` (a disjoint stream: another rng key, and for ``faithful`` other facts).
        chat: wrap the request in the tokenizer's chat template.
        options: the task's keywords (``docs``, ``shots``, ``classes``, ``records``, ``facts``, ``depth``).
    Balance: mdqa's gold document and toolcall's record cycle over every position; the needle tasks' depths spread
    evenly over 5%..95%; icl queries cycle over the classes and planted labels alternate (0, 1, 0, ...).
    Raises: ValueError for an unknown task or split, n < 1, a length too short for the prompt, bad options.
    """
    _check(task, n, split)
    length = DEFAULT_LENGTHS[task] if length is None else length
    gen = GENERATORS[task]
    out = []
    for i in range(n):
        kw: dict[str, Any] = {"split": split, "chat": chat, **options}
        if task == "mdqa" and "depth" not in options:
            docs = options.get("docs", 10)
            kw["depth"] = (i % docs) / (docs - 1) if docs > 1 else 0.0
        elif task == "toolcall" and "depth" not in options:
            records = options.get("records", 5)
            kw["depth"] = (i % records) / (records - 1) if records > 1 else 0.0
        elif task in ("faithful", "planted") and "depth" not in options:
            kw["depth"] = _spread(i, n)
        if task == "icl_cls":
            kw.setdefault("target", i % 2)
        elif task == "icl_map":
            kw.setdefault("target", i % options.get("classes", 3))
        elif task == "planted":
            kw.setdefault("label", i % 2)
        out.append(gen(tok, length, seed=f"{seed}-{i}", **kw))
    return out


def position_sweep(tok: Any, length: int | None = None, per_position: int = 1, docs: int = 10, seed: int = 0,
                   split: str = "test", *, chat: bool = False) -> list[TaskSample]:
    """mdqa with the gold document at every position: ``per_position`` samples at each of the ``docs`` positions
    (depth ``j / (docs - 1)``: the first document is 0.0, the last 1.0), ordered by position."""
    _check("mdqa", per_position, split)
    length = DEFAULT_LENGTHS["mdqa"] if length is None else length
    return [mdqa(tok, length, seed=f"{seed}-sweep-{j}-{r}", depth=j / (docs - 1), docs=docs, split=split, chat=chat)
            for j in range(docs) for r in range(per_position)]


# ---------------------------------------------------------------------------------------------------------
# solvability
# ---------------------------------------------------------------------------------------------------------
def binomial_test(successes: int, n: int, chance: float) -> float:
    """One-sided exact binomial p-value: P[X >= successes] for X ~ Binomial(n, chance)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance must lie in [0, 1], got {chance}")
    return min(1.0, sum(math.comb(n, k) * chance**k * (1 - chance) ** (n - k) for k in range(successes, n + 1)))


def generate_text(model: Any, tok: Any, sample: Sample) -> str:
    """The plain model's greedy continuation of ``sample`` (its own cache, :func:`attnlab.plans.evaluate.
    dense_generate`), cut at the first end-of-sequence token."""
    import torch

    from ..plans.evaluate import dense_generate

    device = next(model.parameters()).device
    toks = dense_generate(model, torch.tensor([sample.ids], device=device), sample.max_new_tokens)["tokens"][0]
    stop = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    out = []
    for t in toks.tolist():
        if t in stop:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)


def summarize(samples: Sequence[TaskSample], texts: Sequence[str], alpha: float = ALPHA) -> dict[str, Any]:
    """Accuracy of ``texts`` on ``samples``, chance, and the :func:`binomial_test` verdict (solvable: p < alpha);
    faithful adds ``prior_rate``, toolcall ``partial``."""
    if len(samples) != len(texts) or not samples:
        raise ValueError(f"need one text per sample, got {len(samples)} samples and {len(texts)} texts")
    scores = [s.score(t) for s, t in zip(samples, texts)]
    n, correct = len(scores), int(round(sum(scores)))
    chance = sum(s.chance for s in samples) / n
    p = binomial_test(correct, n, chance)
    out: dict[str, Any] = {"task": samples[0].task, "n": n, "correct": correct, "accuracy": correct / n,
                           "chance": chance, "p_value": p, "solvable": p < alpha, "test": SOLVABILITY_TEST,
                           "alpha": alpha}
    if samples[0].prior is not None:
        out["prior_rate"] = sum(s.score_prior(t) for s, t in zip(samples, texts)) / n
    if samples[0].fields:
        out["partial"] = sum(s.partial(t) for s, t in zip(samples, texts)) / n
    return out


def solvability(model: Any, tok: Any, task: str, length: int | None = None, n: int = 20, seed: int = 0, *,
                alpha: float = ALPHA, split: str = "test", chat: bool = False, **options: Any) -> dict[str, Any]:
    """Whether the plain ``model`` solves ``task`` above chance: greedy continuations of :func:`make`'s samples,
    scored; ``solvable`` when the one-sided exact binomial test rejects accuracy = chance at ``alpha``.

    Returns: dict(task, length, n, correct, accuracy, chance, p_value, solvable, test, alpha, texts[, prior_rate]
    [, partial]).
    """
    samples = make(tok, task, length, n, seed, split, chat=chat, **options)
    texts = [generate_text(model, tok, s) for s in samples]
    out = summarize(samples, texts, alpha)
    out["length"] = DEFAULT_LENGTHS[task] if length is None else length
    out["texts"] = texts
    return out


def known_facts(model: Any, tok: Any, facts: Sequence[tuple[str, str]] = FACTS, *,
                chat: bool = False) -> list[tuple[str, str]]:
    """The (country, capital) pairs the plain model answers closed-book (``Question: What is the capital of X?
    Answer: The capital of X is``, greedy), for restricting ``faithful`` to a model's own knowledge."""
    out = []
    for country, capital in facts:
        ids = _short(tok, 10**9, f"Question: What is the capital of {country}?", "",
                     f"\nAnswer: The capital of {country} is", chat)
        probe = TaskSample("probe", tuple(ids), (capital,), len(ids), 0.0, 6)
        if probe.score(generate_text(model, tok, probe)):
            out.append((country, capital))
    return out


__all__ = ["ALPHA", "DEFAULT_LENGTHS", "FACTS", "GENERATORS", "SOLVABILITY_TEST", "SPLITS", "TASKS", "TaskSample",
           "binomial_test", "fact_split", "first_named", "generate_text", "known_facts", "make", "position_sweep",
           "solvability", "summarize", *TASKS]
