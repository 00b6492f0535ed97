"""The tile engine (core.selection) against the float64 masked reference: outputs and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab.core.selection as S
from attnlab.core.blocksparse import plan_from_blocks, run_plan
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance


def _random_sel(B, H, Tq, nsets, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(nsets, generator=g)[:n] for _ in range(B * H * Tq)]).view(B, H, Tq, n)
    valid = torch.rand(B, H, Tq, n, generator=g) > 0.3
    return sel, valid


def _blocks(Tk, blk):
    nb = math.ceil(Tk / blk)
    return (torch.arange(nb).view(nb, 1) * blk + torch.arange(blk)).view(1, 1, nb, blk)


@pytest.mark.parametrize("T,blk", [(45, 8), (48, 8)])  # partial last block (row gathers) / aligned (block views)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("waste", [0.0, 1.0])  # per-(batch, head) kernel calls / one padded call per key block
def test_key_centric_matches_reference(T, blk, causal, fused, waste, monkeypatch):
    monkeypatch.setattr(S, "_PAD_WASTE", waste)
    B, H, Hkv = 2, 4, 2
    q, k, v = qkv(B, H, Hkv, T, D=8)
    sets = _blocks(T, blk)
    sel, valid = _random_sel(B, H, T, sets.shape[2], 3)
    parts = S.tiles_from_selection(sel, valid, sets, Hkv, T, 0, causal, rows=4)
    kinds = {type(p) for p in parts}
    if T % blk == 0 and not causal:
        assert kinds == {S.BlockTiles}  # aligned, unmasked: one call per key block, no K/V copy
        per_head = {bh is not None for bh, *_ in S._block_calls(parts[0], B, H)}
        assert per_head == {waste == 0.0}
    out = S.tile_attention(q, k, v, parts, 8**-0.5, fused=fused)
    ref = S.masked_reference(q, k, v, S.selection_mask(sel, valid, sets, T, 0, causal))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


@pytest.mark.parametrize("T", [64, 61])
@pytest.mark.parametrize("fused", [True, False])
def test_diagonal_part_with_staircase(T, fused, monkeypatch):
    monkeypatch.setattr(S, "_DIAG_SUB", 4)  # 16-row blocks -> 4 causal sub-blocks + 3 staircase steps
    B, H, Hkv, blk = 1, 4, 1, 16
    q, k, v = qkv(B, H, Hkv, T, D=8)
    sets = _blocks(T, blk)
    cur = (torch.arange(T) // blk).view(1, 1, T, 1).expand(B, H, T, 1)
    sel, valid = _random_sel(B, H, T, sets.shape[2], 2, seed=3)
    valid = valid & (sel < cur)
    parts = S.tiles_from_selection(sel, valid, sets, Hkv, T, 0, True, rows=8)
    out = S.tile_attention(q, k, v, parts, 0.3, diag_block=blk, fused=fused)
    mask = S.selection_mask(torch.cat([cur, sel], -1), torch.cat([torch.ones_like(valid[..., :1]), valid], -1),
                            sets, T, 0, True)
    ref = S.masked_reference(q, k, v, mask, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
def test_query_centric_blocks_match_blocksparse_engine(causal):
    B, H, Hkv, T, blk = 2, 4, 2, 40, 8
    q, k, v = qkv(B, H, Hkv, T, D=8)
    bi, bv = _random_sel(B, H, T // blk, T // blk, 3, seed=5)
    tiles = S.tiles_from_blocks(bi, bv, blk, blk, T, T, Hkv, 0, causal)
    out = S.tile_attention(q, k, v, [tiles], 0.25)
    ref = run_plan(q, k, v, plan_from_blocks(bi, bv, T, T, blk, 0, causal), 0.25)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_float32_within_sdpa_tolerance():
    B, H, T, blk = 1, 2, 64, 16
    q, k, v = qkv(B, H, None, T, D=16, dtype=torch.float32)
    sets = _blocks(T, blk)
    sel, valid = _random_sel(B, H, T, 4, 2, seed=7)
    mask = S.selection_mask(sel, valid, sets, T, 0, True)
    out = S.tile_attention(q, k, v, S.tiles_from_selection(sel, valid, sets, H, T, 0, True), 0.25)
    ref = S.masked_reference(q, k, v, mask, scale=0.25)
    has = mask.any(-1, keepdim=True)
    err = sdpa_error(q.detach(), k.detach(), v.detach(), mask | ~has, scale=0.25)
    assert max_err(out * has, ref) <= tolerance(torch.float32, err)


def test_every_set_selected_is_dense_attention():
    B, H, T, blk = 1, 2, 32, 8
    q, k, v = qkv(B, H, None, T, D=8)
    sets = _blocks(T, blk)
    sel = torch.arange(4).expand(B, H, T, 4)
    parts = S.tiles_from_selection(sel, torch.ones_like(sel, dtype=torch.bool), sets, H, T, 0, True)
    out = S.tile_attention(q, k, v, parts, 8**-0.5)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


def test_rows_with_no_key_give_zero_and_no_nan():
    q, k, v = qkv(1, 1, None, 16, D=4)
    sets = _blocks(16, 4)
    sel = torch.full((1, 1, 16, 1), 3)  # everyone picks the last block; causal leaves early rows empty
    parts = S.tiles_from_selection(sel, torch.ones_like(sel, dtype=torch.bool), sets, 1, 16, 0, True)
    for fused in (True, False):
        out = S.tile_attention(q, k, v, parts, 0.5, fused=fused)
        assert torch.all(out[0, 0, :12] == 0) and torch.isfinite(out).all()
        g = grads(out, (q, k, v))
        assert all(torch.isfinite(x).all() for x in g)


def test_diagonal_needs_prefill():
    q, k, v = qkv(1, 1, None, 4, Tk=8, D=4)
    with pytest.raises(ValueError, match="Tq == Tk"):
        S.tile_attention(q, k, v, [], 0.5, diag_block=4)


def test_recall_diagnostic_known_answers():
    q, k, _ = qkv(2, 3, None, 24, D=8, requires_grad=False)
    full = torch.ones(1, 3, 24, 24, dtype=torch.bool)
    r = S.selection_recall(q, k, full, causal=True)
    assert torch.allclose(r["mass"], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(r["top_recall"], torch.ones(3, dtype=torch.float64))
    assert torch.allclose(r["sparsity"], torch.zeros(3, dtype=torch.float64))
    # oracle: each query keeps its 3 largest weights -> top recall 1, mass < 1, sparsity known
    s = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), float("-inf"))
    top = s.topk(3, dim=-1).indices
    oracle = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & torch.ones(24, 24, dtype=torch.bool).tril()
    r = S.selection_recall(q, k, oracle, causal=True)
    assert torch.allclose(r["top_recall"], torch.ones(3, dtype=torch.float64))
    assert bool((r["mass"] < 1).all()) and bool((r["mass"] > 0.2).all())
    n_sel = oracle.sum() / (2 * 3)
    assert torch.allclose(r["sparsity"], 1 - n_sel.double() / (24 * 25 / 2))
    # the anti-oracle (the weakest keys) keeps less mass than the oracle with the same count
    worst = s.masked_fill(torch.isinf(s), float("inf")).topk(3, dim=-1, largest=False).indices
    anti = torch.zeros_like(oracle).scatter_(-1, worst, True) & torch.ones(24, 24, dtype=torch.bool).tril()
    r2 = S.selection_recall(q, k, anti, causal=True)
    assert bool((r2["mass"] < r["mass"]).all())


@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_contiguous_head_dim_inputs(which):
    # aligned blocks are read as strided views: a transposed head_dim must not change the answer
    B, H, T, blk = 1, 2, 32, 8
    qkv_ = list(qkv(B, H, None, T, D=8, dtype=torch.float32))
    ref_in = [x.clone() for x in qkv_]
    qkv_[which] = qkv_[which].transpose(2, 3).contiguous().transpose(2, 3)
    assert qkv_[which].stride(-1) != 1
    sets = _blocks(T, blk)
    sel, valid = _random_sel(B, H, T, sets.shape[2], 2, seed=1)
    parts = S.tiles_from_selection(sel, valid, sets, H, T, 0, False, rows=4)
    out = S.tile_attention(*qkv_, parts, 0.3)
    ref = S.tile_attention(*ref_in, parts, 0.3)
    assert torch.equal(out, ref)


def test_tiles_in_query_order_read_queries_as_views():
    # aligned query blocks cover every row once: the flag lets the fused path skip the gathers, same answers
    B, H, T, blk = 1, 2, 32, 8
    q, k, v = qkv(B, H, None, T, D=8)
    bi, bv = _random_sel(B, H, T // blk, T // blk, 2, seed=2)
    tiles = S.tiles_from_blocks(bi, torch.ones_like(bv), blk, blk, T, T, H)
    assert tiles.q_in_order and torch.equal(tiles.q_idx.reshape(-1), torch.arange(B * H * T))
    assert not S.tiles_from_blocks(bi[:, :, :3], torch.ones_like(bv[:, :, :3]), blk, blk, 20, T, H).q_in_order
    gathered = S.Tiles(tiles.q_idx, tiles.k_idx, tiles.row_ok, tiles.mask, tiles.k_block)
    out = S.tile_attention(q, k, v, [tiles], 0.3, fused=True)
    ref = S.tile_attention(q, k, v, [gathered], 0.3, fused=True)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
