"""Inspection composes with whatever runs the attention: an atlas recorded under a plan equals the atlas of
the plan's own weights (built here from the captured q/k and the plan's patterns with the float64 reference),
and importance under a plan is the importance of the plan's heads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnlab.core.reference import reference_attention
from attnlab.inspect.capture import observe_rows, record
from attnlab.inspect.importance import ablation_importance
from attnlab.inspect.metrics import MetricConfig, ProbeSpec, head_metrics
from attnlab.models import hf
from attnlab.plans.plan import HeadPlan, HeadPolicy

T = 40
IDS = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(7))
CFG = MetricConfig(chunk=7, window=4, sink_tokens=2, rollout_max=64)
SPEC = ProbeSpec(context_len=30)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _stream_plan() -> HeadPlan:
    s = HeadPolicy.stream(2, 4)  # the metrics' sink tokens and window: streaming share 1
    return HeadPlan(((HeadPolicy.full(), s), (s, s)), q_per_kv=2)


def _record_with_qk(model):
    """Record an atlas and, through observers in the same pass, each layer's q and k."""
    qk = {}

    def keep(x, ctx):
        qk[ctx.layer, ctx.name.rsplit(".", 1)[1]] = x.detach().clone()

    with hf.hooks(model, {"blocks.*.attn.q": keep, "blocks.*.attn.k": keep}):
        cap = record(model, IDS, CFG, SPEC, logits_rows=0)
    return cap, qk


def _expected(qk, layer, pattern):
    """Head metrics of the plan's own weights: float64 reference softmax over the pattern's keys."""
    q, k = qk[layer, "q"].double(), qk[layer, "k"].double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    _, w = reference_attention(q, k, k, pattern, None, q.shape[-1] ** -0.5, 0, return_weights=True)
    visible = pattern.dense(T, T, 0).sum(-1).expand(q.shape[1], T)  # keys each head's row may see
    want, stats = head_metrics(w[0].float(), CFG, SPEC, visible=visible)
    return want, stats, w[0]


@pytest.mark.parametrize("kind", ["stream", "full"])
def test_atlas_under_a_plan_equals_atlas_of_the_plans_weights(llama, kind):
    plan = _stream_plan() if kind == "stream" else HeadPlan.uniform(2, 2, HeadPolicy.full(), 2)
    with torch.no_grad():
        base = llama(IDS).logits
        with hf.use(llama, plan):
            cap, qk = _record_with_qk(llama)
            planned = llama(IDS).logits
    for layer in range(2):
        want, stats, w = _expected(qk, layer, plan.layer_pattern(layer))
        got = cap.stats[layer].finalize()
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-5, equal_nan=True), (kind, layer, name)
        assert torch.allclose(cap.stats[layer].mean_map, w.float().mean(0), atol=1e-5)
        assert torch.allclose(cap.stats[layer].attention_map(), stats.attention_map(), atol=1e-5)
        assert cap.stats[layer].largest_chunk <= 4 * CFG.chunk * T
    assert torch.equal(cap.predicted, planned[0].argmax(-1))  # recording did not change the plan's output
    if kind == "full":  # a full plan is the model's own attention: same atlas as the plain model
        plain = record(llama, IDS, CFG, SPEC, logits_rows=0)
        for layer in range(2):
            a, b = plain.stats[layer].finalize(), cap.stats[layer].finalize()
            for name in a:
                assert torch.allclose(a[name], b[name], atol=1e-5, equal_nan=True), name
        assert (planned - base).abs().max() < 1e-4
    else:  # the streaming heads' atlas differs from the model's own
        plain = record(llama, IDS, CFG, SPEC, logits_rows=0)
        assert (plain.stats[1].finalize()["distance"] - cap.stats[1].finalize()["distance"]).abs().max() > 0.5
        assert float(cap.stats[1].finalize()["streaming"].min()) == pytest.approx(1.0)  # sinks + window only


def test_weight_rows_under_a_plan(llama):
    """The rows observer sees the plan's weights: zero outside each head's pattern, rows summing to 1."""
    plan = _stream_plan()
    with torch.no_grad(), hf.use(llama, plan):
        ws = observe_rows(llama, IDS, last=5)
    allowed = plan.layer_pattern(1).dense(T, T, 0)[:, -5:]  # (H, 5, T)
    assert ws[1].shape == (4, 5, T)
    assert float(ws[1].masked_fill(allowed, 0).abs().max()) == 0.0
    assert torch.allclose(ws[1].sum(-1), torch.ones(4, 5), atol=1e-5)


def test_ablation_importance_under_a_plan(llama):
    """Zeroing a head under the plan: its importance is measured on the plan's model (differs from plain)."""
    ids = IDS[:, :16]
    plan = _stream_plan()
    with torch.no_grad(), hf.use(llama, plan):
        imp = ablation_importance(llama, ids, batch=5)
        planned_base = llama(ids).logits
    plain = ablation_importance(llama, ids, batch=5)
    assert imp.shape == plain.shape == (2, 4)
    # layer 1 under the plan streams every head: a different model, so different importances
    assert (imp - plain).abs().max() > 1e-6
    assert torch.isfinite(imp).all() and torch.isfinite(planned_base).all()
