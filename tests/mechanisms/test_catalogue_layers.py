"""Every registered layer, one parametrized check each: one shared base (a heads config, projections + an op),
fast path == ``reference`` in float64 (outputs and gradients), decoding token by token after a prefill == the full
forward for layers that decode, and bad options fail with an error naming them.

Tiny shapes: ``dim`` 16, 2 heads, 13 positions (grid layers: a small grid). A newly registered layer must get an
entry in ``CASES`` (the first test fails until it does)."""

from __future__ import annotations

import pytest
import torch
from layer_checks import one_thread  # noqa: F401

import attnlab
from attnlab.mechanisms.heads import HeadsConfig, LayerCache, OpLayer
from attnlab.mechanisms.registry import build, config_options, get, renamed_options
from attnlab.testing import grads, max_err

DIM, HEADS, T = 16, 2, 13

# name -> (options beyond dim/heads, sequence length or None for T, length of the prefill before token-by-token decoding)
CASES: dict[str, tuple[dict, int | None, int]] = {
    # layers
    "cascaded": (dict(key_dim=4), None, 5),
    "cog": (dict(chunk=4), None, 5),
    "combiner": (dict(block=4, kv_heads=1), None, 5),
    "complexformer": ({}, None, 5),
    "diff": (dict(heads=2), None, 5),
    "efficient_attn": ({}, None, 5),
    "gaam": (dict(chunk=4, gaussians=2), None, 5),
    "kv_shift": ({}, None, 5),
    "luong": (dict(score="concat", chunk=4), None, 5),
    "mae": (dict(kv_heads=1), None, 5),
    "mega": (dict(z_dim=8, v_dim=12, ema_dim=3), None, 5),
    "mha": (dict(kv_heads=1, qk_norm=True), None, 5),
    "mhe": (dict(mode="add"), None, 5),
    "moh": (dict(heads=4, chunk=4), None, 5),
    "mta": (dict(heads=4), None, 5),
    "neural_attn": (dict(hidden=8, chunk=4), None, 5),
    "optimised_attn": ({}, None, 5),
    "rcmha": ({}, None, 5),
    "relu_attn": (dict(chunk=4), None, 5),
    "sentinel": ({}, None, 5),
    "shvit": ({}, None, 5),
    "deconstructing": (dict(max_len=16), None, 5),
    "headmask": (dict(n_mask=0), None, 5),  # training masks are random per forward: the checks compare unmasked
    "dual_attn": (dict(rel_dim=2, max_len=16), None, 5),
    "shared_diff": (dict(heads=2, rank=2), None, 5),
    "super_attn": (dict(max_len=16), None, 5),
    "titans_mac": (dict(segment=4, persistent=2), None, 5),
    "titans_mag": (dict(window=4, persistent=2, block=4), None, 5),
    # routing
    "biformer": (dict(grid=(3, 4), regions=(1, 2), top_k=1), 12, 0),
    "delta_select": (dict(top_k=4, always=2), None, 5),
    "dhsa": (dict(min_len=2, max_len=5, top_k=2), None, 5),
    "dma": (dict(window=4, chunk=4), None, 5),
    "hip": (dict(block=4, top_k=2), None, 5),
    "minference": (dict(n_vertical=3, n_slash=3, last_q=4, chunk=4, prefill=8), None, 8),
    "moba": (dict(block=4, top_k=2), None, 5),
    "recycled": (dict(top_k=4, stride=3), None, 5),
    "routing_transformer": (dict(clusters=3), None, 5),
    "sparsifiner": (dict(rank=3, top_k=5), None, 0),
    "superlinear": (dict(stride=4, window=5, top_k=2, chunk=4), None, 5),
    "ssa": (dict(block=4, rate=0.5, eval_mode="sample"), None, 5),
    "rectified": (dict(block=4, top_k=2), None, 5),
    "vmoba": (dict(grid=(2, 2, 3), tile=(1, 2, 3), top_k=1), 12, 0),
    # linear
    "agent": (dict(agents=4, chunk=4), None, 5),
    "care": (dict(grid=(3, 4), chunk=5), 12, 0),
    "flowformer": (dict(chunk=4), None, 5),
    "inline": (dict(chunk=4), None, 5),
    "l2vit": (dict(chunk=4, lcm_kernel=3), None, 5),
    "lightnet": (dict(chunk=4), None, 5),
    "lightning": (dict(chunk=4, layer_idx=1, layers=3), None, 5),
    "linear": (dict(chunk=4), None, 5),
    "lla": (dict(chunk=4), None, 5),
    "rat": (dict(block=4), None, 5),
    "titans": (dict(block=4), None, 5),
    "tnl": (dict(chunk=4), None, 5),
}
NAMES = sorted(CASES)


def base_options(name: str) -> dict:
    """dim and heads (where the layer takes heads: mega is one head) plus the case's options."""
    base = {"dim": DIM, "heads": HEADS} if "heads" in config_options(get(name).config) else {"dim": DIM}
    return {**base, **CASES[name][0]}


def make(name: str, **over) -> OpLayer:
    torch.manual_seed(0)
    layer = build(name, **{**base_options(name), **over}).double()
    with torch.no_grad():  # move parameters off their (often identity-like or constant) initial values
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def hidden(name: str, B: int = 2) -> torch.Tensor:
    n = CASES[name][1] or T
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, n, DIM, generator=g, dtype=torch.float64, requires_grad=True)


def test_every_registered_layer_is_covered() -> None:
    names = {e.name for e in attnlab.catalogue()}
    assert names == set(CASES), f"missing: {sorted(names - set(CASES))}; stale: {sorted(set(CASES) - names)}"


@pytest.mark.parametrize("name", NAMES)
def test_one_base_and_one_heads_config(name: str) -> None:
    entry = get(name)
    assert issubclass(entry.cls, OpLayer) and issubclass(entry.config, HeadsConfig)
    layer = make(name)
    assert isinstance(layer.cfg, HeadsConfig) and layer.dim == DIM
    assert "dim" in config_options(entry.config)


@pytest.mark.parametrize("name", NAMES)
def test_fast_path_matches_reference(name: str) -> None:
    layer, x = make(name), hidden(name)
    params = tuple(p for p in layer.parameters() if p.requires_grad)
    out, ref = layer(x), layer.reference(x)
    assert out.shape == ref.shape == x.shape
    assert max_err(out, ref) < 1e-10, f"output error {max_err(out, ref)}"
    g_out, g_ref = grads(out, (x, *params)), grads(ref, (x, *params))
    assert max_err(g_out, g_ref) < 1e-9, f"gradient error {max_err(g_out, g_ref)}"


@torch.no_grad()
@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n][2]])
def test_decoding_token_by_token_equals_full_forward(name: str) -> None:
    assert get(name).decodes
    layer, x = make(name).eval(), hidden(name).detach()  # decoding is inference (SSA samples anew per training call)
    full = layer(x)
    cache = layer.init_cache(x.shape[0])
    assert isinstance(cache, LayerCache)
    first = CASES[name][2]
    steps = [layer(x[:, :first], cache)] + [layer(x[:, t : t + 1], cache) for t in range(first, x.shape[1])]
    assert cache.length == x.shape[1]
    assert max_err(torch.cat(steps, dim=1), full) < 1e-10


@pytest.mark.parametrize("name", [n for n in NAMES if not CASES[n][2]])
def test_layers_that_do_not_decode_say_so(name: str) -> None:
    assert not get(name).decodes
    with pytest.raises(TypeError):
        make(name).init_cache()


@pytest.mark.parametrize("name", NAMES)
def test_bad_options_fail_naming_the_option(name: str) -> None:
    opts = base_options(name)
    with pytest.raises(TypeError, match="no_such_knob"):
        build(name, **opts, no_such_knob=3)
    for old, new in renamed_options(get(name).config).items():
        with pytest.raises(TypeError, match=f"option '{old}' was renamed to '{new}'"):
            build(name, **opts, **{old: 4})
    with pytest.raises(ValueError, match="dim"):
        build(name, **{**opts, "dim": 0})


def test_the_knob_names_are_one_per_meaning() -> None:
    """No layer offers the retired spellings of ``chunk`` and ``block``."""
    retired = {"chunk_size", "rows", "query_chunk", "rat_chunk", "mem_chunk", "group"}
    for e in attnlab.catalogue():
        assert not retired & set(config_options(e.config)), e.name
