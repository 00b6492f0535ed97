"""PAROAttention (P287) pattern: per-head reordering into blocks. The views agree with a brute-force construction
from coordinates; calibration finds the order that makes a planted axis pattern block-diagonal; the sparse engine
matches a float64 reference (outputs and gradients); bad inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnlab
from attnlab.core.patterns import Full
from attnlab.core.patterns.paro import ParoBlocks, paro_calibrate
from attnlab.testing import grads, max_err, qkv

GRID = (3, 4, 2)  # (F, H, W): 24 tokens


pytestmark = pytest.mark.usefixtures("one_thread")


def brute(grid, order, block, kept):
    """(n, n) mask from coordinates: sort positions by the permuted coordinate tuple, cut into blocks."""
    coords = list(itertools.product(*(range(L) for L in grid)))  # natural row-major order
    ranked = sorted(range(len(coords)), key=lambda p: tuple(coords[p][a] for a in order))
    blk = {p: r // block for r, p in enumerate(ranked)}
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for p, j in itertools.product(range(len(coords)), repeat=2):
        m[p, j] = (blk[p], blk[j]) in kept
    return m


def test_views_agree_with_brute_force():
    g = torch.Generator().manual_seed(0)
    orders = [(0, 1, 2), (2, 0, 1), (1, 2, 0)]
    nb = 5  # 24 tokens, block 5: a partial last block
    keeps = [frozenset((a, b) for a in range(nb) for b in range(nb) if a == b or torch.rand(1, generator=g) < 0.3)
             for _ in orders]
    p = ParoBlocks(GRID, orders, 5, keeps)
    n = 24
    want = torch.stack([brute(GRID, o, 5, kp) for o, kp in zip(orders, keeps)])
    assert torch.equal(p.dense(n, n), want)
    mm = p.eval_mask(torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))
    assert torch.equal(mm, want)
    assert p.count(n, n) == float(want.sum()) / 3
    assert torch.equal(p.dense(n - 4, n, 4), want[:, 4:])
    # natural order, every block kept: full attention
    every = frozenset(itertools.product(range(nb), repeat=2))
    assert torch.equal(ParoBlocks(GRID, [(0, 1, 2)], 5, [every]).dense(n, n)[0], Full().dense(n, n)[0])
    # order (1, 2, 0), block 3 = F: each block is one pixel across its 3 frames
    d = ParoBlocks(GRID, [(1, 2, 0)], 3, [frozenset((b, b) for b in range(8))]).dense(n, n)[0]
    assert d[0].nonzero().flatten().tolist() == [0, 8, 16]


def test_calibration_finds_the_axis_of_a_planted_pattern():
    """Head 0 attends across frames (same pixel), head 1 within a frame row: reordered with that axis fastest, the
    maps become block-diagonal and the kept blocks capture almost all the mass; natural order captures less."""
    F_, H_, W_ = 4, 3, 4
    n, D = F_ * H_ * W_, 16
    coords = list(itertools.product(range(F_), range(H_), range(W_)))
    same_pixel = torch.tensor([[c[1:] == e[1:] for e in coords] for c in coords])
    same_row = torch.tensor([[c[:2] == e[:2] for e in coords] for c in coords])
    # q = k = one-hot group codes, scaled, so softmax concentrates on the planted groups
    def codes(groups):
        ids = {g: i for i, g in enumerate(sorted(set(groups)))}
        e = torch.zeros(n, D, dtype=torch.float64)
        for p, gid in enumerate(groups):
            e[p, ids[gid] % D] = 1.0
        return e * 8.0
    qk0 = codes([c[1:] for c in coords])  # 12 pixel groups
    qk1 = codes([c[:2] for c in coords])  # 12 row groups
    q = torch.stack([qk0, qk1]).unsqueeze(0)
    pat, mass = paro_calibrate(q, q, (F_, H_, W_), block=4, density=0.1, scale=1.0)
    assert pat.orders[0][-1] == 0  # frames fastest: a pixel's 4 frames form one block
    assert pat.orders[1][-1] == 2  # width fastest: a row's 4 pixels form one block
    assert bool((mass > 0.99).all())
    dense = pat.dense(n, n)
    assert bool((dense[0] | ~same_pixel).all()) and bool((dense[1] | ~same_row).all())  # planted keys all kept
    again, again_mass = paro_calibrate(q, q, (F_, H_, W_), block=4, density=0.1, scale=1.0)
    assert again == pat and torch.equal(again_mass, mass)  # deterministic, hashable by value
    w = torch.softmax(q[0, 0] @ q[0, 0].T, -1)
    nat = brute((F_, H_, W_), (0, 1, 2), 4, frozenset((b, b) for b in range(12)))
    assert float((w * nat).sum()) / n < 0.5  # the same budget in natural order misses most of head 0's mass


def test_sparse_engine_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    orders = [(0, 1, 2), (2, 1, 0), (1, 0, 2), (0, 2, 1)]
    keeps = [frozenset((a, b) for a in range(6) for b in range(6) if a == b or torch.rand(1, generator=g) < 0.4)
             for _ in orders]
    p = ParoBlocks(GRID, orders, 4, keeps)
    q, k, v = qkv(2, 4, 2, 24, D=8, seed=2)
    out = attnlab.attention(q, k, v, pattern=p, scale=8**-0.5)
    mask = torch.stack([brute(GRID, o, 4, kp) for o, kp in zip(orders, keeps)])
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = (q @ kk.transpose(-1, -2)) * 8**-0.5
    ref = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vv
    assert max_err(out, ref) < 1e-12
    assert max_err(grads(out, (q, k, v)), grads(ref, (q, k, v))) < 1e-10
    out_op = attnlab.ops.get("pattern")(q, k, v, pattern=p)
    assert max_err(out_op, ref) < 1e-12


def test_bad_inputs_fail_naming_them():
    every = [frozenset({(0, 0)})]
    with pytest.raises(ValueError, match="orders"):
        ParoBlocks(GRID, [(0, 1, 1)], 4, every)
    with pytest.raises(ValueError, match="block"):
        ParoBlocks(GRID, [(0, 1, 2)], 0, every)
    with pytest.raises(ValueError, match="keep"):
        ParoBlocks(GRID, [(0, 1, 2), (2, 1, 0)], 4, every)
    with pytest.raises(ValueError, match="keep"):
        ParoBlocks(GRID, [(0, 1, 2)], 4, [frozenset({(0, 6)})])
    q, k, _ = qkv(1, 1, 1, 24, D=8, requires_grad=False)
    with pytest.raises(ValueError, match="density"):
        paro_calibrate(q, k, GRID, block=4, density=0)
    with pytest.raises(ValueError, match="prod"):
        paro_calibrate(q, k, (5, 5), block=4, density=0.5)
    p = ParoBlocks(GRID, [(0, 1, 2)], 4, every)
    with pytest.raises(ValueError, match="heads"):
        attnlab.attention(*qkv(1, 2, 1, 24, D=8, requires_grad=False), pattern=p)
