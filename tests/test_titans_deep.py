"""Titans with a deep (MLP) memory (R29): the chunk-parallel form = the paper's equations token by token with
materialized weights and autograd gradients (outputs, memory states, gradients of the input and every parameter,
float64), decoding = the full forward, a known first step, and depth 1 unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.mechanisms.linear.titans import TitansConfig
from attnlab.mechanisms.registry import build
from attnlab.testing import grads, max_err

DIM, HEADS, T = 12, 2, 19


def _layer(theta_bias: float = -1.0, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = build("titans", **{"dim": DIM, "heads": HEADS, **opts}).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        layer.gates.bias[2 * HEADS :] += theta_bias + 4.0 if opts.get("memory_depth", 1) > 1 else 0.0
    return layer


def _x(B: int = 2, T: int = T, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIM, generator=g, dtype=torch.float64, requires_grad=True)


def _flat(state: tuple) -> list[torch.Tensor]:
    return [w for part in state for w in part]


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
@pytest.mark.parametrize(
    "opts",
    [
        {"block": 4, "memory_depth": 2},  # 4 does not divide 19
        {"block": 5, "memory_depth": 3, "memory_hidden": 5},
        {"block": 1, "memory_depth": 2, "memory_hidden": 8},  # online SGD
        {"block": 19, "memory_depth": 2},  # one chunk: every gradient at M_0
        {"block": 32, "memory_depth": 2},  # a chunk longer than the sequence
    ],
    ids=lambda o: f"chunk{o['block']}-depth{o['memory_depth']}-hidden{o.get('memory_hidden')}",
)
def test_chunk_parallel_equals_token_loop(opts: dict, mode: str) -> None:
    layer = _layer(mode=mode, **opts)
    x = _x()
    cache = layer.init_cache(2)
    y = layer(x, cache)
    ry, rstate = layer.reference_deep(x)
    r = layer.out(ry)
    assert r.abs().max() > 1e-3 and torch.isfinite(r).all()
    assert max_err(y, r) < 1e-11
    assert max_err(_flat(cache.state["memory"]), _flat(rstate)) < 1e-11  # chunk-start memory, memory, momentum
    params = (x, *layer.parameters())  # includes the learned initial memory M_0 and the gates
    g, rg = grads(y, params), grads(r, params)
    assert max_err(g, rg) < 1e-9
    assert all(t is not None and t.abs().max() > 0 for t in g[-len(layer.mem_init) - 1 :])  # M_0 gets gradients


@pytest.mark.parametrize("splits", [(1,) * T, (3, 1, 6, 2, 7), (8, 11)])
def test_decoding_equals_full_forward(splits: tuple[int, ...]) -> None:
    # the cache holds (chunk-start memory, memory, momentum); a token's update uses the gradient at the chunk-start
    # memory and is applied at once, exactly as in the full forward, so any split gives the same outputs and state
    layer = _layer(block=4, memory_depth=2, memory_hidden=7)
    x = _x().detach()
    full_cache = layer.init_cache(2)
    full = layer(x, full_cache)
    cache = layer.init_cache(2)
    outs, start = [], 0
    for n in splits:
        outs.append(layer(x[:, start : start + n], cache))
        start += n
    assert cache.length == T
    assert max_err(torch.cat(outs, 1), full) < 1e-12
    assert max_err(_flat(cache.state["memory"]), _flat(full_cache.state["memory"])) < 1e-12
    assert cache.numel() == layer.state_size(T) * 2  # batch 2


def test_first_steps_are_sgd_steps_on_the_mlp() -> None:
    # no forgetting, no momentum, theta = 0.5, online SGD: M_1 = M_0 - 0.5 grad l(M_0; x_0), y_0 = M_1(q_0);
    # M_2 = M_1 - 0.5 grad l(M_1; x_1), y_1 = M_2(q_1)
    layer = _layer(block=1, memory_depth=2)
    with torch.no_grad():
        layer.gates.weight.zero_()
        layer.gates.bias.copy_(torch.tensor([-60.0] * HEADS + [-60.0] * HEADS + [0.0] * HEADS))
    x = _x(1, 2).detach()
    q, k, v = layer._qkv(x)

    def mlp(ws: tuple, h: torch.Tensor) -> torch.Tensor:  # h (B, H, d), ws (B, H, out, in)
        return torch.einsum("bhoi,bhi->bho", ws[1], F.silu(torch.einsum("bhoi,bhi->bho", ws[0], h)))

    def grad(ws: tuple, t: int) -> tuple:
        ws = tuple(w.detach().requires_grad_() for w in ws)
        return torch.autograd.grad(((mlp(ws, k[:, :, t]) - v[:, :, t]) ** 2).sum(), ws)

    M0 = tuple(w.detach()[None].double() for w in layer.mem_init)
    M1 = tuple(m - 0.5 * g for m, g in zip(M0, grad(M0, 0)))
    M2 = tuple(m - 0.5 * g for m, g in zip(M1, grad(M1, 1)))
    want = torch.stack([mlp(M1, q[:, :, 0]), mlp(M2, q[:, :, 1])], dim=2)
    assert max_err(layer(x), layer.out(want)) < 1e-12


def test_depth_one_is_unchanged_and_the_deep_form_reduces_to_it() -> None:
    assert TitansConfig().memory_depth == 1
    lin = _layer(block=4)
    assert not hasattr(lin, "mem_init") and lin.state_size(T) == 3 * HEADS * (DIM // HEADS) ** 2
    # the layer-by-layer deep segment with one layer and the closed form of depth 1 agree on a mid-chunk segment
    x = _x()
    q, k, v = lin._qkv(x)
    la, le, th = lin._gates(x)
    g = torch.Generator().manual_seed(5)
    Mp, M, S = (torch.randn(2, HEADS, 6, 6, generator=g, dtype=torch.float64) for _ in range(3))
    sl = slice(2, 7)
    y1, M1, S1 = lin._segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], la[..., sl], le[..., sl], th[..., sl], Mp, M, S)
    y2, M2, S2 = lin._deep_segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], la[..., sl], le[..., sl], th[..., sl],
                                   (Mp,), (M,), (S,))
    assert max_err(y1, y2) < 1e-12 and max_err(M1, M2[0]) < 1e-12 and max_err(S1, S2[0]) < 1e-12


def test_deep_state_size_and_bad_options() -> None:
    layer = build("titans", dim=DIM, heads=HEADS, memory_depth=3, memory_hidden=5)
    assert layer.mem_shapes == [(5, 6), (5, 5), (6, 5)]
    assert layer.state_size(10_000) == layer.state_size(1) == 3 * HEADS * (30 + 25 + 30)
    with pytest.raises(ValueError, match="memory_depth"):
        build("titans", memory_depth=0)
    with pytest.raises(ValueError, match="memory_hidden"):
        build("titans", memory_hidden=4)  # depth 1 has no hidden layer
    with pytest.raises(ValueError, match="memory_hidden"):
        build("titans", memory_depth=2, memory_hidden=0)
