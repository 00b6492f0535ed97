"""Routing Transformer: clustered attention vs the dense float64 reference; online k-means; decoding."""

import torch
import torch.nn.functional as F

from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.registry import build
from attnlab.mechanisms.routing.routing_transformer import cluster_key_sets, routing_attention, routing_mask
from attnlab.testing import grads, max_err, qkv


def test_routing_matches_reference():
    q, k, v = qkv(2, 4, 2, 37, D=8)
    cent = F.normalize(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64), dim=-1)
    for causal in (True, False):
        out = routing_attention(q, k, v, cent, causal=causal)
        ref = masked_reference(q, k, v, routing_mask(q, k, cent, 0, causal))
        assert max_err(out, ref) < 1e-12
        assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_one_cluster_is_dense_attention():
    q, k, v = qkv(1, 2, None, 20, D=8)
    out = routing_attention(q, k, v, F.normalize(torch.ones(2, 1, 8, dtype=torch.float64), dim=-1))
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


def test_cluster_key_sets():
    sets = cluster_key_sets(torch.tensor([[[1, 0, 1, 1, 0]]]), 3)
    assert sets[0, 0].tolist() == [[1, 4, -1], [0, 2, 3], [-1, -1, -1]]


def test_layer_decodes_and_kmeans_moves_centroids():
    torch.manual_seed(0)
    layer = build("routing_transformer", dim=32, heads=4, kv_heads=2, clusters=3, decay=0.5).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    layer.eval()
    full = layer(x)
    assert max_err(full, layer.reference(x)) < 1e-12
    cache = layer.init_cache()
    steps = [layer(x[:, :7], cache)] + [layer(x[:, i : i + 1], cache) for i in range(7, 19)]
    assert max_err(torch.cat(steps, 1), full) < 1e-12
    before = layer.centroids.clone()
    layer.train()
    layer(x)
    assert not torch.allclose(before, layer.centroids)
    assert torch.allclose(layer.centroids.norm(dim=-1), torch.ones(4, 3, dtype=torch.float64))
