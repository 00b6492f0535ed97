"""VMoBA's global block selection [D56] and Superlinear attention with N > 2 search steps [D275]: fast paths vs
plain float64 references (outputs and gradients), known answers, the layers and bad options."""

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.registry import build
from attnlab.mechanisms.routing.superlinear import superlinear_attention, superlinear_mask
from attnlab.mechanisms.routing.vmoba import vmoba_attention, vmoba_mask
from attnlab.testing import grads, max_err, qkv

GRID, TILE = (4, 4, 6), (2, 2, 3)  # 96 tokens; blocks of 48 (1d), 6 (2d), 12 (3d) tokens


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- VMoBA global selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("partition,top_k,threshold", [("1d", 1, None), ("2d", 3, None), ("3d", 2, 0.4),
                                                        ("3d", 4, 0.9)])
def test_vmoba_global_matches_reference(partition, top_k, threshold):
    q, k, v = qkv(2, 4, 2, 96, D=8)
    out = vmoba_attention(q, k, v, GRID, TILE, partition, top_k, threshold, selection="global")
    mask = vmoba_mask(q, k, GRID, TILE, partition, top_k, threshold, selection="global")
    ref = masked_reference(q, k, v, mask)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    size = {"1d": 48, "2d": 6, "3d": 12}[partition]  # tokens per block
    blocks = mask.sum(-1) // size  # (B, H, T) blocks per query
    assert int(blocks.min()) >= 1  # every query keeps its best block
    pairs = blocks.sum(-1)  # per head: the budget top_k * T, plus at most one best block per query
    assert int(pairs.max()) <= top_k * 96 + 96
    assert int(blocks.min()) < int(blocks.max())  # the budget moves between queries


def test_vmoba_global_moves_budget_to_salient_queries():
    q, k, v = qkv(1, 1, None, 96, D=8, requires_grad=False)
    k[..., 0] += 2  # every block's mean key has a positive first coordinate
    q[:, :, :12, 0] = 20  # salient queries: a large gate with every block
    mask = vmoba_mask(q, k, GRID, TILE, "3d", 2, selection="global")
    blocks = mask.sum(-1)[0, 0] // 12
    assert set(blocks[:12].tolist()) == {8} and float(blocks[12:].float().mean()) < 2
    out = vmoba_attention(q, k, v, GRID, TILE, "3d", 2, selection="global")
    assert max_err(out, masked_reference(q, k, v, mask)) < 1e-12
    per_query = vmoba_mask(q, k, GRID, TILE, "3d", 2)
    assert set((per_query.sum(-1) // 12).flatten().tolist()) == {2}  # the per-query rule ignores salience


def test_vmoba_global_limits_and_layer():
    q, k, v = qkv(1, 2, None, 96, D=8)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert max_err(vmoba_attention(q, k, v, GRID, TILE, "2d", 16, selection="global"), dense) < 1e-12
    # a tiny threshold keeps one pair per head, so each query has exactly its best block: per-query top-1
    one = vmoba_attention(q, k, v, GRID, TILE, "3d", 3, 1e-9, selection="global")
    assert max_err(one, vmoba_attention(q, k, v, GRID, TILE, "3d", 1)) < 1e-12
    layer = build("vmoba", dim=32, heads=4, kv_heads=2, grid=GRID, tile=TILE, partition="2d", top_k=2,
                  selection="global").double()
    x = torch.randn(2, 96, 32, dtype=torch.float64)
    assert max_err(layer(x), layer.reference(x)) < 1e-12
    op = attnlab.ops.get("vmoba")
    kw = dict(scale=8**-0.5, q_offset=0, grid=GRID, tile=TILE, partition="1d", top_k=1, selection="global")
    assert max_err(op(q, k, v, **kw), op.reference(q, k, v, **kw)) < 1e-12
    with pytest.raises(ValueError, match="selection"):
        build("vmoba", selection="head")
    with pytest.raises(ValueError, match="selection"):
        vmoba_attention(q, k, v, GRID, TILE, "3d", 2, selection="pairs")


# ---- Superlinear, N > 2 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stride,window,top_k", [((16, 4), 5, 2), ((8, 4, 2), 4, 2), ((16, 8, 2), 6, 3),
                                                 ((12, 4), 3, 1)])
def test_superlinear_steps_match_reference(stride, window, top_k):
    q, k, v = qkv(2, 4, 2, 70, D=8)
    out = superlinear_attention(q, k, v, stride, window, top_k, 8)
    ref = masked_reference(q, k, v, superlinear_mask(q, k, stride, window, top_k))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    tail = superlinear_attention(q[:, :, 43:], k, v, stride, window, top_k, 8)  # queries after a cache
    ref = masked_reference(q[:, :, 43:], k, v, superlinear_mask(q[:, :, 43:], k, stride, window, top_k))
    assert max_err(tail, ref) < 1e-12


def test_superlinear_steps_exclude_nothing():
    q, k, v = qkv(1, 4, 2, 70, D=8)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for stride in ((16, 4), (8, 4, 2), (12, 6, 3)):  # every candidate kept: each past key is reachable
        assert max_err(superlinear_attention(q, k, v, stride, 3, 100), causal) < 1e-12
    # N = 2 through a one-element tuple is the int form
    assert max_err(superlinear_attention(q, k, v, (4,), 5, 2), superlinear_attention(q, k, v, 4, 5, 2)) < 1e-15


def test_superlinear_steps_search_descends_to_the_needle():
    q, k, _ = qkv(1, 1, None, 64, D=8, requires_grad=False)
    k = k * 0.01
    k[:, :, [24, 22, 23]] = q[:, :, 60] * 10  # anchors of span 16-31, its child 20-23 and grandchild 22-23
    v = torch.eye(64, dtype=torch.float64).view(1, 1, 64, 64)
    q, k = F.pad(q, (0, 56)), F.pad(k, (0, 56))
    w = superlinear_attention(q, k, v, (16, 4, 2), 4, 1)[0, 0, 60]
    assert set(w.nonzero().flatten().tolist()) == {22, 23} | set(range(56, 61))


def test_superlinear_steps_layer_decodes_and_bad_strides():
    torch.manual_seed(0)
    layer = build("superlinear", dim=32, heads=4, kv_heads=2, stride=(8, 4, 2), window=3, top_k=2,
                  chunk=4).double()
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    full = layer(x)
    assert max_err(full, layer.reference(x)) < 1e-12
    cache = layer.init_cache()
    steps = [layer(x[:, :9], cache)] + [layer(x[:, i : i + 1], cache) for i in range(9, 29)]
    assert max_err(torch.cat(steps, 1), full) < 1e-12
    for bad in ((4, 8), (8, 3), (), (8, 0), "8"):
        with pytest.raises(ValueError, match="stride"):
            build("superlinear", stride=bad)
