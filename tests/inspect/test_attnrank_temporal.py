"""AttnRank (A170) reordering and slot attention, and temporal-head ablation (A206): brute-force references,
the planted induction circuit, a word-level stub tokenizer on a tiny model, and SmolLM2 end to end (slow)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402
from test_causal import IND_HEAD, PREV_HEAD, induction_data, planted  # noqa: E402

from attnlab.inspect.attnrank import (  # noqa: E402
    attnrank_eval,
    attnrank_order,
    best_order_brute_force,
    build_prompt,
    make_records,
    slot_attention,
)
from attnlab.inspect.temporal import (  # noqa: E402
    CAPITALS,
    head_ablation,
    logit_diff,
    make_prompts,
    temporal_heads,
)
from attnlab.models import hf  # noqa: E402

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# AttnRank
# --------------------------------------------------------------------------------------------------------
def test_attnrank_order_maximizes_relevance_times_attention():
    rng = random.Random(0)
    for _ in range(20):
        rel = [rng.random() for _ in range(5)]
        prof = [rng.random() for _ in range(5)]
        order = attnrank_order(rel, prof)
        assert sorted(order) == list(range(5))
        got = sum(rel[o] * p for o, p in zip(order, prof))
        assert got == pytest.approx(best_order_brute_force(rel, prof))
    # planted: slots by attention 1, 2, 3, 0, 4 receive items by relevance 3, 2, 0, 1, 4
    assert attnrank_order([0.2, 0.1, 0.3, 1.0, 0.0], [0.1, 0.5, 0.2, 0.15, 0.05]) == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError, match="same K"):
        attnrank_order([1.0, 0.5], [0.3, 0.3, 0.4])


def test_slot_attention_planted():
    w = torch.zeros(2, 3, 3, 10)  # (layers, heads, rows, T)
    w[..., 1:3] = 0.1  # slot 0: 0.2 per row
    w[..., 5] = 0.5  # slot 1: 0.5
    w[0, 0, 0, 7] = 0.9  # one row of one head in slot 2: 0.9 / 18 on average
    got = slot_attention(w, [(1, 3), (4, 6), (7, 9)])
    torch.testing.assert_close(got, torch.tensor([0.2, 0.5, 0.05], dtype=torch.float64))
    with pytest.raises(ValueError, match="spans"):
        slot_attention(w, [])


def test_records_are_seeded_and_the_relevant_one_ranks_first():
    a, b = make_records(6, 3), make_records(6, 3)
    assert a == b and len(set(a.nouns)) == 6
    assert max(range(6), key=lambda i: a.relevance[i]) == a.gold and a.relevance[a.gold] == 1.0
    with pytest.raises(ValueError, match="k must be"):
        make_records(1, 0)


@pytest.mark.slow
def test_attnrank_on_smollm2(smollm2):
    model, tok = smollm2
    rec = make_records(4, 1)
    order = [2, 0, 3, 1]
    p = build_prompt(tok, rec, order)
    for s, (a, b) in enumerate(p.spans):
        assert tok.decode(p.ids[0, a:b]).strip() == f"The code of the {rec.nouns[order[s]]} is {rec.codes[order[s]]}."
    assert tok.decode(p.ids[0, p.question_start:]).startswith("Question")
    assert p.gold_slot == order.index(rec.gold) and p.answer == " " + rec.codes[rec.gold]
    with pytest.raises(ValueError, match="permutation"):
        build_prompt(tok, rec, [0, 0, 1, 2])
    res = attnrank_eval(model, tok, k=4, n_eval=2, n_calib=2, slots=False)
    assert sum(res.profile) == pytest.approx(1.0) and len(res.profile) == 4
    table = {r["arrangement"]: r for r in res.table()}
    assert set(table) == {"retrieval", "reverse", "random", "attnrank"}
    assert table["retrieval"]["gold_slot"] == 0 and table["reverse"]["gold_slot"] == 3
    assert table["retrieval"]["d_logp_vs_retrieval"] == 0.0
    assert all(r["logp"] <= 0 and r["exact"] in (0.0, 1.0) for r in res.rows)


# --------------------------------------------------------------------------------------------------------
# temporal heads
# --------------------------------------------------------------------------------------------------------
def test_head_ablation_matches_one_head_at_a_time():
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    metric = lambda lg: lg[:, -1, 5].double() - lg[:, -1, 7].double()  # noqa: E731
    clean, ab = head_ablation(model, ids, metric, batch=3)
    with torch.no_grad():
        assert clean == pytest.approx(float(metric(model(input_ids=ids).logits)[0]), abs=1e-5)
        for layer, h in [(0, 0), (0, 3), (1, 2)]:
            def zero(z, ctx, h=h):
                z = z.clone()
                z[:, h] = 0
                return z
            with hf.hooks(model, {f"blocks.{layer}.attn.z": zero}):
                ref = float(metric(model(input_ids=ids).logits)[0])
            assert float(ab[layer, h]) == pytest.approx(ref, abs=1e-5)


def test_head_ablation_finds_the_planted_induction_circuit():
    model = planted()
    clean_ids, _, ans, _ = induction_data()
    metric = lambda lg: lg[:, -1, ans].double() - lg[:, -1].double().mean(-1)  # noqa: E731
    clean, ab = head_ablation(model, clean_ids, metric)
    drop = clean - ab
    top2 = {tuple(divmod(int(i), 4)) for i in drop.flatten().argsort(descending=True)[:2]}
    assert top2 == {(0, PREV_HEAD), (1, IND_HEAD)}
    assert drop[1, IND_HEAD] > 0.9 * clean and drop.flatten().sort().values[:-2].abs().max() < 0.1 * clean


class _WordTok:
    """Word-level stub tokenizer for the tiny model: each word (and punctuation mark) gets a fixed id."""

    pad_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, w):
        return self.vocab.setdefault(w, 1 + len(self.vocab) % (VOCAB - 1))

    def __call__(self, text, add_special_tokens=True, **_):
        words = re.findall(r"\w+|[^\w\s]", text)
        return {"input_ids": [self._id(w) for w in words]}


def test_temporal_prompts_and_scores_on_a_tiny_model():
    tok = _WordTok()
    ps = make_prompts(tok, 3, seed=2)
    for t, c, a in zip(ps["temporal"], ps["control"], ps["alias"]):
        assert (t.answer, t.other) == (c.answer, c.other) == (a.answer, a.other)
        year = t.text.rsplit("In ", 1)[1].split(",")[0]  # the queried year's fact names the answer city
        fact = next(f for f in t.text.split(". ")[:2] if f.startswith(f"In {year},"))
        assert tok(" " + fact.rsplit(" ", 1)[1])["input_ids"][0] == t.answer
        assert "In the year" in a.text and c.text.startswith("The capital of ")
        country = c.text[len("The capital of "):-len(" is")]
        assert tok(" " + next(k for k, v in CAPITALS.items() if v == country))["input_ids"][0] == c.answer
    model = tiny("llama")
    res = temporal_heads(model, tok, n=2, sets=("temporal", "control"), batch=8)
    for s in ("temporal", "control"):
        if res.clean[s] > 0:
            assert res.drop[s].shape == (2, 4) and not res.drop[s].isnan().any()
        else:  # a set the model does not solve has no share to lose
            assert res.drop[s].isnan().all()
    torch.testing.assert_close(res.score, res.drop["temporal"] - res.drop["control"], equal_nan=True)
    p = ps["temporal"][0]
    lg = torch.zeros(1, 1, VOCAB)
    lg[0, 0, p.answer], lg[0, 0, p.other] = 3.0, 1.0
    assert float(logit_diff(lg, p)[0]) == 2.0
    with pytest.raises(ValueError, match="temporal and control"):
        temporal_heads(model, tok, n=1, sets=("temporal",))
