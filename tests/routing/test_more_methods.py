"""VMoBA partitions, recycled attention, delta correction, HiP: fast paths vs the float64 masked reference."""

import json

import pytest
import torch
import torch.nn.functional as F

from attnlab.bench.selection import SelectionMethod, planted_qkv, recall_report
from attnlab.cli import main
from attnlab.core.reference import reference_attention
from attnlab.core.sparse import masked_reference
from attnlab.mechanisms.registry import build, get
from attnlab.mechanisms.routing.delta import delta_correction
from attnlab.mechanisms.routing.delta_layers import select_tokens, token_attention
from attnlab.mechanisms.routing.hip import hip_attention, hip_select
from attnlab.mechanisms.routing.minference import block_topk_mask
from attnlab.mechanisms.routing.moba import moba_attention
from attnlab.mechanisms.routing.recycled import RecycledDecoder, recycled_reference
from attnlab.mechanisms.routing.vmoba import block_order, keep_blocks, vmoba_attention, vmoba_mask
from attnlab.testing import grads, max_err, qkv

GRID, TILE = (4, 4, 6), (2, 2, 3)  # 96 tokens


# ---- VMoBA ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition,top_k,threshold", [("1d", 1, None), ("2d", 3, None), ("3d", 2, None),
                                                        ("3d", 5, 0.5)])
def test_vmoba_matches_reference(partition, top_k, threshold):
    q, k, v = qkv(2, 4, 2, 96, D=8)
    out = vmoba_attention(q, k, v, GRID, TILE, partition, top_k, threshold)
    mask = vmoba_mask(q, k, GRID, TILE, partition, top_k, threshold)
    ref = masked_reference(q, k, v, mask)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    if threshold is not None:  # the number of blocks varies per query
        counts = mask.sum(-1) // 12
        assert int(counts.min()) >= 1 and int(counts.max()) <= top_k and int(counts.min()) < int(counts.max())


def test_vmoba_partitions_are_grid_tiles():
    q, k, _ = qkv(1, 1, None, 96, D=8, requires_grad=False)
    # block of token 0 under each partition, as a set of (frame, row, column) coordinates
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in GRID), indexing="ij"), -1).view(-1, 3)
    expect = {"1d": (2, 4, 6), "2d": (1, 2, 3), "3d": (2, 2, 3)}
    for part, shape in expect.items():
        m = vmoba_mask(q, k, GRID, TILE, part, 1)  # one block per query: every row is exactly one block
        for i in (0, 50):
            c = coords[m[0, 0, i]]
            assert tuple((c.max(0).values - c.min(0).values + 1).tolist()) == shape, part
            assert len(c) == shape[0] * shape[1] * shape[2]
    order = block_order((2, 2, 2), (1, 2, 2))
    assert order.tolist()[:4] == [0, 1, 2, 3] and order.tolist()[4:] == [4, 5, 6, 7]


def test_vmoba_gate_and_threshold_rule():
    gate = torch.tensor([[[[3.0, 1.0, 2.0, 0.0]]]])
    sel, valid = keep_blocks(gate, 4, None, 1.0)
    assert sel.flatten().tolist() == [0, 2, 1, 3] and bool(valid.all())
    p = torch.softmax(gate, -1).flatten()  # 0.64, 0.09, 0.24, 0.03
    _, valid = keep_blocks(gate, 4, 0.6, 1.0)
    assert valid.flatten().tolist() == [True, False, False, False] and float(p[0]) >= 0.6
    _, valid = keep_blocks(gate, 4, 0.8, 1.0)
    assert valid.flatten().tolist() == [True, True, False, False]
    _, valid = keep_blocks(gate, 2, 0.99, 1.0)  # capped at top_k
    assert valid.shape[-1] == 2 and bool(valid.all())
    # the gate picks the tile whose mean key matches the query
    q, k, _ = qkv(1, 1, None, 96, D=8, requires_grad=False)
    k = k * 0.01
    order = block_order(GRID, TILE)
    k[:, :, order[12 * 5 : 12 * 6]] = q[:, :, 7:8] * 10  # 3-D tile 5 made of copies of query 7
    m = vmoba_mask(q, k, GRID, TILE, "3d", 1)
    assert m[0, 0, 7].nonzero().flatten().tolist() == sorted(order[60:72].tolist())


def test_vmoba_all_blocks_is_dense_and_layer():
    q, k, v = qkv(1, 2, None, 96, D=8)
    assert max_err(vmoba_attention(q, k, v, GRID, TILE, "2d", 16), reference_attention(q, k, v)) < 1e-12
    layer = build("vmoba", dim=32, heads=4, kv_heads=2, grid=GRID, tile=TILE, partition="1d", top_k=1).double()
    x = torch.randn(2, 96, 32, dtype=torch.float64)
    assert max_err(layer(x), layer.reference(x)) < 1e-12
    assert get("vmoba").family == "routing" and not get("vmoba").decodes
    with pytest.raises(ValueError, match="partition"):
        build("vmoba", partition="4d")
    with pytest.raises(ValueError, match="divide"):
        build("vmoba", grid=(4, 4, 5), tile=(2, 2, 2), partition="3d")
    with pytest.raises(TypeError, match="decode"):
        layer.init_cache()


# ---- Recycled attention -----------------------------------------------------------------------------------


def _decode(q, k, v, prefill, **cfg):
    dec = RecycledDecoder(**cfg)
    outs = [dec(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])[:, :, -1:]]
    for i in range(prefill, q.shape[2]):
        outs.append(dec(q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1]))
    return torch.cat(outs, 2), dec


@pytest.mark.parametrize("stride,dense_refresh", [(1, False), (3, True), (4, False)])
def test_recycled_matches_reference(stride, dense_refresh):
    q, k, v = qkv(2, 4, 2, 30, D=8)
    out, dec = _decode(q, k, v, 12, top_k=5, stride=stride, dense_refresh=dense_refresh)
    ref = recycled_reference(q, k, v, 12, 5, stride, dense_refresh)
    assert max_err(out, ref) < 1e-12
    assert dec.full_steps == -(-19 // stride)
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_recycled_limits():
    q, k, v = qkv(1, 2, None, 24, D=8, requires_grad=False)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, 9:]
    # stride 1 with dense refresh: every step is a full step; k = all keys: recycling is exact
    assert max_err(_decode(q, k, v, 10, top_k=3, stride=1)[0], dense) < 1e-12
    assert max_err(_decode(q, k, v, 10, top_k=24, stride=5)[0], dense) < 1e-12
    # stride 1 without dense refresh: top-k attention of every query over its own best keys
    s = (q @ k.transpose(-1, -2)) * 8**-0.5
    s = s.masked_fill(~torch.ones(24, 24, dtype=torch.bool).tril(), float("-inf"))
    top = s.topk(4, dim=-1).indices
    m = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True) & torch.isfinite(s)
    topk_ref = masked_reference(q, k, v, m)[:, :, 9:]
    out = _decode(q, k, v, 10, top_k=4, stride=1, dense_refresh=False)[0]
    assert max_err(out, topk_ref) < 1e-12
    assert max_err(out, dense) > 1e-3  # and it is really sparse


def test_recycled_dynamic_refresh():
    q, k, v = qkv(1, 2, None, 20, D=8, requires_grad=False)
    q = q.clone()
    q[:, :, 15] = -q[:, :, 8]  # a query unlike the one of the last full step (position 8)
    _, dec = _decode(q, k, v, 9, top_k=3, stride=100, refresh_below=-0.9)
    assert dec.full_steps == 2  # the prefill and the dissimilar query
    _, dec = _decode(q, k, v, 9, top_k=3, stride=100)
    assert dec.full_steps == 1


# ---- Delta correction -------------------------------------------------------------------------------------


def _planted():
    """Queries share a direction that the first key (a sink) matches: local sparse attention misses it."""
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 1, 2, 96, 16
    shared = torch.randn(1, H, 1, D, generator=g, dtype=torch.float64)
    q = shared + 0.3 * torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = 0.5 * torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k[:, :, 0] = shared[:, :, 0] * 2
    # values vary slowly along the sequence (so neighbouring rows share their error); the sink's stands out
    v = torch.randn(B, H, T // 16 + 1, D, generator=g, dtype=torch.float64)
    v = F.interpolate(v.flatten(0, 1).transpose(1, 2), size=T, mode="linear").transpose(1, 2).view(B, H, T, D)
    v[:, :, 0] = 3 * torch.randn(D, generator=g, dtype=torch.float64)
    return q, k, v


def test_delta_correction_reduces_error_and_is_exact_on_all_rows():
    q, k, v = _planted()
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    sparse = moba_attention(q, k, v, 16, 1)  # the current block only: misses the sink
    fixed = delta_correction(q, k, v, sparse, 8)
    err = lambda o: float((o - dense)[:, :, 16:].norm())  # noqa: E731  (rows past the sink's block)
    assert err(fixed) < 0.25 * err(sparse), (err(fixed), err(sparse))
    assert err(delta_correction(q, k, v, sparse, 2)) < err(delta_correction(q, k, v, sparse, 16))  # denser: better
    assert max_err(delta_correction(q, k, v, sparse, 1), dense) < 1e-12
    # the sampled rows themselves are exact; row i only uses rows <= i (a causal correction)
    assert max_err(fixed[:, :, ::8], dense[:, :, ::8]) < 1e-12
    q2 = q.clone()
    q2[:, :, 50:] += 1.0
    moved = delta_correction(q2, k, v, moba_attention(q2, k, v, 16, 1), 8)
    assert max_err(moved[:, :, :50], fixed[:, :, :50]) < 1e-12


def test_delta_correction_gqa_and_errors():
    q, k, v = qkv(1, 4, 2, 20, D=8)
    sparse = moba_attention(q, k, v, 4, 2)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(delta_correction(q, k, v, sparse, 1), dense) < 1e-12
    with pytest.raises(ValueError, match="sparse_out"):
        delta_correction(q, k, v, sparse[:, :, :5], 2)


# ---- HiP --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,block,top_k", [(64, 4, 2), (61, 8, 3), (40, 4, 1)])
def test_hip_matches_reference(T, block, top_k):
    q, k, v = qkv(2, 4, 2, T, D=8)
    out = hip_attention(q, k, v, block, top_k)
    sel, valid = hip_select(q, k, block, top_k)
    assert bool((valid.sum(-1) == torch.clamp(torch.arange(sel.shape[2]), max=top_k) + 1).all())
    ref = masked_reference(q, k, v, block_topk_mask(sel, valid, block, T, T))
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12


def test_hip_all_blocks_is_causal_and_tree_search_finds_the_peak():
    q, k, v = qkv(1, 2, None, 40, D=8)
    full = hip_attention(q, k, v, 4, 10)
    assert max_err(full, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-12
    # keys whose match with the last query block rises smoothly to a peak at block 22 of 31 past blocks
    q, k, _ = qkv(1, 1, None, 128, D=8, requires_grad=False)
    pos = torch.arange(128, dtype=torch.float64)
    bump = torch.exp(-(((pos - 22 * 4 - 1.5) / 10) ** 2))
    k = 0.01 * k + q[:, :, 124:].mean(2, keepdim=True) * 5 * bump.view(1, 1, 128, 1)
    sel, valid = hip_select(q, k, 4, 2)
    assert 22 in sel[0, 0, 31][valid[0, 0, 31]].tolist()
    with pytest.raises(ValueError, match="multiple"):
        hip_select(q[:, :, :10], k, 4, 2, q_offset=3)


# ---- DELTA selection layers -------------------------------------------------------------------------------


def test_delta_layers_select_and_sparse_layer():
    q, k, v = qkv(2, 4, 2, 30, D=8)
    keep = select_tokens(q[:, :, -3:], k, top_k=5, always=2)
    assert keep.shape == (2, 30) and bool((keep[:, -2:]).all()) and int(keep.sum(-1).max()) <= 7
    # known answer: the positions with the most attention summed over heads and queries
    p = torch.softmax((q[:, :, -1:] @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8**-0.5, -1).sum((1, 2))
    one = select_tokens(q[:, :, -1:], k, top_k=4, always=0)
    assert torch.equal(one, torch.zeros_like(one).scatter_(-1, p.topk(4).indices, True))
    out = token_attention(q[:, :, -3:], k, v, keep)
    m = keep.view(2, 1, 1, 30) & torch.ones(3, 30, dtype=torch.bool).tril(27)
    ref = masked_reference(q[:, :, -3:], k, v, m)
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-12
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(token_attention(q, k, v, select_tokens(q, k, top_k=30)), dense) < 1e-12


# ---- recall report and ``attnlab bench selection`` --------------------------------------------------------


def test_recall_report_known_answers(tmp_path):
    q, k, v = planted_qkv(1, 2, 64, 8, seed=1)
    full = SelectionMethod("all", lambda q, k: torch.ones(1, 2, 64, 64, dtype=torch.bool))
    diag = SelectionMethod("diag", lambda q, k: torch.eye(64, dtype=torch.bool).expand(1, 2, 64, 64))
    rows = recall_report([full, diag], q, k, v)
    assert [(r["method"], r["head"]) for r in rows] == [("all", 0), ("all", 1), ("diag", 0), ("diag", 1)]
    for r in rows[:2]:
        assert r["sparsity"] == pytest.approx(0) and r["mass"] == pytest.approx(1) and r["out_err"] < 1e-12
        assert r["top_recall"] == pytest.approx(1)
    assert rows[2]["sparsity"] == pytest.approx(1 - 64 / (64 * 65 / 2))
    assert 0 < rows[2]["mass"] < 1 and rows[2]["out_err"] > 0.1
    assert main(["bench", "selection", "--length", "64", "--heads", "2", "--head-dim", "8",
                 "--methods", "moba", "hip", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    data = json.loads((run / "results.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"moba", "hip"} and len(data["rows"]) == 4
    assert all(0 < r["sparsity"] < 1 and 0 < r["mass"] <= 1 for r in data["rows"])
    assert (run / "results.md").exists() and (run / "selection_recall.png").stat().st_size > 0


# ---- Sparsifiner ------------------------------------------------------------------------------------------


def test_sparsifiner_matches_reference_and_trains_its_predictor():
    torch.manual_seed(0)
    layer = build("sparsifiner", dim=32, heads=4, rank=3, top_k=5).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64, requires_grad=True)
    out, ref = layer(x), layer.reference(x)
    assert max_err(out, ref) < 1e-12
    params = [x] + [p for n, p in layer.named_parameters() if not n.startswith("p")]
    assert max_err(grads(out, tuple(params)), grads(ref, tuple(params))) < 1e-12
    c = layer.connectivity(x)
    assert c.shape == (2, 4, 20, 20)
    dense = build("sparsifiner", dim=32, heads=4, rank=3, top_k=20).double()
    dense.load_state_dict(layer.state_dict())
    q, k, v = dense.project(x)
    assert max_err(dense(x), dense.out(F.scaled_dot_product_attention(q, k, v))) < 1e-12
    assert max_err(out, dense(x)) > 1e-3  # top-5 of 20 really drops keys
    loss = layer.predictor_loss(x)
    loss.backward()
    assert layer.pq.weight.grad is not None and float(layer.pq.weight.grad.abs().sum()) > 0
    assert get("sparsifiner").family == "routing"
