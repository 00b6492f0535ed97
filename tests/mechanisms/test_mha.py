import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import Causal, PerHead, Sinks, SlidingWindow
from attnlab.core.score_mods import ALiBi, SoftCap
from attnlab.mechanisms.layers.mha import cached_attention
from attnlab.testing import max_err, qkv

CONFIGS = {
    "mha": dict(),
    "gqa-qknorm": dict(kv_heads=2, qk_norm=True),
    "mqa-bias": dict(kv_heads=1, bias=True),
    "window-alibi": dict(pattern=SlidingWindow(6), score_mod=ALiBi(4)),  # block-sparse engine
    "streaming-softcap": dict(pattern=(Sinks(2) | SlidingWindow(4)) & Causal(), score_mod=SoftCap(5.0)),
    "per-head": dict(pattern=PerHead((Causal(), SlidingWindow(3), SlidingWindow(8), Causal()))),
    "no-rope": dict(rope=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_reference_and_decodes(name):
    layer = build64("mha", dim=32, heads=4, **CONFIGS[name])
    x = hidden()
    check_reference(layer, x)
    check_decoding(layer, x)


def test_bidirectional_matches_reference_and_refuses_cache():
    layer = build64("mha", dim=32, heads=4, pattern=None)
    check_reference(layer, hidden())
    with pytest.raises(TypeError, match="causal"):
        layer.init_cache()


def test_presets_and_cache_size():
    mqa, gqa, mha = (attnlab.build(n, dim=32, heads=4) for n in ("mqa", "gqa", "mha"))
    assert (mqa.cfg.kvh, gqa.cfg.kvh, mha.cfg.kvh) == (1, 2, 4)
    assert mqa.k_proj.weight.shape == (8, 32)
    x = torch.randn(1, 10, 32)
    sizes = []
    for layer in (mqa, mha):
        cache = layer.init_cache()
        layer(x, cache)
        sizes.append(cache.nbytes())
    assert sizes[1] == 4 * sizes[0] == 2 * 10 * 32 * 4
    assert mha.state_size(10) == 4 * mqa.state_size(10)


def test_rope_positions_are_absolute():
    """Without a cache, the same tokens give the same outputs; RoPE keeps relative scores only."""
    layer = build64("mha", dim=32, heads=4, pattern=None)
    x = hidden(T=8).detach()
    y = layer(x)
    assert not torch.allclose(y[:, 0], y[:, 1])
    # scores depend on relative positions only: a causal layer on a shifted copy equals the cached suffix
    causal = build64("mha", dim=32, heads=4)
    xx = torch.cat([x, x], dim=1)
    cache = causal.init_cache()
    causal(xx[:, :8], cache)
    assert max_err(causal(xx[:, 8:], cache), causal(xx)[:, 8:]) < 1e-12


def test_cached_attention_offsets():
    q, k, v = qkv(B=1, H=2, Tq=4, Tk=9, requires_grad=False)
    full = attnlab.reference_attention(q, k, v, Causal())
    assert max_err(cached_attention(q, k, v, None, Causal()), full) < 1e-12


def test_bad_configs():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attnlab.build("mha", dim=32, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        attnlab.build("mha", dim=30, heads=4)
    with pytest.raises(TypeError, match="valid options"):
        attnlab.build("mha", dim=32, heads=4, window=3)
    layer = attnlab.build("mha", dim=32, heads=4)
    with pytest.raises(ValueError, match="batch, seq, 32"):
        layer(torch.randn(2, 5, 16))


def test_float32_close_to_reference():
    layer = attnlab.build("mha", dim=64, heads=4, kv_heads=2)
    x = torch.randn(2, 40, 64)
    ref = layer.double().reference(x.double())
    out = layer.float()(x)
    assert max_err(out, ref) < 1e-4


def test_state_size_counts_the_keys_the_next_query_reads():
    import attnlab
    from attnlab.core.patterns import Causal, SlidingWindow

    full = attnlab.build("mha", dim=32, heads=4, kv_heads=2)
    window = attnlab.build("mha", dim=32, heads=4, kv_heads=2, pattern=SlidingWindow(16) & Causal())
    assert full.state_size(100) == 2 * 2 * 8 * 100
    assert window.state_size(100) == 2 * 2 * 8 * 16
    assert window.state_size(10) == 2 * 2 * 8 * 10
