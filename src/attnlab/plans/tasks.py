"""Long-context tasks, generated offline and seeded, sized in the model's own tokens.

Every generator takes a tokenizer, a target length in tokens and a seed, and returns a :class:`Sample` whose
prompt is *exactly* ``length`` tokens (token lists of the pieces are concatenated; the haystack is cut to
fit), so plans are compared on identical inputs and the block-sparse plans are reused across samples.

Tasks (RULER / InfiniteBench style, written from their descriptions):

* ``passkey``   -- a 5-digit pass key hidden at a given depth in repeated filler text;
* ``niah``      -- single needle: "One of the special magic numbers for <word> is: <7 digits>." in a
  haystack of varied sentences; the question names the word;
* ``multikey``  -- several needles with different keys; one is asked (the others are distractors);
* ``multivalue`` -- RULER's multi-value needle: one key with 4 different 7-digit values at spread depths;
  asked for all of them (score: fraction of the values named);
* ``vartrack``  -- variable tracking: ``VAR A = 12345`` then a chain ``VAR B = VAR A`` ... hidden in noise;
  asked which variables hold the value (score: fraction of the chain named);
* ``cwe``       -- common words extraction: a numbered word list where a few words repeat often;
  asked for the most common words (score: recall of them);
* ``fwe``       -- frequent words extraction: coded words drawn from a Zipf law; asked for the 3 most frequent;
* ``kv``        -- key-value retrieval: a JSON object of random hex keys and values; asked the value of a key.

``Sample.score(text)`` maps the generated continuation to [0, 1].

:func:`depth_grid` places the needle of the single-depth tasks at every (length, depth) of a grid, from the
start of the haystack (0.0) to right before the question (1.0).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TASKS = ("passkey", "niah", "multikey", "vartrack", "cwe", "fwe", "kv", "multivalue")
#: tasks whose answer sits at one depth (multivalue: its first value's), the ones :func:`depth_grid` takes
DEPTH_TASKS = ("passkey", "niah", "multikey", "kv", "multivalue")
#: the whole context, with the last 2% (where recency-biased methods differ) sampled twice
DEFAULT_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.98, 1.0)
DEFAULT_LENGTHS = (1024, 2048, 4096)
FULL_LENGTHS = (1024, 2048, 4096, 8192)

_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_WORDS = (
    "apple river stone cloud maple tiger violin garden candle harbor silver meadow copper falcon lantern "
    "orchid pepper quartz saddle timber velvet walnut willow zephyr anchor basket cactus dagger ember fossil "
    "glacier hammer island jasmine kettle ladder magnet needle oyster pebble quiver ribbon spiral thistle "
    "umbrella valley wagon yonder zinnia beacon cobalt dune echo fjord grove heron ivory jungle kiwi lotus"
).split()
_SUBJECTS = ("The old library", "A quiet village", "The committee", "Every traveler", "The small museum",
             "Our neighbor", "The northern road", "A careful student", "The city council", "The ship's crew")
_VERBS = ("opened", "described", "visited", "repaired", "measured", "painted", "discussed", "ignored",
          "collected", "planned")
_OBJECTS = ("the eastern gate", "a long report", "the winter market", "several old maps", "the stone bridge",
            "a wooden cart", "the morning train", "the harvest plan", "a set of letters", "the river bank")
_TAILS = ("before noon.", "after the storm.", "with great care.", "for the third time.", "without a word.",
          "in the spring.", "as usual.", "near the hill.", "at dawn.", "during the festival.")


@dataclass(frozen=True)
class Sample:
    """One prompt: ``ids`` (exactly ``length`` token ids) and what a correct continuation contains."""

    task: str
    ids: tuple[int, ...]
    answers: tuple[str, ...]
    length: int
    depth: float
    max_new_tokens: int
    mode: str = "all"  # "all": every answer must appear; "recall": fraction of answers that appear

    def score(self, text: str) -> float:
        """1.0 when the continuation contains the answer(s); ``recall`` tasks score the fraction found."""
        found = [a for a in self.answers if _contains(text, a)]
        if self.mode == "recall":
            return len(found) / len(self.answers)
        return float(len(found) == len(self.answers))


def _contains(text: str, answer: str) -> bool:
    if answer.isdigit():
        return answer in re.sub(r"[\s,]", "", text)
    return answer.lower() in text.lower()


def _enc(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


class _Hay:
    """Token lists of haystack sentences, cycled to fill any number of tokens."""

    def __init__(self, tok: Any, sentences: list[str]) -> None:
        self.parts = [_enc(tok, s) for s in sentences]
        if not any(self.parts):  # take() would never fill (BERT's tokenizer encodes " " as nothing)
            raise ValueError(f"haystack {sentences[:3]!r} encodes to no tokens with this tokenizer")

    def take(self, n: int, start: int = 0) -> list[int]:
        out: list[int] = []
        i = start
        while len(out) < n:
            out.extend(self.parts[i % len(self.parts)])
            i += 1
        return out[:n]


def _essay(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)} "
            for _ in range(n)]


def _assemble(tok: Any, length: int, head: str | list[int], needles: list[tuple[float, str]], tail: str,
              hay: _Hay, min_room: int = 8) -> list[int]:
    """``head + haystack with needles at relative depths + tail``, exactly ``length`` tokens."""
    h = head if isinstance(head, list) else _enc(tok, head)
    t = _enc(tok, tail)
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None and _wants_bos(tok) else []
    needle_ids = [(d, _enc(tok, s)) for d, s in sorted(needles)]
    fixed = len(bos) + len(h) + len(t) + sum(len(x) for _, x in needle_ids)
    room = length - fixed
    if room < min_room or room < 0:
        raise ValueError(f"length {length} is too short for this task (needs at least {fixed + min_room} tokens)")
    filler = hay.take(room)
    out, pos = bos + h, 0
    for depth, ids in needle_ids:
        cut = int(round(depth * room))
        out += filler[pos:cut] + ids
        pos = cut
    out += filler[pos:] + t
    assert len(out) == length
    return out


def _wants_bos(tok: Any) -> bool:
    ids = tok("x")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def passkey(tok: Any, length: int, seed: int = 0, depth: float | None = None) -> Sample:
    rng = random.Random(f"passkey-{seed}-{length}")
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    head = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. " \
           "I will quiz you about the important information there.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    tail = "\nWhat is the pass key? The pass key is"
    ids = _assemble(tok, length, head, [(depth, needle)], tail, _Hay(tok, [_FILLER]))
    return Sample("passkey", tuple(ids), (key,), length, depth, 8)


def niah(tok: Any, length: int, seed: int = 0, depth: float | None = None, keys: int = 1) -> Sample:
    rng = random.Random(f"niah-{keys}-{seed}-{length}")
    words = rng.sample(_WORDS, keys)
    values = [str(rng.randint(1000000, 9999999)) for _ in words]
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    depths = [depth] + [rng.uniform(0.05, 0.95) for _ in words[1:]]
    needles = [(d, f"One of the special magic numbers for {w} is: {v}. ") for d, w, v in zip(depths, words, values)]
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them. " \
           "I will quiz you about the numbers afterwards.\n"
    tail = f"\nWhat is the special magic number for {words[0]} mentioned in the provided text? " \
           f"The special magic number for {words[0]} mentioned in the provided text is"
    hay = _Hay(tok, _essay(rng, 64))
    ids = _assemble(tok, length, head, needles, tail, hay)
    return Sample("multikey" if keys > 1 else "niah", tuple(ids), (values[0],), length, depth, 10)


def multikey(tok: Any, length: int, seed: int = 0, depth: float | None = None) -> Sample:
    return niah(tok, length, seed, depth, keys=4)


def multivalue(tok: Any, length: int, seed: int = 0, depth: float | None = None, values: int = 4) -> Sample:
    """One key with ``values`` different 7-digit values, asked for all of them (recall). The first sits at
    ``depth``, the others ``1 / values`` of the haystack apart from it and from each other (wrapping around),
    so every region of the context holds one: a method must keep several far-apart places."""
    rng = random.Random(f"multivalue-{values}-{seed}-{length}")
    word = rng.choice(_WORDS)
    vals = [str(v) for v in rng.sample(range(1000000, 10000000), values)]
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    depths = [depth] + [(depth + k / values) % 1.0 for k in range(1, values)]
    needles = [(d, f"One of the special magic numbers for {word} is: {v}. ") for d, v in zip(depths, vals)]
    head = "Some special magic numbers are hidden within the following text. Make sure to memorize them. " \
           "I will quiz you about the numbers afterwards.\n"
    tail = f"\nWhat are all the special magic numbers for {word} mentioned in the provided text? " \
           f"The special magic numbers for {word} mentioned in the provided text are"
    ids = _assemble(tok, length, head, needles, tail, _Hay(tok, _essay(rng, 64)))
    return Sample("multivalue", tuple(ids), tuple(vals), length, depth, 12 * values, mode="recall")


def vartrack(tok: Any, length: int, seed: int = 0, depth: float | None = None, hops: int = 3) -> Sample:
    rng = random.Random(f"vartrack-{seed}-{length}")
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}. "] + [f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(hops)]
    depths = sorted(rng.uniform(0.05, 0.9) for _ in lines)
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
    tail = f"\nQuestion: Find all variables that are assigned the value {value} in the text above. " \
           f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} " \
           "variables are assigned the value " + value + ", they are:"
    ids = _assemble(tok, length, head, list(zip(depths, lines)), tail, _Hay(tok, [_FILLER]))
    return Sample("vartrack", tuple(ids), tuple(names), length, depths[0], 24, mode="recall")


def cwe(tok: Any, length: int, seed: int = 0, depth: float | None = None, common: int = 5) -> Sample:
    rng = random.Random(f"cwe-{seed}-{length}")
    head = "Below is a numbered list of words. In these words, some appear more often than others. " \
           "Memorize the ones that appear most often.\n"
    tail = f"\nQuestion: What are the {common} most common words in the above list? " \
           f"Answer: The top {common} words that appear most often in the list are:"
    vocab = rng.sample(_WORDS, len(_WORDS))
    top, rare = vocab[:common], vocab[common:]
    fixed = len(_enc(tok, head)) + len(_enc(tok, tail)) + 1
    words: list[str] = []
    i = 0
    body_ids: list[int] = []
    while True:
        w = top[i % common] if rng.random() < 0.3 else rng.choice(rare)
        piece = _enc(tok, f"{i + 1}. {w} ")
        if fixed + len(body_ids) + len(piece) > length:
            break
        words.append(w)
        body_ids += piece
        i += 1
    counts = Counter(words)
    answers = tuple(w for w, _ in counts.most_common(common))
    ids = _assemble(tok, length, _enc(tok, head) + body_ids, [], tail, _Hay(tok, [" "]), 0)
    return Sample("cwe", tuple(ids), answers, length, 0.0, 40, mode="recall")


def fwe(tok: Any, length: int, seed: int = 0, depth: float | None = None, top: int = 3) -> Sample:
    rng = random.Random(f"fwe-{seed}-{length}")
    coded = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4)) for _ in range(60)]
    weights = [1.0 / (r + 1) ** 1.5 for r in range(len(coded))]
    head = "Read the following coded text and track the frequency of each coded word. Find the three most " \
           "frequently appeared coded words.\n"
    tail = "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most " \
           "frequently appeared words in the above coded text? Answer: According to the coded text above, " \
           "the three most frequently appeared words are:"
    fixed = len(_enc(tok, head)) + len(_enc(tok, tail)) + 1
    body_ids: list[int] = []
    seen: list[str] = []
    while True:
        w = rng.choices(coded, weights)[0]
        piece = _enc(tok, f" {w} ....")
        if fixed + len(body_ids) + len(piece) > length:
            break
        seen.append(w)
        body_ids += piece
    answers = tuple(w for w, _ in Counter(seen).most_common(top))
    ids = _assemble(tok, length, _enc(tok, head) + body_ids, [], tail, _Hay(tok, [" ...."]), 0)
    return Sample("fwe", tuple(ids), answers, length, 0.0, 16, mode="recall")


def kv(tok: Any, length: int, seed: int = 0, depth: float | None = None) -> Sample:
    rng = random.Random(f"kv-{seed}-{length}")

    def hexid() -> str:
        return "".join(rng.choice("0123456789abcdef") for _ in range(8))

    head = "Extract the value corresponding to the specified key in the JSON object below.\nJSON data:\n{"
    tail_t = '}}\nKey: "{k}"\nThe value associated with the specified key is: "'
    pairs: list[tuple[str, str]] = []
    body_ids: list[int] = []
    budget = length - len(_enc(tok, head)) - len(_enc(tok, tail_t.format(k="00000000"))) - 2
    while True:
        k, v = hexid(), hexid()
        piece = _enc(tok, f'"{k}": "{v}", ')
        if len(body_ids) + len(piece) > budget:
            break
        pairs.append((k, v))
        body_ids += piece
    depth = rng.uniform(0.05, 0.95) if depth is None else depth
    key, value = pairs[min(len(pairs) - 1, int(depth * len(pairs)))]
    ids = _assemble(tok, length, _enc(tok, head) + body_ids, [], tail_t.format(k=key), _Hay(tok, [" "]), 0)
    return Sample("kv", tuple(ids), (value,), length, depth, 12)


GENERATORS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey, "niah": niah, "multikey": multikey, "vartrack": vartrack, "cwe": cwe, "fwe": fwe, "kv": kv,
    "multivalue": multivalue,
}


def make_samples(tok: Any, task: str, length: int, n: int, seed: int = 0) -> list[Sample]:
    """``n`` seeded samples of ``task`` at ``length`` tokens; depths spread evenly over 5%..95%."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    depths = [0.05 + 0.9 * (i + 0.5) / n for i in range(n)]
    return [GENERATORS[task](tok, length, seed=seed * 1000 + i, depth=depths[i]) for i in range(n)]


def depth_grid(tok: Any, task: str, lengths: Sequence[int] | int, depths: Sequence[float] | None = None,
               seed: int = 0) -> list[Sample]:
    """One sample of ``task`` at every (length, depth): the needle (multivalue: its first value) after a
    ``depth`` fraction of the haystack -- 0.0 right after the instructions, 1.0 right before the question.

    Args:
        tok: the model's tokenizer; every prompt is exactly ``length`` of its tokens.
        task: one of :data:`DEPTH_TASKS` (tasks with a single needle depth).
        lengths: prompt lengths in tokens (an int for one).
        depths: fractions in [0, 1]; default :data:`DEFAULT_DEPTHS` (0.0 ... 0.9, 0.98, 1.0).
        seed: the sample at depth index ``i`` uses generator seed ``seed * 1000 + i`` (fresh keys per depth).
    Returns: samples ordered by length, then depth.
    Raises: ValueError for an unknown task, a task without a single needle depth, or a depth outside [0, 1].
    """
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if task not in DEPTH_TASKS:
        raise ValueError(f"task {task!r} has no single needle depth; depth_grid takes {DEPTH_TASKS}")
    depths = DEFAULT_DEPTHS if depths is None else tuple(float(d) for d in depths)
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must lie in [0, 1], got {bad}")
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    return [GENERATORS[task](tok, length, seed=seed * 1000 + i, depth=d)
            for length in lengths for i, d in enumerate(depths)]


__all__ = ["DEFAULT_DEPTHS", "DEFAULT_LENGTHS", "DEPTH_TASKS", "FULL_LENGTHS", "GENERATORS", "Sample", "TASKS",
           "depth_grid", "make_samples", *TASKS]
