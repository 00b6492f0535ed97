"""Routing ops take a layer's learned parts as tensor options (or a documented parameter-free stand-in), and the
layer's output is its projections around exactly that op call."""

import pytest
import torch
import torch.nn.functional as F

from attnlab import ops
from attnlab.core.reference import reference_attention
from attnlab.mechanisms.registry import build
from attnlab.mechanisms.routing.dma import dma_reference
from attnlab.mechanisms.routing.routing_transformer import routing_attention
from attnlab.testing import max_err, qkv


def _layer_via_op(layer, x, **options):
    q, k, v = layer.project(x)
    out = ops.get(layer.op)(q, k, v, scale=layer.cfg.d**-0.5, **{**layer.op_options(), **options})
    return layer.finish(out, x)


def test_layers_are_projections_around_their_op():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    rt = build("routing_transformer", dim=32, heads=4, kv_heads=2, clusters=3).double().eval()
    assert max_err(rt(x), _layer_via_op(rt, x, centroids=rt.centroids)) < 1e-12
    dma = build("dma", dim=32, heads=4, kv_heads=2, window=5, chunk=4).double()
    v = dma.project(x)[2]
    assert max_err(dma(x), _layer_via_op(dma, x, importance=dma.importance(v))) < 1e-12
    sp = build("sparsifiner", dim=32, heads=4, rank=3, top_k=5).double()
    assert max_err(sp(x), _layer_via_op(sp, x, connectivity=sp.connectivity(x))) < 1e-12
    moba = build("moba", dim=32, heads=4, block=4, top_k=2, delta=3).double()
    assert max_err(moba(x), _layer_via_op(moba, x)) < 1e-12


def test_parameter_free_stand_ins():
    q, k, v = qkv(2, 4, 2, 20, D=8, requires_grad=False)
    # routing_transformer without centroids: fixed seeded unit centroids, the same on every call
    spec = ops.get("routing_transformer")
    cent = F.normalize(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    assert max_err(spec(q, k, v, clusters=3), routing_attention(q, k, v, cent)) < 1e-12
    with pytest.raises(ValueError, match="centroids"):
        spec(q, k, v, centroids=torch.zeros(4, 3, 7))
    # dma without importance: exp(-softplus(mean of the values)) per position, shared by the kv heads
    imp = torch.exp(-F.softplus(v.mean((1, 3)))).unsqueeze(1).expand(2, 2, 20)
    assert max_err(ops.get("dma")(q, k, v, window=5, chunk=4), dma_reference(q, k, v, imp, 5)) < 1e-12
    with pytest.raises(ValueError, match="importance"):
        ops.get("dma")(q, k, v, importance=torch.zeros(2, 2, 19))
    # sparsifiner without a predictor: each query attends its top-k keys by q.k (bidirectional)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(6, dim=-1).indices, True)
    assert max_err(ops.get("sparsifiner")(q, k, v, top_k=6), reference_attention(q, k, v, mask=top)) < 1e-12


def test_renamed_op_options_name_the_new_one():
    q, k, v = qkv(1, 2, None, 12, D=8, requires_grad=False)
    for name, old, new in (("dma", "block", "chunk"), ("superlinear", "block", "chunk"), ("hip", "delta_correction",
                                                                                         "delta")):
        with pytest.raises(ValueError, match=f"'{old}' was renamed to '{new}'"):
            ops.get(name)(q, k, v, **{old: 4})
    with pytest.raises(ValueError, match="delta must be a non-negative integer"):
        ops.get("moba")(q, k, v, block=4, delta=-1)
