import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.core.patterns import SlidingWindow
from attnlab.testing import max_err


@pytest.mark.parametrize("name", ["diff", "shared_diff"])
@pytest.mark.parametrize("opts", [dict(), dict(pattern=SlidingWindow(5), depth=3)])
def test_matches_reference_and_decodes(name, opts):
    layer = build64(name, dim=32, heads=2, **opts)
    check_reference(layer, hidden())
    check_decoding(layer, hidden())


def test_lambda_init_schedule():
    cfg = attnlab.mechanisms.registry.make_config
    assert abs(cfg("diff", depth=1).lam_init - 0.2) < 1e-12
    assert abs(cfg("diff", depth=1000).lam_init - 0.8) < 1e-12
    assert cfg("diff", lambda_init=0.5).lam_init == 0.5


def test_identical_maps_make_lambda_irrelevant():
    """With equal maps the difference is (1 - lambda) A V, and the per-head RMSNorm removes the factor."""
    layer = build64("shared_diff", dim=32, heads=2, rank=2)
    with torch.no_grad():
        layer.q_up.zero_()
        layer.k_up.zero_()
        x = hidden().detach()
        y = layer(x)
        layer.lam.mul_(0.3)  # another lambda, still < 1
        assert max_err(layer(x), y) < 1e-5  # RMSNorm eps only
        layer.q_up.normal_()  # distinct maps: lambda matters again
        y = layer(x)
        layer.lam.mul_(2.0)
        assert max_err(layer(x), y) > 1e-4


def test_shared_diff_has_fewer_parameters():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(attnlab.build("shared_diff", dim=128, heads=4, rank=4)) < 0.8 * count(
        attnlab.build("diff", dim=128, heads=4)
    )


def test_head_dim_rules():
    with pytest.raises(ValueError, match="2 \\* heads"):
        attnlab.build("diff", dim=36, heads=4)
