import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import SlidingWindow
from attnlab.testing import max_err


@pytest.mark.parametrize("opts", [dict(), dict(key_dim=4, pattern=SlidingWindow(4)), dict(rope=False)])
def test_matches_reference_and_decodes(opts):
    layer = build64("cascaded", dim=32, heads=4, **opts)
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


def test_cascade_flows_forward_only():
    """Head j sees channel splits 0..j: changing split 3 leaves heads 0-2 alone; changing split 0 moves all."""
    layer = build64("cascaded", dim=32, heads=4)
    with torch.no_grad():
        layer.proj.weight.copy_(torch.eye(32, dtype=torch.float64))  # read the head outputs directly
        x = hidden().detach()
        y = layer(x)
        x3 = x.clone()
        x3[..., 24:] += 1.0
        y3 = layer(x3)
        assert max_err(y3[..., :24], y[..., :24]) < 1e-12
        assert max_err(y3[..., 24:], y[..., 24:]) > 1e-3
        x0 = x.clone()
        x0[..., :8] += 1.0
        diff = (layer(x0) - y).abs().amax(dim=(0, 1))
        assert bool((diff.view(4, 8).amax(-1) > 1e-6).all())


def test_projection_cost_is_a_fraction_of_mha():
    cga = attnlab.build("cascaded", dim=64, heads=8)
    mha = attnlab.build("mha", dim=64, heads=8)
    n = lambda m: sum(p.numel() for name, p in m.named_parameters() if "proj" not in name or "q" in name)  # noqa: E731
    assert sum(p.numel() for p in cga.qkv.parameters()) == 8 * 8 * (2 * 8 + 8)
    assert n(cga) < n(mha)


def test_needs_divisible_dim():
    with pytest.raises(ValueError, match="divisible"):
        attnlab.build("cascaded", dim=30, heads=4)
