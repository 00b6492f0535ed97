"""Every layer of the linear family: fast path = the paper's plain form (float64, outputs and gradients),
parallel = chunked = recurrent, decoding with a cache = the full forward, constant decoding state."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.mechanisms.registry import build, catalogue, config_options, get
from attnlab.testing import grads, max_err

# small configurations per registered name (several where a layer has variants worth checking)
CASES: dict[str, list[dict]] = {
    "linear": [
        {},
        {"feature_map": "relu"},
        {"feature_map": "taylor", "feature_dim": 3},
        {"feature_map": "cosformer", "max_len": 40},
    ],
    "lightning": [{}, {"layer_idx": 1, "layers": 3}],
    "tnl": [{"layer_idx": 2, "layers": 4}],
    "flowformer": [{}],
    "agent": [{}],
    "lightnet": [{}],
    "inline": [{}, {"feature_map": "elu1", "window": 1}],
    "l2vit": [{}],
    "rat": [{}, {"block": 1}],
    "lla": [{}, {"ridge": 0.05}],
    "titans": [{"block": 4}, {"block": 1}, {"block": 7}, {"block": 4, "memory_depth": 2},
               {"block": 7, "memory_depth": 3, "memory_hidden": 5}],
}
# registered layers tested in their own file because they are not causal sequence layers (no cache, no modes)
TESTED_ELSEWHERE = {"care": "tests/test_care.py"}
# layers whose decoding state grows with the length (and say so)
GROWING = {"rat", "lla"}

DIM, HEADS, T = 12, 2, 19


def _params() -> list:
    out = []
    for name, variants in CASES.items():
        for i, opts in enumerate(variants):
            out.append(pytest.param(name, opts, id=f"{name}-{i}"))
    return out


def _build(name: str, opts: dict) -> torch.nn.Module:
    fields = set(config_options(get(name).config))
    base = {"dim": DIM, "heads": HEADS}
    if "chunk" in fields:
        base["chunk"] = 4  # does not divide T = 19
    torch.manual_seed(0)
    layer = build(name, **{**base, **opts}).double()
    with torch.no_grad():  # non-trivial values for parameters initialized to constants
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _x(B: int = 2, T: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, DIM, generator=g, dtype=torch.float64, requires_grad=True)


def test_every_linear_mechanism_is_tested() -> None:
    names = {e.name for e in catalogue("linear")}
    covered = set(CASES) | set(TESTED_ELSEWHERE)
    assert names == covered, f"untested: {names - covered}; stale: {covered - names}"
    assert not any(get(n).decodes for n in TESTED_ELSEWHERE)


@pytest.mark.parametrize("name,opts", _params())
def test_forward_matches_reference(name: str, opts: dict) -> None:
    if name not in {e.name for e in catalogue("linear")}:
        pytest.fail(f"{name} is not registered")
    layer = _build(name, opts)
    x = _x()
    y, r = layer(x), layer.reference(x)
    assert y.shape == x.shape
    assert max_err(y, r) < 1e-10
    params = (x, *layer.parameters())
    assert max_err(grads(y, params), grads(r, params)) < 1e-9


@pytest.mark.parametrize("name,opts", _params())
def test_modes_agree(name: str, opts: dict) -> None:
    fields = set(config_options(get(name).config))
    if "mode" not in fields:
        pytest.fail(f"{name} has no mode option")  # every layer in the family offers the three forms
    x = _x()
    outs = {m: _build(name, {**opts, "mode": m})(x) for m in ("parallel", "chunked", "recurrent")}
    assert max_err(outs["chunked"], outs["parallel"]) < 1e-10
    assert max_err(outs["recurrent"], outs["parallel"]) < 1e-10


@pytest.mark.parametrize("name,opts", _params())
@pytest.mark.parametrize("splits", [(1,) * T, (5, 1, 7, 6), (4, 15)])
def test_cache_decoding_equals_full_forward(name: str, opts: dict, splits: tuple[int, ...]) -> None:
    layer = _build(name, opts)
    x = _x()
    full = layer(x)
    cache = layer.init_cache(2)
    outs, start = [], 0
    with torch.no_grad():
        for n in splits:
            outs.append(layer(x[:, start : start + n], cache))
            start += n
    assert cache.length == T
    assert max_err(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("name,opts", _params())
def test_state_size_is_the_cache_and_constant(name: str, opts: dict) -> None:
    layer = _build(name, opts)
    cache = layer.init_cache(1)
    with torch.no_grad():
        for t in range(T):
            layer(_x(1)[:, t : t + 1], cache)
            assert cache.numel() == layer.state_size(t + 1), t
    if name in GROWING:
        assert layer.state_size(10_000) > layer.state_size(T)
    else:
        assert layer.state_size(10_000) == layer.state_size(T) == layer.state_size(1)


def test_hybrid_stack_of_linear_and_softmax_layers_decodes() -> None:
    from attnlab.models.lm import LMConfig, TransformerLM

    cfg = LMConfig(vocab=32, dim=16, layers=3, heads=2, mechanisms=("lightning", "mha", "linear"))
    torch.manual_seed(0)
    model = TransformerLM(cfg).double().eval()
    idx = torch.randint(0, 32, (2, 11))
    full, _ = model(idx)
    caches = model.init_caches(2)
    with torch.no_grad():
        a, _ = model(idx[:, :6], caches=caches)
        b, _ = model(idx[:, 6:], caches=caches)
    assert max_err(torch.cat([a, b], 1), full) < 1e-10


def test_l2vit_hybrid_with_local_window_attention() -> None:
    # L2ViT's layout: local window (softmax) attention alternating with linear global attention
    from attnlab.core.patterns import SlidingWindow
    from attnlab.models.lm import LMConfig, TransformerLM

    opts = ({"pattern": SlidingWindow(4)}, {"lcm_kernel": 3}, {"pattern": SlidingWindow(4)}, {"lcm_kernel": 3})
    cfg = LMConfig(vocab=32, dim=16, layers=4, heads=2, mechanisms=("mha", "l2vit", "mha", "l2vit"),
                   mechanism_options=opts)
    torch.manual_seed(0)
    model = TransformerLM(cfg).double().eval()
    idx = torch.randint(0, 32, (1, 13))
    full, _ = model(idx)
    caches = model.init_caches(1)
    with torch.no_grad():
        steps = [model(idx[:, t : t + 1], caches=caches)[0] for t in range(13)]
    assert max_err(torch.cat(steps, 1), full) < 1e-10


def test_bad_options_fail_loudly() -> None:
    with pytest.raises(ValueError, match="feature_map"):
        attnlab.build("linear", feature_map="softmax")
    with pytest.raises(ValueError, match="divisible"):
        attnlab.build("lightning", dim=10, heads=3)
    layer = attnlab.build("cosformer", dim=8, heads=2, max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        layer(torch.randn(1, 5, 8))


def test_lla_with_infinite_ridge_is_softmax_attention() -> None:
    # the local linear fit with a frozen slope is the locally constant fit: softmax attention (the oracle)
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention

    layer = _build("lla", {"ridge": 1e12})
    x = _x()
    q, k, v = layer.qkv(x)
    want = layer.out(reference_attention(q, k, v, Causal()))
    assert max_err(layer(x), want) < 1e-9


def test_rat_with_chunk_one_is_softmax_attention_over_gated_tokens() -> None:
    # L = 1: every token is its own chunk, so k~_t = (1 - f_t) k_t and attention is plain causal softmax
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention

    layer = _build("rat", {"block": 1})
    x = _x()
    q, f, k, v = layer._inputs(x)
    want = layer.out(reference_attention(q, (1 - f) * k, (1 - f) * v, Causal()))
    assert max_err(layer(x), want) < 1e-12


def test_titans_first_steps_are_gradient_descent_on_the_memory() -> None:
    # no forgetting, no momentum: M_1 = -theta grad = 2 theta v_0 k_0^T, so y_0 = 2 theta (k_0 . q_0) v_0;
    # then M_2 = M_1 - 2 theta (M_1 k_1 - v_1) k_1^T with block=1 (online SGD)
    layer = _build("titans", {"block": 1})
    with torch.no_grad():
        layer.gates.weight.zero_()
        layer.gates.bias.copy_(torch.tensor([-60.0] * HEADS + [-60.0] * HEADS + [0.0] * HEADS))  # alpha, eta ~ 0
    x = _x(1, 2)
    q, k, v = layer._qkv(x)
    theta = 0.5
    M1 = 2 * theta * v[:, :, 0, :, None] @ k[:, :, 0, None, :]
    M2 = M1 - 2 * theta * (M1 @ k[:, :, 1, :, None] - v[:, :, 1, :, None]) @ k[:, :, 1, None, :]
    y = torch.stack([(M1 @ q[:, :, 0, :, None])[..., 0], (M2 @ q[:, :, 1, :, None])[..., 0]], dim=2)
    assert max_err(layer(x), layer.out(y)) < 1e-12
