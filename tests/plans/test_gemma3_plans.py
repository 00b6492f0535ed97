"""Plans on Gemma 3: sliding-window layers keep the model's own window under every plan source, budgets count
the full layers only, eval's dense row is the model's own (windowed) cache.

Unit tests use tiny random 3-layer Gemma 3 models (sliding, full, sliding; window 4; 4 query heads over ONE
key/value head, like the 270M model); one test loads the real Gemma 3 270M on a short prompt."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from attnlab.models import hf
from attnlab.plans import sources
from attnlab.plans.evaluate import DENSE, dense_generate, evaluate, write
from attnlab.plans.plan import HeadPlan, HeadPolicy
from attnlab.plans.runtime import greedy_generate

WINDOW = 4
TYPES = ("sliding_attention", "full_attention", "sliding_attention")


def tiny_gemma3(vocab: int = 97, kv_heads: int = 1) -> Gemma3ForCausalLM:
    """3 layers (sliding, full, sliding; window 4), 4 query heads, head_dim 8, query_pre_attn_scalar != head_dim."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                           query_pre_attn_scalar=32, sliding_window=WINDOW, layer_types=list(TYPES),
                           max_position_embeddings=2048, attn_implementation="sdpa")
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def g3():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def g3_vocab(gtok):
    """The tiny Gemma 3 with the real vocabulary (the profiling code builds passkey prompts)."""
    return tiny_gemma3(vocab=len(gtok)), gtok


def _kinds(plan: HeadPlan) -> list[list[str]]:
    return [[p.label() for p in row] for row in plan.policies]


def _windowed(plan: HeadPlan) -> bool:
    """Every kv head of the sliding layers is exactly the model's window (stream, no sinks, window 4)."""
    return all(p == HeadPolicy.stream(0, WINDOW) for i in (0, 2) for p in plan.policies[i])


def test_model_windows_and_budget_layers(g3):
    assert sources.model_windows(g3) == [WINDOW, None, WINDOW]
    assert sources.budget_layers(g3) == [False, True, False]
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert sources.model_windows(llama) == [None, None] and sources.budget_layers(llama) is None
    plan = sources.uniform(llama, "full")  # no sliding layers: unchanged
    assert plan == HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)


def test_uniform_full_plan_equals_the_model(g3):
    """The all-full plan keeps the local layers' window: its logits are the model's own; one key less on the
    local layers (stream(0, 3)) and the logits differ, so the window is exactly the model's."""
    plan = sources.uniform(g3, "full")
    assert _kinds(plan) == [["stream(0+4)"], ["full"], ["stream(0+4)"]] and dict(plan.meta)["model_windows"] == "kept"
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = g3(input_ids=ids).logits
        with hf.use(g3, plan):
            out = g3(input_ids=ids, use_cache=False).logits
        narrow = plan.with_policy(0, 0, HeadPolicy.stream(0, WINDOW - 1)).with_policy(2, 0, HeadPolicy.stream(0, 3))
        with hf.use(g3, narrow):
            off = g3(input_ids=ids, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5)
    assert (off - ref).abs().max() > 1e-3
    stream = sources.uniform(g3, "stream", sinks=2, window=8)
    assert _kinds(stream) == [["stream(0+4)"], ["stream(2+8)"], ["stream(0+4)"]]


def test_plan_decode_and_dense_row_equal_the_models_own_cache(g3):
    """Decoding under the windowed all-full plan gives the model's own tokens and holds what the model's own
    cache holds (window - 1 positions on local layers); the dense row (native or SDPA) agrees."""
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    new = 6
    with torch.no_grad():
        ref = g3.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)[0, 20:]
    r = greedy_generate(g3, ids, sources.uniform(g3, "full"), max_new_tokens=new)
    assert r["tokens"][0].tolist() == ref.tolist()
    fed = 20 + new - 1  # the last generated token is never fed back
    assert r["kv_positions"] == fed + 2 * (WINDOW - 1)
    head_bytes = 2 * 8 * 4  # keys + values, head_dim 8, float32
    assert r["kv_bytes"] == r["kv_positions"] * head_bytes
    # without with_model_windows the model's mask still bounds what the local layers read, but their cache
    # would keep every position
    un = greedy_generate(g3, ids, HeadPlan.uniform(3, 1, HeadPolicy.full(), 4), max_new_tokens=new)
    assert un["tokens"][0].tolist() == ref.tolist() and un["kv_positions"] == 3 * fed
    for native in (True, False):
        d = dense_generate(g3, ids, new, native=native)
        assert d["tokens"][0].tolist() == ref.tolist()
        assert d["kv_bytes"] == r["kv_bytes"]


def test_from_scores_budget_covers_full_layers_only():
    # the highest scores sit on sliding layers (0, 2): they are never ranked
    sc = torch.tensor([[9.0, 8.0], [0.3, 0.1], [7.0, 7.0], [0.2, 0.4]])
    plan = sources.from_scores(sc, 2, full_fraction=0.5, sinks=4, window=64, layers=[False, True, False, True])
    kinds = [[p.kind for p in row] for row in plan.policies]
    assert kinds == [["stream", "stream"], ["full", "stream"], ["stream", "stream"], ["stream", "full"]]
    assert plan.name == "scores-2full" and dict(plan.meta)["budget_layers"] == [1, 3]
    # Gemma 3 270M's shape: 18 layers x 1 kv head, 3 full layers: 0.44 of 3 heads rounds to 1
    layers = [i % 6 == 5 for i in range(18)]
    sc = torch.arange(18, dtype=torch.float32).view(18, 1)
    plan = sources.from_scores(sc, 4, full_fraction=0.44, layers=layers)
    assert [i for i, row in enumerate(plan.policies) if row[0].kind == "full"] == [17]
    with pytest.raises(ValueError, match="one flag per layer"):
        sources.from_scores(sc, 4, layers=[True])


def test_plan_from_scores_and_atlas_on_one_kv_head(g3):
    sc = torch.tensor([[5.0], [0.1], [4.0]])
    full = sources.plan_from_scores(g3, sc, full_fraction=1.0, source="probe")
    assert _kinds(full) == [["stream(0+4)"], ["full"], ["stream(0+4)"]] and full.q_per_kv == 4
    none = sources.plan_from_scores(g3, sc, full_fraction=0.4, sinks=2, window=16)  # round(0.4 * 1) = 0
    assert _kinds(none) == [["stream(0+4)"], ["stream(2+16)"], ["stream(0+4)"]]

    class Atlas:  # what from_atlas reads of a HeadAtlas: kv_scores() and the head counts
        num_heads, num_kv_heads = 4, 1

        def kv_scores(self):
            return {"retrieval": torch.tensor([[1.0], [0.5], [1.0]], dtype=torch.float64),
                    "streaming": torch.tensor([[0.0], [0.2], [0.0]], dtype=torch.float64)}

    plan = sources.from_atlas(Atlas(), full_fraction=1.0, model=g3)
    assert _kinds(plan) == [["stream(0+4)"], ["full"], ["stream(0+4)"]]
    assert dict(plan.meta)["source"] == "atlas"
    with pytest.raises(ValueError, match="atlas is for"):
        sources.from_atlas(Atlas(), model=tiny_gemma3(kv_heads=2))


def test_moa_searches_and_budgets_the_full_layers_only(monkeypatch, g3):
    lost = torch.zeros(3, 1, 3)
    lost[:, 0] = torch.tensor([0.9, 0.5, 0.2])  # every layer loses mass, the sliding ones as much as the full one
    monkeypatch.setattr(sources, "window_loss_profile", lambda *a, **k: lost)
    # candidates at 400 tokens: 4 + w - 1 = 35, 67, 131 positions, full 400
    roomy = sources.moa_plan(g3, None, kv_budget=1.0, at_length=400, windows=(32, 64, 128))
    assert _windowed(roomy) and roomy[1, 0].kind == "full" and dict(roomy.meta)["budget_layers"] == [1]
    # 0.3 of the ONE full head's 400 positions is 120: window 64 (67). Budgeting all three layers (360
    # positions) would have bought window 128 for the full layer.
    tight = sources.moa_plan(g3, None, kv_budget=0.3, at_length=400, windows=(32, 64, 128))
    assert _windowed(tight) and tight[1, 0] == HeadPolicy.stream(4, 64)


def test_plan_sources_run_on_tiny_gemma3(g3_vocab, tmp_path):
    """Every source of `attnlab plan` (build_plan) on the tiny Gemma 3: the local layers keep the window."""
    from attnlab.plans.cli import build_plan, model_kv_ratio

    model, tok = g3_vocab
    sc = sources.probe_scores(model, tok, n=1, length=160, window=16)
    assert sc.shape == (3, 1) and bool((sc >= 0).all())
    gates = sources.duo_gates(model, tok, steps=2, length=160, n=1, window=16, lr=0.5)
    assert gates.shape == (3, 1) and gates[0, 0] == 1.0 and gates[2, 0] == 1.0  # sliding layers: untouched
    assert 0 < float(gates[1, 0]) < 1 and abs(float(gates[1, 0]) - float(torch.sigmoid(torch.tensor(2.0)))) > 1e-4
    base = dict(model="tiny", full_fraction=1.0, sinks=2, window=16, kind="stream", budget=0.5, at_length=256,
                pages=4, steps=1, profile_length=160, samples=1)
    for source in ("uniform", "probe", "duo", "moa", "atlas"):
        plan = build_plan(argparse.Namespace(source=source, **base), model, tok)
        assert plan.num_layers == 3 and plan.q_per_kv == 4 and _windowed(plan), source
        if source in ("probe", "duo", "atlas"):
            assert plan[1, 0].kind == "full", source  # full_fraction 1.0 of the one full-layer head
    own = model_kv_ratio(model, sources.uniform(model, "full"), 256)
    assert own == pytest.approx(1.0)
    assert model_kv_ratio(model, sources.uniform(model, "stream", sinks=2, window=16), 256) == pytest.approx(
        (17 + 2 * 3) / (256 + 2 * 3))


def test_plan_cli_accepts_source_and_names_gemma3():
    from attnlab.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["plan", "--model", "gemma3", "--source", "uniform", "--kind", "stream"])
    assert args.source == "uniform" and args.model == "gemma3"
    assert parser.parse_args(["plan", "--from", "moa"]).source == "moa"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for cmd in ("plan", "eval", "inspect"):
        model_arg = next(a for a in sub.choices[cmd]._actions if "--model" in a.option_strings)
        assert "gemma3" in model_arg.help, cmd


def test_eval_on_tiny_gemma3_has_a_dense_row_and_windows_every_plan(g3_vocab, tmp_path):
    model, tok = g3_vocab
    unwindowed = HeadPlan.uniform(3, 1, HeadPolicy.full(), 4, name="all-full")  # as a JSON plan might be
    stream = sources.uniform(model, "stream", sinks=2, window=16).renamed("stream")
    report = evaluate(model, tok, [unwindowed, stream], ("passkey",), (96,), n=1, warmup=False)
    rows = {r["plan"]: r for r in report.rows}
    assert set(rows) == {DENSE, "all-full", "stream"}
    assert rows["all-full"]["kv_ratio"] == pytest.approx(1.0)  # windowed: exactly the model's own cache
    assert rows["all-full"]["samples"] == rows[DENSE]["samples"]
    assert rows["stream"]["kv_ratio"] < 1.0
    assert report.meta["model_windows"] == [WINDOW, None, WINDOW]
    run_dir = write(report, str(tmp_path))
    assert (run_dir / "results.json").is_file() and "dense" in (run_dir / "results.md").read_text()


# ---------------------------------------------------------------------------------------------------------
# the real Gemma 3 270M, one short prompt
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3():
    return hf.load_model("gemma3")


@pytest.mark.slow
def test_real_gemma3_probe_plan_and_full_plan_decode(gemma3):
    """Gemma 3 270M, a 256-token passkey: a probe plan keeps the 15 local layers at the model's window and one
    of the 3 full layers' kv heads full; the windowed all-full plan decodes the dense row's tokens from a
    cache of the same size."""
    from attnlab.plans.tasks import passkey

    model, tok = gemma3
    assert sources.model_windows(model) == [None if i % 6 == 5 else 512 for i in range(18)]
    plan = sources.probe_plan(model, tok, full_fraction=0.44, n=1, length=256)
    local = [i for i in range(18) if i % 6 != 5]
    assert all(plan[i, 0] == HeadPolicy.stream(0, 512) for i in local)
    assert sum(plan[i, 0].kind == "full" for i in (5, 11, 17)) == 1
    s = passkey(tok, 256, seed=1)
    ids = torch.tensor([s.ids])
    r = greedy_generate(model, ids, sources.uniform(model, "full"), max_new_tokens=4)
    d = dense_generate(model, ids, 4)
    assert r["tokens"].tolist() == d["tokens"].tolist()
    assert r["kv_bytes"] == d["kv_bytes"]


@pytest.mark.parametrize("budget", ["raw", None, 0.6, 0.3])
def test_window_prefill_runs_the_band_and_equals_the_masked_call(monkeypatch, budget):
    """On the model's sliding layers the plan's prefill patterns ANDed with the window (sparse engine, no mask)
    give the same logits and decode as the model's dense window mask applied to the policies' calls."""
    from attnlab.plans import runtime

    g3 = tiny_gemma3(kv_heads=2)
    base = HeadPlan.uniform(3, 2, HeadPolicy.full(), 2).with_policy(1, 1, HeadPolicy.stream(1, 3))
    # raw: full policies on the local layers, only the model's mask bounds what they read
    plan = base if budget == "raw" else sources.with_model_windows(g3, base, budget=budget)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))

    def run():
        runner = runtime.PlanRunner(plan)
        runner.timing = True
        with torch.no_grad(), hf.use(g3, runner) as h:
            out = g3(input_ids=ids, cache=h.new_cache(), use_cache=True).logits
        return out, runner.timer

    fast, timer = run()
    assert "window/prefill" in timer.seconds
    monkeypatch.setattr(runtime, "_model_window", lambda module, mask: None)
    slow, timer2 = run()
    assert "window/prefill" not in timer2.seconds
    assert torch.allclose(fast, slow, atol=1e-5)
    if budget == "raw":  # a one-key-wider band changes the logits: the band used is the model's window
        monkeypatch.setattr(runtime, "_model_window", lambda module, mask: WINDOW + 1 if mask is not None else None)
        wide, _ = run()
        assert (wide - fast).abs().max() > 1e-4
