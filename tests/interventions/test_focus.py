"""Focus directions (I128) on tiny random models: alpha 0 is the plain model; the query shift is exactly
``alpha * scale * direction`` on the chosen heads only; with a component planted in the relevant keys, the
estimated direction finds it, the contextual heads are those with the most attention on the span, and adding the
direction raises the attention mass on the span; the relevant span of a prompt (known answer; a real mdqa prompt)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import tiny  # noqa: E402

from attnlab.interventions import focus as FO  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans.evaluate import dense_generate  # noqa: E402

T = 40
SPAN = (12, 17)
PROMPTS = [torch.randint(1, 97, (1, T), generator=torch.Generator().manual_seed(20 + i)) for i in range(3)]
U = torch.randn(8, generator=torch.Generator().manual_seed(4))  # head_dim 8


def plant(k, ctx):
    """Relevant keys (the span, in full prompts) share a component along U in every key/value head."""
    if k.shape[2] < SPAN[1]:
        return None
    k = k.clone()
    k[:, :, SPAN[0]:SPAN[1]] += 0.6 * U
    return k


def _mass(model, ids, heads, fd=None):
    """Mean over ``heads`` of the last query's attention on the span (weights read at the seam)."""
    table = {"blocks.*.attn.k": plant}
    with hf.hooks(model, table), (fd.attach(model) if fd is not None else hf.hooks(model, {})):
        _, store = hf.run_with_cache(model, ids, ["blocks.*.attn.weights"], rows=(T - 1, T))
    return sum(float(store[f"blocks.{a}.attn.weights"][0, b, 0, SPAN[0]:SPAN[1]].sum()) for a, b in heads) / len(heads)


def test_alpha_zero_is_the_plain_model():
    model = tiny("llama")
    fd = FO.FocusDirections(((0, 1), (1, 3)), torch.randn(2, 8), 0.0)
    want = dense_generate(model, PROMPTS[0], 6, native=False)["tokens"].tolist()
    assert FO.generate(model, None, PROMPTS[0], 6, fd)["tokens"].tolist() == want
    with fd.attach(model):
        got = model(input_ids=PROMPTS[0], use_cache=False).logits
    assert torch.equal(got, model(input_ids=PROMPTS[0], use_cache=False).logits)


def test_query_shift_is_alpha_scale_direction_on_chosen_heads_only():
    model = tiny("gemma3")
    d = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    fd = FO.FocusDirections(((1, 2), (1, 0)), d, 0.7, torch.tensor([2.0, 3.0]))
    names = ["blocks.0.attn.q", "blocks.1.attn.q"]
    _, plain = hf.run_with_cache(model, PROMPTS[0], names)
    with fd.attach(model):
        _, got = hf.run_with_cache(model, PROMPTS[0], names)
    want = plain[names[1]].clone()  # the last layer's queries: nothing shifted upstream of them
    want[:, 2] += 0.7 * 2.0 * d[0]
    want[:, 0] += 0.7 * 3.0 * d[1]
    torch.testing.assert_close(got[names[1]], want)
    torch.testing.assert_close(got[names[0]], plain[names[0]])  # layer 0 has no focus head


def test_planted_relevant_keys_direction_heads_and_more_focus():
    model = tiny("llama")
    items = [(ids, SPAN) for ids in PROMPTS]
    with hf.hooks(model, {"blocks.*.attn.k": plant}):
        fd, trace = FO.estimate(model, items, k=3, tail=4)
        mass = torch.stack([FO.span_mass(model, ids, SPAN) for ids in PROMPTS]).mean(0)
    # the direction is the planted component (the rest of the keys averages out over 5 vs 22 positions)
    cos = fd.directions @ torch.nn.functional.normalize(U, dim=0)
    assert bool((cos > 0.8).all()), cos
    # the contextual heads: the 3 heads with the most span mass (read here from the seam's own weights)
    assert set(fd.heads) == {divmod(i, 4) for i in torch.topk(mass.flatten(), 3).indices.tolist()}
    for ids in PROMPTS:
        base = _mass(model, ids, fd.heads)
        lo = _mass(model, ids, fd.heads, fd.with_alpha(0.5))
        hi = _mass(model, ids, fd.heads, fd.with_alpha(2.0))
        assert base < lo < hi, (base, lo, hi)
    assert trace["heads"] == [f"{a}.{b}" for a, b in fd.heads]


class CharTok:
    """Token ids index fixed text pieces (decode = concatenation)."""

    pieces = ["Intro", " text", ". ", "Filler", " here", ".", "\n", "Document", " [1]", " The", " capital", " is",
              " Pa", "ris", ".", " More", " filler", "."]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[int(i)] for i in ids)


def test_answer_span_known_answer():
    tok = CharTok()
    ids = list(range(len(CharTok.pieces)))
    assert FO.answer_span(tok, ids, "Paris") == (7, 15)  # "Document [1] The capital is Paris."
    assert FO.answer_span(tok, ids, "here") == (3, 6)  # after ". " up to the next "."
    with pytest.raises(ValueError, match="does not appear"):
        FO.answer_span(tok, ids, "Rome")


@pytest.mark.slow
def test_answer_span_of_a_real_mdqa_prompt(gtok):
    from attnlab.interventions.tasks import make

    s = make(gtok, "mdqa", 512, 1, seed=0)[0]
    a, b = FO.sample_span(gtok, s)
    text = gtok.decode(list(s.ids[a:b]))
    assert text.strip().startswith("Document [") and text.rstrip().endswith(f"is {s.answers[0]}.")


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="directions"):
        FO.FocusDirections(((0, 1),), torch.randn(2, 8))
    with pytest.raises(ValueError, match="distinct"):
        FO.FocusDirections(((0, 1), (0, 1)), torch.randn(2, 8))
    model = tiny("llama")
    with pytest.raises(ValueError, match="k must"):
        FO.estimate(model, [(PROMPTS[0], SPAN)], k=0)
    with pytest.raises(ValueError, match="outside"), FO.FocusDirections(((0, 9),), torch.randn(1, 8)).attach(model):
        model(input_ids=PROMPTS[0], use_cache=False)
