"""``attnlab bench scbench`` on tiny random models: the shared-context task generator, multi-turn decoding with
the cache kept equal to one cache-free forward over the concatenated turns, full budgets equal to dense across
turns, compressed caches within their budget after every turn, the query-agnostic protocol, the command."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import tiny  # noqa: E402

from attnlab.bench import scbench as S  # noqa: E402
from attnlab.frontier import methods as M  # noqa: E402
from attnlab.frontier import run as R  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans.plan import HeadPlan, HeadPolicy  # noqa: E402

VOCAB = 512
L = 160  # context tokens (pieces of the toy tokenizer)


class WordTok:
    """A reversible toy tokenizer (no BOS), the interface the tasks use: each word or punctuation mark with
    its leading whitespace is one token; ids are given in order of first appearance."""

    bos_token_id = None
    PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        out = []
        for piece in self.PIECE.findall(text):
            if piece not in self.ids:
                self.ids[piece] = len(self.pieces)
                self.pieces.append(piece)
            out.append(self.ids[piece])
        assert max(out, default=0) < VOCAB, "toy vocabulary full"
        return {"input_ids": out}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] if i < len(self.pieces) else "?" for i in ids)


TOK = WordTok()


def model(family: str = "llama"):
    return tiny(family, vocab_size=VOCAB, max_position_embeddings=1024)


def sample(index: int = 0, turns: int = 3, items: int | None = None, length: int = L, seed: int = 0):
    return S.shared_sample(TOK, length, turns=turns, items=items, index=index, seed=seed)


# ---- the task ---------------------------------------------------------------------------------------------
def test_shared_sample_items_turns_and_determinism():
    s = sample(1, turns=3, items=4)
    assert len(s.context) == L and s.items == 4 and len(s.turns) == 3
    text = TOK.decode(s.context)
    # every item is in the context once, at its own place, in depth order
    starts = [text.index(S.needle(k, v)) for k, v in zip(s.keys, s.values)]
    assert all(text.count(S.needle(k, v)) == 1 for k, v in zip(s.keys, s.values))
    assert starts == sorted(starts) and len(set(starts)) == 4
    assert list(s.depths) == sorted(s.depths) and len(set(s.depths)) == 4 and 0.05 <= s.depths[0] < s.depths[-1] <= 0.95
    assert len(set(s.keys)) == 4 and len(set(s.values)) == 4
    # each turn asks a different item; its answer is in the context next to its key; rotation by the index
    assert [t.item for t in s.turns] == [1, 2, 3]
    for t in s.turns:
        assert TOK.decode(t.ids) == S.question(s.keys[t.item]) and t.answer == s.values[t.item]
        assert TOK.decode(t.reply) == f" {t.answer}." and TOK.decode(t.reply[: t.answer_len]) == f" {t.answer}"
        assert t.score_forced(list(t.reply)) == 1.0 and t.score_forced(list(t.reply[:-1]) + [0]) == 1.0
        assert t.score_forced([t.reply[0] + 1] + list(t.reply[1:])) == 0.0
        assert t.token_accuracy([t.reply[0] + 1] + list(t.reply[1:])) == pytest.approx(1 - 1 / t.answer_len)
        assert f"{s.keys[t.item]} = {t.answer}" in text
        assert t.score(f" {t.answer[:3]} {t.answer[3:]}.") == 1.0 and t.score(" 123.") == 0.0
    # seeded: the same arguments give the same sample, another index or seed another one
    assert sample(1, turns=3, items=4) == s
    assert sample(2, turns=3, items=4).context != s.context
    assert sample(1, turns=3, items=4, seed=1).values != s.values
    assert [t.item for t in sample(0, turns=4).turns] == [0, 1, 2, 3]


def test_shared_sample_bad_arguments():
    with pytest.raises(ValueError, match="turns"):
        sample(turns=0)
    with pytest.raises(ValueError, match="items"):
        sample(turns=3, items=2)
    with pytest.raises(ValueError, match="too short"):
        sample(turns=4, length=40)


# ---- the key equivalence: turns on a kept cache == one forward over everything ------------------------------
@pytest.mark.parametrize(("family", "history"), [("llama", "gold"), ("llama", "model"), ("gemma3", "gold")])
def test_multi_turn_cache_equals_full_forward(family, history):
    """Dense turns on the kept cache (questions and replies fed token by token) give the logits and greedy
    tokens of one cache-free forward over the concatenated context + (question, reply) * T."""
    m = model(family)
    s = sample(0, turns=3)
    res = S.run_dense(m, s, keep_logits=True, history=history)
    assert len(s.turns[0].ids) == 7  # "\nWhat does KEY equal? KEY =" (the toy tokenizer's pieces)
    seq = S.history(s, res["turns"])
    reply = [len(t.reply) if history == "gold" else t.max_new_tokens for t in s.turns]
    assert len(seq) == L + sum(len(t.ids) + n for t, n in zip(s.turns, reply))
    with torch.no_grad():
        full = m(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
    pos = L
    for turn, r, n in zip(s.turns, res["turns"], reply):
        pos += len(turn.ids)
        ref = full[pos - 1: pos - 1 + n]  # the logits before each reply token
        torch.testing.assert_close(r["logits"], ref, atol=2e-4, rtol=1e-4)
        assert r["tokens"] == ref.argmax(-1).tolist()
        assert r["fed"] == (list(turn.reply) if history == "gold" else r["tokens"])
        pos += n
        assert r["seen"] == pos
    with pytest.raises(ValueError, match="history"):
        S.run_turns(m, None, s, history="mine")


def _same_as_dense(res: dict, dense: dict) -> None:
    for r, d in zip(res["turns"], dense["turns"], strict=True):
        assert r["tokens"] == d["tokens"]
        torch.testing.assert_close(r["logits"], d["logits"], atol=2e-4, rtol=1e-4)


def test_full_plan_and_full_budgets_equal_dense_across_turns():
    """A plan of full heads (press and prefill) and the compress-once methods at budget 1.0 (they keep the
    whole context, then append) reproduce dense on every turn."""
    m = model()
    s = sample(3, turns=3)
    ctx = R.context(m, TOK)
    dense = S.run_dense(m, s, keep_logits=True)
    captured = R.prefill_dense(m, s.context, capture=True)[2]
    full = HeadPlan.uniform(ctx.num_layers, ctx.num_kv_heads, HeadPolicy.full(), ctx.q_per_kv)
    _same_as_dense(S.run_press(m, full, captured, s, keep_logits=True), dense)
    _same_as_dense(S.run_prefill(m, M.Setup(plan=full), s, keep_logits=True), dense)
    for name in ("snapkv", "knorm", "adakv"):
        plan = M.get(name).build(ctx, 1.0, L).plan
        res = S.run_press(m, plan, captured, s, keep_logits=True)
        _same_as_dense(res, dense)
        assert [r["kv_bytes"] for r in res["turns"]] == [r["kv_bytes"] for r in dense["turns"]], name


def test_compressed_caches_stay_within_budget_after_every_turn():
    """KV bytes after each turn <= budget x the dense context cache + what the turns appended (compress-once
    methods grow by the tokens fed after the context; fixed-size ones do not grow at all), and well below
    dense after the last turn."""
    m = model()
    f = 0.25
    s = sample(4, turns=2, length=256)  # SnapKV's 32-query window and a budget above it
    ctx = R.context(m, TOK)
    geo_bytes = 2 * 2 * 2 * 8 * 4  # layers x kv heads x (k, v) x head_dim x float32 bytes, per position
    dense = S.run_dense(m, s)
    assert dense["turns"][0]["kv_bytes"] == geo_bytes * dense["turns"][0]["seen"]
    captured = R.prefill_dense(m, s.context, capture=True)[2]
    runs = {(n, "press"): S.run_press(m, M.get(n).build(ctx, f, 256).plan, captured, s)
            for n in ("stream", "snapkv", "pyramidkv", "adakv", "knorm", "tova", "h2o")}
    runs[("stream", "prefill")] = S.run_prefill(m, M.get("stream").build(ctx, f, 256), s)
    for (name, protocol), res in runs.items():
        for r, d in zip(res["turns"], dense["turns"], strict=True):
            assert r["seen"] == d["seen"]  # the same tokens were fed after the context
            appended = r["seen"] - 256
            # PyramidKV's first layer keeps 1.5x the mean; H2O's accumulators add 1/(2 D) of its entries
            slack = 1.5 if name == "pyramidkv" else 1.1
            bound = slack * f * geo_bytes * 256 + geo_bytes * appended
            assert r["kv_bytes"] <= bound, (name, protocol, r["kv_bytes"], bound)
        assert res["turns"][-1]["kv_bytes"] < 0.6 * dense["turns"][-1]["kv_bytes"], (name, protocol)
        if name in ("stream", "tova", "h2o"):  # fixed-size caches do not grow with the turns
            assert res["turns"][-1]["kv_bytes"] == res["turns"][0]["kv_bytes"], name


def _kept_after(m, plan, captured, ids) -> list:
    from attnlab.models import hf

    cache, runner = R.replay(plan, captured)
    with hf.use(m, runner):
        for t in ids:
            S.step(m, t, cache)
    return [layer.groups[0].state["_kept"].clone() for layer in cache.layers]


def test_press_is_query_agnostic_press_q1_is_not():
    """press compresses before any question token is read: SnapKV keeps the same positions whichever question
    comes; press+q1 prefills question 1 with the context, so its observation window (and choice) follows it."""
    m = model()
    s = sample(5, turns=3, length=256)
    ctx = R.context(m, TOK)
    plan = M.get("snapkv").build(ctx, 0.25, 256).plan
    captured = R.prefill_dense(m, s.context, capture=True)[2]
    a, b = (_kept_after(m, plan, captured, s.turns[i].ids) for i in (0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    q1 = [R.prefill_dense(m, list(s.context) + list(s.turns[i].ids), capture=True)[2] for i in (0, 1)]
    a1, b1 = (_kept_after(m, plan, q1[i], [s.turns[i].ids[-1]]) for i in (0, 1))
    assert not all(torch.equal(x, y) for x, y in zip(a1, b1))


# ---- configurations, aggregation, the command ---------------------------------------------------------------
def test_aggregate_known_answer():
    def row(method, sample, scores, kv, budget=None, protocol="dense"):
        return {"model": "m", "length": 10, "method": method, "budget": budget, "protocol": protocol,
                "family": "x", "sample": sample, "seconds": 1.0,
                "turns": [{"score": s, "kv_bytes": b, "token_acc": s / 2 + 0.5} for s, b in zip(scores, kv)]}

    rows = [row("dense", 0, [1, 1, 1], [100, 110, 120]), row("dense", 1, [1, 0, 1], [100, 110, 120]),
            row("snapkv", 0, [1, 0, 0], [25, 35, 45], 0.25, "press"),
            row("snapkv", 1, [1, 1, 0], [25, 35, 45], 0.25, "press"),
            {"model": "m", "method": "tova", "error": "boom"}]
    out = {r["method"]: r for r in S.aggregate(rows)}
    assert set(out) == {"dense", "snapkv"}
    sn = out["snapkv"]
    assert sn["accuracy"] == [1.0, 0.5, 0.0] and sn["n"] == 2
    assert sn["token_accuracy"] == [1.0, 0.75, 0.5]
    assert sn["kv_ratio"] == pytest.approx([0.25, 35 / 110, 45 / 120])
    assert sn["degradation"] == pytest.approx(((1 - 0) + (1 - 0.5)) / 2)
    assert out["dense"]["degradation"] == pytest.approx((0 + 0.5) / 2)
    lo, hi = sn["degradation_ci"]
    assert 0.5 <= lo <= 0.75 <= hi <= 1.0
    assert S.degradation([1.0]) == 0.0
    md = S.markdown(S.aggregate(rows))
    assert "turn 3" in md and "+0.75" in md
    assert "| m | 10 | snapkv | 0.250 | press | 1.00 | 0.75 | 0.50 | +0.38 |" in md


def test_configs_cover_protocols():
    cfgs = S.configs(["m"], ["snapkv", "stream", "moba"], [0.25], ("press", "press+q1", "prefill"), 2, 100)
    got = {(c.sample, c.method, c.protocol) for c in cfgs}
    assert (0, "dense", "dense") in got and cfgs[0].method == "dense"
    assert {(m, p) for _, m, p in got} == {("dense", "dense"), ("snapkv", "press"), ("snapkv", "press+q1"),
                                          ("stream", "press"), ("stream", "press+q1"), ("stream", "prefill"),
                                          ("moba", "prefill")}
    assert len({c.key for c in cfgs}) == len(cfgs)
    with pytest.raises(ValueError, match="unknown frontier method"):
        S.configs(["m"], ["nope"], [0.25], ("press",), 1, 100)


def _args(tmp_path, **kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    S.register(parser.add_subparsers())
    argv = ["scbench", "--models", "tiny", "--methods", "snapkv,stream,minference", "--n", "1", "--turns", "2",
            "--length", str(L), "--out", str(tmp_path)]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return parser.parse_args(argv)


def test_command_writes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(hf.SHARED, "tiny", (model(), TOK))
    assert S.run(_args(tmp_path)) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name.startswith("scbench-")]
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    # dense + snapkv press + stream press + stream prefill + minference prefill
    assert len(recs) == 5 and not [r for r in recs if "error" in r]
    assert all(len(r["turns"]) == 2 for r in recs)
    res = json.loads((run_dir / "results.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"dense", "snapkv", "stream", "minference"}
    assert (run_dir / "results.md").read_text().count(f"| tiny | {L} |") == 5 * 2  # exact + answer-token tables
    assert (run_dir / f"scbench-tiny-{L}.png").stat().st_size > 0
    # resuming with another method runs only its configuration; the report covers the whole folder
    assert S.run(_args(tmp_path, resume=run_dir, methods="knorm")) == 0
    lines = (run_dir / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["method"] == "knorm"
    res = json.loads((run_dir / "results.json").read_text())
    assert {r["method"] for r in res["rows"]} == {"dense", "snapkv", "stream", "minference", "knorm"}
    calls = []
    monkeypatch.setattr(S, "run_config", lambda cfg: calls.append(cfg) or {})
    assert S.run(_args(tmp_path, resume=run_dir)) == 0
    assert calls == [] and (run_dir / "results.jsonl").read_text().splitlines() == lines


def test_run_config_records_errors(monkeypatch):
    cfg = S.Config("tiny-missing", 0, "snapkv", 0.25, "prefill", L)
    monkeypatch.setitem(hf.SHARED, "tiny-missing", (model(), TOK))
    out = S.run_config(cfg)  # SnapKV has no prefill protocol
    assert "error" in out and "press" in out["error"]


@pytest.mark.slow
def test_smollm2_answers_every_turn_and_press_shrinks_the_cache():
    """On the real model: the context is sized in its tokens, dense answers each turn on the kept cache, and a
    query-agnostic press keeps about its budget."""
    from attnlab.models.hf import load_model

    m, tok = load_model("smollm2")
    s = S.shared_sample(tok, 512, turns=2, index=1)
    assert len(s.context) == 512
    assert tok.decode(list(s.turns[0].ids)) == S.question(s.keys[s.turns[0].item])
    dense = S.run_dense(m, s, capture=True)
    texts = [tok.decode(r["tokens"]) for r in dense["turns"]]
    assert [t.score_forced(r["tokens"]) for t, r in zip(s.turns, dense["turns"])] == [1.0, 1.0], texts
    plan = M.get("snapkv").build(R.context(m, tok), 0.25, 512).plan
    press = S.run_press(m, plan, dense["captured"], s)
    for r, d in zip(press["turns"], dense["turns"]):
        assert r["kv_bytes"] < 0.4 * d["kv_bytes"]
