"""Knob-setting procedures on tiny models: the first-order screens equal finite differences, every fit returns knobs
of the right shape, the same twice, never worse than the plain model on validation; the store round-trips without
pickles; validation and test splits never share a generator seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ivhelpers import Tok, samples, tiny  # noqa: E402

from attnlab.interventions import data  # noqa: E402
from attnlab.interventions import fit as F  # noqa: E402
from attnlab.interventions import registry as R  # noqa: E402
from attnlab.models import hf  # noqa: E402
from attnlab.plans import calibrate as C  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def llama64():
    return tiny("llama").double()


def fc(model, n=2, seed=3, length=40):
    return F.FitContext(model, Tok(), samples(n, seed=seed, length=length))


def _fd(model, pairs, hooks_with, L, H, cells, eps=1e-3):
    """Central differences of the validation NLL in one gate entry at a time."""
    out = []
    for layer, h in cells:
        vals = []
        for sgn in (1, -1):
            g = torch.zeros(L, H, dtype=torch.float64)
            g[layer, h] = sgn * eps
            vals.append(F.val_nll(model, pairs, lambda g=g: hf.hooks(model, hooks_with(g))))
        out.append((vals[0] - vals[1]) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


CELLS = [(0, 0), (0, 3), (1, 1), (1, 2)]


def test_zerotuning_screen_is_the_gradient_in_log_gamma(llama64):
    c = fc(llama64)
    pairs = c.pairs
    g = F.grad_screen(llama64, pairs, F.zerotuning_hooks, (2, 4))
    fd = _fd(llama64, pairs, F.zerotuning_hooks, 2, 4, CELLS)
    got = torch.tensor([float(g[a, b]) for a, b in CELLS], dtype=torch.float64)
    assert fd.abs().max() > 1e-6  # the heads matter
    assert torch.allclose(got, fd, rtol=0.05, atol=2e-6)  # central differences: O(eps^2) and float32 parts


def test_act_screen_is_the_gradient_of_the_calibration_gate(llama64):
    c = fc(llama64)
    act = C.ACT(alpha=1.5, beta=0.2)
    g = F.grad_screen(llama64, c.pairs, F.act_gate_hooks(act), (2, 4))
    fd = _fd(llama64, c.pairs, F.act_gate_hooks(act), 2, 4, CELLS)
    got = torch.tensor([float(g[a, b]) for a, b in CELLS], dtype=torch.float64)
    assert fd.abs().max() > 1e-6
    assert torch.allclose(got, fd, rtol=0.05, atol=2e-6)  # central differences: O(eps^2) and float32 parts


def _check_never_worse(f: F.Fitted):
    grid = f.trace["grid"]
    chosen = min(range(len(grid)), key=lambda i: (grid[i]["val_nll"], i))
    assert grid[chosen]["val_nll"] <= grid[0]["val_nll"]


@pytest.mark.parametrize("name, knobs, tensors", [
    ("zerotuning", {}, {"gamma": (2, 4), "sensitivity": (2, 4)}),
    ("act", {"alpha": 1.5}, {"heads": (2, 4), "sensitivity": (2, 4)}),
    ("fim", {"rows": 8, "tail": 8}, {"bias": (2, 4, 41)}),
    ("scale_dim", {}, {}),
    ("dagcd", {}, {"probe": (2, 4)}),
    ("decore", {"heads": ((1, 0), (0, 2))}, {}),
    ("lookback", {}, None),
    ("pause", {}, {}),
])
def test_fits_have_the_right_shapes_and_repeat_exactly(llama, name, knobs, tensors):
    choice = R.parse_one(name)
    full = {**choice.knobs, **knobs}
    a = choice.spec.fit(fc(llama), full)
    b = choice.spec.fit(fc(llama), full)
    assert json.dumps(a.knobs, sort_keys=True, default=str) == json.dumps(b.knobs, sort_keys=True, default=str)
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), (name, k)
    if tensors is not None:
        assert {k: tuple(v.shape) for k, v in a.tensors.items()} == tensors
    if "grid" in a.trace:
        _check_never_worse(a)
    R.apply(llama, Tok(), R.Choice(name, tuple(sorted(knobs.items()))), a)  # the fitted knobs build


def test_zerotuning_fit_tunes_only_screened_heads(llama):
    f = F.fit_zerotuning(fc(llama), {**R.parse_one("zerotuning").knobs, "gamma": 2.0})
    g, s = f.tensors["gamma"], f.tensors["sensitivity"]
    assert set(g.unique().tolist()) <= {1.0, 2.0, 0.5} and bool((g != 1).any())
    assert bool((s[g == 2.0] < 0).all()) and bool((s[g == 0.5] > 0).all())  # each head moved the way it prefers
    assert f.knobs["side"] in ("up", "both")
    assert f.trace["grid"][1]["candidate"]["gamma"] == 2.0 and f.knobs["gamma"] == 2.0  # given: not the identity


def test_act_head_filter_keeps_helpful_heads(llama):
    f = F.fit_act(fc(llama), {**R.parse_one("act").knobs, "alpha": 1.5})
    m, s = f.tensors["heads"].bool(), f.tensors["sensitivity"]
    assert bool((s[m] < 0).all())


def test_fim_calibrates_only_full_attention_layers():
    g3 = tiny("gemma3")  # layer 0 slides over 4 tokens, layer 1 is full
    f = F.fit_fim(fc(g3), {"strength": None, "layers": None, "rows": 8, "tail": 8})
    assert f.tensors["bias"].shape == (2, 4, 41)
    for cand in f.trace["grid"][1:]:
        assert set(cand["candidate"]["layers"]) <= {1}
    assert F.full_layers(g3) == [1]


def test_fim_bias_is_kept_on_the_context_span_only():
    b = torch.randn(2, 3, 33, generator=torch.Generator().manual_seed(0))
    out = F.span_bias(b, 40, 8)  # span: keys 1 .. 31
    assert out.shape == (2, 3, 41)
    assert float(out[..., 0].abs().max()) == 0 and float(out[..., 32:].abs().max()) == 0
    want = b[..., 1:32] - b[..., 1:32].mean(-1, keepdim=True)
    assert torch.allclose(out[..., 1:32], want) and torch.allclose(out.sum(-1), torch.zeros(2, 3), atol=1e-5)


def test_positional_dimension_finds_a_planted_dimension():
    torch.manual_seed(0)
    model = tiny("llama")
    # plant position in dimension 7 of layer 0's input: a pre-hook adds a ramp over positions
    blocks = F.decoder_layers(model)
    h = blocks[0].register_forward_pre_hook(lambda m, a, k: _plant(a, k), with_kwargs=True)
    try:
        dim, votes = F.positional_dimension(model, [list(s.ids) for s in samples(2, 5)])
    finally:
        h.remove()
    assert dim == 7 and votes[7] >= 1


def _ramp(x):
    r = torch.zeros_like(x)
    r[..., 7] = torch.linspace(-50, 50, x.shape[1])
    return r


def _plant(args, kwargs):
    if args:
        return (args[0] + _ramp(args[0]), *args[1:]), kwargs
    kwargs["hidden_states"] = kwargs["hidden_states"] + _ramp(kwargs["hidden_states"])
    return args, kwargs


def test_logistic_detector_separates_and_repeats():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = (x[:, 2] - 0.5 * x[:, 4] > 0).float()
    w, b = F.logistic_fit(x, y)
    w2, b2 = F.logistic_fit(x, y)
    assert torch.equal(w, w2) and b == b2
    pred = (x.double() @ w.double() + b > 0).float()
    assert bool((pred == y).all())
    assert w[2] > 0 and w[4] < 0 and w[2] == w.abs().max()


def test_lookback_fit_without_both_labels_falls_back(llama):
    c = fc(llama)
    c.val = [s.__class__(s.task, s.ids, ("never-produced",), s.length, s.depth, 3) for s in c.val]
    f = F.fit_lookback(c, R.parse_one("lookback").knobs)
    assert f.knobs["detector"] is False and "weights" not in f.tensors and "every label" in f.trace["detector"]


def test_ranked_heads_order_and_ties():
    s = torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.0, 0.5]])
    assert F.ranked_heads(s, 4) == [(0, 1), (1, 0), (0, 2), (1, 2)]


def test_fit_store_round_trip_without_pickles(tmp_path, llama):
    store = F.FitStore(tmp_path)
    f = F.fit_zerotuning(fc(llama), R.parse_one("zerotuning").knobs)
    k1 = store.key("tiny", "zerotuning", {"task": "kv", "len": 40}, {}, True, 0)
    k2 = store.key("tiny", "zerotuning", {"task": "kv", "len": 80}, {}, True, 0)
    k3 = store.key("tiny", "zerotuning", {"task": "kv", "len": 40}, {"gamma": "2.0"}, True, 0)
    assert len({k1, k2, k3}) == 3
    assert store.load(k1) is None
    store.save(k1, f)
    back = store.load(k1)
    assert back.knobs == json.loads(json.dumps(f.knobs))
    assert all(torch.equal(back.tensors[k], f.tensors[k]) for k in f.tensors)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def test_val_and_test_splits_are_disjoint_and_seeded():
    tok = Tok()
    test = data.make(tok, "passkey", 200, 5, seed=0, split="test")
    val = data.make(tok, "passkey", 200, 5, seed=0, split="val")
    again = data.make(tok, "passkey", 200, 5, seed=0, split="val")
    assert [s.ids for s in val] == [s.ids for s in again]
    assert not {data.sample_id(s) for s in test} & {data.sample_id(s) for s in val}
    assert {s.answers for s in test}.isdisjoint({s.answers for s in val})
    with pytest.raises(ValueError, match="seed"):
        data.make(tok, "passkey", 200, 5, seed=1000)
    with pytest.raises(ValueError, match="n must"):
        data.make(tok, "passkey", 200, 1001)
    with pytest.raises(ValueError, match="split"):
        data.make(tok, "passkey", 200, 2, split="train")
    with pytest.raises(ValueError, match="unknown task"):
        data.make(tok, "nope", 200, 2)


def test_target_text_spacing():
    class Quote(Tok):
        def decode(self, ids, skip_special_tokens=True):
            return '"' if ids and ids[-1] == 5 else "is"

    s = samples(1)[0]
    assert data.target_text(Quote(), s.__class__("kv", (1, 2, 5), ("ab12",), 3, 0.5, 4)) == "ab12"
    assert data.target_text(Quote(), s.__class__("kv", (1, 2, 6), ("ab12", "cd"), 3, 0.5, 4)) == " ab12, cd"


@pytest.mark.slow
def test_retrieval_scores_from_the_atlas_on_a_real_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.models.hf import load_model

    _, tok = load_model("smollm2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa")).eval()
    a = F.retrieval_scores(model, tok, [1000])
    b = F.retrieval_scores(model, tok, [1000])
    assert a.shape == (2, 4) and torch.equal(a, b) and bool(((a >= 0) & (a <= 1)).all())


def test_lookback_detector_trains_on_planted_spans(llama):
    from attnlab.interventions import tasks

    c = F.FitContext(llama, Tok(), data.make(Tok(), "planted", 200, 2, 0, "val"))
    a = F.fit_lookback(c, R.parse_one("lookback").knobs)
    b = F.fit_lookback(c, R.parse_one("lookback").knobs)
    assert a.trace["train"] == "planted" and a.trace["examples"] == F.QUICK["lb_planted"]
    assert a.tensors["weights"].shape == (2 * 4,) and torch.equal(a.tensors["weights"], b.tensors["weights"])
    val = data.make(Tok(), "planted", 200, F.QUICK["lb_planted"], 0, "val")
    x, y = F.planted_examples(llama, val)
    assert y.tolist() == [1.0 - s.label for s in val] and x.shape == (len(val), 8)
    span = val[0].span
    want = C.lookback_ratios(llama, torch.tensor([list(val[0].ids[: span[1]])]), span[0]).mean(-1).flatten()
    assert torch.allclose(x[0], want)
    assert tasks.TASKS  # the planted task comes from the intervention tasks


def test_moa_elastic_rules_respect_the_budget_and_repeat(llama):
    c = fc(llama, n=1, length=120)
    a = F.fit_moa(c, {"budget": 0.4, "sinks": 2})
    b = F.fit_moa(c, {"budget": 0.4, "sinks": 2})
    assert a.tensors["alpha"].shape == a.tensors["beta"].shape == (2, 2)  # (layers, kv heads)
    assert torch.equal(a.tensors["alpha"], b.tensors["alpha"]) and torch.equal(a.tensors["beta"], b.tensors["beta"])
    assert a.trace["profile_lengths"] == [64, 120]
    assert all(d <= 0.4 + 1e-9 for d in a.trace["density"].values())
    for alpha, beta in zip(a.tensors["alpha"].flatten().tolist(), a.tensors["beta"].flatten().tolist()):
        assert (alpha, beta) == (-1.0, -1.0) or (alpha in F.QUICK["moa_alpha"] and beta in F.QUICK["moa_beta"])
    plan = F.moa_plan_at(llama, torch.tensor([[16.0, -1.0], [64.0, 16.0]]), torch.tensor([[0.5, -1.0], [0.0, 0.0]]),
                         2, 200)
    kinds = [[(p.kind, getattr(p, "window", None)) for p in row] for row in plan.policies]
    assert kinds == [[("stream", 116), ("full", None)], [("stream", 64), ("stream", 16)]]


def test_moa_all_full_is_the_plain_model_and_a_tight_budget_is_not(llama):
    from attnlab.interventions import decoding as D

    ids = list(samples(1, seed=9, length=120)[0].ids)
    full = F.moa_plan_at(llama, -torch.ones(2, 2), -torch.ones(2, 2), 2, 120)
    tight = F.moa_plan_at(llama, torch.full((2, 2), 8.0), torch.zeros(2, 2), 2, 120)
    with torch.no_grad():
        plain = llama(input_ids=torch.tensor([ids])).logits[0, -1]
        with hf.use(llama, full):
            same = llama(input_ids=torch.tensor([ids])).logits[0, -1]
        with hf.use(llama, tight):
            other = llama(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(same, plain, atol=1e-5) and (other - plain).abs().max() > 1e-3
    arm = R.Arm("moa", [R.Applied("moa", "plan", {}, plan_for=lambda n: tight)])
    with D.Base(llama, arm.plan_for(len(ids))) as base:
        toks = arm.generate(llama, ids, 4, base)
    assert toks.shape == (1, 4)
