import pytest

from attnlab.plans.tasks import TASKS, Sample, make_samples


@pytest.mark.parametrize("task", TASKS)
def test_exact_length_seeded_and_answer_in_prompt(smol, task):
    _, tok = smol
    a = make_samples(tok, task, 600, 2, seed=3)
    b = make_samples(tok, task, 600, 2, seed=3)
    c = make_samples(tok, task, 600, 2, seed=4)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert a[0].ids != c[0].ids
    for s in a:
        assert len(s.ids) == 600 and s.length == 600
        text = tok.decode(list(s.ids))
        for ans in s.answers:
            assert ans in text, (task, ans)
        # a continuation made of the answers scores 1, an empty one 0
        assert s.score(" " + ", ".join(s.answers)) == 1.0
        assert s.score(" no idea") == 0.0


def test_needles_at_requested_depths(smol):
    _, tok = smol
    early, late = make_samples(tok, "passkey", 800, 2)
    key_e = tok(early.answers[0], add_special_tokens=False)["input_ids"]
    text_e = tok.decode(list(early.ids))
    text_l = tok.decode(list(late.ids))
    assert text_e.index(early.answers[0]) < len(text_e) / 2 < text_l.index(late.answers[0])
    assert key_e


def test_scoring_modes():
    s = Sample("x", (1,), ("12345",), 1, 0.5, 4)
    assert s.score("The key is 12,345.") == 1.0 and s.score("1234") == 0.0
    r = Sample("x", (1,), ("alpha", "beta"), 1, 0.5, 4, mode="recall")
    assert r.score("Alpha and gamma") == 0.5


def test_too_short_is_a_clear_error(smol):
    _, tok = smol
    with pytest.raises(ValueError, match="too short"):
        make_samples(tok, "passkey", 40, 1)
    with pytest.raises(ValueError, match="unknown task"):
        make_samples(tok, "nope", 400, 1)


# --- multivalue and depth_grid ------------------------------------------------------------------------------

# Needle sentences as the task descriptions state them (written here, not taken from the generators).
_NEEDLE_RE = {
    "passkey": r"The pass key is (\d+)\. Remember it\. \1 is the pass key\. ",
    "niah": r"One of the special magic numbers for \w+ is: (\d{7})\. ",
    "multikey": r"One of the special magic numbers for \w+ is: (\d{7})\. ",
    "multivalue": r"One of the special magic numbers for \w+ is: (\d{7})\. ",
}
_HEAD_END = {"passkey": "information there.\n", "kv": "JSON data:\n{"}  # others: "afterwards.\n"
_TAIL_START = {"passkey": "\nWhat is the pass key?", "kv": "}\nKey:", "multivalue": "\nWhat are all"}


def _token_of_char(tok, ids):
    """Char offset -> index of the token holding it (byte-level BPE on ASCII text: pieces concatenate)."""
    import bisect
    from itertools import accumulate

    pieces = [tok.decode([t]) for t in ids]
    text = "".join(pieces)
    assert text == tok.decode(list(ids))
    ends = list(accumulate(len(p) for p in pieces))
    return text, lambda c: bisect.bisect_right(ends, c)


def test_multivalue_recall_and_spread(smol):
    import re

    from attnlab.plans.tasks import multivalue

    _, tok = smol
    s = multivalue(tok, 700, seed=5, depth=0.3)
    assert s.task == "multivalue" and s.mode == "recall" and len(s.ids) == 700 and s.depth == 0.3
    assert len(s.answers) == 4 and len(set(s.answers)) == 4 and all(re.fullmatch(r"\d{7}", a) for a in s.answers)
    text = tok.decode(list(s.ids))
    needles = [m for m in re.finditer(_NEEDLE_RE["multivalue"], text)]
    assert sorted(m.group(1) for m in needles) == sorted(s.answers)
    assert len({re.search(r"for (\w+) is", m.group(0)).group(1) for m in needles}) == 1  # one key, 4 values
    key = re.search(r"for (\w+) is", needles[0].group(0)).group(1)
    assert f"What are all the special magic numbers for {key}" in text
    starts = sorted(m.start() for m in needles)
    assert min(b - a for a, b in zip(starts, starts[1:])) > 0.05 * len(text)  # spread, not clustered
    a, b, c, d = s.answers
    assert s.score(f" {a}, {b}, {c} and {d}.") == 1.0
    assert s.score(f" {a} and {c}") == 0.5
    assert s.score(f" {d}") == 0.25
    assert s.score(" 1234567") == 0.0


def test_depth_grid_defaults_and_errors(smol):
    from attnlab.plans.tasks import DEFAULT_DEPTHS, depth_grid

    _, tok = smol
    assert DEFAULT_DEPTHS[0] == 0.0 and DEFAULT_DEPTHS[-1] == 1.0 and 0.98 in DEFAULT_DEPTHS
    grid = depth_grid(tok, "passkey", [400, 500])
    assert [(s.length, s.depth) for s in grid] == [(n, d) for n in (400, 500) for d in DEFAULT_DEPTHS]
    assert len({s.answers for s in grid}) == len(grid)  # fresh keys per cell
    assert [s.ids for s in depth_grid(tok, "passkey", 400, seed=1)] == [s.ids for s in depth_grid(tok, "passkey", [400], seed=1)]
    for task in ("vartrack", "cwe", "fwe"):
        with pytest.raises(ValueError, match="single needle depth"):
            depth_grid(tok, task, [400])
    with pytest.raises(ValueError, match="unknown task"):
        depth_grid(tok, "nope", [400])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        depth_grid(tok, "niah", [400], depths=[0.5, 1.2])


@pytest.mark.parametrize("task", ["passkey", "niah", "multikey", "multivalue"])
def test_depth_grid_needle_sits_at_the_asked_depth(smol, task):
    """Haystack tokens before the asked needle = depth x all haystack tokens (to the token: the depth is a
    fraction of the filler, other needles excluded); depth 1.0 puts the needle right before the question."""
    import re

    from attnlab.plans.tasks import depth_grid

    _, tok = smol
    for s in depth_grid(tok, task, [520]):
        assert len(s.ids) == 520
        text, tok_at = _token_of_char(tok, s.ids)
        head_end = text.index(_HEAD_END.get(task, "afterwards.\n")) + len(_HEAD_END.get(task, "afterwards.\n"))
        tail_start = text.rindex(_TAIL_START.get(task, "\nWhat is the special"))
        a, b = tok_at(head_end), tok_at(tail_start)
        spans = [(tok_at(m.start()), tok_at(m.end()), m.group(1)) for m in re.finditer(_NEEDLE_RE[task], text)]
        (asked,) = [sp for sp in spans if sp[2] == s.answers[0]]
        hay_total = (b - a) - sum(e - st for st, e, _ in spans)
        hay_before = (asked[0] - a) - sum(e - st for st, e, _ in spans if e <= asked[0])
        assert abs(hay_before - s.depth * hay_total) <= 1, (s.depth, hay_before, hay_total)
        if s.depth == 1.0:
            assert text[text.index(s.answers[0]):].split("\n")[1].startswith("What")
            assert asked[1] == b  # nothing between the needle and the question
        if s.depth == 0.0:
            assert asked[0] == a


def test_depth_grid_kv_pair_at_the_asked_depth(smol):
    import re

    from attnlab.plans.tasks import depth_grid

    _, tok = smol
    for s in depth_grid(tok, "kv", [520]):
        text = tok.decode(list(s.ids))
        key = re.search(r'Key: "([0-9a-f]{8})"', text).group(1)
        pairs = re.findall(r'"([0-9a-f]{8})": "([0-9a-f]{8})"', text)
        idx = [k for k, _ in pairs].index(key)
        assert pairs[idx][1] == s.answers[0]
        assert abs(idx / len(pairs) - s.depth) <= 1 / len(pairs)  # within one pair
        if s.depth == 1.0:
            assert idx == len(pairs) - 1 and re.search(f'"{s.answers[0]}",\\s*}}\\nKey:', text)
        if s.depth == 0.0:
            assert idx == 0


def test_filler_that_encodes_to_nothing_is_a_clear_error():
    """A tokenizer that drops whitespace (BERT's) cannot fill kv / cwe prompts with " ": an error, not a hang."""

    class DropsSpaces:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 50 for c in text if not c.isspace()]}

    with pytest.raises(ValueError, match="encodes to no tokens"):
        make_samples(DropsSpaces(), "kv", 300, 1)
