"""SAR (I122) as a score analysis: relevance known answers, TokenSAR = mean NLL under uniform relevance, AUROC known
answers and its CI, teacher-forced NLLs against a plain forward, and the runner end to end (``sar`` records the plain
generation, resumes, identical samples across arms, the AUROC table)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, fake_make, tiny  # noqa: E402

from attnlab.interventions import data  # noqa: E402
from attnlab.interventions import registry as R  # noqa: E402
from attnlab.interventions import runner as RN  # noqa: E402
from attnlab.interventions import sar as SAR  # noqa: E402
from attnlab.interventions import scoring as SC  # noqa: E402
from attnlab.models import hf  # noqa: E402


def bag(texts):
    """A bag-of-words embedding (64 buckets + a constant): a test's own similarity model."""
    out = torch.zeros(len(texts), 65, dtype=torch.float64)
    for i, t in enumerate(texts):
        out[i, 64] = 1.0
        for w in t.split():
            out[i, sum(map(ord, w)) % 64] += 1.0
    return out


WORDS = {1: "the", 2: "", 3: "capital", 4: "is", 5: "paris"}


def decode(ids):
    return " ".join(w for w in (WORDS[i] for i in ids) if w)


def test_relevance_known_answers():
    ids = [1, 2, 3, 4, 5]
    rel = SAR.token_relevance(ids, decode, bag)
    assert rel[1] == 0  # the token decodes to nothing: its removal leaves the sentence unchanged
    e = bag([decode(ids), decode([1, 2, 3, 4])])
    want = 1 - abs(float(e[0] @ e[1]) / float(e[0].norm() * e[1].norm()))
    assert rel[4] == pytest.approx(want, abs=1e-12) and want > 0.05
    assert all(0 <= float(r) <= 1 for r in rel) and (rel[[0, 2, 3, 4]] > 0).all()


def test_token_sar_weighting():
    nll = torch.tensor([0.5, 2.0, 4.0, 1.5])
    assert SAR.token_sar(nll, torch.ones(4)) == pytest.approx(float(nll.mean()))
    assert SAR.token_sar(nll, torch.full((4,), 0.3)) == pytest.approx(2.0)
    assert SAR.token_sar(nll, torch.tensor([0.0, 0.0, 1.0, 0.0])) == pytest.approx(4.0)
    assert SAR.token_sar(nll, torch.tensor([0.0, 1.0, 3.0, 0.0])) == pytest.approx((2.0 + 12.0) / 4)
    assert SAR.token_sar(nll, torch.zeros(4)) == pytest.approx(2.0)  # sar-uniform-fallback
    with pytest.raises(ValueError, match="non-negative"):
        SAR.token_sar(nll, torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="equal non-empty"):
        SAR.token_sar(nll, torch.ones(3))


def test_auroc_known_answers_and_ci():
    y = [0, 0, 0, 1, 1]
    assert SC.auroc([0.1, 0.2, 0.3, 0.8, 0.9], y) == 1.0
    assert SC.auroc([0.9, 0.8, 0.7, 0.2, 0.1], y) == 0.0
    assert SC.auroc([0.5] * 5, y) == 0.5
    assert SC.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert SC.auroc([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1]) == 0.875  # one tie counts one half
    assert SC.auroc([0.1, 0.2], [0, 0]) is None and SC.auroc_ci([0.1, 0.2], [1, 1]) is None
    assert SC.auroc_ci([0.1, 0.2, 0.3, 0.8, 0.9], y) == (1.0, 1.0)
    lo, hi = SC.auroc_ci([0.1, 0.4, 0.35, 0.8, 0.3, 0.6], [0, 0, 1, 1, 0, 1], n_boot=500)
    assert 0 <= lo < SC.auroc([0.1, 0.4, 0.35, 0.8, 0.3, 0.6], [0, 0, 1, 1, 0, 1]) <= hi <= 1 and lo < hi
    with pytest.raises(ValueError, match="0 or 1"):
        SC.auroc([0.1, 0.2], [0, 2])


def test_token_nll_is_the_teacher_forced_log_likelihood():
    torch.set_num_threads(1)
    model = tiny("llama")
    prompt, new = [5, 9, 13, 2, 40], [7, 7, 21]
    got = SAR.token_nll(model, prompt, new)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + new])).logits[0].double()
    ref = [-torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t] for i, t in enumerate(new)]
    assert torch.allclose(got, torch.stack(ref), atol=1e-6)
    assert SAR.answer_tokens([4, 8, 0, 0], frozenset({0})) == [4, 8]
    assert SAR.answer_tokens([0], 0) == [0]


def test_sentence_score_known_answers():
    lp = [math.log(0.5), math.log(0.25)]
    sim = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    want = (-math.log(0.5 + 0.8 * 0.25) - math.log(0.25 + 0.8 * 0.5)) / 2
    assert SAR.sentence_score(lp, sim, 1.0) == pytest.approx(want, abs=1e-12)
    want = (-math.log(0.5 + 0.8 * 0.25 / 0.001) - math.log(0.25 + 0.8 * 0.5 / 0.001)) / 2
    assert SAR.sentence_score(lp, sim, 0.001) == pytest.approx(want, abs=1e-12)
    pe = (-lp[0] - lp[1]) / 2
    assert SAR.sentence_score(lp, sim, math.inf) == pytest.approx(pe)
    assert SAR.sentence_score(lp, torch.eye(2), 0.001) == pytest.approx(pe)  # no similar answer: the mean NLL
    with pytest.raises(ValueError, match="t must be"):
        SAR.sentence_score(lp, sim, 0.0)
    with pytest.raises(ValueError, match="K, K"):
        SAR.sentence_score(lp, torch.eye(3), 1.0)


def test_sampled_answers_are_seeded_and_their_nll_is_teacher_forced():
    from attnlab.interventions.decoding import Base

    torch.set_num_threads(1)
    model = tiny("llama")
    prompt = [5, 9, 13, 2, 40, 41]
    with Base(model) as base:
        a = SAR.sample_answers(model, prompt, 3, 5, base.new_cache, eos=None, seed=7)
        b = SAR.sample_answers(model, prompt, 3, 5, base.new_cache, eos=None, seed=7)
    assert [t for t, _ in a] == [t for t, _ in b] and len({tuple(t) for t, _ in a}) > 1
    for toks, nll in a:
        assert len(toks) == 5 and torch.allclose(nll, SAR.token_nll(model, prompt, toks), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def world(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(data, "make", fake_make)
    monkeypatch.setitem(hf.SHARED, "tiny", (tiny("llama"), Tok()))
    monkeypatch.setitem(SAR._EMBEDDERS, "minilm", bag)
    RN._SAMPLES.clear()
    calls = []
    real = RN.run_config

    def run_config(cfg):
        calls.append(cfg.key)
        return real(cfg)

    monkeypatch.setattr(RN, "run_config", run_config)
    yield calls
    RN._SAMPLES.clear()
    torch.set_num_threads(n)


def test_sar_end_to_end_resume_and_identical_samples(tmp_path, world):
    run = RN.Run(("tiny",), ("sar",), ("kv",), (40,), 4, 0, True)
    out = RN.score(run, tmp_path, show_progress=False, log=lambda s: None)
    recs = out["records"]
    assert len(recs) == 8 and [k.rsplit("/", 1)[1] for k in world[:2]] == ["plain", "sar"]
    plain = {r["sample"]: r for r in recs if r["arm"] == "plain"}
    model, tok = hf.SHARED["tiny"]
    for r in (r for r in recs if r["arm"] == "sar"):
        p = plain[r["sample"]]
        assert r["sample_id"] == p["sample_id"] and r["text"] == p["text"]  # the plain generation, analysed
        s = fake_make(tok, "kv", 40, 4)[r["sample"]]
        new = [int(w) for w in r["text"].split()]
        nll = SAR.token_nll(model, list(s.ids), new)
        rel = SAR.token_relevance(new, tok.decode, bag)
        assert r["measures"]["mean_nll"] == pytest.approx(float(nll.mean()), abs=1e-9)
        assert r["measures"]["max_nll"] == pytest.approx(float(nll.max()), abs=1e-9)
        w = rel / rel.sum() if rel.sum() > 0 else torch.full_like(rel, 1 / len(rel))
        assert r["measures"]["token_sar"] == pytest.approx(float((w * nll).sum()), abs=1e-9)
    rows = {row["measure"]: row for row in out["scores"]}
    assert set(rows) == {"token_sar", "mean_nll", "max_nll"} and all(r["stat"] == "auroc" for r in rows.values())
    wrong = sum(p["score"] < 0.5 for p in plain.values())
    assert all(r["n"] == 4 and r["n_incorrect"] == wrong for r in rows.values())
    assert not [r for r in out["rows"] if r["arm"] == "sar"]  # not in the change table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["scores"]) == 3 and "Score arms" in (tmp_path / "results.md").read_text()
    world.clear()
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    RN.score(run, tmp_path, show_progress=False, log=lambda s: None)
    assert world == [] and (tmp_path / "results.jsonl").read_text().splitlines() == lines


def test_sentence_level_measures_in_the_runner(tmp_path, world):
    run = RN.Run(("tiny",), ("sar:samples=3",), ("kv",), (40,), 2, 0, True)
    out = RN.score(run, tmp_path, show_progress=False, log=lambda s: None)
    for r in (r for r in out["records"] if r["arm"] != "plain"):
        m = r["measures"]
        assert all(math.isfinite(m[k]) for k in ("sent_sar", "sar", "pe", "ln_pe"))
        assert m["sent_sar"] <= m["pe"] + 1e-9  # the relevance term only adds probability
    assert {row["measure"] for row in out["scores"]} >= {"sent_sar", "sar", "pe", "ln_pe"}


def test_score_rows_use_plain_labels_and_refuse_other_text():
    def rec(arm, i, score, text, u=None):
        r = {"model": "m", "task": "t", "length": 8, "sample": i, "arm": arm, "sample_id": f"s{i}",
             "score": score, "text": text, "seconds": 1.0}
        if u is not None:
            r["measures"] = {"token_sar": u, "mean_nll": -u, "max_nll": 1.0}
        return r

    recs = [rec("plain", i, float(i % 2 == 0), f"x{i}") for i in range(6)]
    recs += [rec("sar", i, float(i % 2 == 0), f"x{i}", u=float(i % 2)) for i in range(6)]
    rows = {r["measure"]: r for r in SC.aggregate_scores(recs)}
    assert rows["token_sar"]["value"] == 1.0 and rows["mean_nll"]["value"] == 0.0
    assert rows["max_nll"]["value"] == 0.5 and rows["token_sar"]["n_incorrect"] == 3
    with pytest.raises(ValueError, match="plain model's generation"):
        SC.aggregate_scores(recs + [rec("sar:embedder=minilm", 0, 1.0, "other", u=0.0)])
    recs[6]["measures"]["token_sar"] = math.nan  # a non-finite measure is left out, not counted
    assert {r["measure"]: r["n"] for r in SC.aggregate_scores(recs)}["token_sar"] == 5


def test_registered_as_a_score_kind_alone_in_its_arm():
    assert R.get("sar").kind == "score" and "score" in R.KINDS and "sar [score] I122" in R.describe()
    assert SC.is_score_arm("sar") and not SC.is_score_arm("act")
    with pytest.raises(ValueError, match="cannot be composed"):
        SC.is_score_arm("sar+act")
    with pytest.raises(ValueError, match="embedder"):
        R.parse("sar:embedder=bert")


@pytest.mark.slow
def test_minilm_relevance_on_real_text():
    embed = SAR.embedder("minilm")
    words = {1: "The", 2: "", 3: "capital", 4: "of", 5: "France", 6: "is", 7: "Paris."}
    dec = lambda ids: " ".join(w for w in (words[i] for i in ids) if w)  # noqa: E731
    rel = SAR.token_relevance(list(words), dec, embed)
    assert rel[1] == 0 and float(rel[6]) > float(rel[0])  # the answer word matters more than "The"
    e = embed(["a cat", "a cat"])
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5) and torch.allclose(e[0], e[1])
