import torch

from attnlab.models.hf import ModelGeometry
from attnlab.plans import sources


def test_from_scores_keeps_top_heads_full():
    sc = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.0, 0.3]])
    plan = sources.from_scores(sc, q_per_kv=3, full_fraction=2 / 6, sinks=4, window=64)
    kinds = [[p.kind for p in row] for row in plan.policies]
    assert kinds == [["stream", "full", "stream"], ["full", "stream", "stream"]]
    assert plan[0, 0].window == 64 and dict(plan.meta)["source"] == "scores"


def test_uniform_baselines():
    geo = ModelGeometry(3, 6, 2, 8, True)
    for kind, label in (("full", "full"), ("stream", "stream(4+256)"), ("snap", "snap(256/32)"),
                        ("topk", "topk(16x16)")):
        plan = sources.uniform(geo, kind)
        assert plan.num_layers == 3 and plan.num_kv_heads == 2 and plan.q_per_kv == 3
        assert {p.label() for row in plan.policies for p in row} == {label}


def test_moa_search_respects_budget_and_prefers_lossy_heads(monkeypatch, tiny_vocab):
    model, tok = tiny_vocab
    # head (0, 0) loses a lot with small windows, the others lose nothing
    lost = torch.zeros(2, 2, 3)
    lost[0, 0] = torch.tensor([0.9, 0.5, 0.2])
    monkeypatch.setattr(sources, "window_loss_profile", lambda *a, **k: lost)
    plan = sources.moa_plan(model, tok, kv_budget=0.5, at_length=400, windows=(32, 64, 128))
    assert plan[0, 0].kind == "full"
    assert all(plan[i, j].kind == "stream" and plan[i, j].window == 32 for i, j in ((0, 1), (1, 0), (1, 1)))
    assert plan.kv_ratio(400) <= 0.5
    tight = sources.moa_plan(model, tok, kv_budget=0.12, at_length=400, windows=(32, 64, 128))
    assert tight[0, 0].kind == "stream" and tight[0, 0].window == 64  # the best upgrade that fits
    assert tight.kv_ratio(400) <= 0.12


def test_probe_profile_and_duo_gates_run_on_a_tiny_model(tiny_vocab):
    model, tok = tiny_vocab
    sc = sources.probe_scores(model, tok, n=1, length=160, window=16)
    assert sc.shape == (2, 2) and bool((sc >= 0).all())
    prof = sources.window_loss_profile(model, tok, (8, 64), n=1, length=160, rows=16)
    assert prof.shape == (2, 2, 2) and bool((prof[..., 0] >= prof[..., 1] - 1e-6).all())  # wider loses less
    gates = sources.duo_gates(model, tok, steps=2, length=160, n=1, window=16, lr=0.5)
    assert gates.shape == (2, 2) and bool(((gates > 0) & (gates < 1)).all())
    assert not torch.allclose(gates, torch.sigmoid(torch.tensor(2.0)).expand(2, 2))  # the optimizer moved them
    plan = sources.from_scores(gates, 2, 0.5, 4, 16, source="duo")
    assert plan.counts() == {"full": 2, "stream": 2}


def _eager_attentions(model, ids):
    """Independent weights: transformers' eager attention with output_attentions, (L, H, T, T)."""
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return torch.stack([a[0] for a in model(input_ids=ids, output_attentions=True).attentions])
    finally:
        model.set_attn_implementation(prev)


def test_last_rows_weights_equal_the_models_attention(tiny):
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    ws = sources._last_rows_weights(tiny, ids[0].tolist(), 6)
    A = _eager_attentions(tiny, ids)
    assert len(ws) == 2 and ws[0].shape == (4, 6, 40)
    for layer in range(2):
        assert torch.allclose(ws[layer], A[layer, :, -6:], atol=1e-5)


def test_duo_hooks_mix_full_and_stream(tiny):
    """Gates 1: the model itself; gates 0: the all-stream plan; in between: the mix, differentiably."""
    from attnlab.models import hf
    from attnlab.plans.plan import HeadPlan, HeadPolicy

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    pol = HeadPolicy.stream(2, 8)
    with torch.no_grad():
        base = tiny(input_ids=ids).logits
        with hf.use(tiny, HeadPlan.uniform(2, 2, pol, 2)):
            stream = tiny(input_ids=ids).logits
        for value, want in ((1.0, base), (0.0, stream)):
            with hf.hooks(tiny, sources.duo_hooks(lambda layer, v=value: torch.full((2,), v), pol.pattern(), 2)):
                got = tiny(input_ids=ids).logits
            assert (got - want).abs().max() < 1e-4, value
    assert (stream - base).abs().max() > 1e-3
    gates = torch.full((2, 2), 0.5, requires_grad=True)
    with hf.hooks(tiny, sources.duo_hooks(lambda layer: gates[layer], pol.pattern(), 2)):
        loss = tiny(input_ids=ids).logits.square().mean()
    (grad,) = torch.autograd.grad(loss, gates)
    assert bool((grad != 0).all())
