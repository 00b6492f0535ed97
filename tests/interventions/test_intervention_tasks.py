"""The interventions' tasks on the real tokenizers (no model weights): seeded and split-disjoint, the answer where
the task says it is, balanced labels and demonstrations, scoring on known strings, the solvability statistics."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from attnlab.interventions import tasks as T

# small lengths keep the tests quick; mdqa with 5 documents
LEN = {"mdqa": 400, "faithful": 160, "icl_cls": 400, "icl_map": 300, "toolcall": 320, "planted": 300}
OPTS = {"mdqa": {"docs": 5}}
HAYSTACK = ("mdqa", "faithful", "planted")


def _folder_tok(name: str, model: str):
    from transformers import AutoTokenizer

    from attnlab.models import hf

    folder = hf.cache_root() / "models" / name
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return hf.load_model(model)[1]


@pytest.fixture(scope="module")
def stok():
    """SmolLM2's tokenizer (no BOS added, has a chat template)."""
    return _folder_tok("smollm2-135m-instruct", "smollm2")


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def tok(request, stok, gtok):
    return stok if request.param == "smollm2" else gtok


def _make(tok, task, n=4, seed=0, split="test", **kw):
    return T.make(tok, task, LEN[task], n, seed, split, **{**OPTS.get(task, {}), **kw})


def _text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


# --- generation: seeds, splits, lengths ---------------------------------------------------------------------
@pytest.mark.parametrize("task", T.TASKS)
def test_seeded_lengths_and_splits(tok, task):
    a, b, c = _make(tok, task, seed=1), _make(tok, task, seed=1), _make(tok, task, seed=2)
    assert [s.ids for s in a] == [s.ids for s in b]
    assert all(x.ids != y.ids for x, y in zip(a, c))
    for s in a:
        assert s.task == task and s.split == "test"
        assert s.length == len(s.ids)
        if task in HAYSTACK:
            assert len(s.ids) == LEN[task]
        else:
            assert len(s.ids) <= LEN[task]
        # BOS exactly where the tokenizer adds one by itself (Gemma yes, SmolLM2 no)
        assert (s.ids[0] == tok.bos_token_id) == (tok("x")["input_ids"][0] == tok.bos_token_id)
        assert s.ids.count(tok.bos_token_id) <= 1
    # val draws from another stream: no prompt is shared, whatever the seeds
    test = {s.ids for seed in (0, 1) for s in _make(tok, task, n=12, seed=seed)}
    val = {s.ids for seed in (0, 1) for s in _make(tok, task, n=12, seed=seed, split="val")}
    assert len(test) == 24 and len(val) == 24 and not test & val
    assert all(s.split == "val" for s in _make(tok, task, n=2, split="val"))


def test_faithful_splits_use_disjoint_facts(stok):
    def countries(split):
        return {re.search(r"capital of ([A-Z][\w ]+?)\?", _text(stok, s.ids)).group(1)
                for s in _make(stok, "faithful", n=40, split=split)}

    test, val = countries("test"), countries("val")
    assert test and val and not test & val
    assert len(test) + len(val) >= 10  # many facts in use, not one


# --- mdqa ---------------------------------------------------------------------------------------------------
_DOC = re.compile(r"Document \[(\d+)\] \(Title: (\w+)\) The capital of \2 is (\w+)\.")


def _gold_doc(tok, s) -> tuple[int, int, str]:
    """(1-based index of the document about the asked country, number of documents, its city), read from text."""
    text = _text(tok, s.ids)
    asked = re.search(r"Question: What is the capital of (\w+)\?", text).group(1)
    docs = _DOC.findall(text)
    hits = [(int(i), city) for i, c, city in docs if c == asked]
    assert len(hits) == 1
    return hits[0][0], len(docs), hits[0][1]


def test_mdqa_gold_fact_in_context_at_its_depth(tok):
    for s in _make(tok, "mdqa", n=10):
        idx, ndocs, city = _gold_doc(tok, s)
        assert ndocs == 5 and s.answers == (city,)
        assert s.depth == pytest.approx((idx - 1) / (ndocs - 1))
        assert s.chance == pytest.approx(1 / 5)
        assert _text(tok, s.ids).count(city) == 1  # distractors name other cities


def test_position_sweep_hits_first_and_last(tok):
    sweep = T.position_sweep(tok, 400, per_position=2, docs=5)
    assert len(sweep) == 10
    got = [_gold_doc(tok, s)[0] for s in sweep]
    assert got == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [s.depth for s in sweep[::2]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # make's default cycles over every position too
    assert sorted(_gold_doc(tok, s)[0] for s in _make(tok, "mdqa", n=5)) == [1, 2, 3, 4, 5]


# --- faithful -----------------------------------------------------------------------------------------------
def test_faithful_context_overrides_a_known_fact(tok):
    truth = dict(T.FACTS)
    for s in _make(tok, "faithful", n=8):
        text = _text(tok, s.ids)
        country, stated = re.search(r"The capital of ([A-Z][\w ]+?) is (\w[\w ]*?)\. ", text).groups()
        assert s.prior == truth[country] and s.answers == (stated,)
        assert stated != s.prior and s.prior not in text
        assert s.choices == (stated, s.prior)
    # without the hint: the same facts, asked as a plain question
    for h, p in zip(_make(tok, "faithful", n=3), _make(tok, "faithful", n=3, hint=False)):
        assert (h.answers, h.prior) == (p.answers, p.prior) and len(p.ids) == len(h.ids)
        assert "according to the text" not in _text(tok, p.ids).lower()
        assert _text(tok, h.ids).count("According to the text") == 2


# --- icl ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shots", [0, 1, 4, 8, 9])
def test_icl_cls_shots_balanced_and_held_out(stok, shots):
    for s in _make(stok, "icl_cls", n=4, shots=shots):
        text = _text(stok, s.ids)
        demos = re.findall(r"Review: (.+)\nLabel: (\w+)\n", text)
        query = re.findall(r"Review: (.+)\n", text)[-1]
        assert len(demos) == shots == s.shots
        assert query not in [d for d, _ in demos]
        counts = Counter(lab for _, lab in demos)
        assert set(counts) <= set(s.choices) and max(counts.values(), default=0) - min(
            [counts[c] for c in s.choices]) <= shots % 2
        # the demonstrations agree with one mapping: positive reviews -> one word, negative -> the other
        pos = {lab for d, lab in demos if d.split()[-1].rstrip(".") in T._POS}
        neg = {lab for d, lab in demos if d.split()[-1].rstrip(".") in T._NEG}
        assert len(pos) <= 1 and len(neg) <= 1 and not pos & neg
        same = pos if query.split()[-1].rstrip(".") in T._POS else neg  # labels of demos of the query's class
        assert same <= {s.answers[0]}
    # queries alternate between the classes across samples
    words = [s.answers[0] == s.choices[0] for s in _make(stok, "icl_cls", n=6, shots=4)]
    assert words == [True, False] * 3


def test_icl_demos_nested_across_shots(stok):
    def demos(task, k):
        text = _text(stok, _make(stok, task, n=1, shots=k)[0].ids)
        return set(re.findall(r"Review: (.+)\n" if task == "icl_cls" else r"(\w+) -> \w+\n", text))

    for task in ("icl_cls", "icl_map"):
        assert demos(task, 2) <= demos(task, 6) <= demos(task, 12)


@pytest.mark.parametrize("shots,classes", [(0, 3), (6, 3), (12, 3), (7, 2), (8, 4)])
def test_icl_map_shots_balanced_and_held_out(stok, shots, classes):
    for s in _make(stok, "icl_map", n=classes, shots=shots, classes=classes):
        text = _text(stok, s.ids)
        pairs = re.findall(r"(\w+) -> (\w+)\n", text)
        query = re.findall(r"(\w+) ->$", text)[-1]
        assert len(pairs) == shots and s.chance == pytest.approx(1 / classes) and len(s.choices) == classes
        assert query not in [w for w, _ in pairs]
        counts = Counter(lab for _, lab in pairs)
        assert max(counts.values(), default=0) - min(counts[c] for c in s.choices) <= (shots % classes > 0)
        # every shown word of the query's category carries the gold label
        cat = next(c for c, ws in T._CATEGORIES.items() if query in ws)
        assert {lab for w, lab in pairs if w in T._CATEGORIES[cat]} <= {s.answers[0]}
    assert Counter(s.answers[0] == s.choices[0] for s in _make(stok, "icl_map", n=6, shots=6))[True] == 2


# --- toolcall -----------------------------------------------------------------------------------------------
def test_toolcall_fields_are_in_context(tok):
    for s in _make(tok, "toolcall", n=6):
        text = _text(tok, s.ids)
        log = text.split("Shop log:")[-1]  # after the worked example
        item = re.search(r"Who bought the (\w+ \w+), and", log).group(1)
        name, amount = re.search(rf"The {item} was bought by ([\w ]+?) for (\d+) dollars\.", log).groups()
        assert s.answers == (f'call(name="{name}", value={amount})',)
        assert dict(s.fields) == {"name": name, "value": amount}
        assert len(re.findall(r"was bought by", log)) == 5 and s.chance == pytest.approx(0.2)
        assert name not in text.split("Shop log:")[-2]  # the example's names are never drawn
    # the gold record cycles over the log
    golds = [round(s.depth * 4) for s in _make(tok, "toolcall", n=5)]
    assert golds == [0, 1, 2, 3, 4]


# --- planted ------------------------------------------------------------------------------------------------
def test_planted_labels_balanced_and_claims_absent(tok):
    samples = _make(tok, "planted", n=10)
    assert [s.label for s in samples] == [0, 1] * 5
    for s in samples:
        start, end = s.span
        context = _text(tok, s.ids[:start])
        summary = _text(tok, s.ids[start:end])
        assert summary.startswith("\nSummary: ") and s.lookback_ids == s.ids[:end]
        assert "Question:" in _text(tok, s.ids[end:])
        # the summary's value: a name, a day or a number (the words after "by", "a", "to" or "About")
        value = re.search(r"(?:by|on a|went to|About) ([A-Z]\w+ [A-Z]\w+|\w+day|\d+)", summary).group(1)
        assert (value not in context) == bool(s.label)
        assert s.answers == (("no",) if s.label else ("yes",))


# --- chat framing -------------------------------------------------------------------------------------------
def test_chat_template_wraps_the_request(stok, gtok):
    s = T.make(stok, "faithful", 200, 1, chat=True)[0]
    text = stok.decode(list(s.ids))
    assert len(s.ids) == 200
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nRead the text" in text
    country = re.search(r"capital of ([A-Z][\w ]+?)\?", text).group(1)
    assert text.endswith(f"<|im_end|>\n<|im_start|>assistant\nAnswer: According to the text, the capital of "
                         f"{country} is")
    with pytest.raises(ValueError, match="chat template"):
        T.make(gtok, "faithful", 200, 1, chat=True)


# --- errors -------------------------------------------------------------------------------------------------
def test_clear_errors(stok):
    with pytest.raises(ValueError, match="unknown task"):
        T.make(stok, "nope")
    with pytest.raises(ValueError, match="split"):
        T.make(stok, "mdqa", split="train")
    with pytest.raises(ValueError, match="n must"):
        T.make(stok, "mdqa", n=0)
    with pytest.raises(ValueError, match="too short"):
        T.make(stok, "mdqa", 120, 1)
    with pytest.raises(ValueError, match="too short"):
        T.make(stok, "icl_cls", 60, 1, shots=8)
    with pytest.raises(ValueError, match="depth"):
        T.make(stok, "mdqa", 400, 1, depth=1.5)
    with pytest.raises(ValueError, match="classes"):
        T.make(stok, "icl_map", n=1, classes=9)
    with pytest.raises(ValueError, match="no fact"):
        T.make(stok, "faithful", n=1, facts=[("France", "Paris")], split="val" if T.fact_split("France") ==
               "test" else "test")


# --- scoring ------------------------------------------------------------------------------------------------
def test_first_named():
    assert T.first_named(" Bar, then foo", ("foo", "bar")) == "bar"
    assert T.first_named(" food barn", ("foo", "bar")) is None  # whole words only
    assert T.first_named("New York City", ("New York", "New York City")) == "New York City"
    assert T.first_named("", ("a",)) is None


def test_scores_on_known_strings(stok):
    fa = _make(stok, "faithful", n=1)[0]
    ctx, prior = fa.answers[0], fa.prior
    assert fa.score(f" {ctx}.") == 1.0 and fa.score_prior(f" {ctx}.") == 0.0
    assert fa.score(f" {prior}, not {ctx}") == 0.0 and fa.score_prior(f" {prior}, not {ctx}") == 1.0
    assert fa.score(" Lyon") == 0.0 == fa.score_prior(" Lyon")

    cls = _make(stok, "icl_cls", n=1)[0]
    right, wrong = cls.answers[0], next(c for c in cls.choices if c != cls.answers[0])
    assert cls.score(f" {right}\n\nReview: x\nLabel: {wrong}") == 1.0 and cls.score(f" {wrong} {right}") == 0.0

    md = _make(stok, "mdqa", n=1)[0]
    assert md.score(f" {md.answers[0]}.") == 1.0 and md.score(" Paris.") == 0.0

    tc = _make(stok, "toolcall", n=1)[0]
    name, value = dict(tc.fields)["name"], dict(tc.fields)["value"]
    assert tc.score(f' call(name="{name}", value={value})\n') == 1.0 and tc.partial(tc.answers[0]) == 1.0
    assert tc.score(f'call(name="{name}", value="{value}")') == 0.0  # wrong format
    assert tc.partial(f'call(name="{name}", value="{value}")') == 1.0  # ... right fields
    assert tc.partial(f'call(name="{name}", value=1)') == 0.5 and tc.partial("no idea") == 0.0
    assert tc.score(f'The call is call(name="{name}", value={value})') == 0.0  # must start with the call

    pl = [s for s in _make(stok, "planted", n=2)]
    assert [s.score(" No.") for s in pl] == [0.0, 1.0] and [s.score(" yes") for s in pl] == [1.0, 0.0]
    with pytest.raises(ValueError, match="prior"):
        md.score_prior("x")
    with pytest.raises(ValueError, match="span"):
        _ = md.lookback_ids


# --- solvability statistics ---------------------------------------------------------------------------------
def test_binomial_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(15, 20, 0.5), (14, 20, 0.5), (5, 20, 0.1), (0, 7, 0.3), (20, 20, 1 / 3), (3, 10, 0.0)]:
        assert T.binomial_test(k, n, p) == pytest.approx(stats.binomtest(k, n, p, alternative="greater").pvalue)
    with pytest.raises(ValueError, match="successes"):
        T.binomial_test(5, 4, 0.5)
    with pytest.raises(ValueError, match="chance"):
        T.binomial_test(1, 4, 1.5)


def test_summarize_on_synthetic_accuracies(stok):
    samples = _make(stok, "icl_cls", n=20, shots=2)  # chance 0.5
    right = [s.answers[0] for s in samples]
    wrong = [next(c for c in s.choices if c != s.answers[0]) for s in samples]
    # 15 / 20 at chance 0.5: p = 0.0207 (solvable); 14 / 20: p = 0.0577 (not)
    r15 = T.summarize(samples, right[:15] + wrong[15:])
    r14 = T.summarize(samples, right[:14] + wrong[14:])
    assert (r15["correct"], r15["accuracy"], r15["chance"]) == (15, 0.75, 0.5)
    assert r15["p_value"] == pytest.approx(0.020694, abs=1e-6) and r15["solvable"]
    assert r14["p_value"] == pytest.approx(0.057659, abs=1e-6) and not r14["solvable"]
    # faithful reports the prior rate, toolcall the field-level score
    fa = _make(stok, "faithful", n=4)
    r = T.summarize(fa, [s.prior for s in fa[:3]] + [s.answers[0] for s in fa[3:]])
    assert (r["accuracy"], r["prior_rate"], r["solvable"]) == (0.25, 0.75, False)
    tc = _make(stok, "toolcall", n=2)
    r = T.summarize(tc, [tc[0].answers[0], f'call(name="{dict(tc[1].fields)["name"]}", value=0)'])
    assert (r["accuracy"], r["partial"], r["chance"]) == (0.5, 0.75, 0.2)
    with pytest.raises(ValueError, match="one text per sample"):
        T.summarize(samples, ["x"])


def test_solvability_runs_the_plain_model(stok):
    """End to end on a random 2-layer Llama with SmolLM2's vocabulary: greedy continuations, scored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(stok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    r = T.solvability(model, stok, "icl_map", n=3, shots=3)
    assert r["n"] == 3 and len(r["texts"]) == 3 and r["length"] == T.DEFAULT_LENGTHS["icl_map"]
    samples = T.make(stok, "icl_map", n=3, shots=3)
    assert r["correct"] == sum(s.score(t) for s, t in zip(samples, r["texts"]))
    assert r["p_value"] == pytest.approx(T.binomial_test(r["correct"], 3, 1 / 3))
    # the continuation stops at the end-of-sequence token
    s = samples[0]
    eos = stok.eos_token_id
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.full((len(stok),), -1e4))
        model.lm_head.bias[eos] = 1e4
    try:
        assert T.generate_text(model, stok, s) == ""
    finally:
        model.lm_head.bias = None
