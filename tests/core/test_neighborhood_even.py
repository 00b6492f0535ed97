"""Neighborhood attention with even kernel sizes (NATTEN convention): k/2 keys before the query, k/2 - 1 after,
shifted inwards at the borders; with dilation, inside the query's dilation group. The expected windows are
built here from the convention with plain Python lists (no use of the pattern's own helpers)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import attnlab
from attnlab.core.patterns import Neighborhood
from attnlab.testing import grads, max_err, qkv, sdpa_error, tolerance


def axis_window(i: int, L: int, k: int, d: int) -> list[int]:
    """Keys (axis coordinates) of query ``i`` on a non-causal axis, stride 1, from the convention."""
    group = [x for x in range(L) if x % d == i % d]
    pos = group.index(i)
    if len(group) <= k:
        return group
    lo, hi = pos - k // 2, pos + (k - 1) // 2  # k/2 before, k/2 - 1 after (k even); (k-1)/2 each (k odd)
    if lo < 0:  # shift inwards: keep k keys
        lo, hi = 0, k - 1
    if hi > len(group) - 1:
        lo, hi = len(group) - k, len(group) - 1
    return group[lo : hi + 1]


def expected_mask(grid: tuple[int, ...], k: tuple[int, ...], d: tuple[int, ...]) -> torch.Tensor:
    """(n, n) boolean: product over axes of ``axis_window``, on row-major flattened coordinates."""
    coords = list(itertools.product(*(range(L) for L in grid)))
    index = {c: n for n, c in enumerate(coords)}
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for qc in coords:
        wins = [axis_window(qc[a], grid[a], k[a], d[a]) for a in range(len(grid))]
        for kc in itertools.product(*wins):
            m[index[qc], index[kc]] = True
    return m


def mask_of(p: Neighborhood) -> torch.Tensor:
    n = p.seq_len
    return p.eval_mask(torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1))[0]


CASES = [
    ((10,), (4,), (1,)),
    ((9,), (2,), (1,)),
    ((13,), (6,), (2,)),
    ((7, 8), (4, 2), (1, 1)),
    ((9, 10), (4, 4), (2, 2)),
    ((8, 7), (4, 3), (1, 2)),  # mixed parity
    ((4, 5, 6), (2, 4, 2), (1, 1, 2)),
]


@pytest.mark.parametrize("grid,k,d", CASES, ids=[f"{g}-{k}-{d}" for g, k, d in CASES])
def test_even_kernel_views_match_the_convention(grid, k, d):
    p = Neighborhood(grid, k, dilation=d)
    n = math.prod(grid)
    want = expected_mask(grid, k, d)
    assert torch.equal(p.dense(n, n)[0], want)
    assert torch.equal(mask_of(p), want)
    assert p.count(n, n) == float(want.sum())
    # suffix of queries (decode-like offsets) agrees too
    assert torch.equal(p.dense(n - 3, n, 3)[0], want[3:])
    assert p.count(n - 3, n, 3) == float(want[3:].sum())
    # grids large enough: every query sees exactly prod(k) keys
    assert all(L // dd >= kk for L, kk, dd in zip(grid, k, d))
    assert p.dense(n, n)[0].sum(-1).eq(math.prod(k)).all()


def test_interior_window_is_i_minus_half_to_i_plus_half_minus_one():
    for k in (2, 4, 6):
        p = Neighborhood(20, k)
        d = p.dense(20, 20)[0]
        for i in range(k // 2, 20 - k // 2 + 1):
            assert d[i].nonzero().flatten().tolist() == list(range(i - k // 2, i + k // 2)), (k, i)


def test_border_shifts_known_answers():
    d = Neighborhood(10, 4).dense(10, 10)[0]
    rows = {i: d[i].nonzero().flatten().tolist() for i in range(10)}
    assert rows[0] == rows[1] == rows[2] == [0, 1, 2, 3]  # shifted right at the start
    assert rows[3] == [1, 2, 3, 4]
    assert rows[8] == [6, 7, 8, 9]  # i + k/2 - 1 = 9: still unshifted
    assert rows[9] == [6, 7, 8, 9]  # shifted left at the end
    # k = 2: the query and the key before it; the first query takes the one after
    d2 = Neighborhood(5, 2).dense(5, 5)[0]
    assert [d2[i].nonzero().flatten().tolist() for i in range(5)] == [[0, 1], [0, 1], [1, 2], [2, 3], [3, 4]]


def test_dilation_window_lives_in_the_query_group():
    p = Neighborhood(13, 4, dilation=2)  # groups: evens (7 members), odds (6 members)
    d = p.dense(13, 13)[0]
    assert d[6].nonzero().flatten().tolist() == [2, 4, 6, 8]  # group pos 3: 1..4 -> 2, 4, 6, 8
    assert d[0].nonzero().flatten().tolist() == [0, 2, 4, 6]
    assert d[12].nonzero().flatten().tolist() == [6, 8, 10, 12]
    assert d[11].nonzero().flatten().tolist() == [5, 7, 9, 11]  # odd group ends at 11: shifted
    assert d[1].nonzero().flatten().tolist() == [1, 3, 5, 7]
    # 2-D, dilation on one axis
    p2 = Neighborhood((8, 8), 4, dilation=(2, 1))
    keys = p2.dense(64, 64)[0][5 * 8 + 4].nonzero().flatten()
    assert sorted({int(j) // 8 for j in keys}) == [1, 3, 5, 7] and sorted({int(j) % 8 for j in keys}) == [2, 3, 4, 5]


def test_odd_sizes_unchanged():
    """Odd kernels: the centred window of radius (k-1)/2 (checked against the convention and a known row)."""
    for grid, k, d in [((9, 9), (3, 5), (1, 1)), ((11,), (3,), (2,)), ((5, 6, 7), (3, 3, 5), (1, 2, 1))]:
        p = Neighborhood(grid, k, dilation=d)
        assert torch.equal(p.dense(p.seq_len, p.seq_len)[0], expected_mask(grid, k, d))
    assert Neighborhood(9, 5).dense(9, 9)[0, 4].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]


def test_even_kernel_with_stride_and_causal_axes_stay_consistent():
    """Stride / causal combinations: mask_mod, dense and count agree and every query sees itself."""
    for p in [Neighborhood(12, 4, stride=2), Neighborhood((8, 9), (4, 6), stride=(4, 3)),
              Neighborhood((6, 8), (4, 4), causal=(True, False), dilation=(1, 2))]:
        n = p.seq_len
        dense = p.dense(n, n)[0]
        assert torch.equal(mask_of(p), dense)
        assert p.count(n, n) == float(dense.sum())
        assert bool(dense.diagonal().all())
    # stride 4 = kernel 4: blocked attention
    d = Neighborhood(12, 4, stride=4).dense(12, 12)[0]
    assert torch.equal(d, torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3))


def test_bad_inputs_still_raise():
    with pytest.raises(ValueError, match="stride"):
        Neighborhood(10, 4, stride=5)
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood((8, 8), 0)


def _ref64(q, k, v, mask, scale):
    """float64 masked softmax attention, written plainly. mask (Tq, Tk) bool."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    w = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", w, vv)


@pytest.mark.parametrize("grid,k,d", [((24,), (4,), (1,)), ((6, 7), (4, 2), (1, 1)), ((8, 6), (4, 2), (2, 1)),
                                       ((4, 4, 6), (2, 4, 2), (1, 1, 2))])
def test_sparse_engine_matches_float64_reference(grid, k, d):
    p = Neighborhood(grid, k, dilation=d)
    n = p.seq_len
    q, kk, v = qkv(B=1, H=2, Hkv=1, Tq=n, D=8, dtype=torch.float32)
    scale = 8**-0.5
    out = attnlab.attention(q, kk, v, pattern=p, scale=scale)
    want_mask = expected_mask(grid, k, d)
    ref = _ref64(q, kk, v, want_mask, scale)
    tol = tolerance(torch.float32, sdpa_error(q.detach(), kk.detach(), v.detach(), want_mask, scale=scale))
    assert out.dtype == torch.float32
    assert max_err(out, ref) <= 4 * tol
    assert max_err(grads(out, (q, kk, v)), grads(ref, (q, kk, v))) <= 40 * tol
    # float64 inputs through the engine: tight agreement
    q2, k2, v2 = qkv(B=1, H=2, Hkv=1, Tq=n, D=8, dtype=torch.float64, seed=3)
    out2 = attnlab.attention(q2, k2, v2, pattern=p, scale=scale)
    ref2 = _ref64(q2, k2, v2, want_mask, scale)
    assert max_err(out2, ref2) < 1e-10
    assert max_err(grads(out2, (q2, k2, v2)), grads(ref2, (q2, k2, v2))) < 1e-9
