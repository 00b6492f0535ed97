"""SHViT single-head attention on a channel split (L54): fast path == reference and == an independent float64
formula (outputs and gradients), causal and not, decode == full forward, the pass-through channels, bad options."""

import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import SlidingWindow
from attnlab.testing import grads, max_err


@pytest.mark.parametrize("opts", [dict(), dict(partial=0.5, key_dim=4, pattern=SlidingWindow(4)), dict(rope=False),
                                  dict(pre_norm=False, partial=1.0)])
def test_matches_reference_and_decodes(opts):
    layer = build64("shvit", dim=32, **opts)
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


def test_non_causal_matches_reference_and_refuses_a_cache():
    layer = build64("shvit", dim=32, causal=False)
    assert layer.cfg.pattern is None
    check_reference(layer, hidden())
    with pytest.raises(TypeError):
        layer.init_cache()


def _formula(x, Wqkv, g, Wo, p, kd, causal, eps=1e-6):
    """float64 SHSA written from the paper: split, per-token RMS-normed X_att, one softmax head, concat, W_O."""
    x = x.double()
    xa, xr = x[..., :p], x[..., p:]
    xa = xa / torch.sqrt((xa * xa).mean(-1, keepdim=True) + eps) * g.double()
    q = xa @ Wqkv[:kd].double().T
    k = xa @ Wqkv[kd : 2 * kd].double().T
    v = xa @ Wqkv[2 * kd :].double().T
    s = q @ k.transpose(-1, -2) / kd**0.5  # (B, T, T)
    if causal:
        T = x.shape[1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(s, dim=-1) @ v
    return torch.cat([a, xr], dim=-1) @ Wo.double().T


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_equals_independent_float64_formula(causal):
    torch.manual_seed(0)
    layer = attnlab.build("shvit", dim=32, key_dim=8, rope=False, causal=causal)  # float32 fast path
    with torch.no_grad():
        layer.norm.weight.add_(0.1 * torch.randn_like(layer.norm.weight))
    p = layer.cfg.pdim
    assert p == 7  # round(32 / 4.67)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    params = (layer.qkv.weight, layer.norm.weight, layer.o_proj.weight)
    out = layer(x)
    ref = _formula(x, *params, p, 8, causal)
    assert out.dtype == torch.float32
    assert max_err(out, ref) < 2e-5
    assert max_err(grads(out, (x, *params)), grads(ref, (x, *params))) < 1e-4
    # float64: tight
    layer64 = layer.double()
    x64 = x.detach().double().requires_grad_(True)
    params = (layer64.qkv.weight, layer64.norm.weight, layer64.o_proj.weight)
    out, ref = layer64(x64), _formula(x64, *params, p, 8, causal)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (x64, *params)), grads(ref, (x64, *params))) < 1e-10


@torch.no_grad()
def test_pass_through_channels_and_single_head():
    """With W_O = I the last dim - C_p channels come out unchanged, and they never reach the attended ones."""
    layer = build64("shvit", dim=32)
    p = layer.cfg.pdim
    layer.o_proj.weight.copy_(torch.eye(32, dtype=torch.float64))
    x = hidden().detach()
    y = layer(x)
    assert torch.equal(y[..., p:], x[..., p:])
    x2 = x.clone()
    x2[..., p:] += 3.0
    assert max_err(layer(x2)[..., :p], y[..., :p]) == 0.0
    x3 = x.clone()
    x3[..., :p] += 1.0
    assert max_err(layer(x3)[..., :p], y[..., :p]) > 1e-3


@torch.no_grad()
def test_causal_outputs_ignore_the_future():
    layer, x = build64("shvit", dim=32), hidden().detach()
    x2 = x.clone()
    x2[:, 10:] += 1.0
    assert max_err(layer(x2)[:, :10], layer(x)[:, :10]) < 1e-14
    assert max_err(build64("shvit", dim=32, causal=False)(x2)[:, :10], build64("shvit", dim=32, causal=False)(x)[:, :10]) > 1e-6


def test_paper_ratio_and_sizes():
    layer = attnlab.build("shvit", dim=128)
    assert layer.cfg.partial == pytest.approx(1 / 4.67) and layer.cfg.pdim == 27 and layer.cfg.key_dim == 16
    assert layer.qkv.weight.shape == (2 * 16 + 27, 27)
    assert layer.o_proj.weight.shape == (128, 128)
    assert layer.state_size(10) == (16 + 27) * 10
    assert attnlab.build("shvit", dim=8, partial=0.01).cfg.pdim == 1  # at least one channel


@pytest.mark.parametrize("bad,match", [(dict(partial=0), "partial"), (dict(partial=1.5), "partial"),
                                       (dict(partial=True), "partial"), (dict(key_dim=0), "key_dim"),
                                       (dict(key_dim=5), "key_dim"), (dict(pre_norm=1), "pre_norm")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        attnlab.build("shvit", dim=32, **bad)


def test_heads_are_not_an_option():
    with pytest.raises(TypeError, match="heads"):
        attnlab.build("shvit", dim=32, heads=4)
