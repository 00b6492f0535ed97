"""Deconstructing Attention's controlled variants (L2): each variant's fast path == its reference and == an
independent float64 formula (outputs and gradients), causal and not; decoding == full forward; the property each
variant is built to have (no mixing, input-independent weights, L2 scores, position-only queries/keys)."""

import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.mechanisms.registry import get
from attnlab.testing import grads, max_err

VARIANTS = ["no_mixing", "input_independent", "l2_distance", "decoupled_qk"]


def make(variant, seed=0, **opts):
    layer = build64("deconstructing", seed=seed, dim=32, heads=4, variant=variant, max_len=24, **opts)
    with torch.no_grad():  # off the zero / identity-like initial values
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference_and_decodes(variant):
    layer = make(variant)
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_causal_matches_reference_and_refuses_a_cache(variant):
    layer = make(variant, causal=False)
    check_reference(layer, hidden())
    with pytest.raises(TypeError):
        layer.init_cache()


def _formula(layer, x):
    """float64 from the paper's descriptions, written with plain loops over heads and rows (rope off)."""
    cfg = layer.cfg
    B, T, _ = x.shape
    H, d = cfg.heads, cfg.dim // cfg.heads
    Wv = layer.v_proj.weight.double()
    out = torch.zeros(B, T, cfg.dim, dtype=torch.float64)
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        v = x @ Wv[sl].T  # (B, T, d)
        if cfg.variant in ("l2_distance", "decoupled_qk"):
            src = x if cfg.variant == "l2_distance" else layer.pos[:T].double().expand(B, T, cfg.dim)
            q, k = src @ layer.q_proj.weight[sl].double().T, src @ layer.k_proj.weight[sl].double().T
        rows = []
        for i in range(T):
            keys = range(i + 1) if cfg.causal else range(T)
            if cfg.variant == "no_mixing":
                rows.append(v[:, i])
                continue
            if cfg.variant == "input_independent":
                s = torch.stack([layer.mix[h, i, j].double().expand(B) for j in keys], -1)
            elif cfg.variant == "l2_distance":
                s = torch.stack([-((q[:, i] - k[:, j]) ** 2).sum(-1) / d**0.5 for j in keys], -1)
            else:
                s = torch.stack([(q[:, i] * k[:, j]).sum(-1) / d**0.5 for j in keys], -1)
            w = torch.softmax(s, -1)
            rows.append(sum(w[:, n, None] * v[:, j] for n, j in enumerate(keys)))
        out[..., sl] = torch.stack(rows, 1)
    return out @ layer.o_proj.weight.double().T


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_path_equals_independent_float64_formula(variant, causal):
    layer = make(variant, rope=False, causal=causal)
    x = hidden(T=9)
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    out, ref = layer(x), _formula(layer, x)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (x, *params)), grads(ref, (x, *params))) < 1e-10
    # float32 fast path against the same float64 formula
    layer32 = layer.float()
    x32 = x.detach().float()
    assert max_err(layer32(x32), _formula(layer, x.detach())) < 1e-4


@torch.no_grad()
def test_no_mixing_each_token_sees_only_itself():
    layer, x = make("no_mixing", causal=False), hidden().detach()
    x2 = x.clone()
    x2[:, 7] += 1.0
    diff = (layer(x2) - layer(x)).abs().amax(dim=(0, 2))
    assert bool((diff[7] > 1e-3) & (diff[torch.arange(21) != 7] == 0).all())
    assert max_err(layer(x), x @ layer.v_proj.weight.T @ layer.o_proj.weight.T) < 1e-12


@torch.no_grad()
@pytest.mark.parametrize("variant", ["input_independent", "decoupled_qk"])
def test_input_independent_weights_make_the_layer_linear_in_x(variant):
    """Weights that do not depend on x: out = W v(x) is linear in x (dot-product / L2 attention are not)."""
    for name, linear in ((variant, True), ("l2_distance", False)):
        layer = make(name)
        a, b = hidden(seed=1).detach(), hidden(seed=2).detach()
        err = max_err(layer(a + 2 * b), layer(a) + 2 * layer(b))
        assert (err < 1e-12) if linear else (err > 1e-3), (name, err)


@torch.no_grad()
def test_input_independent_starts_as_a_causal_average():
    layer = build64("deconstructing", dim=8, heads=2, variant="input_independent", max_len=16)
    with torch.no_grad():
        layer.v_proj.weight.copy_(torch.eye(8, dtype=torch.float64))
        layer.o_proj.weight.copy_(torch.eye(8, dtype=torch.float64))
    x = hidden(T=10, dim=8).detach()
    want = x.cumsum(1) / torch.arange(1, 11, dtype=torch.float64).view(1, -1, 1)
    assert max_err(layer(x), want) < 1e-12


@torch.no_grad()
def test_l2_scores_put_the_largest_weight_on_the_query_itself_when_q_equals_k():
    """-||q_i - k_j||^2 is 0 at j = i and negative elsewhere when W_Q = W_K (dot products would not do this)."""
    layer = make("l2_distance", rope=False, causal=False)
    layer.k_proj.weight.copy_(layer.q_proj.weight)
    x = hidden(T=12).detach()
    q = (x @ layer.q_proj.weight.T).view(2, 12, 4, 8).transpose(1, 2)
    s = -((q[:, :, :, None] - q[:, :, None]) ** 2).sum(-1)
    assert torch.equal(s.argmax(-1), torch.arange(12).expand(2, 4, 12))
    dot = q @ q.transpose(-1, -2)
    assert not torch.equal(dot.argmax(-1), torch.arange(12).expand(2, 4, 12))  # the dot form differs here
    assert max_err(layer(x), layer.reference(x)) < 1e-12


def test_too_long_for_max_len_fails_naming_it():
    for variant in ("input_independent", "decoupled_qk"):
        layer = make(variant)
        with pytest.raises(ValueError, match="max_len"):
            layer(hidden(T=25))
    make("l2_distance")(hidden(T=25))  # no table: any length


@pytest.mark.parametrize("bad,match", [(dict(variant="softmax"), "variant"), (dict(max_len=0), "max_len")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        attnlab.build("deconstructing", dim=32, heads=4, **bad)
    with pytest.raises(TypeError, match="kv_heads"):
        attnlab.build("deconstructing", dim=32, heads=4, kv_heads=2)


def test_registered_with_the_paper_and_cache_sizes():
    e = get("deconstructing")
    assert e.papers == ("L2",) and e.decodes and e.family == "layers"
    sizes = {v: attnlab.build("deconstructing", dim=32, heads=4, variant=v, max_len=8).state_size(10) for v in VARIANTS}
    assert sizes == {"no_mixing": 0, "input_independent": 320, "l2_distance": 640, "decoupled_qk": 640}
    layer = make("input_independent")
    cache = layer.init_cache(2)
    layer(hidden(T=5).detach(), cache)
    assert cache.numel() == 2 * 4 * 8 * 5  # values only (zero-width keys)
