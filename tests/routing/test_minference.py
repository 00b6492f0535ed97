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


def _plain_vs_mask(vert, slash, Tq, Tk, q_offset):
    """Vertical-slash's rule with loops: position p sees key j <= p when j is a kept column or p - j a kept offset."""
    B, H = vert.shape[:2]
    m = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            cols, offs = set(vert[b, h].tolist()), set(slash[b, h].tolist())
            for r in range(Tq):
                p = q_offset + r
                for j in range(min(p + 1, Tk)):
                    m[b, h, r, j] = j in cols or (p - j) in offs
    return m


@pytest.mark.parametrize("T,nv,ns,chunk,path", [(64, 2, 2, 8, "tiles"), (40, 8, 8, 8, "rows"), (33, 6, 9, 4, "rows")])
def test_vertical_slash_picks_tiles_or_row_chunks_and_both_are_exact(T, nv, ns, chunk, path, monkeypatch):
    """Sparse selections run as gathered tiles; when some tile's union would hold over half the keys (f * L / 2
    diagonals of a short prompt) the rows run as masked chunks over the causal prefix. Both equal the float64
    reference of the rule written with loops, outputs and gradients."""
    from attnlab.mechanisms.routing import minference as M

    used = []
    real_rows, real_tiles = M.vertical_slash_rows, M.vertical_slash_tiles
    monkeypatch.setattr(M, "vertical_slash_rows", lambda *a, **kw: (used.append("rows"), real_rows(*a, **kw))[1])
    monkeypatch.setattr(M, "vertical_slash_tiles", lambda *a, **kw: (used.append("tiles"), real_tiles(*a, **kw))[1])
    monkeypatch.setattr(M, "ROW_CHUNK", 16)  # several chunks at test lengths
    q, k, v = qkv(2, 4, 2, T, D=8)
    out = M.vertical_slash_attention(q, k, v, nv, ns, last_q=8, chunk=chunk)
    assert used == [path]
    vert, slash = vertical_slash_select(q, k, nv, ns, last_q=8)
    ref = masked_reference(q, k, v, _plain_vs_mask(vert, slash, T, T, 0))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


@pytest.mark.parametrize("Tq,rows", [(13, 4), (13, 64), (29, 8)])
def test_vertical_slash_row_chunks_at_an_offset(Tq, rows):
    """The row-chunk form for queries at the end of a longer key sequence (chunks shorter and longer than Tq)."""
    from attnlab.mechanisms.routing.minference import vertical_slash_rows

    T = 29
    q, k, v = qkv(1, 4, 2, T, D=8)
    q = q[:, :, -Tq:].detach().requires_grad_()
    g = torch.Generator().manual_seed(Tq + rows)
    vert = torch.stack([torch.randperm(T, generator=g)[:3] for _ in range(4)]).view(1, 4, 3)
    slash = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(T - 1, generator=g)[:4] + 1])
                         for _ in range(4)]).view(1, 4, 5)
    out = vertical_slash_rows(q, k, v, vert, slash, 0.3, T - Tq, rows=rows)
    ref = masked_reference(q, k, v, _plain_vs_mask(vert, slash, Tq, T, T - Tq), scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
