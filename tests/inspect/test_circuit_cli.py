"""`attnlab circuit`: task generators (single-token answers), promote/suppress on a planted DLA, and the command
end to end on the saved planted induction circuit (known answers: path patching to the logits picks only the
induction head 1.0, which writes the answer; activation patching picks 1.0 and the previous-token head 0.0, linked
0.0 -> 1.0 via k)."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.cli import main
from attnlab.inspect.causal_report import colors_task, factual_task, induction_task
from attnlab.inspect.circuit_cli import promote_suppress, run_circuit, write_circuit_report
from attnlab.models import hf  # noqa: E402
from tests.inspect.test_causal import BOS, IND_HEAD, NV, PREV_HEAD, planted
from tests.inspect.test_causal_cli import word_tokenizer
from tests.models.hf_tiny import tiny

WORDS = ("<unk> On In the table floor room , I see there is a and . What color ? The has visited red blue green "
         "black pen cup book ball Mary John Tom Anna Paris Rome London Berlin Tokyo Madrid Oslo").split()


def test_colors_and_factual_prompts():
    tok = word_tokenizer(WORDS)
    model = tiny("llama")
    for t in colors_task(model, tok, 4, seed=1):
        c, b = t.text["clean"].split(), t.text["corrupt"].split()
        assert t.targets == (WORDS.index(t.text["answer"]),) and t.baselines == (WORDS.index(t.text["corrupt_answer"]),)
        # the answer colour sits right before the queried object in the context; only the two query mentions differ
        q = c[-2]
        assert c[c.index(q) - 1] == t.text["answer"] and b[b.index(b[-2]) - 1] == t.text["corrupt_answer"]
        assert [i for i, (u, v) in enumerate(zip(c, b)) if u != v] == [len(c) - 5, len(c) - 2]
        assert t.rows == (len(t.clean[0]) - 1,)
    for t in factual_task(model, tok, 4, seed=2):
        c = t.text["clean"].split()
        a_cities = [w for w in c[3:8] if w not in (",", "and")]  # "Anna has visited P , R and O"
        said = t.sets["said"][0]
        assert WORDS[said] == c[-2] and WORDS[said] in a_cities
        assert sorted(t.sets["correct"] + [said]) == sorted(WORDS.index(w) for w in a_cities)
        assert not set(t.sets["distractors"]) & set(t.sets["correct"] + [said])
        assert t.rows == (len(c) - 1,) * 2 and t.targets == tuple(t.sets["correct"])
        assert set(t.baselines) <= set(t.sets["distractors"])
        assert t.corrupt.shape == t.clean.shape and t.text["corrupt"].split()[-4] != t.text["subject"]
    with pytest.raises(ValueError, match="single-token"):
        colors_task(model, word_tokenizer(["<unk>", "red", "pen"]), 1)


@pytest.mark.slow
def test_answers_are_single_smollm2_tokens(smollm2):
    model, tok = smollm2
    for t in colors_task(model, tok, 6) + factual_task(model, tok, 6):
        for tid in t.targets + t.baselines + tuple(t.sets.get("said", ())):
            assert len(tok(tok.decode([tid]), add_special_tokens=False)["input_ids"]) == 1
        assert t.clean.shape == t.corrupt.shape and t.rows[0] == t.clean.shape[1] - 1


def test_promote_suppress_planted():
    L, H = 3, 4
    g = torch.Generator().manual_seed(0)
    noise = lambda *s: 0.01 * torch.randn(*s, L, H, generator=g, dtype=torch.float64)  # noqa: E731
    correct, said, distr = noise(2), noise(1), noise(3)
    correct[:, 2, 1] += 2.0  # promoter: raises every correct answer
    said[:, 2, 3] -= 1.5  # suppressor: lowers the answer already said
    correct[:, 1, 0] += 1.0
    said[:, 1, 0] -= 1.0  # both
    distr[:, 0, 2] += 3.0  # raises the distractors: relative to them, it lowers the said answer (suppress)
    r = promote_suppress(correct, said, distr, tau=0.25)
    roles = {(i, h): r["labels"][i][h] for i in range(L) for h in range(H) if r["labels"][i][h]}
    assert roles == {(2, 1): "promote", (2, 3): "suppress", (1, 0): "both", (0, 2): "suppress"}
    assert r["threshold"] == pytest.approx(0.25 * float(r["promote"].abs().max()))
    want = correct.mean(0) - distr.mean(0)
    torch.testing.assert_close(r["promote"], want)
    with pytest.raises(ValueError, match="tau"):
        promote_suppress(correct, said, distr, tau=1.5)
    with pytest.raises(ValueError, match="said"):
        promote_suppress(correct, said[..., :2], distr)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    planted().save_pretrained(folder)
    word_tokenizer([f"t{i}" for i in range(NV - 1)] + ["<s>"], bos="<s>").save_pretrained(folder)
    return folder


def test_circuit_path_screen_finds_the_direct_head(saved, tmp_path):
    """One round of the path screen (path patching to the logits) keeps only the induction head (the
    previous-token head acts through it, so its path effect is ~0 although its activation-patching effect is
    large); zeroing the one head still removes the gap; a rerun with ``both`` reuses the path rows and adds only
    the activation screen."""
    hf.SHARED.pop(str(saved), None)
    kw = dict(n=3, top=5, screen_n=2, path_n=1, length=7, path_rounds=1, run_dir=tmp_path, show_progress=False)
    d = run_circuit(str(saved), "induction", **kw)
    assert d["screen"] == "path" and list(d["screens"]) == ["path"]
    assert d["heads"] == [[1, IND_HEAD]] and d["edges"] == []  # one head: no pair to path-patch
    assert d["found"] == [{"head": [1, IND_HEAD], "round": 1, "route": "logits",
                           "effect": pytest.approx(float(d["screens"]["path"][1][IND_HEAD]))}]
    assert d["rounds"] == []
    path = torch.tensor(d["screens"]["path"])
    assert path[1, IND_HEAD] > 0.9 and abs(path[0, PREV_HEAD]) < 0.05
    k = d["knockout"]
    assert k["circuit"]["fraction"] > 0.9 and abs(k["control"]["fraction"]) < 0.1 and len(k["control_heads"]) == 1
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    both = run_circuit(str(saved), "induction", screen="both", **kw)
    new = (tmp_path / "results.jsonl").read_text().splitlines()[len(rows):]
    assert [json.loads(r)["stage"] for r in new] == ["screen", "screen"]  # activation rows only
    assert both["heads"] == d["heads"] and both["screens"]["path"] == d["screens"]["path"]
    act = torch.tensor(both["screens"]["activation"])
    assert act[0, PREV_HEAD] > 0.5 and act[1, IND_HEAD] > 0.9
    assert both["head_effects"]["activation"] == [pytest.approx(float(act[1, IND_HEAD]), abs=1e-6)]
    # and back to the activation screen alone: its rows are reused, only its own paths and knockout run
    rows = (tmp_path / "results.jsonl").read_text().splitlines()
    act_only = run_circuit(str(saved), "induction", screen="activation", **kw)
    new = (tmp_path / "results.jsonl").read_text().splitlines()[len(rows):]
    assert {json.loads(r)["stage"] for r in new} == {"paths", "knock"}
    assert sorted(map(tuple, act_only["heads"])) == [(0, PREV_HEAD), (1, IND_HEAD)]
    assert act_only["dla"] == d["dla"] and act_only["screens"]["activation"] == both["screens"]["activation"]
    # nothing reaches the threshold: no paths, no knockout, and the report says which heads came closest
    none = run_circuit(str(saved), "induction", min_effect=1.5, **kw)
    assert none["heads"] == [] and none["knockout"] == {} and none["largest"][0][:2] == [1, IND_HEAD]
    md = write_circuit_report(none, tmp_path / "none", pngs=False)["md"].read_text()
    assert "No head reaches |effect| >= --min-effect 1.5 (largest: L1.H0 " in md
    with pytest.raises(ValueError, match="screen"):
        run_circuit(str(saved), "induction", screen="dla", **kw)


def test_circuit_path_rounds_find_the_previous_token_head_through_k(saved, tmp_path):
    """Iterated path patching, 2 rounds: round 1 (senders -> logits) finds the induction head only;
    round 2 (every layer-0 head -> the induction head's q, k, v separately) adds the previous-token head through
    its keys, not its queries or values; the rows of round 1 are those of a one-round run, reused on resume."""
    hf.SHARED.pop(str(saved), None)
    kw = dict(n=3, top=5, screen_n=2, path_n=1, length=7, run_dir=tmp_path, show_progress=False)
    one = run_circuit(str(saved), "induction", path_rounds=1, **kw)
    n_rows = len((tmp_path / "results.jsonl").read_text().splitlines())
    d = run_circuit(str(saved), "induction", path_rounds=2, **kw)
    new = [json.loads(r) for r in (tmp_path / "results.jsonl").read_text().splitlines()[n_rows:]]
    assert [r["stage"] for r in new if r["stage"] != "knock"] == ["round", "round", "paths"]  # round 1 reused
    assert d["path_rounds"] == 2 and d["screens"] == one["screens"]
    assert [(f["head"], f["round"], f["route"]) for f in d["found"]] == [([1, IND_HEAD], 1, "logits"),
                                                                       ([0, PREV_HEAD], 2, "k")]
    assert d["heads"] == [[1, IND_HEAD], [0, PREV_HEAD]]
    prev = d["found"][1]
    assert prev["effect"] == prev["routes"]["k"] > 0.75
    assert abs(prev["routes"]["q"]) < 0.02 and abs(prev["routes"]["v"]) < 0.02
    (r2,) = d["rounds"]
    assert r2["round"] == 2 and r2["receivers"] == [[1, IND_HEAD]] and r2["new"] == [[0, PREV_HEAD]]
    e = torch.tensor([r2["effects"][v] for v in ("q", "k", "v")])  # (route, sender layers = 1, heads)
    assert e.shape == (3, 1, 4) and e[1, 0, PREV_HEAD] > 0.75
    e[1, 0, PREV_HEAD] = 0
    assert e.abs().max() < 0.02  # no distractor, through no route
    k = d["knockout"]
    assert k["circuit"]["fraction"] > 0.9 and abs(k["control"]["fraction"]) < 0.1 and len(k["control_heads"]) == 2
    md = write_circuit_report(d, tmp_path / "md", pngs=False)["md"].read_text()
    assert "| head | round | route | effect found | path to logits | DLA |" in md
    assert f"| L0.H0 | 2 | k | {prev['effect']:.3f} |" in md and "| L1.H0 | 1 | logits |" in md
    assert "Round 2: every earlier head -> L1.H0 (q / k / v separately); new: L0.H0" in md
    assert write_circuit_report(d, tmp_path / "png")["round2"].stat().st_size > 1000
    # a third round (the default) has no receiver to work on (the previous-token head sits in layer 0): it stops
    three = run_circuit(str(saved), "induction", **kw)
    assert three["path_rounds"] == 3
    assert three["found"] == d["found"] and len(three["rounds"]) == 1
    with pytest.raises(ValueError, match="path_rounds"):
        run_circuit(str(saved), "induction", path_rounds=0, **kw)


def test_circuit_activation_screen_finds_both_planted_heads(saved, tmp_path):
    hf.SHARED.pop(str(saved), None)
    d = run_circuit(str(saved), "induction", screen="activation", n=4, top=5, screen_n=2, path_n=1, length=7,
                    run_dir=tmp_path, show_progress=False)
    assert sorted(map(tuple, d["heads"])) == [(0, PREV_HEAD), (1, IND_HEAD)]
    best = d["edges"][0]
    assert (best["sender"], best["receiver"], best["via"]) == ([0, PREV_HEAD], [1, IND_HEAD], "k")
    assert best["effect"] > 0.75 and all(abs(e["effect"]) < 0.05 for e in d["edges"][1:])
    k = d["knockout"]
    assert k["circuit"]["fraction"] > 0.9 and abs(k["control"]["fraction"]) < 0.1
    assert k["circuit"]["ci"][0] <= k["circuit"]["drop"] <= k["circuit"]["ci"][1]
    # resume: every stage's rows are already there, nothing reruns and the answer is the same
    n_rows = len((tmp_path / "results.jsonl").read_text().splitlines())
    d2 = run_circuit(str(saved), "induction", screen="activation", n=4, top=5, screen_n=2, path_n=1, length=7,
                     run_dir=tmp_path, show_progress=False)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == n_rows
    assert d2["heads"] == d["heads"]
    t = induction_task(planted(), type("T", (), {"all_special_ids": [BOS], "bos_token_id": BOS})(), 7,
                       corrupt="first")
    assert t.clean[0, 8:].tolist() == t.corrupt[0, 8:].tolist()  # first-copy corruption keeps the second copy


def test_cli_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["circuit", "induction", "--model", str(saved), "--n", "3", "--screen-n", "1", "--path-n", "1",
                 "--length", "7", "--lens-steps", "5", "--screen", "activation", "--top", "2",
                 "--out", str(out)]) == 0
    (run,) = out.glob("circuit-*")
    d = json.loads((run / "circuit.json").read_text())
    assert sorted(map(tuple, d["heads"])) == [(0, PREV_HEAD), (1, IND_HEAD)] and d["knockout"]["prompts"] == 3
    md = (run / "circuit.md").read_text()
    assert "| L0.H0 | L1.H0 | k |" in md and "| L1.H0 |" in md.split("Attention Lens")[1]
    assert "| head | activation patching | DLA |" in md
    assert [(r["layer"], r["head"]) for r in d["lens"]] == [tuple(h) for h in d["heads"]]
    for png in ("activation_z.png", "dla.png"):
        assert (run / png).stat().st_size > 1000
    # both screens in one table, the heads picked by path patching to the logits
    out2 = tmp_path / "runs2"
    assert main(["circuit", "induction", "--model", str(saved), "--n", "2", "--screen-n", "1", "--length", "7",
                 "--screen", "both", "--no-png", "--out", str(out2)]) == 0
    (run2,) = out2.glob("circuit-*")
    assert "circuit by the path screen" in " ".join(capsys.readouterr().out.split())  # the rich table's title
    d2 = json.loads((run2 / "circuit.json").read_text())
    assert d2["heads"] == [[1, IND_HEAD], [0, PREV_HEAD]] and set(d2["screens"]) == {"path", "activation"}
    assert [f["route"] for f in d2["found"]] == ["logits", "k"]
    md2 = (run2 / "circuit.md").read_text()
    assert "| head | round | route | effect found | path to logits | activation patching | DLA |" in md2
    row = next(line for line in md2.splitlines() if line.startswith("| L1.H0 |"))
    want = (d2["head_effects"]["path"][0], d2["head_effects"]["activation"][0])
    assert row.startswith(f"| L1.H0 | 1 | logits | {want[0]:.3f} | {want[0]:.3f} | {want[1]:.3f} |")
    out3 = tmp_path / "runs3"  # --path-rounds 1: the logits screen alone
    assert main(["circuit", "induction", "--model", str(saved), "--n", "2", "--screen-n", "1", "--length", "7",
                 "--path-rounds", "1", "--no-png", "--out", str(out3)]) == 0
    (run3,) = out3.glob("circuit-*")
    assert json.loads((run3 / "circuit.json").read_text())["heads"] == [[1, IND_HEAD]]
    assert main(["circuit", "induction", "--model", str(saved), "--path-rounds", "0", "--out", str(out3)]) == 2
    assert main(["circuit", "induction", "--model", str(tmp_path / "nope"), "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["circuit", "copying"])


def test_zeroing_equals_removing_the_heads_columns():
    """Reference: the heads' columns of o_proj set to zero in a copy of the model (no hooks)."""
    import copy

    from attnlab.inspect.circuit_cli import screen_prompt, zeroed_metrics

    tok = word_tokenizer(WORDS)
    model = tiny("llama")
    (t,) = factual_task(model, tok, 1, seed=0)
    sets = [[], [(1, 2)], [(0, 1), (1, 3)]]
    got = zeroed_metrics(model, t, sets)
    for hs, m in zip(sets, got, strict=True):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for layer, h in hs:
                ref.model.layers[layer].self_attn.o_proj.weight[:, h * 8:(h + 1) * 8] = 0
            want = t.metric()(ref(input_ids=t.clean).logits)
        assert m == pytest.approx(want, rel=1e-5, abs=1e-6)
    r = screen_prompt(model, t)
    assert r["clean"] == pytest.approx(got[0], rel=1e-5, abs=1e-6)
    assert torch.tensor(r["patched"]).shape == (2, 4) and len(r["sets"]["correct"]) == 2
    assert len(r["sets"]["distractors"]) == 3 and torch.tensor(r["sets"]["said"]).shape == (1, 2, 4)
