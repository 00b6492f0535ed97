"""Dual attention (L157): fast path == the explicit (T x T x d_r) reference and == an independent float64 formula
written with loops (outputs and gradients), causal and not; decode with a cache == full forward; zero relational
heads == plain MHA with the same weights; planted relations and symbols; bad options."""

import math

import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.mechanisms.registry import get
from attnlab.testing import grads, max_err


def make(seed=0, **opts):
    opts = {"dim": 32, "heads": 4, "rel_dim": 3, "max_len": 32, **opts}
    layer = build64("dual_attn", seed=seed, **opts)
    return layer


@pytest.mark.parametrize("opts", [dict(), dict(symbols="sinusoidal"), dict(rope=False, relational_heads=1),
                                  dict(relational_heads=4), dict(rel_dim=1, head_dim=6),
                                  dict(heads=3, relational_heads=2, rope=False, symbols="sinusoidal", dim=15)])
def test_matches_reference_and_decodes(opts):
    layer = make(**opts)
    x = hidden(dim=layer.cfg.dim)
    check_reference(layer, x)
    check_decoding(layer, x)


@pytest.mark.parametrize("symbols", ["learned", "sinusoidal"])
def test_non_causal_matches_reference_and_refuses_a_cache(symbols):
    layer = make(causal=False, symbols=symbols)
    check_reference(layer, hidden())
    with pytest.raises(TypeError):
        layer.init_cache()
    with pytest.raises(TypeError):
        layer(hidden().detach(), attnlab.mechanisms.heads.LayerCache())


def _sinusoid(T, dim):
    """Fixed symbols written channel by channel: e = dim rounded up to even, channel c < e/2 is sin(p w_c),
    channel c >= e/2 is cos(p w_{c - e/2}), w_f = 10000^(-2f/e); the first dim channels."""
    e = dim + dim % 2
    s = torch.zeros(T, dim, dtype=torch.float64)
    for p in range(T):
        for c in range(dim):
            f = c if c < e // 2 else c - e // 2
            ang = p * 10000.0 ** (-2 * f / e)
            s[p, c] = math.sin(ang) if c < e // 2 else math.cos(ang)
    return s


def _formula(x, P, cfg, S):
    """Dual attention from the paper, one query, key, head and relation at a time (float64, rope off).
    P: the weights; S (T, dim): the symbols."""
    B, T, _ = x.shape
    H, Hs, d, R = cfg.heads, cfg.sensory_heads, cfg.d, cfg.rel_dim

    def rows(W, i):  # head / relation i of a stacked weight
        return W[i * d : (i + 1) * d]

    out = []
    for b in range(B):
        ys = []
        for i in range(T):
            keys = range(i + 1) if cfg.causal else range(T)
            per_head = []
            for h in range(H):
                qi = rows(P["q"], h) @ x[b, i]
                logits = torch.stack([qi @ (rows(P["k"], h) @ x[b, j]) / math.sqrt(d) for j in keys])
                e = torch.exp(logits - logits.max())
                alpha = e / e.sum()
                if h < Hs:
                    msgs = [rows(P["v"], h) @ x[b, j] for j in keys]
                else:
                    g = h - Hs
                    msgs = []
                    for j in keys:
                        r = torch.stack([(rows(P["rq"], n) @ x[b, i]) @ (rows(P["rk"], n) @ x[b, j]) for n in range(R)])
                        msgs.append(P["wr"][g].T @ r + P["ws"][g].T @ S[j])
                per_head.append(sum(a * m for a, m in zip(alpha, msgs)))
            ys.append(P["o"] @ torch.cat(per_head))
        out.append(torch.stack(ys))
    return torch.stack(out)


def _params(layer):
    names = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
             "rq": "rel_q_proj.weight", "rk": "rel_k_proj.weight", "wr": "w_r", "ws": "w_s", "sym": "symbols"}
    have = dict(layer.named_parameters())
    return {k: have[n] for k, n in names.items() if n in have}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("symbols", ["learned", "sinusoidal"])
def test_fast_path_equals_independent_float64_formula(causal, symbols):
    torch.manual_seed(0)
    layer = attnlab.build("dual_attn", dim=12, heads=3, relational_heads=2, rel_dim=2, rope=False, causal=causal,
                          symbols=symbols, max_len=8)  # float32 fast path
    x = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        layer = layer.to(dtype)
        xx = x.detach().to(dtype).requires_grad_(True)
        P = _params(layer)
        S = P["sym"][:6] if symbols == "learned" else _sinusoid(6, 12)
        out = layer(xx)
        ref = _formula(xx.double(), {k: p.double() for k, p in P.items()}, layer.cfg, S.double())
        assert out.dtype == dtype
        assert max_err(out, ref) < tol
        inputs = (xx, *P.values())
        g_out, g_ref = grads(out, inputs), grads(ref, inputs)
        assert max_err(g_out, g_ref) < 50 * tol
        assert all(g is not None and g.abs().sum() > 0 for g in g_out)  # every weight is used


@torch.no_grad()
def test_planted_relations_known_answer():
    """One relational head, uniform attention (W_Q = W_K = 0), non-causal, relation features = identity, W_r picks
    the relation into channel 0, no symbols, W_O = I: out_i = (<x_i, mean_j x_j>, 0, 0, 0)."""
    layer = build64("dual_attn", dim=4, heads=1, relational_heads=1, rel_dim=1, rope=False, causal=False)
    for w in (layer.q_proj.weight, layer.k_proj.weight, layer.w_s):
        w.zero_()
    for w in (layer.rel_q_proj.weight, layer.rel_k_proj.weight, layer.o_proj.weight):
        w.copy_(torch.eye(4, dtype=torch.float64))
    layer.w_r.copy_(torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64))
    x = hidden(B=2, T=7, dim=4).detach()
    y = layer(x)
    want = (x * x.mean(1, keepdim=True)).sum(-1)
    assert max_err(y[..., 0], want) < 1e-12
    assert y[..., 1:].abs().max() == 0


@torch.no_grad()
def test_planted_symbols_known_answer():
    """One relational head, uniform causal attention, W_r = 0, W_s = I, W_O = I: out_i = mean_{j <= i} s_j."""
    layer = build64("dual_attn", dim=4, heads=1, relational_heads=1, rope=False, max_len=10)
    for w in (layer.q_proj.weight, layer.k_proj.weight, layer.w_r):
        w.zero_()
    layer.w_s.copy_(torch.eye(4, dtype=torch.float64)[None])
    layer.o_proj.weight.copy_(torch.eye(4, dtype=torch.float64))
    y = layer(hidden(B=1, T=9, dim=4).detach())
    S = layer.symbols[:9]
    want = S.cumsum(0) / torch.arange(1, 10, dtype=torch.float64)[:, None]
    assert max_err(y[0], want) < 1e-12


@torch.no_grad()
def test_symbols_are_what_carries_position():
    """Non-causal, no RoPE: with W_s = 0 the layer is permutation-equivariant (relations and sensory heads see only
    content); with symbols it is not."""
    layer = make(causal=False, rope=False)
    x = hidden().detach()
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))
    assert max_err(layer(x[:, perm]), layer(x)[:, perm]) > 1e-3
    layer.w_s.zero_()
    assert max_err(layer(x[:, perm]), layer(x)[:, perm]) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_zero_relational_heads_is_plain_mha(causal):
    mha = build64("mha", seed=1, dim=32, heads=4, causal=causal)
    dual = make(relational_heads=0, causal=causal)
    dual.load_state_dict(mha.state_dict())  # strict: exactly the same parameters (no symbols, no relations)
    x = hidden()
    y_mha, y_dual = mha(x), dual(x)
    assert max_err(y_dual, y_mha) < 1e-12
    assert max_err(grads(y_dual, (x,)), grads(y_mha, (x,))) < 1e-12
    assert max_err(dual.reference(x), y_mha) < 1e-12
    if causal:
        check_decoding(dual, x)


def test_parameters_and_cache_size():
    layer = make(heads=4, relational_heads=3, rel_dim=3, max_len=32)  # dim 32, d 8, 1 sensory head
    dim, d, R, H, Hs, Hr = 32, 8, 3, 4, 1, 3
    want = 3 * H * d * dim + Hs * d * dim + 2 * R * d * dim + Hr * R * d + Hr * dim * d + 32 * dim
    assert sum(p.numel() for p in layer.parameters()) == want
    assert layer.state_size(5) == (H * d + Hs * d + R * d + dim) * 5
    x = hidden(B=2, T=11).detach()
    cache = layer.init_cache(2)
    with torch.no_grad():
        layer(x[:, :4], cache)
        for t in range(4, 11):
            layer(x[:, t : t + 1], cache)
    assert cache.length == 11 and cache.numel() == 2 * layer.state_size(11)
    only_rel = make(relational_heads=4, symbols="sinusoidal")
    assert only_rel.v_proj is None and only_rel.symbols is None
    assert only_rel.state_size(1) == 4 * 8 + 3 * 8 + 32


def test_default_split_and_registration():
    e = get("dual_attn")
    assert e.papers == ("L157",) and e.family == "layers" and e.decodes
    cfg = attnlab.build("dual_attn", dim=32, heads=4).cfg
    assert (cfg.relational_heads, cfg.sensory_heads, cfg.symbols, cfg.rope, cfg.causal) == (2, 2, "learned", True, True)
    assert attnlab.build("dual_attn", dim=32, heads=1).cfg.relational_heads == 0


def test_learned_symbols_bound_the_length_sinusoidal_do_not():
    layer = make(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        layer(hidden(T=9).detach())
    with pytest.raises(ValueError, match="max_len"):
        layer.reference(hidden(T=9).detach())
    cache = layer.init_cache(2)
    with torch.no_grad():
        layer(hidden(T=8).detach(), cache)
        with pytest.raises(ValueError, match="max_len"):
            layer(hidden(T=1).detach(), cache)
    sin = make(max_len=8, symbols="sinusoidal")
    check_reference(sin, hidden(T=12))


@pytest.mark.parametrize("bad,match", [(dict(relational_heads=-1), "relational_heads"),
                                       (dict(relational_heads=5), "relational_heads"),
                                       (dict(relational_heads=True), "relational_heads"),
                                       (dict(relational_heads=1.0), "relational_heads"),
                                       (dict(rel_dim=0), "rel_dim"), (dict(rel_dim=True), "rel_dim"),
                                       (dict(symbols="random"), "symbols"), (dict(max_len=0), "max_len"),
                                       (dict(head_dim=5), "head_dim")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        attnlab.build("dual_attn", dim=32, heads=4, **bad)


def test_unknown_option_and_bad_input():
    with pytest.raises(TypeError, match="sensory_heads"):
        attnlab.build("dual_attn", dim=32, heads=4, sensory_heads=2)  # one knob: heads - relational_heads
    with pytest.raises(TypeError, match="kv_heads"):  # no grouped key/value heads
        attnlab.build("dual_attn", dim=32, heads=4, kv_heads=2)
    layer = make()
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 5, 31, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        layer.reference(torch.randn(2, 5, 31, dtype=torch.float64))
