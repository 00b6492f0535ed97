"""The sparse engine's selection plans (core.sparse) against the float64 masked reference: outputs and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnlab.core.sparse as S
import attnlab.core.sparse.executor as R
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
@pytest.mark.parametrize("engine", ["python", "explicit"])
@pytest.mark.parametrize("waste", [0.0, 1.0])  # per-(batch, head) kernel calls / one padded call per key block
def test_key_centric_matches_reference(T, blk, causal, engine, waste, monkeypatch):
    monkeypatch.setattr(R, "_PAD_WASTE", waste)
    B, H, Hkv = 2, 4, 2
    q, k, v = qkv(B, H, Hkv, T, D=8)
    sets = _blocks(T, blk)
    sel, valid = _random_sel(B, H, T, sets.shape[2], 3)
    plan = S.plan_selection(sel, valid, sets, Hkv, T, 0, causal, q_block=4)
    kinds = {type(p) for p in plan.parts}
    if T % blk == 0 and not causal:
        assert kinds == {S.BlockTiles}  # aligned, unmasked: one call per key block, no K/V copy
        per_head = {bh is not None for bh, *_ in R._block_calls(plan.parts[0], B, H)}
        assert per_head == {waste == 0.0}
    out = S.run(q, k, v, plan, 8**-0.5, engine=engine)
    ref = S.masked_reference(q, k, v, S.selection_mask(sel, valid, sets, T, 0, causal))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


@pytest.mark.parametrize("T", [64, 61])
@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_diagonal_part_with_staircase(T, engine, monkeypatch):
    monkeypatch.setattr(R, "_DIAG_SUB", 4)  # 16-row blocks -> 4 causal sub-blocks + 3 staircase steps
    B, H, Hkv, blk = 1, 4, 1, 16
    q, k, v = qkv(B, H, Hkv, T, D=8)
    sets = _blocks(T, blk)
    cur = (torch.arange(T) // blk).view(1, 1, T, 1).expand(B, H, T, 1)
    sel, valid = _random_sel(B, H, T, sets.shape[2], 2, seed=3)
    valid = valid & (sel < cur)
    plan = S.plan_selection(sel, valid, sets, Hkv, T, 0, True, q_block=8, diag_block=blk)
    out = S.run(q, k, v, plan, 0.3, engine=engine)
    mask = S.selection_mask(torch.cat([cur, sel], -1), torch.cat([torch.ones_like(valid[..., :1]), valid], -1),
                            sets, T, 0, True)
    ref = S.masked_reference(q, k, v, mask, scale=0.3)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("engine", ["python", "explicit"])
def test_query_centric_blocks_match_reference(causal, engine):
    B, H, Hkv, T, blk = 2, 4, 2, 44, 8  # a short last query block and key block
    q, k, v = qkv(B, H, Hkv, T, D=8)
    G = math.ceil(T / blk)
    bi, bv = _random_sel(B, H, G, G, 3, seed=5)
    out = S.run(q, k, v, S.plan_blocks(bi, bv, blk, blk, T, T, Hkv, 0, causal), 0.25, engine=engine)
    allowed = torch.zeros(B, H, T, T, dtype=torch.bool)  # the selection written out block by block
    for b in range(B):
        for h in range(H):
            for g in range(G):
                for j, ok in zip(bi[b, h, g].tolist(), bv[b, h, g].tolist()):
                    if ok:
                        allowed[b, h, g * blk : (g + 1) * blk, j * blk : (j + 1) * blk] = True
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    ref = S.masked_reference(q, k, v, allowed, scale=0.25)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_float32_within_sdpa_tolerance():
    B, H, T, blk = 1, 2, 64, 16
    q, k, v = qkv(B, H, None, T, D=16, dtype=torch.float32)
    sets = _blocks(T, blk)
    sel, valid = _random_sel(B, H, T, 4, 2, seed=7)
    mask = S.selection_mask(sel, valid, sets, T, 0, True)
    out = S.run(q, k, v, S.plan_selection(sel, valid, sets, H, T, 0, True), 0.25, engine="python")
    ref = S.masked_reference(q, k, v, mask, scale=0.25)
    has = mask.any(-1, keepdim=True)
    err = sdpa_error(q.detach(), k.detach(), v.detach(), mask | ~has, scale=0.25)
    assert max_err(out * has, ref) <= tolerance(torch.float32, err)


def test_every_set_selected_is_dense_attention():
    B, H, T, blk = 1, 2, 32, 8
    q, k, v = qkv(B, H, None, T, D=8)
    sets = _blocks(T, blk)
    sel = torch.arange(4).expand(B, H, T, 4)
    plan = S.plan_selection(sel, torch.ones_like(sel, dtype=torch.bool), sets, H, T, 0, True)
    out = S.run(q, k, v, plan, 8**-0.5)
    assert max_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12


def test_rows_with_no_key_give_zero_and_no_nan():
    q, k, v = qkv(1, 1, None, 16, D=4)
    sets = _blocks(16, 4)
    sel = torch.full((1, 1, 16, 1), 3)  # everyone picks the last block; causal leaves early rows empty
    plan = S.plan_selection(sel, torch.ones_like(sel, dtype=torch.bool), sets, 1, 16, 0, True)
    for engine in ("python", "explicit"):
        out = S.run(q, k, v, plan, 0.5, engine=engine)
        assert torch.all(out[0, 0, :12] == 0) and torch.isfinite(out).all()
        g = grads(out, (q, k, v))
        assert all(torch.isfinite(x).all() for x in g)


def test_diagonal_needs_prefill():
    q, k, v = qkv(1, 1, None, 4, Tk=8, D=4)
    with pytest.raises(ValueError, match="Tq == Tk"):
        S.run(q, k, v, S.plan_tiles([], diag_block=4), 0.5)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        S.plan_selection(torch.zeros(1, 1, 4, 1, dtype=torch.long), torch.ones(1, 1, 4, 1, dtype=torch.bool),
                         _blocks(8, 4), 1, 8, 4, diag_block=4)


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
    plan = S.plan_selection(sel, valid, sets, H, T, 0, False, q_block=4)
    out = S.run(*qkv_, plan, 0.3, engine="python")
    ref = S.run(*ref_in, plan, 0.3, engine="python")
    assert torch.equal(out, ref)


def test_tiles_in_query_order_read_queries_as_views():
    # aligned query blocks cover every row once: the flag lets the fused path skip the gathers, same answers
    B, H, T, blk = 1, 2, 32, 8
    q, k, v = qkv(B, H, None, T, D=8)
    bi, bv = _random_sel(B, H, T // blk, T // blk, 2, seed=2)
    tiles = S.plan_blocks(bi, torch.ones_like(bv), blk, blk, T, T, H).parts[0]
    assert tiles.q_in_order and torch.equal(tiles.q_idx.reshape(-1), torch.arange(B * H * T))
    assert not S.plan_blocks(bi[:, :, :3], torch.ones_like(bv[:, :, :3]), blk, blk, 20, T, H).parts[0].q_in_order
    gathered = S.Tiles(tiles.q_idx, tiles.k_idx, tiles.row_ok, tiles.mask, tiles.k_block)
    out = S.run(q, k, v, S.plan_tiles([tiles]), 0.3, engine="python")
    ref = S.run(q, k, v, S.plan_tiles([gathered]), 0.3, engine="python")
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
