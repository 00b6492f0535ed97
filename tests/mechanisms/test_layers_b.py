"""Part-B layer catalogue: every fast path against its plain reference (float64 outputs and gradients),
incremental decoding against the full forward, causality, known answers and config errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from attnlab.mechanisms.base import AttentionLayer
from attnlab.mechanisms.registry import build, get
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance

# Small configs that exercise every code path (chunk < T so the fast paths stream several blocks).
CASES: dict[str, dict] = {
    "cog": dict(dim=16, heads=2, chunk=4),
    "relu_attn": dict(dim=16, heads=2, chunk=4),
    "gaam": dict(dim=16, heads=2, chunk=4, gaussians=2),
    "kv_shift": dict(dim=16, heads=2),
    "complexformer": dict(dim=16, heads=2),
    "sentinel": dict(dim=16, heads=2),
    "mta": dict(dim=16, heads=4, query_kernel=3, key_kernel=3, head_kernel=2),
    "rcmha": dict(dim=16, heads=2, conv_kernel=3),
    "neural_attn": dict(dim=16, heads=2, hidden=8, chunk=4),
    "optimised_attn": dict(dim=16, heads=2),
    "efficient_attn": dict(dim=16, heads=2),
    "super_attn": dict(dim=16, heads=2, max_len=12),
    "mega": dict(dim=16, z_dim=8, v_dim=12, ema_dim=3),
    "luong": dict(dim=16, heads=2, score="concat", chunk=4),
}
PAPERS = {
    "cog": "L134", "relu_attn": "L271", "gaam": "L47", "kv_shift": "L121", "complexformer": "L78",
    "sentinel": "L246", "mta": "L154", "rcmha": "L68", "neural_attn": "L215", "optimised_attn": "L156",
    "efficient_attn": "L156", "super_attn": "L156", "mega": "L190", "luong": "L249",
}
T = 9

for _name in CASES:  # registers the layers even before layers/__init__.py lists them
    importlib.import_module(f"attnlab.mechanisms.layers.{_name}")


def make(name: str, seed: int = 0, **over) -> AttentionLayer:
    torch.manual_seed(seed)
    layer = build(name, **{**CASES[name], **over}).double()
    with torch.no_grad():  # move every parameter off its (often identity-like) init
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def hidden(dim: int, seed: int = 1, B: int = 2, T: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, dim, generator=g, dtype=torch.float64).requires_grad_(True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_path_matches_reference(name: str, causal: bool) -> None:
    layer = make(name, causal=causal)
    x = hidden(layer.dim)
    params = tuple(layer.parameters())
    out, ref = layer(x), layer.reference(x)
    assert out.shape == x.shape
    assert max_err(out.detach(), ref.detach()) < 1e-10
    assert max_err(grads(out, (x, *params)), grads(ref, (x, *params))) < 1e-9


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CASES))
def test_decoding_matches_full_forward(name: str) -> None:
    layer = make(name)
    x = hidden(layer.dim).detach()
    full = layer(x)
    cache = layer.init_cache(batch=2)
    steps = [layer(x[:, a:b], cache) for a, b in [(0, 1), (1, 4), (4, 5), (5, 6), (6, T)]]
    assert max_err(torch.cat(steps, dim=1), full) < 1e-10


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CASES))
def test_causal_outputs_ignore_the_future(name: str) -> None:
    layer = make(name)
    x = hidden(layer.dim).detach()
    y = x.clone()
    y[:, 6:] += torch.randn_like(y[:, 6:])
    a, b = layer.reference(x), layer.reference(y)
    assert max_err(a[:, :6], b[:, :6]) < 1e-12
    assert max_err(a[:, 6:], b[:, 6:]) > 1e-3


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_float32_fast_path_close_to_float64_reference(name: str) -> None:
    layer = make(name)
    x = hidden(layer.dim).detach()
    ref = layer.reference(x)
    out = layer.float()(x.float())
    q, k, v = qkv(B=2, H=2, Tq=T, D=8, dtype=torch.float32, requires_grad=False)
    assert max_err(out, ref) < tolerance(torch.float32, sdpa_error(q, k, v, None)) * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_registered_with_paper(name: str) -> None:
    entry = get(name)
    assert entry.family == "layers" and entry.papers == (PAPERS[name],)
    layer = build(name)
    x = torch.randn(1, 5, layer.dim)
    assert layer(x).shape == (1, 5, layer.dim)


@pytest.mark.parametrize("name", sorted(CASES))
def test_non_causal_layers_refuse_a_cache(name: str) -> None:
    layer = make(name, causal=False)
    with pytest.raises(TypeError, match="causal"):
        layer.init_cache()


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("cog", dict(dim=10, heads=4), "divisible"),
        ("cog", dict(dim=12, heads=4, rope=True), "even"),
        ("relu_attn", dict(chunk=0), "chunk"),
        ("gaam", dict(gaussians=0), "gaussians"),
        ("gaam", dict(eps=-1.0), "eps"),
        ("mta", dict(key_kernel=2), "odd"),
        ("mta", dict(heads=4, head_kernel=3), "head_kernel"),
        ("mta", dict(query_kernel=0), "query_kernel"),
        ("kv_shift", dict(heads=0), "heads"),
        ("complexformer", dict(dim=12, heads=4), "even"),
        ("rcmha", dict(conv_kernel=0), "conv_kernel"),
        ("neural_attn", dict(hidden=0), "hidden"),
        ("optimised_attn", dict(dim=7, heads=2), "divisible"),
        ("super_attn", dict(max_len=0), "max_len"),
        ("mega", dict(ema_dim=0), "ema_dim"),
        ("mega", dict(v_dim=-3), "v_dim"),
        ("luong", dict(score="bilinear"), "score"),
        ("sentinel", dict(dim=0), "dim"),
    ],
)
def test_bad_config_raises(name: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(name, **options)


def _heads_of(layer, x: torch.Tensor, rope: bool = True):
    """Plain q, k, v of a layer with q, k, v projections (no cache), optionally rotated."""
    from attnlab.mechanisms.common import apply_rope, split_heads

    q, k, v = (split_heads(p(x), layer.heads) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    if rope:
        pos = torch.arange(x.shape[1])
        q, k = apply_rope(q, pos), apply_rope(k, pos)
    return q, k, v


def _out(layer, o: torch.Tensor) -> torch.Tensor:
    from attnlab.mechanisms.common import merge_heads

    return layer.o_proj(merge_heads(o))


@torch.no_grad()
def test_cog_weights_flip_sign_with_the_keys() -> None:
    # sign(-S) softmax(|-S|) = -sign(S) softmax(|S|): negating the keys negates the output (softmax cannot)
    layer = make("cog")
    x = hidden(16).detach()
    out = layer(x)
    layer.k_proj.weight.neg_()
    assert max_err(layer(x), -out) < 1e-12
    # the first token sees only itself: weight sign(s_00) with magnitude 1
    layer.k_proj.weight.neg_()
    q, k, v = _heads_of(layer, x[:, :1])
    expect = torch.sign((q * k).sum(-1, keepdim=True)) * v
    assert max_err(layer(x[:, :1]), _out(layer, expect)) < 1e-12


@torch.no_grad()
def test_relu_attention_is_positively_homogeneous_and_divides_by_visible_keys() -> None:
    layer = make("relu_attn")
    x = hidden(16).detach()
    out = layer(x)
    layer.q_proj.weight.mul_(3.0)
    assert max_err(layer(x), 3.0 * out) < 1e-11  # relu(3s)/L = 3 relu(s)/L; a softmax would sharpen
    q, k, v = _heads_of(layer, x)
    s = torch.relu(q @ k.transpose(-1, -2) / 8 ** 0.5).tril()
    expect = (s @ v) / torch.arange(1, T + 1, dtype=x.dtype).view(T, 1)
    assert max_err(layer(x), _out(layer, expect)) < 1e-12


@torch.no_grad()
def test_gaam_with_wide_gaussians_averages_the_visible_values() -> None:
    layer = make("gaam", gaussians=1)
    layer.log_xi.fill_(40.0)  # variance scale e^40: every visible key gets the same weight
    x = hidden(16).detach()
    _, _, v = _heads_of(layer, x)
    mean = v.cumsum(2) / torch.arange(1, T + 1, dtype=x.dtype).view(T, 1)
    assert max_err(layer(x), _out(layer, mean)) < 1e-9


@torch.no_grad()
def test_identity_initialised_layers_are_plain_softmax_attention() -> None:
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention

    x = hidden(16).detach()
    torch.manual_seed(0)
    for name, opts, rope in [("mta", dict(dim=16, heads=4), True), ("kv_shift", dict(dim=16, heads=2), True),
                             ("rcmha", dict(dim=16, heads=2), False)]:
        layer = build(name, **opts).double()  # fresh init: identity kernels / shifts, zero position terms
        if name == "rcmha":
            layer.pos_proj.weight.zero_()
        q, k, v = _heads_of(layer, x, rope=rope)
        expect = _out(layer, reference_attention(q, k, v, Causal()))
        assert max_err(layer(x), expect) < 1e-12, name


@torch.no_grad()
def test_kv_shift_previous_only_attends_to_shifted_keys() -> None:
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention
    from attnlab.mechanisms.common import apply_rope

    layer = make("kv_shift")
    layer.alpha.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))  # keys: only the previous position
    layer.beta.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    x = hidden(16).detach()
    q, k, v = _heads_of(layer, x, rope=False)
    pos = torch.arange(T)
    k_prev = torch.cat([torch.zeros_like(k[:, :, :1]), k[:, :, :-1]], dim=2)
    expect = reference_attention(apply_rope(q, pos), apply_rope(k_prev, pos), v, Causal())
    assert max_err(layer(x), _out(layer, expect)) < 1e-12


@torch.no_grad()
def test_complexformer_with_unit_rates_is_rope_and_differs_otherwise() -> None:
    from attnlab.core.patterns import Causal
    from attnlab.core.reference import reference_attention

    layer = make("complexformer")
    x = hidden(16).detach()
    q, k, v = _heads_of(layer, x, rope=True)
    rope_out = _out(layer, reference_attention(q, k, v, Causal()))
    assert max_err(layer(x), rope_out) > 1e-3  # perturbed gamma, lambda: not RoPE
    layer.gamma.fill_(1.0)
    layer.lam.fill_(1.0)
    assert max_err(layer(x), rope_out) < 1e-12
    assert max_err(layer.reference(x), rope_out) < 1e-12


@torch.no_grad()
def test_sentinel_with_zero_value_is_an_extra_zero_sink() -> None:
    from attnlab.core.reference import reference_attention
    from attnlab.core.score_mods import Bias

    layer = make("sentinel")
    layer.sentinel.value.zero_()
    x = hidden(16).detach()
    q, k, v = _heads_of(layer, x)
    B, H, _, d = k.shape
    ks = layer.sentinel.key[None, :, None].expand(B, H, 1, d)
    allowed = torch.ones(T, T + 1, dtype=torch.bool).tril(1)  # sentinel (column 0) plus keys <= t
    scores_mask = torch.where(allowed, 0.0, float("-inf")).to(x.dtype)
    expect = reference_attention(q, torch.cat([ks, k], 2), torch.cat([torch.zeros_like(v[:, :, :1]), v], 2),
                                 score_mod=Bias(scores_mask[None, None]), q_offset=0)
    assert max_err(layer(x), _out(layer, expect)) < 1e-12


def test_better_attention_parameter_counts() -> None:
    def n(layer) -> int:
        return sum(p.numel() for p in layer.parameters())

    std = n(build("mha", dim=16, heads=2, bias=False))  # 4 dim^2
    assert n(build("optimised_attn", dim=16, heads=2)) * 4 == std * 3
    assert n(build("efficient_attn", dim=16, heads=2)) * 2 == std
    assert n(build("super_attn", dim=16, heads=2, max_len=12)) == std // 2 + 12 * 12


@torch.no_grad()
def test_super_attention_identity_kernel_is_efficient_attention() -> None:
    sup, eff = build("super_attn", dim=16, heads=2, max_len=12).double(), build("efficient_attn", dim=16, heads=2)
    eff = eff.double()
    eff.load_state_dict({k: v for k, v in sup.state_dict().items() if k != "align"})
    x = hidden(16).detach()
    assert max_err(sup(x), eff(x)) < 1e-12
    with pytest.raises(ValueError, match="max_len"):
        sup(hidden(16, T=13).detach())


@pytest.mark.parametrize("score", ["dot", "general", "concat"])
def test_luong_cross_attention_matches_reference(score: str) -> None:
    layer = make("luong", score=score, heads=1)
    x, ctx = hidden(16), hidden(16, seed=5, T=6)
    params = tuple(layer.parameters())
    out, ref = layer.cross(x, ctx), layer.reference(x, context=ctx)
    assert out.shape == x.shape
    assert max_err(out.detach(), ref.detach()) < 1e-10
    assert max_err(grads(out, (x, ctx, *params)), grads(ref, (x, ctx, *params))) < 1e-9
    # every target row sees the whole source: changing the last source state changes the first row
    ctx2 = ctx.detach().clone()
    ctx2[:, -1] += 1.0
    assert max_err(layer.cross(x, ctx2)[:, 0].detach(), out[:, 0].detach()) > 1e-6


@pytest.mark.parametrize("score", ["dot", "general"])
def test_luong_self_attention_scores_and_decoding(score: str) -> None:
    layer = make("luong", score=score)
    x = hidden(16)
    params = tuple(layer.parameters())
    out, ref = layer(x), layer.reference(x)
    assert max_err(out.detach(), ref.detach()) < 1e-10
    assert max_err(grads(out, (x, *params)), grads(ref, (x, *params))) < 1e-9
    cache = layer.init_cache()
    with torch.no_grad():
        steps = torch.cat([layer(x[:, t:t + 1].detach(), cache) for t in range(T)], dim=1)
    assert max_err(steps, out.detach()) < 1e-10


@torch.no_grad()
def test_luong_dot_is_the_paper_formula() -> None:
    layer = make("luong", score="dot", heads=1)
    x = hidden(16).detach()
    a = torch.softmax((x @ x.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -torch.inf), -1)
    expect = torch.tanh(torch.cat([a @ x, x], dim=-1) @ layer.wc.weight.T)
    assert max_err(layer(x), expect) < 1e-12


def _numbers_held(cache, batch: int) -> int:
    """Numbers a layer cache holds per sequence: cached keys/values plus state tensors that are not views of them."""
    return cache.numel() // batch


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CASES))
def test_state_size_is_what_the_cache_holds(name: str) -> None:
    layer = make(name)
    x = hidden(layer.dim).detach()
    cache = layer.init_cache(batch=2)
    layer(x[:, :4], cache)
    layer(x[:, 4:], cache)
    assert _numbers_held(cache, 2) == layer.state_size(T)
