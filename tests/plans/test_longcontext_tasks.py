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
