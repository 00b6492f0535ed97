"""MoBA and BiFormer: fast path vs the dense float64 reference with the same selection, dense limits, decoding."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.reference import reference_attention
from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.registry import build, get
from attnlab.mechanisms.routing.biformer import biformer_attention, biformer_mask, region_order
from attnlab.mechanisms.routing.moba import moba_attention, moba_mask, moba_select
from attnlab.testing import grads, max_err, qkv


@pytest.mark.parametrize("T,block,top_k", [(64, 8, 3), (61, 8, 2), (50, 5, 20), (48, 16, 1)])
def test_moba_matches_reference(T, block, top_k):
    q, k, v = qkv(2, 4, 2, T, D=8)
    out = moba_attention(q, k, v, block, top_k)
    ref = masked_reference(q, k, v, moba_mask(q, k, block, top_k, 0))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_moba_selection_rules():
    q, k, _ = qkv(1, 2, None, 40, D=8, requires_grad=False)
    sel, valid = moba_select(q, k, 8, 3, 0)
    cur = torch.arange(40) // 8
    assert torch.equal(sel[..., 0], cur.expand(1, 2, 40))  # the current block is always read
    assert bool((sel[..., 1:][valid[..., 1:]] < cur.view(1, 1, 40, 1).expand_as(sel[..., 1:])[valid[..., 1:]]).all())
    assert int(valid[0, 0, 3].sum()) == 1 and int(valid[0, 0, 39].sum()) == 3  # no past block yet / enough
    # the gate picks the block whose mean key best matches the query
    k2 = torch.zeros_like(k)
    k2[:, :, 8:16] = q[:, :, 39:40]  # block 1's mean key equals query 39
    sel2, _ = moba_select(q, k2, 8, 2, 0)
    assert bool((sel2[:, :, 39, 1] == 1).all())


def test_moba_every_block_is_causal_attention():
    q, k, v = qkv(1, 2, None, 40, D=8)
    out = moba_attention(q, k, v, 8, 5)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


def test_moba_decodes_with_cache():
    torch.manual_seed(0)
    layer = build("moba", dim=32, heads=4, kv_heads=2, block=4, top_k=2).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = layer(x)
    assert max_err(full, layer.reference(x)) < 1e-12
    cache = layer.init_cache()
    steps = [layer(x[:, :9], cache)] + [layer(x[:, i : i + 1], cache) for i in range(9, 23)]
    assert max_err(torch.cat(steps, 1), full) < 1e-12
    assert get("moba").family == "routing" and get("moba").decodes


def test_moba_trains():
    layer = build("moba", dim=32, heads=2, block=8, top_k=2)
    x = torch.randn(1, 40, 32)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("top_k", [1, 3, 12])
def test_biformer_matches_reference(top_k):
    q, k, v = qkv(2, 4, 2, 48, D=8)
    out = biformer_attention(q, k, v, (6, 8), (3, 4), top_k)
    ref = masked_reference(q, k, v, biformer_mask(q, k, (6, 8), (3, 4), top_k))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_biformer_all_regions_is_dense_and_regions_are_2d():
    q, k, v = qkv(1, 2, None, 48, D=8)
    assert max_err(biformer_attention(q, k, v, (6, 8), (3, 4), 12), reference_attention(q, k, v)) < 1e-12
    order = region_order((4, 4), (2, 2))
    assert order[:4].tolist() == [0, 1, 4, 5]  # the first region is the top-left 2x2 square
    m = biformer_mask(q, k, (6, 8), (3, 4), 1)
    assert int(m[0, 0, 0].sum()) == 4  # one region of 2x2 tokens


def test_biformer_layer_and_errors():
    layer = build("biformer", dim=32, heads=2, grid=(4, 8), regions=(2, 2), top_k=2).double()
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    assert max_err(layer(x), layer.reference(x)) < 1e-12
    with pytest.raises(ValueError, match="divide"):
        build("biformer", grid=(5, 8), regions=(2, 2))
    with pytest.raises(ValueError, match="length"):
        layer(torch.randn(1, 30, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="decode"):
        layer.init_cache()
