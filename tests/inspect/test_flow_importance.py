"""Rollout and max-flow against hand-computed answers; head importance against independent o_proj hooks."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnlab.inspect.flow import MaxFlow, attention_flow, rollout, with_residual
from attnlab.inspect.importance import ablation_importance, gradient_importance


def test_maxflow_textbook_graph():
    g = MaxFlow(6)  # CLRS figure 26.1: maximum flow 23
    for u, v, c in [(0, 1, 16), (0, 2, 13), (1, 3, 12), (2, 1, 4), (2, 4, 14), (3, 2, 9), (3, 5, 20), (4, 3, 7),
                    (4, 5, 4)]:
        g.add_edge(u, v, c)
    assert g.max_flow(0, 5) == pytest.approx(23.0)


def _random_causal_maps(L, T, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(L, T, T, generator=g).masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), -torch.inf)
    return torch.softmax(s, -1)


def test_rollout_and_flow_one_layer_and_identity():
    maps = _random_causal_maps(1, 5, 0)
    a = with_residual(maps)[0].double()
    assert torch.allclose(rollout(maps), a)
    assert torch.allclose(attention_flow(maps, 4), a[4], atol=1e-9)  # one edge per input: its capacity
    eye = torch.eye(4).expand(3, 4, 4)
    assert torch.allclose(rollout(eye), torch.eye(4, dtype=torch.float64))
    two = _random_causal_maps(2, 5, 1)
    w = with_residual(two).double()
    assert torch.allclose(rollout(two), w[1] @ w[0])
    assert torch.allclose(rollout(two), torch.tril(rollout(two)))  # causal: nothing from later tokens
    assert attention_flow(two, 2)[3:].abs().max() == 0


def test_flow_equals_brute_force_min_cut():
    L, T, target = 2, 3, 2
    maps = _random_causal_maps(L, T, 2).double()
    a = with_residual(maps)
    nodes = (L + 1) * T
    edges = [(layer * T + k, (layer + 1) * T + i, float(a[layer, i, k]))
             for layer in range(L) for i in range(T) for k in range(T) if a[layer, i, k] > 0]
    flows = attention_flow(maps, target)
    for j in range(T):
        s, t = j, L * T + target
        others = [n for n in range(nodes) if n not in (s, t)]
        best = float("inf")
        for bits in itertools.product([0, 1], repeat=len(others)):
            side = {s} | {n for n, b in zip(others, bits) if b}
            best = min(best, sum(c for u, v, c in edges if u in side and v not in side))
        assert float(flows[j]) == pytest.approx(best, abs=1e-9)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64)
    return LlamaForCausalLM(cfg).eval()


def _loss_with_o_proj_scale(model, ids, layer, head, scale):
    """Independent path: scale the head's slice of o_proj's input with a forward pre-hook."""
    d = model.config.hidden_size // model.config.num_attention_heads

    def pre(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] *= scale
        return (x,)

    h = model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].double()
            return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    finally:
        h.remove()


def test_ablation_importance_equals_o_proj_hook(tiny_llama):
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    imp = ablation_importance(tiny_llama, ids, batch=3)
    assert imp.shape == (2, 4)
    base = _loss_with_o_proj_scale(tiny_llama, ids, 0, 0, 1.0)
    for layer, head in [(0, 1), (1, 3)]:
        want = _loss_with_o_proj_scale(tiny_llama, ids, layer, head, 0.0) - base
        assert float(imp[layer, head]) == pytest.approx(want, abs=1e-5)


def test_gradient_importance_equals_finite_difference(tiny_llama):
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    tiny_llama.double()
    try:
        imp = gradient_importance(tiny_llama, ids)
        eps = 1e-2  # RMSNorm runs in float32 even in a float64 model: a tiny step would measure its rounding
        for layer, head in [(0, 2), (1, 0)]:
            fd = (_loss_with_o_proj_scale(tiny_llama, ids, layer, head, 1 + eps)
                  - _loss_with_o_proj_scale(tiny_llama, ids, layer, head, 1 - eps)) / (2 * eps)
            assert float(imp[layer, head]) == pytest.approx(abs(fd), rel=1e-2, abs=2e-6)
        assert all(p.requires_grad for p in tiny_llama.parameters())  # restored
    finally:
        tiny_llama.float()
