"""Titans MAG and MAC [R29] (memory as a gate / as context) and the Combiner layer [P283]: what the attention
of each may read, decoding in uneven splits, bad options. Fast path == reference (outputs and gradients) and
token-by-token decoding are in tests/mechanisms/test_catalogue_layers.py."""

import pytest
import torch

from attnlab.mechanisms.registry import build, get
from attnlab.testing import grads, max_err

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(name: str, **opts):
    torch.manual_seed(0)
    layer = build(name, dim=16, heads=2, **opts).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _x(T: int = 17) -> torch.Tensor:
    return torch.randn(2, T, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _memory_off(layer) -> None:
    """theta = sigmoid(-1e4) = 0: the memory never learns, so it stays at its (zero) start."""
    with torch.no_grad():
        layer.memory.gates.bias[2 * layer.memory.heads :] = -1e4


@pytest.mark.parametrize("name,opts", [("titans_mag", dict(window=4, persistent=3, block=4)),
                                       ("titans_mag", dict(window=3, persistent=0, block=5, memory_depth=2,
                                                           kv_heads=1, rope=True)),
                                       ("titans_mac", dict(segment=4, persistent=2)),
                                       ("titans_mac", dict(segment=5, persistent=0, memory_depth=2,
                                                           memory_hidden=6))])
def test_variants_match_reference_and_decode_in_uneven_splits(name, opts):
    layer, x = _layer(name, **opts), _x().requires_grad_()
    out, ref = layer(x), layer.reference(x)
    assert max_err(out, ref) < 1e-10
    params = (x, *layer.parameters())
    assert max_err(grads(out, params), grads(ref, params)) < 1e-9
    with torch.no_grad():
        cache = layer.init_cache(2)
        parts, start = [], 0
        for n in (6, 1, 7, 3):
            parts.append(layer(x[:, start : start + n], cache))
            start += n
    assert cache.length == 17 and max_err(torch.cat(parts, 1), out) < 1e-10


@torch.no_grad()
def test_mag_attention_reads_the_window_and_the_persistent_tokens():
    layer, x = _layer("titans_mag", window=4, persistent=2, block=4), _x()
    _memory_off(layer)
    base = layer(x)
    far = x.clone()
    far[:, 5] += 1.0  # outside the window of rows >= 9
    diff = (layer(far) - base).abs().amax((0, 2))
    assert float(diff[9:].max()) == 0.0 and float(diff[5:9].min()) > 0  # window only, the memory is off
    with torch.no_grad():
        layer.persist[0] += 1.0  # every row reads the persistent tokens
    assert float((layer(x) - base).abs().amax((0, 2)).min()) > 0
    on = _layer("titans_mag", window=4, persistent=2, block=4)  # with the memory learning, the past comes back
    assert float((on(far) - on(x)).abs().amax((0, 2))[9:].min()) > 0


@torch.no_grad()
def test_mac_attention_stays_in_the_segment_and_the_memory_carries_the_past():
    layer, x = _layer("titans_mac", segment=4, persistent=2), _x(12)
    _memory_off(layer)
    early = x.clone()
    early[:, 1] += 1.0  # segment 0
    diff = (layer(early) - layer(x)).abs().amax((0, 2))
    assert float(diff[4:].max()) == 0.0 and float(diff[1:4].min()) > 0 and float(diff[0]) == 0.0
    on = _layer("titans_mac", segment=4, persistent=2)  # the memory learns from segment 0 and is read later
    assert float((on(early) - on(x)).abs().amax((0, 2))[4:].min()) > 0
    state = on.init_cache(2)
    on(x[:, :6], state)
    assert state.numel() == 2 * on.state_size(6)  # batch 2: the memory + this segment's 2 tokens (h and x)


def test_hybrids_are_registered_and_reject_bad_options():
    for name in ("titans_mag", "titans_mac"):
        assert get(name).papers == ("R29",) and get(name).decodes
        with pytest.raises(ValueError, match="persistent"):
            build(name, persistent=-1)
        with pytest.raises(ValueError, match="memory_hidden"):
            build(name, memory_hidden=4)  # needs memory_depth >= 2
    with pytest.raises(ValueError, match="window"):
        build("titans_mag", window=0)
    with pytest.raises(ValueError, match="block"):
        build("titans_mag", block=0)
    with pytest.raises(ValueError, match="segment"):
        build("titans_mac", segment=0)
    with pytest.raises(TypeError, match="rope"):
        build("titans_mac", rope=True)


def test_combiner_layer_learns_its_span_query_and_rejects_bad_pools():
    layer, x = _layer("combiner", block=4, pool="mean"), _x().requires_grad_()
    out = layer(x)
    g = torch.autograd.grad(out.pow(2).sum(), layer.span_query)[0]
    assert g.abs().max() > 0  # the in-span distribution is trained
    assert max_err(out, layer.reference(x)) < 1e-10
    with pytest.raises(ValueError, match="pool"):
        build("combiner", pool="min")
    with pytest.raises(ValueError, match="block"):
        build("combiner", block=0)
