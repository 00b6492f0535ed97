"""MInference-style vertical-slash and block top-k prefill vs the dense float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.routing.minference import (
    block_topk_attention,
    block_topk_mask,
    block_topk_select,
    vertical_slash_attention,
    vertical_slash_mask,
    vertical_slash_select,
)
from attnlab.testing import grads, max_err, qkv


@pytest.mark.parametrize("T,nv,ns,chunk", [(40, 4, 3, 8), (37, 2, 5, 16)])
def test_vertical_slash_matches_reference(T, nv, ns, chunk):
    q, k, v = qkv(2, 4, 2, T, D=8)
    vert, slash = vertical_slash_select(q, k, nv, ns, last_q=8)
    assert bool((slash == 0).any(-1).all())  # the main diagonal is always kept
    out = vertical_slash_attention(q, k, v, nv, ns, last_q=8, chunk=chunk)
    ref = masked_reference(q, k, v, vertical_slash_mask(vert, slash, T, T))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_vertical_slash_finds_planted_column_and_diagonal():
    q, k, v = qkv(1, 1, None, 48, D=8, requires_grad=False)
    k = k * 0.01
    k[:, :, 5] = q[:, :, -8:].mean(2) * 20  # a key every late query loves: a vertical line
    vert, _ = vertical_slash_select(q, k, 1, 2, last_q=8)
    assert vert.flatten().tolist() == [5]
    m = vertical_slash_mask(torch.tensor([[[5]]]), torch.tensor([[[0, 3]]]), 10, 10)
    assert m[0, 0, 9].nonzero().flatten().tolist() == [5, 6, 9]


def test_vertical_slash_all_is_causal():
    q, k, v = qkv(1, 2, None, 24, D=8)
    out = vertical_slash_attention(q, k, v, 24, 24, last_q=4, chunk=8)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


@pytest.mark.parametrize("T,block,top_k", [(40, 8, 2), (45, 8, 1)])
def test_block_topk_matches_reference(T, block, top_k):
    q, k, v = qkv(2, 4, 2, T, D=8)
    out = block_topk_attention(q, k, v, block, top_k)
    sel, valid = block_topk_select(q, k, block, top_k)
    ref = masked_reference(q, k, v, block_topk_mask(sel, valid, block, T, T))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    full = block_topk_attention(q, k, v, block, 10)
    assert max_err(full, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)) < 1e-12
