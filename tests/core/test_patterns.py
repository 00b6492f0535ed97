"""Static patterns: the three views agree (mask_mod, dense, count), FlexAttention accepts them, known answers,
clear errors. ``pattern_zoo`` holds one instance of every class."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pattern_zoo import pattern_zoo

from attnlab.core.patterns import (
    Causal,
    Chunked,
    Document,
    FITGroups,
    HaloBlocks,
    MaxViTBlock,
    MaxViTGrid,
    Neighborhood,
    PerHead,
    PowerAttention,
    Radial,
    ShiftedChunks,
    ShiftedCrossChunk,
    SlidingWindow,
    Stochastic,
    StridedShards,
)
from attnlab.core.patterns.base import Pattern

ZOO = pattern_zoo()
IDS = [name for name, _, _ in ZOO]


def call_shapes(pat: Pattern, L: int) -> list[tuple[int, int, int]]:
    """(q_len, kv_len, q_offset) cases: full, a suffix, one query at the end / start, and for
    length-free patterns also length 1, q_len < kv_len, more queries than keys and queries past the keys."""
    shapes = [(L, L, 0), (L - 3, L, 3), (L - 5, L, 2), (1, L, L - 1), (1, L, 0)]
    if pat.seq_len is None:
        shapes += [(1, 1, 0), (2, 2, 0), (L - 4, L + 3, 7), (L, L - 6, 0), (3, L, L + 2)]
    return shapes


def mask_of(pat: Pattern, q_len: int, kv_len: int, q_offset: int) -> torch.Tensor:
    q = torch.arange(q_offset, q_offset + q_len).view(-1, 1)
    k = torch.arange(kv_len).view(1, -1)
    return pat.eval_mask(q, k)


@pytest.mark.parametrize("name,pat,L", ZOO, ids=IDS)
def test_views_agree(name, pat, L):
    Hp = pat.num_heads or 1
    for q_len, kv_len, off in call_shapes(pat, L):
        dense = pat.dense(q_len, kv_len, off)
        assert dense.dtype == torch.bool and dense.shape == (Hp, q_len, kv_len)
        assert torch.equal(mask_of(pat, q_len, kv_len, off), dense), (q_len, kv_len, off)
        assert pat.count(q_len, kv_len, off) == pytest.approx(float(dense.sum()) / Hp, abs=1e-9)
        assert 0.0 <= pat.density(q_len, kv_len, off) <= 1.0
        order = pat.query_order(q_len, off)
        if order is not None:
            assert sorted(order.tolist()) == list(range(q_len))


def test_zoo_covers_every_pattern_class():
    import attnlab.core.patterns as P

    classes = {getattr(P, n) for n in P.__all__ if isinstance(getattr(P, n), type)}
    abstract = {P.Pattern, P.GridPattern}
    zoo_classes = {type(p) for _, p, _ in ZOO}
    assert classes - abstract <= zoo_classes, classes - abstract - zoo_classes


@pytest.mark.parametrize("name,pat,L", ZOO, ids=IDS)
def test_flex_block_mask(name, pat, L):
    """mask_mod runs under create_block_mask's vmap; its block map equals the blocks of the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    blk = 8
    bm = create_block_mask(
        lambda b, h, q, k: pat.mask_mod(b, h, q, k), B=None, H=pat.num_heads, Q_LEN=L, KV_LEN=L,
        device="cpu", BLOCK_SIZE=blk,
    )
    dense = pat.dense(L, L)
    n = math.ceil(L / blk)
    padded = torch.zeros(dense.shape[0], n * blk, n * blk, dtype=torch.bool)
    padded[:, :L, :L] = dense
    expect = padded.view(-1, n, blk, n, blk).any(dim=4).any(dim=2)
    assert torch.equal(bm.to_dense()[0].bool(), expect)


# ---- neighborhood attention ------------------------------------------------------------------


def keys_of(pat: Pattern, grid: tuple[int, ...], coord: tuple[int, ...]) -> set[tuple[int, ...]]:
    """The allowed key coordinates of the query at ``coord`` (via the dense mask)."""
    L = math.prod(grid)
    p = 0
    for c, n in zip(coord, grid):
        p = p * n + c
    row = pat.dense(L, L)[0, p]
    return {tuple(int(x) for x in torch.unravel_index(torch.tensor(int(j)), grid)) for j in row.nonzero().flatten()}


def box(*ranges) -> set[tuple[int, ...]]:
    out = {()}
    for r in ranges:
        out = {t + (x,) for t in out for x in r}
    return out


def test_na_every_query_sees_k_squared_and_corner_shifts():
    p = Neighborhood((9, 9), 3)
    assert p.count(81, 81) == 81 * 9
    assert keys_of(p, (9, 9), (0, 0)) == box(range(0, 3), range(0, 3))
    assert keys_of(p, (9, 9), (4, 4)) == box(range(3, 6), range(3, 6))
    p5 = Neighborhood((9, 9), 5)
    assert keys_of(p5, (9, 9), (0, 4)) == box(range(0, 5), range(2, 7))  # shifted down at the border
    assert keys_of(p5, (9, 9), (8, 8)) == box(range(4, 9), range(4, 9))
    assert p5.dense(81, 81).sum(-1).eq(25).all()


def test_dilated_neighbors_exact():
    p = Neighborhood((12, 12), 3, dilation=2)
    assert keys_of(p, (12, 12), (0, 0)) == box({0, 2, 4}, {0, 2, 4})
    assert keys_of(p, (12, 12), (5, 6)) == box({3, 5, 7}, {4, 6, 8})
    # axis length not a multiple of the dilation: groups of different lengths, border shift inside the group
    q = Neighborhood(11, 3, dilation=2)
    assert keys_of(q, (11,), (10,)) == {(6,), (8,), (10,)}
    assert keys_of(q, (11,), (9,)) == {(5,), (7,), (9,)}
    assert keys_of(q, (11,), (1,)) == {(1,), (3,), (5,)}


def test_causal_axis_is_a_causal_window():
    # 1-D causal NA is exactly a causal sliding window
    assert torch.equal(Neighborhood(23, 5, causal=True).dense(23, 23), SlidingWindow(5).dense(23, 23))
    # interior rows of 1-D NA are a two-sided window of radius k // 2
    na = Neighborhood(23, 5).dense(23, 23)[0, 2:21]
    assert torch.equal(na, SlidingWindow(3, causal=False).dense(23, 23)[0, 2:21])
    # causal on the first axis only: rows at or above, columns centred
    p = Neighborhood((6, 7), 3, causal=(True, False))
    assert keys_of(p, (6, 7), (4, 3)) == box(range(2, 5), range(2, 5))
    assert keys_of(p, (6, 7), (0, 0)) == box({0}, range(0, 3))


def test_gna_stride_equal_kernel_is_blocked_attention():
    assert torch.equal(Neighborhood((6, 9), 3, stride=3).dense(54, 54), MaxViTBlock((6, 9), 3).dense(54, 54))
    # stride 2: the two queries of a stride group share one window (the centre query's)
    p = Neighborhood(10, 5, stride=2)
    d = p.dense(10, 10)[0]
    for a in range(0, 10, 2):
        assert torch.equal(d[a], d[min(a + 1, 9)])
    assert keys_of(p, (10,), (4,)) == {(x,) for x in range(3, 8)}  # leader 5: window 3..7


def test_na_query_order_makes_small_key_unions():
    """Groups of 64 consecutive queries in query_order are 8x8 tiles: union (8+4)^2 keys for a 5x5 kernel."""
    p = Neighborhood((32, 32), 5)
    dense = p.dense(1024, 1024)[0]
    order = p.query_order(1024)
    union = dense[order].view(16, 64, 1024).any(1).sum(-1)
    assert int(union.max()) == 144
    natural = dense.view(16, 64, 1024).any(1).sum(-1)  # two image rows: 6 x 32 keys
    assert int(natural.max()) == 192


@settings(max_examples=25, deadline=None)
@given(
    grid=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    data=st.data(),
)
def test_na_random_configs(grid, data):
    n = len(grid)
    causal = tuple(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    kernel = tuple(data.draw(st.integers(1, 4)) * (1 if c else 2) + (0 if c else 1) for c in causal)
    dilation = tuple(data.draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(data.draw(st.integers(1, k)) for k in kernel)
    p = Neighborhood(tuple(grid), kernel, dilation=dilation, stride=stride, causal=causal)
    L = p.seq_len
    off = data.draw(st.integers(0, L - 1))
    dense = p.dense(L - off, L, off)
    assert torch.equal(mask_of(p, L - off, L, off), dense)
    assert p.count(L - off, L, off) == float(dense.sum())
    assert bool(dense[0].any(-1).all())  # every query sees at least itself


# ---- vision blocks ---------------------------------------------------------------------------


def test_halo_block_plus_halo():
    p = HaloBlocks((12, 12), 4, 1)
    assert keys_of(p, (12, 12), (5, 5)) == box(range(3, 9), range(3, 9))  # (4 + 2) ** 2
    assert keys_of(p, (12, 12), (0, 0)) == box(range(0, 5), range(0, 5))  # clipped at the border
    d = p.dense(144, 144)[0]
    assert torch.equal(d[5 * 12 + 5], d[4 * 12 + 7])  # same block, same keys


def test_maxvit_grid_and_block():
    g = MaxViTGrid((6, 6), 3)
    assert keys_of(g, (6, 6), (0, 1)) == box({0, 2, 4}, {1, 3, 5})
    assert g.count(36, 36) == 36 * 9
    b = MaxViTBlock((6, 6), 3)
    assert keys_of(b, (6, 6), (4, 1)) == box(range(3, 6), range(0, 3))
    # MaxViT's setting: window == grid step, so block and grid share only the query itself
    both = (b | MaxViTGrid((6, 6), 2)).dense(36, 36)[0]
    assert both.sum(-1).eq(9 + 4 - 1).all()


# ---- per-head and long-range patterns ---------------------------------------------------------


def test_s2_shards_union_covers_context():
    for p in (StridedShards(3, 4), StridedShards(2, 6, local_blocks=2, shards=4)):
        d = p.dense(40, 40)
        assert torch.equal(d.any(0), Causal().dense(40, 40)[0])
        assert p.density(40) < 0.5 * Causal().density(40) + 0.2  # each head is sparse
    d = StridedShards(2, 4, causal=False).dense(33, 33)
    assert bool(d.any(0).all())
    # head h sees far blocks with index % heads == h, plus its own block
    row = StridedShards(2, 4).dense(40, 40)[1, 39]
    assert set(row.nonzero().flatten().tolist()) == {2, 3, 10, 11, 18, 19, 26, 27, 34, 35, 38, 39}


def test_shifted_chunks_longlora():
    p = ShiftedChunks(8, 4)
    d = p.dense(30, 30)
    chunk = Chunked(8, causal=True).dense(30, 30)[0]
    assert torch.equal(d[0], chunk) and torch.equal(d[1], chunk)
    shifted = Chunked(8, causal=True).dense(26, 26)[0]  # positions 4..29: borders at 4, 12, 20, 28
    assert torch.equal(d[2, 4:, 4:], shifted) and torch.equal(d[3], d[2])
    assert d[2, 12].nonzero().flatten().tolist() == [12]  # first token of a shifted chunk sees itself only
    assert d[2, 3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # the short first chunk [0, 4)


def test_scca_kv_shift():
    p = ShiftedCrossChunk(8, 4)
    d = p.dense(32, 32)
    assert torch.equal(d[0], Chunked(8, causal=True).dense(32, 32)[0])
    assert d[3, 17].nonzero().flatten().tolist() == list(range(12, 14))  # chunk 16..23 shifted back 4
    assert not bool(d[3, :4].any())  # rolled keys before position 0 do not exist
    flow = ShiftedCrossChunk(8, 4, mode="flow", causal=False)
    assert [flow.shift_of(h) for h in range(4)] == [0, 2, 4, 6]
    assert flow.dense(32, 32)[2, 20].nonzero().flatten().tolist() == list(range(12, 20))


def test_power_attention_distances():
    d = PowerAttention().dense(40, 40)[0]
    assert sorted(37 - j for j in d[37].nonzero().flatten().tolist()) == [0, 1, 2, 4, 8, 16, 32]
    b = PowerAttention(block=4, local_blocks=1).dense(40, 40)[0]
    blocks = sorted({j // 4 for j in b[39].nonzero().flatten().tolist()})
    assert blocks == [1, 5, 7, 8, 9]  # block 9 minus {0, 1, 2, 4, 8}


def test_radial_density_halves_with_distance():
    d = Radial(4).dense(81, 81)[0]
    back = sorted(40 - j for j in d[40].nonzero().flatten().tolist() if j <= 40)
    assert back == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32]  # w/2 = 2 keys per octave after the window
    # frames of 8 tokens: the spatial window halves per band, then every other frame
    f = Radial(1, frame=8).dense(17 * 8, 17 * 8)[0]
    q = 16 * 8 + 3  # frame 16, token 3
    per_frame = f[q].view(17, 8).sum(-1).flip(0).tolist()  # by frame distance 0..16
    assert per_frame[:4] == [8, 7, 3, 3]
    assert per_frame[4:8] == [1, 1, 1, 1] and per_frame[8:16] == [1, 0] * 4
    # O(n log n): doubling the length a bit more than doubles the pairs
    c1, c2 = Radial(4).count(1024, 1024), Radial(4).count(2048, 2048)
    assert 2.0 < c2 / c1 < 2.4


def test_fit_groups_and_latents():
    p = FITGroups(5, latents=2)  # period 7: latents at 0, 1, 7, 8, 14, 15, ...
    d = p.dense(28, 28)[0]
    assert d[9].nonzero().flatten().tolist() == list(range(7, 14))  # a data token: its group only
    assert d[8].nonzero().flatten().tolist() == [0, 1] + list(range(7, 14)) + [14, 15, 21, 22]


def test_stochastic_is_seeded_and_never_empty():
    a, b = Stochastic(0.3, block=2, seed=5), Stochastic(0.3, block=2, seed=6)
    assert torch.equal(a.dense(50, 50), Stochastic(0.3, block=2, seed=5).dense(50, 50))
    assert not torch.equal(a.dense(50, 50), b.dense(50, 50))
    assert bool(a.dense(50, 50).any(-1).all())
    assert torch.equal(Stochastic(1.0, block=4).dense(30, 30), Causal().dense(30, 30))
    # the kept fraction of off-local block pairs is close to keep
    s = Stochastic(0.25, block=1, seed=0, causal=False).dense(300, 300)[0]
    off = ~torch.eye(300, dtype=torch.bool)
    assert abs(float(s[off].float().mean()) - 0.25) < 0.02


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,arg",
    [
        (lambda: Neighborhood((8, 8), 0), "kernel_size"),
        (lambda: Neighborhood((8, 8), (3, 3, 3)), "kernel_size"),
        (lambda: Neighborhood((8, 8), 3, dilation=0), "dilation"),
        (lambda: Neighborhood((8, 8), 3, stride=4), "stride"),
        (lambda: Neighborhood((8, 0), 3), "grid"),
        (lambda: Neighborhood((), 3), "grid"),
        (lambda: Neighborhood((8, 8), 3, causal=(True,)), "causal"),
        (lambda: HaloBlocks((8, 8), 0, 1), "block"),
        (lambda: HaloBlocks((8, 8), 4, -1), "halo"),
        (lambda: MaxViTBlock((8, 8), 0), "window"),
        (lambda: MaxViTGrid((8, 8), 3), "grid_size"),
        (lambda: ShiftedChunks(0, 4), "chunk"),
        (lambda: ShiftedChunks(8, 0), "num_heads"),
        (lambda: ShiftedChunks(8, 4, shift=8), "shift"),
        (lambda: ShiftedCrossChunk(8, 4, mode="zigzag"), "mode"),
        (lambda: StridedShards(0, 4), "block"),
        (lambda: StridedShards(4, 4, shards=5), "shards"),
        (lambda: StridedShards(4, 4, local_blocks=0), "local_blocks"),
        (lambda: PowerAttention(block=0), "block"),
        (lambda: Radial(0), "window"),
        (lambda: Radial(2, frame=-1), "frame"),
        (lambda: FITGroups(0), "group"),
        (lambda: FITGroups(4, latents=0), "latents"),
        (lambda: Stochastic(0.0), "keep"),
        (lambda: Stochastic(1.5), "keep"),
        (lambda: Stochastic(0.5, block=0), "block"),
        (lambda: Stochastic(0.5, seed=-1), "seed"),
    ],
)
def test_bad_arguments_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_grid_length_mismatch_raises():
    p = Neighborhood((5, 7), 3)
    with pytest.raises(ValueError, match="sequence length 35"):
        p.dense(36, 36)
    with pytest.raises(ValueError, match="sequence length 35"):
        p.count(30, 34, 0)
    with pytest.raises(ValueError, match="sequence length"):
        MaxViTGrid((6, 8), 2).check_lengths(48, 48, 1)  # queries past the grid


def test_per_head_mismatch_raises():
    with pytest.raises(ValueError, match="4 heads"):
        StridedShards(4, 4).check_heads(8)
    with pytest.raises(ValueError, match="different num_heads"):
        StridedShards(4, 4) | ShiftedChunks(8, 2)
    with pytest.raises(ValueError, match="head-uniform"):
        PerHead((StridedShards(4, 2), Causal()))
    with pytest.raises(ValueError, match="different seq_len"):
        Neighborhood((5, 7), 3) & Document((10, 10))
