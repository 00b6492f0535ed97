"""Superlinear (D275) trainable routing: the routing term (``route``) adds each kept span's routing score as a
log-weight of its keys. route = 0 keeps the hard rule's spans and outputs; the fast gathered path equals the dense
float64 form (outputs and gradients, including the routing keys); finite differences confirm the gradient reaches
the routing keys; a tiny training run learns to route to a planted span."""

import pytest
import torch

from attnlab import ops
from attnlab.mechanisms.registry import build
from attnlab.mechanisms.routing.superlinear import superlinear_attention, superlinear_mask
from attnlab.testing import grads, max_err, qkv

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rk(k, seed):
    g = torch.Generator().manual_seed(seed)
    return (k.detach() + 0.5 * torch.randn(k.shape, dtype=F64, generator=g)).requires_grad_(True)


@pytest.mark.parametrize("stride, window, top_k", [(4, 5, 2), ((8, 4), 4, 2)])
def test_route_zero_is_the_hard_rule(stride, window, top_k):
    q, k, v = qkv(1, 4, 2, 40, D=8, seed=1, requires_grad=False)
    plain = superlinear_attention(q, k, v, stride, window, top_k, 4)
    assert max_err(superlinear_attention(q, k, v, stride, window, top_k, 4, route=0.0), plain) == 0
    rk = _rk(k, 2).detach()
    # the spans come from the routing keys; route = 0 adds nothing on top of their hard choice
    sel = superlinear_mask(q, rk, stride, window, top_k)
    out = superlinear_attention(q, k, v, stride, window, top_k, 4, route_keys=rk)
    from attnlab.core.sparse import masked_reference

    assert max_err(out, masked_reference(q, k, v, sel)) < 1e-12
    assert not torch.equal(sel, superlinear_mask(q, k, stride, window, top_k))  # different keys, different spans


@pytest.mark.parametrize("stride, window, top_k", [(4, 5, 2), (4, 3, 10), ((8, 4), 4, 2)])
def test_routed_path_equals_dense_reference_with_gradients(stride, window, top_k):
    q, k, v = qkv(2, 4, 2, 37, D=8, seed=3)
    rk = _rk(k, 4)
    opts = dict(stride=stride, window=window, top_k=top_k, chunk=5, route=1.5, route_keys=rk)
    out = ops.get("superlinear")(q, k, v, **opts)
    ref = ops.reference("superlinear", q, k, v, **opts)
    assert max_err(out, ref) < 1e-12
    leaves = (q, k, v, rk)
    g_out, g_ref = grads(out, leaves), grads(ref, leaves)
    assert max_err(g_out, g_ref) < 1e-10
    assert float(g_out[-1].abs().max()) > 1e-3  # the routing keys get a gradient
    # route != 0 changes the output; route = 0 gives the routing keys no gradient at all
    plain = ops.get("superlinear")(q, k, v, **{**opts, "route": 0.0})
    assert max_err(plain, out) > 1e-4
    assert plain.grad_fn is not None
    g0 = torch.autograd.grad(plain.sum(), rk, allow_unused=True)[0]
    assert g0 is None or float(g0.abs().max()) == 0


def test_finite_differences_reach_the_routing_keys():
    q, k, v = qkv(1, 2, 1, 20, D=4, seed=5, requires_grad=False)
    rk = _rk(k, 6)

    def f(rk_):
        return superlinear_attention(q, k, v, 4, 4, 2, 4, route=2.0, route_keys=rk_)

    assert torch.autograd.gradcheck(f, (rk,), eps=1e-6, atol=1e-7)
    qq = q.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: superlinear_attention(x, k, v, 4, 4, 2, 4, route=2.0), (qq,),
                                    eps=1e-6, atol=1e-7)


def test_layer_route_proj_trains_and_matches_reference():
    layer = build("superlinear", dim=16, heads=2, kv_heads=1, stride=4, window=4, top_k=2, chunk=4,
                  route=1.0).double()
    assert layer.route_proj is not None and build("superlinear", dim=16, heads=2).route_proj is None
    with torch.no_grad():
        layer.route_proj.add_(0.1 * torch.randn(layer.route_proj.shape, dtype=F64,
                                                generator=torch.Generator().manual_seed(7)))
    x = torch.randn(1, 19, 16, dtype=F64, generator=torch.Generator().manual_seed(8))
    out = layer(x)
    assert max_err(out, layer.reference(x)) < 1e-12
    (g,) = torch.autograd.grad(out.square().sum(), [layer.route_proj])
    assert float(g.abs().max()) > 1e-4
    with pytest.raises(ValueError, match="route"):
        build("superlinear", route=float("nan"))
    q, k, v = qkv(1, 2, 1, 8, D=4, requires_grad=False)
    with pytest.raises(ValueError, match="route_keys"):
        ops.get("superlinear")(q, k, v, stride=4, window=4, top_k=1, chunk=4, route_keys=k[:, :, :5])
    with pytest.raises(ValueError, match="route"):
        ops.get("superlinear")(q, k, v, stride=4, window=4, top_k=1, chunk=4, route="soft")


def planted_routing_run(steps: int = 100, seed: int = 3) -> dict:
    """Keys and values random, except one planted span (positions 4..7) whose values are a target vector; the last 8
    queries (whose local part does not reach the span) should output the target. Only a routing projection W
    (route_keys = k W, identity at start) and nothing else trains, with route = 1 and top_k = 2 of 4-5 eligible
    spans. Returns the fraction of (query) rows whose kept spans include the planted one, before and after."""
    g = torch.Generator().manual_seed(seed)
    T, D, stride, window, top_k = 32, 8, 4, 4, 2
    k = torch.randn(1, 1, T, D, dtype=F64, generator=g)
    u = torch.randn(D, dtype=F64, generator=g)
    q = (u + 0.3 * torch.randn(1, 1, 8, D, dtype=F64, generator=g))  # rows at positions 24..31
    target = torch.randn(D, dtype=F64, generator=g)
    v = torch.randn(1, 1, T, D, dtype=F64, generator=g)  # distractors everywhere else
    v[:, :, 4:8] = target
    W = torch.eye(D, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([W], lr=0.05)

    def hit() -> float:
        with torch.no_grad():
            sel = superlinear_mask(q, k @ W, stride, window, top_k, q_offset=24)
        return float(sel[0, 0, :, 4:8].all(-1).double().mean())

    before, losses = hit(), []
    for _ in range(steps):
        out = superlinear_attention(q, k, v, stride, window, top_k, 8, q_offset=24, route=1.0, route_keys=k @ W)
        loss = (out - target).square().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"hit_before": before, "hit_after": hit(), "loss_first": losses[0], "loss_last": losses[-1]}


def test_training_learns_to_route_to_a_planted_span():
    r = planted_routing_run()
    assert r["hit_before"] == 0.0  # no row's untrained search keeps the planted span
    assert r["hit_after"] == 1.0 and r["loss_last"] < 0.5 * r["loss_first"]
