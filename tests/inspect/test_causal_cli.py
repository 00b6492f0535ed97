"""`attnlab inspect causal` and its core (causal_report) on the planted induction circuit (known answer: layer 1
head 0 carries the repeat, K-composing with the previous-token head 0.0) and on a tiny random Llama (IOI-lite
plumbing), with word-level tokenizers built here (nothing downloaded)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from attnlab.cli import main
from attnlab.inspect.causal import direct_logit_attribution
from attnlab.inspect.causal_report import (
    build_tasks,
    causal_analysis,
    induction_task,
    ioi_task,
    write_causal_report,
)
from tests.inspect.test_causal import BOS, IND_HEAD, NV, PREV_HEAD, planted
from tests.models.hf_tiny import VOCAB, tiny


def word_tokenizer(words: list[str], bos: str | None = None):
    """A PreTrainedTokenizerFast whose ids are the positions of ``words`` (whitespace / punctuation split)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    t = Tokenizer(WordLevel(vocab, unk_token=words[0]))
    t.pre_tokenizer = Whitespace()
    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token=words[0], **kw)


@pytest.fixture(scope="module")
def circuit():
    return planted()


def test_induction_prompts():
    tok = SimpleNamespace(all_special_ids=[BOS], bos_token_id=BOS)
    model = planted()
    t = induction_task(model, tok, 7, seed=3)
    c, b = t.clean[0].tolist(), t.corrupt[0].tolist()
    assert len(c) == len(b) == 15 and c[0] == b[0] == BOS
    x, y = c[1:8], b[8:]
    assert c[8:] == x and b[1:8] == x  # clean [BOS] x x, corrupted [BOS] x y
    assert not set(x) & set(y) and BOS not in x + y and len(set(x)) == 7
    assert t.rows == tuple(range(8, 14)) and t.targets == tuple(x[1:])
    logits = torch.randn(1, 15, NV, dtype=torch.float64)
    want = sum(float(logits[0, 8 + i, x[i + 1]]) for i in range(6)) / 6
    assert t.metric()(logits) == pytest.approx(want)
    with pytest.raises(ValueError, match="ordinary tokens"):
        induction_task(model, tok, 8)  # 15 ordinary tokens cannot make two disjoint copies of 8
    with pytest.raises(ValueError, match="unknown task"):
        build_tasks(model, tok, "copying")


def test_planted_circuit_is_found(circuit, tmp_path):
    tok = SimpleNamespace(all_special_ids=[BOS], bos_token_id=BOS)
    a = causal_analysis(circuit, tok, "induction", 7, seed=1, dla_rows=None)
    assert a.patch.shape == a.dla.shape == (2, 4)
    assert float(a.patch[1, IND_HEAD]) == pytest.approx(1.0, abs=0.02)
    others = a.patch.clone()
    others[1, IND_HEAD] = 0
    assert others.abs().max() < 0.05  # the first copy is shared: the previous-token head's z is the same
    # only layer-1 heads write the block the unembedding reads (MLPs are zero): their DLA sums to the metric
    assert a.dla[0].abs().max() < 1e-9
    assert float(a.dla.sum()) == pytest.approx(a.clean_metric, rel=1e-5)
    top = a.top_heads(3)[0]
    assert (top["layer"], top["head"]) == (1, IND_HEAD)
    assert (top["k_source"]["layer"], top["k_source"]["head"]) == (0, PREV_HEAD)
    assert a.top_pairs("k", 1)[0]["writer"] == [0, PREV_HEAD] and a.top_pairs("k", 1)[0]["reader"] == [1, IND_HEAD]
    # DLA on 2 of the 6 rows (the first and the last): the mean over exactly those rows
    b = causal_analysis(circuit, tok, "induction", 7, seed=1, dla_rows=2, composition=False)
    t = b.tasks[0]
    want = sum(direct_logit_attribution(circuit, t.clean, t.targets[i], position=t.rows[i]).heads for i in (0, 5)) / 2
    torch.testing.assert_close(b.dla, want)
    assert b.composition == {} and "k_source" not in b.top_heads(1)[0]
    paths = write_causal_report(b, tmp_path, pngs=False)
    assert "| 1 | L1.H0 |" in paths["md"].read_text() and set(paths) == {"json", "md"}


def test_cli_on_a_saved_planted_model(circuit, tmp_path):
    folder = tmp_path / "planted"
    circuit.save_pretrained(folder)
    word_tokenizer([f"t{i}" for i in range(NV - 1)] + ["<s>"], bos="<s>").save_pretrained(folder)
    out = tmp_path / "runs"
    assert main(["inspect", "causal", "--model", str(folder), "--task", "induction", "--n", "7",
                 "--out", str(out), "--top", "4"]) == 0
    (run,) = out.glob("causal-*")
    d = json.loads((run / "causal.json").read_text())
    assert d["task"] == "induction" and d["num_layers"] == 2 and d["num_heads"] == 4
    assert (d["top_heads"][0]["layer"], d["top_heads"][0]["head"]) == (1, IND_HEAD) and len(d["top_heads"]) == 4
    assert d["prompts"][0]["clean"].startswith("<s> t")
    assert d["patch_z"][1][IND_HEAD] == pytest.approx(1.0, abs=0.02)
    md = (run / "causal.md").read_text()
    assert "| 1 | L1.H0 |" in md and "L0.H0 (0.25)" in md
    for png in ("patch_z.png", "dla.png", "k_comp.png"):
        assert (run / png).stat().st_size > 1000


def test_bad_model_and_task(tmp_path, capsys):
    assert main(["inspect", "causal", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["inspect", "causal", "--task", "copying"])


IOI_WORDS = ("<unk> When After While Then and went to the store park cafe were at had a long chat , gave handed "
             "passed wrote drink ball cup letter Mary John Tom Anna").split()


def test_ioi_lite_on_a_tiny_llama():
    tok = word_tokenizer(IOI_WORDS)
    model = tiny("llama")
    assert len(IOI_WORDS) <= VOCAB
    tasks = ioi_task(model, tok, 3, seed=0)
    refs = []
    for t in tasks:
        words = t.text["clean"].split()
        bad = t.text["corrupt"].split()
        io, s = t.text["io"], t.text["s"]
        # ABC: the repeated subject (the word before the verb) is replaced by a third name; the rest is the same
        diff = [i for i, (u, v) in enumerate(zip(words, bad)) if u != v]
        assert len(diff) == 1 and words[diff[0]] == s and bad[diff[0]] not in (io, s)
        assert t.targets == (IOI_WORDS.index(io),) and t.baselines == (IOI_WORDS.index(s),)
        with torch.no_grad():
            lc = model(t.clean).logits[0, -1].double()
            lb = model(t.corrupt).logits[0, -1].double()
        refs.append((float(lc[t.targets[0]] - lc[t.baselines[0]]), float(lb[t.targets[0]] - lb[t.baselines[0]])))
    a = causal_analysis(model, tok, "ioi-lite", 3, seed=0)
    assert a.clean_metric == pytest.approx(sum(r[0] for r in refs) / 3, rel=1e-4, abs=1e-5)
    assert a.corrupt_metric == pytest.approx(sum(r[1] for r in refs) / 3, rel=1e-4, abs=1e-5)
    assert a.patch.shape == (2, 4) and bool(a.patch.isfinite().all()) and bool(a.dla.isfinite().all())
    with pytest.raises(ValueError, match="single tokens"):
        ioi_task(model, word_tokenizer(["<unk>", "When", "Mary"]), 1)
