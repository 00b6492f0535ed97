import pytest
import torch
from layer_checks import build64, check_decoding, check_reference, hidden, one_thread  # noqa: F401

import attnlab
from attnlab.testing import max_err


@pytest.mark.parametrize("opts", [dict(), dict(mode="add"), dict(mode="add", rope=False, pattern=None)])
def test_matches_reference(opts):
    layer = build64("mhe", dim=32, heads=4, **opts)
    check_reference(layer, hidden())
    if layer.cfg.pattern is not None:
        check_decoding(layer, hidden())


def test_parameter_count_is_one_head_plus_embeddings():
    layer = attnlab.build("mhe", dim=64, heads=8)
    d = 8
    proj = sum(p.numel() for n, p in layer.named_parameters() if n != "o_proj.weight")
    assert proj == 3 * 64 * d + 3 * 8 * d  # single shared projection + 3 n d embeddings (the paper's count)
    mha = attnlab.build("mha", dim=64, heads=8)
    assert proj < sum(p.numel() for n, p in mha.named_parameters() if n != "o_proj.weight") / 7


def test_additive_key_embedding_cancels_in_softmax():
    layer = build64("mhe", dim=32, heads=4, mode="add", rope=False)
    x = hidden().detach()
    y = layer(x)
    with torch.no_grad():
        layer.emb[1].normal_()  # new e^K
    assert max_err(layer(x), y) < 1e-12
    with torch.no_grad():
        layer.emb[0].normal_()  # new e^Q changes the scores
    assert max_err(layer(x), y) > 1e-3


def test_heads_differ():
    layer = build64("mhe", dim=32, heads=4)
    with torch.no_grad():
        layer.emb.fill_(1.0)  # identical heads: the four head outputs coincide
        o = layer.o_proj
        o.weight.copy_(torch.eye(32, dtype=torch.float64))
        y = layer(hidden().detach())
    assert max_err(y[..., :8], y[..., 8:16]) < 1e-12


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        attnlab.build("mhe", dim=32, heads=4, mode="concat")
