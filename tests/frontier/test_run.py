"""The frontier runner on tiny random models: the shared dense prefill + replay gives exactly the cache a
method's own prefill builds, a full budget reproduces dense decoding, records aggregate into report rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_tiny import VOCAB, tiny  # noqa: E402

from attnlab.frontier import methods as M  # noqa: E402
from attnlab.frontier import run as R  # noqa: E402
from attnlab.plans.plan import HeadPolicy  # noqa: E402
from attnlab.plans.runtime import greedy_generate  # noqa: E402
from attnlab.plans.tasks import Sample  # noqa: E402

L = 48


def sample(seed: int = 0, new: int = 5, length: int = L) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(1, VOCAB, (length,), generator=g).tolist())
    return Sample("passkey", ids, ("x",), length, 0.5, new)


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


#: methods whose own prompt computation is dense (press only): their replayed cache must equal their own
#: (LAQ decodes pseudo tokens between the prompt and its compression: tested on its own below)
PRESS = [m for m in M.METHODS.values() if m.protocols == ("press",) and m.name != "laq"]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("meth", PRESS, ids=lambda m: m.name)
def test_press_replay_equals_the_methods_own_prefill(family, meth):
    """replay(plan, dense capture) then decode == PlanRunner prefill + decode (greedy_generate), token for
    token, and the caches hold the same bytes: the replay is the policy's own prompt handling."""
    model = tiny(family)
    ctx = R.context(model, Tok())
    s = sample(1)
    plan = meth.build(ctx, 0.25, L).plan
    ids = torch.tensor([s.ids])
    dense = R.run_dense(model, ids, 4, capture=True)
    press = R.run_press(model, plan, dense, 4)
    own = greedy_generate(model, ids, plan, max_new_tokens=5)
    assert torch.equal(press["tokens"], own["tokens"])
    assert press["kv_bytes"] == own["kv_bytes"]


# MoA's plan is calibrated at (f, L) on a real model; PyramidKV's last layers keep half the mean budget by design
FULL_BUDGET = [m for m in M.METHODS.values() if m.name not in ("moa", "pyramidkv")]


@pytest.mark.parametrize("meth", FULL_BUDGET, ids=lambda m: m.name)
def test_full_budget_reproduces_dense(meth):
    """At budget 1.0 every method keeps (or reads) everything: the same tokens as dense decoding."""
    model = tiny("llama")
    ctx = R.context(model, Tok())
    for name in ("probe", "duo", "atlas"):  # head scores, injected (a real model's calibration is not needed)
        ctx.cache[name] = torch.rand(2, 2)
    s = sample(2)
    ids = torch.tensor([s.ids])
    dense = R.run_dense(model, ids, 4, capture=True)
    setup = meth.build(ctx, 1.0, L)
    for protocol in meth.protocols:
        res = R.run_press(model, setup.plan, dense, 4) if protocol == "press" else R.run_prefill(model, setup, ids, 4)
        assert torch.equal(res["tokens"], dense["tokens"]), (meth.name, protocol)


def test_budgets_shrink_the_cache():
    model = tiny("llama")
    ctx = R.context(model, Tok())
    ids = torch.tensor([sample(3, length=200).ids])  # long enough for SnapKV's 32-query window
    dense = R.run_dense(model, ids, 2, capture=True)
    for name in ("snapkv", "pyramidkv", "tova", "h2o", "knorm", "adakv", "stream"):
        res = R.run_press(model, M.get(name).build(ctx, 0.25, 200).plan, dense, 2)
        assert res["kv_bytes"] < 0.5 * dense["kv_bytes"], name


def test_gemma3_methods_act_on_full_layers_only():
    model = tiny("gemma3")  # layer 0 slides over 4 keys, layer 1 is full
    ctx = R.context(model, Tok())
    assert ctx.full_layers == (1,)
    plan = M.get("snapkv").build(ctx, 0.25, L).plan
    assert plan.policies[0][0].kind == "stream" and plan.policies[0][0].window == 4
    assert plan.policies[1][0].kind == "snap"
    assert set(M.get("moba").build(ctx, 0.25, L).ops) == {1}


def test_gemma3_budgets_cover_the_local_layers_unless_kept():
    """local="shrink" (the default) shrinks the sliding layers to the budget's share of their window, so the
    cache can go under the local layers' own share; local="keep" leaves them whole (and labels the model)."""
    from attnlab.plans.sources import local_policy

    assert local_policy(512) == local_policy(512, 1.0) == HeadPolicy.stream(0, 512)
    shrunk = local_policy(512, 0.25)
    assert shrunk.sinks == 4 and abs(shrunk.kept(4096) - 0.25 * 511) <= 1
    assert local_policy(4, 0.25) == HeadPolicy.stream(0, 4)  # too short to shrink
    with pytest.raises(ValueError, match="budget"):
        local_policy(512, 0.0)
    model = tiny("gemma3", sliding_window=64)
    T = 200
    s = sample(4, length=T)
    ids = torch.tensor([s.ids])
    dense = R.run_dense(model, ids, 2, capture=True)
    held = {}
    for local in ("shrink", "keep"):
        ctx = R.context(model, Tok(), local=local)
        plan = M.get("snapkv").build(ctx, 0.25, T).plan
        held[local] = R.run_press(model, plan, dense, 2)["kv_bytes"]
        local_share = 63 / (63 + T + 1)  # the sliding layer holds 63 keys, the full one every position
        if local == "keep":
            assert plan.policies[0][0] == HeadPolicy.stream(0, 64)
            assert R.model_label("gemma3", ctx) == "gemma3:own-windows"
            assert held[local] > local_share * dense["kv_bytes"]
        else:
            assert plan.policies[0][0] == local_policy(64, 0.25)
            assert R.model_label("gemma3", ctx) == "gemma3"
            assert held[local] <= 0.3 * dense["kv_bytes"]
            # press: the prompt ran densely (the same first token), the compressed local cache changes what follows
            # when the window the model reads is shorter; the plan's own prefill reads the short window at once
            press = R.run_press(model, plan, dense, 2)["tokens"]
            own = greedy_generate(model, ids, plan, max_new_tokens=3)["tokens"]
            assert press[0, 0] == dense["tokens"][0, 0]
            assert not torch.equal(own[0, :1], dense["tokens"][0, :1]) or not torch.equal(press, own)
    assert held["shrink"] < held["keep"]
    with pytest.raises(ValueError, match="local"):
        M.Context(None, None, 2, 2, 2, (1,), local="drop")
    assert R.model_label("smollm2", R.context(tiny("llama"), Tok(), local="keep")) == "smollm2"


@pytest.mark.parametrize("f", [0.25, 0.5, 0.9])
def test_gemma3_local_min_gives_the_full_layers_what_the_windows_do_not_hold(f):
    """local="min": every KV method holds about f of the dense cache, the sliding layers LOCAL_MIN positions
    (unless the full layers cannot spend the budget: then the windows get the rest), the full layers the
    rest; density methods (Quest) keep every key; records are labelled MODEL:local-min."""
    model = tiny("gemma3", sliding_window=128)
    T = 400
    ids = torch.tensor([sample(5, length=T).ids])
    dense = R.run_dense(model, ids, 2, capture=True)
    ctx = R.context(model, Tok(), local="min")
    assert R.model_label("gemma3", ctx) == "gemma3:local-min"
    dense_positions = 127 + T  # the sliding layer's window, the full layer's prompt
    each = min(M.LOCAL_MIN, f * 127)  # never more than shrink would hold
    local_kept = max(each, f * dense_positions - T)
    assert ctx.layer_fraction(f, T) == pytest.approx(min(1.0, (f * dense_positions - each) / T))
    for name in ("stream", "snapkv", "tova", "adakv"):  # (PyramidKV gives a lone full layer 1.5x by design)
        setup = M.get(name).build(ctx, f, T)
        assert abs(setup.plan.policies[0][0].kept(T) - local_kept) <= 2, name
        res = R.run_press(model, setup.plan, dense, 2)
        assert abs(res["kv_bytes"] / dense["kv_bytes"] - f) < 0.03, (name, res["kv_bytes"] / dense["kv_bytes"])
    shrink = M.get("snapkv").build(R.context(model, Tok()), f, T).plan
    more = M.get("snapkv").build(ctx, f, T).plan[1, 0].budget - shrink[1, 0].budget  # what the full layer gains
    assert more > 0 if f >= 0.5 else more == 0
    quest = M.get("quest").build(ctx, f, T).plan
    assert quest[0, 0] == HeadPolicy.stream(0, 128) and quest[1, 0].kind == "topk"
    # a prompt shorter than the window: the window's share is of the positions it holds, not of its length
    short = 60
    plan = M.get("snapkv").build(ctx, f, short).plan
    assert plan[0, 0].kept(short) <= max(min(M.LOCAL_MIN, f * short), f * 2 * short - short) + 2
    with pytest.raises(ValueError, match="has none"):
        M.Context(None, None, 2, 2, 2, (), local="min")._min_split(f, T)


def test_run_sample_records_and_aggregate(tmp_path):
    model = tiny("llama")
    ctx = R.context(model, Tok())
    cfgs = R.configs(["snapkv", "stream", "moba"], [0.25])
    recs = []
    for i in range(2):
        recs += R.run_sample(model, Tok(), ctx, sample(10 + i), cfgs, model_name="tiny", index=i)
    assert not [r for r in recs if "error" in r]
    assert {(r["method"], r["protocol"]) for r in recs} == {("dense", "dense"), ("snapkv", "press"),
                                                           ("stream", "prefill"), ("stream", "press"),
                                                           ("moba", "prefill")}
    rows = R.aggregate(recs)
    dense = [r for r in rows if r["method"] == "dense"][0]
    assert dense["kv_ratio"] == 1.0 and dense["n"] == 2 and dense["prefill_speedup"] == 1.0
    snap = [r for r in rows if r["method"] == "snapkv"][0]
    assert 0 < snap["kv_ratio"] < 1 and len(snap["scores"]) == 2


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown frontier method"):
        M.get("nope")


@pytest.fixture(scope="module")
def smol():
    from attnlab.models.hf import load_model

    return load_model("smollm2")


def test_grid_samples_cover_the_whole_context_and_tabulate(smol):
    _, tok = smol
    grid = R.samples(tok, R.GRID, 300, n=99)
    assert [s.depth for s in grid][-3:] == [0.9, 0.98, 1.0] and grid[0].depth == 0.0
    assert all(s.task == R.GRID and len(s.ids) == 300 for s in grid)
    recs = [{"model": "m", "task": R.GRID, "length": 300, "sample": i, "depth": s.depth, "method": "dense",
             "budget": None, "protocol": "dense", "score": float(i % 2)} for i, s in enumerate(grid)]
    table = R.depth_table(recs)
    assert "| m | 300 | dense | - | dense | 0.00 | 1.00 |" in table


def test_cli_writes_the_report_and_resumes(smol, tmp_path, capsys):
    from attnlab.cli import main

    args = ["frontier", "--models", "smollm2", "--methods", "snapkv,stream", "--budgets", "0.5", "--tasks",
            "passkey", "--lengths", "256", "--n", "1"]
    assert main(args + ["--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    names = {p.name for p in run_dir.iterdir()}
    assert {"samples.jsonl", "results.json", "results.md"} <= names and any(n.endswith(".png") for n in names)
    lines = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4  # dense, snapkv press, stream prefill, stream press
    capsys.readouterr()
    assert main(args + ["--resume", str(run_dir)]) == 0
    assert "1 done already" in capsys.readouterr().out
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 4
    md = (run_dir / "results.md").read_text()
    assert "snapkv" in md and "stream" in md
    # a new budget on a resumed run: only its configurations run (and the dense run they are paired with)
    more = [a if a != "0.5" else "0.5,0.25" for a in args]
    assert main(more + ["--resume", str(run_dir)]) == 0
    recs = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    added = recs[4:]
    assert sorted((r["method"], r["budget"]) for r in added) == [
        ("dense", None), ("snapkv", 0.25), ("stream", 0.25), ("stream", 0.25)]
    # another --n or --seed would draw other prompts under the same sample indices: refused, nothing run
    other_n = [a if prev != "--n" else "2" for prev, a in zip([None] + more, more)]
    for flag, other in (("--n", other_n), ("--seed", more + ["--seed", "1"])):
        with pytest.raises(SystemExit, match=f"was run with {flag}"):
            main(other + ["--resume", str(run_dir)])
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == len(recs)
    # an interrupted run (no results.json yet) is guarded too: sampling.json is written before the first sample
    (run_dir / "results.json").unlink()
    with pytest.raises(SystemExit, match="was run with --n"):
        main(other_n + ["--resume", str(run_dir)])
    (run_dir / "sampling.json").unlink()  # a folder from before sampling.json, interrupted: nothing to compare
    assert main(more + ["--resume", str(run_dir)]) == 0 and (run_dir / "sampling.json").is_file()


def test_cli_refuses_unknown_names():
    from attnlab.cli import main

    with pytest.raises(ValueError, match="unknown frontier method"):
        main(["frontier", "--methods", "nope"])
    with pytest.raises(SystemExit, match="unknown task"):
        main(["frontier", "--tasks", "nope", "--methods", "snapkv"])


def test_calibrations_persist_in_the_run_folder(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return torch.arange(6.0).view(2, 3)

    first = M.Context(None, None, 2, 3, 1, (0, 1), store=tmp_path)
    a = first.calibrated("probe", make)
    again = M.Context(None, None, 2, 3, 1, (0, 1), store=tmp_path)  # a resumed run: a new process
    b = again.calibrated("probe", make)
    assert calls == [1] and torch.equal(a, b)
    plan = M.get("stream").build(R.context(tiny("llama"), Tok()), 0.25, L).plan
    again.calibrated("moa-x", lambda: plan)
    assert M.Context(None, None, 2, 3, 1, (0, 1), store=tmp_path).calibrated("moa-x", make) == plan


def test_solvable_rows_keep_the_cells_dense_solves():
    rows = [{"model": "m", "task": t, "length": 10, "method": meth, "accuracy": a}
            for t, a_dense in (("easy", 1.0), ("hard", 0.0), ("half", 0.5)) for meth, a in (("dense", a_dense),
                                                                                            ("x", 0.2))]
    kept = R.solvable_rows(rows)
    assert sorted({r["task"] for r in kept}) == ["easy", "half"] and len(kept) == 4


@pytest.mark.parametrize("name", ["recycled", "delta", "quest"])
def test_decode_sparse_methods_read_the_prompt_densely(name):
    """Recycled, DELTA and Quest are decode-family methods: the prompt's logits equal the dense model's (their
    selection starts with the first decoding step), while a later step reads fewer keys than dense."""
    from attnlab.models import hf

    model = tiny("llama")
    ctx = R.context(model, Tok())
    T = 120
    ids = torch.tensor([sample(7, length=T).ids])
    setup = M.get(name).build(ctx, 0.1, T)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with hf.use(model, R.method_runner(model, setup)):
            own = model(input_ids=ids).logits
    torch.testing.assert_close(own, dense, rtol=1e-4, atol=1e-4)
    full = R.run_dense(model, ids, 6, capture=False)
    res = R.run_prefill(model, setup, ids, 6)
    assert res["tokens"][0, 0] == full["tokens"][0, 0]


def test_laq_re_selects_with_the_queries_of_tokens_decoded_over_snapkvs_cache():
    """LAQ = SnapKV whose scores add the queries of `lookahead` tokens first decoded over SnapKV's own cache.
    Checked against a reference that recomputes every step by hand: the pseudo queries equal those hooked on
    SnapKV's own greedy decoding (so the pseudo tokens are SnapKV's continuation), and the kept positions are the
    top-k of (last-window scores + lookahead scores) written out with softmax over the prompt keys; the whole
    method holds SnapKV's bytes, and with nothing to evict decodes as dense."""
    from attnlab.models import hf
    from attnlab.plans.policies.snap import snap_select

    model = tiny("llama")
    ctx = R.context(model, Tok())
    s = sample(3, new=6)
    ids = torch.tensor([s.ids])
    dense = R.run_dense(model, ids, 5, capture=True)
    laq = M.get("laq").build(ctx, 0.25, L)
    snap = M.get("snapkv").build(ctx, 0.25, L)
    assert laq.lookahead == M.LOOKAHEAD and laq.plan == snap.plan
    G = 3
    # SnapKV's own greedy continuation over its cache, hooked: one query row per step and layer
    rows = {}
    cache, runner = R.replay(snap.plan, dense["captured"])
    with hf.use(model, runner), hf.hooks(model, {"blocks.*.attn.q": lambda v, c: rows.setdefault(c.layer, []).append(v)}):
        R.decode(model, dense["first"], cache, G)
    ahead = R.pseudo_queries(model, snap.plan, dense, G)
    assert sorted(ahead) == list(range(ctx.num_layers))
    for layer, q in ahead.items():
        assert q.shape[2] == G and torch.equal(q, torch.cat(rows[layer], dim=2))
    # the kept positions: window scores + lookahead scores, by hand
    pol = snap.plan[0, 0]
    cache, _ = R.replay(snap.plan, dense["captured"], ahead)
    for layer in range(ctx.num_layers):
        rec = dense["captured"][layer]
        q, k = rec["q"].double(), rec["k"].double()
        H, Hkv = q.shape[1], k.shape[1]
        kk = k.repeat_interleave(H // Hkv, dim=1)
        w = pol.window
        att = (q[:, :, L - w:] @ kk.transpose(-1, -2)) * rec["scale"]
        att = att.masked_fill(torch.ones(w, L, dtype=torch.bool).triu(L - w + 1), float("-inf")).softmax(-1)
        la = ((ahead[layer].double() @ kk.transpose(-1, -2)) * rec["scale"]).softmax(-1)
        total = (att.sum(2) + la.sum(2)).view(1, Hkv, H // Hkv, L).sum(2)
        expect = snap_select(total, L, budget=pol.budget, window=w, kernel=pol.kernel)
        slot = cache.layers[layer].groups[0]
        got = snap_select(slot.state["_scores"].double(), L, budget=pol.budget, window=w, kernel=pol.kernel)
        assert torch.equal(got, expect), layer
        assert (slot.state["_scores"].double() - total).abs().max() < 1e-5
    # the whole method: the cache SnapKV's budget allows, and at a full budget the dense tokens
    res = R.run_press(model, laq.plan, dense, 5, laq.lookahead)
    assert res["kv_bytes"] == R.run_press(model, snap.plan, dense, 5)["kv_bytes"]
    full = M.get("laq").build(ctx, 1.0, L)
    assert torch.equal(R.run_press(model, full.plan, dense, 5, full.lookahead)["tokens"], dense["tokens"])


def test_lookahead_methods_are_refused_where_the_lookahead_cannot_run():
    from attnlab.cost import methods as CM
    from attnlab.cost.model import NotPriced

    with pytest.raises(NotPriced, match="pseudo tokens"):
        CM.price("laq", CM.ModelShape.bare(), 256)
    from attnlab.cost.tts import plan_for

    model = tiny("llama")
    with pytest.raises(ValueError, match="lookahead"):
        plan_for(model, Tok(), "laq", 0.25, L)
