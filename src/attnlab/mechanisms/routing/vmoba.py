"""VMoBA [D56]: mixture of block attention over a video grid, with 1-D / 2-D / 3-D block partitions.

Tokens sit on a ``(t, h, w)`` grid (frames x rows x columns, raster order). A *partition* cuts the grid into
blocks that are tiles of the grid:

* ``"1d"``: temporal chunks, ``tile[0]`` whole frames per block (shape ``(tile[0], h, w)``);
* ``"2d"``: spatial patches inside each frame (shape ``(1, tile[1], tile[2])``);
* ``"3d"``: spatio-temporal cubes (shape ``tile``).

The paper cycles 1D-2D-3D from layer to layer; here each layer takes its ``partition`` as an option. As in
MoBA, a query's gate for block ``j`` is ``<q, mean(K_j)>`` (mean-pooled key tile) and each query attends the
``top_k`` blocks with the highest gate (bidirectional: video diffusion attends the whole clip). With
``threshold`` set, the number of blocks is per query (the paper's threshold-based selection): blocks are taken
by decreasing gate until their share of the softmax of the gates reaches ``threshold`` (at most ``top_k``).

``selection="global"`` is the paper's global block selection: the (query, block) pairs of a whole head (one
batch element) compete together, so salient queries get more blocks and flat ones fewer. The head keeps its
``top_k * T`` pairs of highest gate (the same average budget as per-query top-k); with ``threshold``, the
shortest prefix of the head's pairs sorted by gate whose share of the head-wide softmax of the gates reaches
``threshold`` (capped at ``top_k * T`` pairs). Every query also keeps its own best block (our convention, so no
row is empty).

Execution: q, k, v are permuted once into tile-major order so every block is contiguous and aligned; queries
are grouped by the block they selected and each block runs as one kernel call with K/V read as views
(``core.sparse`` key-centric :class:`BlockTiles`), then the output is permuted back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.ops._engine import tile_attention, tiles_from_selection
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import block_sets, gate_scores

PARTITIONS = ("1d", "2d", "3d")
SELECTIONS = ("query", "global")


def block_shape(grid: tuple[int, int, int], tile: tuple[int, int, int], partition: str) -> tuple[int, int, int]:
    """The (frames, rows, columns) extent of one block under ``partition``; checks divisibility."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    t, h, w = grid
    shape = {"1d": (tile[0], h, w), "2d": (1, tile[1], tile[2]), "3d": tuple(tile)}[partition]
    if any(g % s for g, s in zip(grid, shape)):
        raise ValueError(f"grid {grid} must divide into {partition} blocks of shape {shape}")
    return shape


def block_order(grid: tuple[int, int, int], shape: tuple[int, int, int], device=None) -> Tensor:
    """(T,) raster positions listed block by block (blocks and the tokens inside them in raster order)."""
    t, h, w = grid
    a, b, c = shape
    pos = torch.arange(t * h * w, device=device).view(t // a, a, h // b, b, w // c, c)
    return pos.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def keep_blocks(gate: Tensor, top_k: int, threshold: float | None, scale: float) -> tuple[Tensor, Tensor]:
    """Selection from gate scores (B, H, T, nb): (sel, valid), each (B, H, T, min(top_k, nb)).

    Without ``threshold``: the ``top_k`` best blocks. With it: the shortest prefix of the blocks sorted by gate
    whose softmax mass reaches ``threshold`` (the best block always), capped at ``top_k``.
    """
    n = min(top_k, gate.shape[-1])
    val, sel = gate.topk(n, dim=-1)
    valid = torch.ones_like(sel, dtype=torch.bool)
    if threshold is not None:
        p = torch.softmax(gate * scale, dim=-1)
        before = torch.gather(p, -1, sel).cumsum(-1) - torch.gather(p, -1, sel)  # mass of the better blocks
        valid = before < threshold
    return sel, valid


def keep_blocks_global(gate: Tensor, top_k: int, threshold: float | None, scale: float) -> tuple[Tensor, Tensor]:
    """Head-wide selection from gate scores (B, H, T, nb): (sel, valid), each (B, H, T, nb).

    ``sel`` lists every block per query by decreasing gate; ``valid`` marks the kept ones: the head's
    ``top_k * T`` best (query, block) pairs (with ``threshold``: while the head-wide softmax mass of the better
    pairs is below it), plus each query's best block.
    """
    B, H, T, nb = gate.shape
    flat = gate.reshape(B, H, T * nb)
    idx = flat.topk(min(top_k * T, T * nb), dim=-1).indices  # the head's best pairs, by decreasing gate
    keep = torch.ones_like(idx, dtype=torch.bool)
    if threshold is not None:
        p = torch.softmax(flat * scale, dim=-1).gather(-1, idx)
        keep = p.cumsum(-1) - p < threshold  # mass of the better pairs
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, keep).view(B, H, T, nb)
    chosen.scatter_(-1, gate.argmax(-1, keepdim=True), True)
    sel = gate.argsort(-1, descending=True)
    return sel, chosen.gather(-1, sel)


def vmoba_attention(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], partition: str,
    top_k: int, threshold: float | None = None, scale: float | None = None, selection: str = "query",
) -> Tensor:
    """Bidirectional VMoBA. q (B, H, T, D); k, v (B, Hkv, T, D) in raster order, T = t * h * w -> (B, H, T, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("top_k", top_k)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    T = grid[0] * grid[1] * grid[2]
    if Tq != T or Tk != T:
        raise ValueError(f"VMoBA needs q and k of length {T} (grid {grid}), got {Tq}, {Tk}")
    scale = default_scale(D, scale)
    shape = block_shape(grid, tile, partition)
    block = shape[0] * shape[1] * shape[2]
    order = block_order(grid, shape, q.device)
    qp, kp, vp = q[:, :, order], k[:, :, order], v[:, :, order]
    with torch.no_grad():
        keep = keep_blocks if selection == "query" else keep_blocks_global
        sel, valid = keep(gate_scores(qp, kp, block), top_k, threshold, scale)
    parts = tiles_from_selection(sel, valid, block_sets(T, block, q.device), Hkv, T, 0, causal=False)
    out = tile_attention(qp, kp, vp, parts, scale)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T, device=q.device)
    return out[:, :, inv]


def vmoba_mask(
    q: Tensor, k: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], partition: str, top_k: int,
    threshold: float | None = None, scale: float | None = None, selection: str = "query",
) -> Tensor:
    """Dense (B, H, T, T) mask in raster order, built plainly from each token's grid coordinates
    (``selection="global"``: a plain loop over each head's sorted (query, block) pairs)."""
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    a, b, c = block_shape(grid, tile, partition)
    tt, yy, xx = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    bid = (((tt // a) * (grid[1] // b) + yy // b) * (grid[2] // c) + xx // c).reshape(-1).to(q.device)  # (T,)
    nb = T // (a * b * c)
    onehot = torch.nn.functional.one_hot(bid, nb).to(q.dtype)  # (T, nb)
    kk = k.repeat_interleave(H // k.shape[1], 1)
    kbar = torch.einsum("bhtd,tn->bhnd", kk, onehot) / onehot.sum(0).view(1, 1, nb, 1)
    gate = q @ kbar.transpose(-1, -2)  # (B, H, T, nb)
    if selection == "global":
        return _global_mask(gate, top_k, threshold, scale)[..., bid]
    sel, valid = keep_blocks(gate, top_k, threshold, scale)
    chosen = torch.zeros(B, H, T, nb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)), True)
    return chosen[..., bid]


def _global_mask(gate: Tensor, top_k: int, threshold: float | None, scale: float) -> Tensor:
    """(B, H, T, nb) kept (query, block) pairs of the global rule, one head at a time in Python."""
    B, H, T, nb = gate.shape
    chosen = torch.zeros(B, H, T, nb, dtype=torch.bool, device=gate.device)
    for b in range(B):
        for h in range(H):
            g = gate[b, h].double()
            z = torch.exp((g - g.max()) * scale)
            share, gl = (z / z.sum()).tolist(), g.tolist()
            pairs = sorted(((gl[i][j], i, j) for i in range(T) for j in range(nb)), reverse=True)
            mass = 0.0
            for n, (_, i, j) in enumerate(pairs):
                if n >= top_k * T or (threshold is not None and mass >= threshold):
                    break
                chosen[b, h, i, j] = True
                mass += share[i][j]
            for i in range(T):  # each query's best block
                chosen[b, h, i, max(range(nb), key=lambda j: gl[i][j])] = True
    return chosen


# ---- the op and the layer ----------------------------------------------------------------------------------


def _check(grid, tile, partition: str, top_k: int, threshold: float | None, selection: str = "query") -> None:
    positive_int("top_k", top_k)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    block_shape(tuple(grid), tuple(tile), partition)  # validates the partition and divisibility
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _vmoba_weights(q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None, grid=(4, 4, 4),
                   tile=(2, 2, 2), partition: str = "3d", top_k: int = 2, threshold: float | None = None,
                   selection: str = "query", **_: Any) -> Tensor:
    return vmoba_mask(q, k, tuple(grid), tuple(tile), partition, top_k, threshold, scale, selection)


@sparse_op("vmoba", papers=("D56",), summary="video MoBA: 1-D/2-D/3-D grid tiles as blocks, per-query top-k (or "
           "threshold) by mean-key gate", options={"grid": (4, 4, 4), "tile": (2, 2, 2), "partition": "3d",
           "top_k": 2, "threshold": None, "selection": "query"}, weights_mask=_vmoba_weights, causal=lambda o: False, decodes=False,
           dense_options={"top_k": ALL}, example={"grid": (2, 3, 4), "tile": (1, 3, 2), "partition": "3d",
                                                  "top_k": 2})
def vmoba_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, grid, tile,
             partition: str, top_k: int, threshold: float | None, selection: str) -> Tensor:
    """Bidirectional VMoBA over the video ``grid`` (raster order): q (B, H, T, D), k, v (B, Hkv, T, D)."""
    _check(grid, tile, partition, top_k, threshold, selection)
    return vmoba_attention(q, k, v, tuple(grid), tuple(tile), partition, top_k, threshold, scale, selection)


@dataclass(frozen=True)
class VMoBAConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    causal: bool = False  # bidirectional over a video grid
    grid: tuple[int, int, int] = (4, 4, 4)  # (frames, rows, columns)
    tile: tuple[int, int, int] = (2, 2, 2)  # block extent along the axes the partition cuts
    partition: str = "3d"
    top_k: int = 2
    threshold: float | None = None
    selection: str = "query"  # "query": per-query top-k; "global": the head's best (query, block) pairs
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        _check(self.grid, self.tile, self.partition, self.top_k, self.threshold, self.selection)
        self.check()


@register(
    "vmoba", family="routing", papers=("D56",), year=2025, config=VMoBAConfig, decodes=False,
    summary="video MoBA: 1-D/2-D/3-D grid tiles as blocks, per-query top-k (or threshold) by mean-key gate",
)
class VMoBAAttention(RoutingLayer):
    op = "vmoba"
