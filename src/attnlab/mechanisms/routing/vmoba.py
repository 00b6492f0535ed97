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


def vmoba_attention(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], partition: str,
    top_k: int, threshold: float | None = None, scale: float | None = None,
) -> Tensor:
    """Bidirectional VMoBA. q (B, H, T, D); k, v (B, Hkv, T, D) in raster order, T = t * h * w -> (B, H, T, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("top_k", top_k)
    T = grid[0] * grid[1] * grid[2]
    if Tq != T or Tk != T:
        raise ValueError(f"VMoBA needs q and k of length {T} (grid {grid}), got {Tq}, {Tk}")
    scale = default_scale(D, scale)
    shape = block_shape(grid, tile, partition)
    block = shape[0] * shape[1] * shape[2]
    order = block_order(grid, shape, q.device)
    qp, kp, vp = q[:, :, order], k[:, :, order], v[:, :, order]
    with torch.no_grad():
        sel, valid = keep_blocks(gate_scores(qp, kp, block), top_k, threshold, scale)
    parts = tiles_from_selection(sel, valid, block_sets(T, block, q.device), Hkv, T, 0, causal=False)
    out = tile_attention(qp, kp, vp, parts, scale)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T, device=q.device)
    return out[:, :, inv]


def vmoba_mask(
    q: Tensor, k: Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int], partition: str, top_k: int,
    threshold: float | None = None, scale: float | None = None,
) -> Tensor:
    """Dense (B, H, T, T) mask in raster order, built plainly from each token's grid coordinates."""
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
    sel, valid = keep_blocks(gate, top_k, threshold, scale)
    chosen = torch.zeros(B, H, T, nb + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)), True)
    return chosen[..., bid]


# ---- the op and the layer ----------------------------------------------------------------------------------


def _check(grid, tile, partition: str, top_k: int, threshold: float | None) -> None:
    positive_int("top_k", top_k)
    block_shape(tuple(grid), tuple(tile), partition)  # validates the partition and divisibility
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _vmoba_weights(q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None, grid=(4, 4, 4),
                   tile=(2, 2, 2), partition: str = "3d", top_k: int = 2, threshold: float | None = None,
                   **_: Any) -> Tensor:
    return vmoba_mask(q, k, tuple(grid), tuple(tile), partition, top_k, threshold, scale)


@sparse_op("vmoba", papers=("D56",), summary="video MoBA: 1-D/2-D/3-D grid tiles as blocks, per-query top-k (or "
           "threshold) by mean-key gate", options={"grid": (4, 4, 4), "tile": (2, 2, 2), "partition": "3d",
           "top_k": 2, "threshold": None}, weights_mask=_vmoba_weights, causal=lambda o: False, decodes=False,
           dense_options={"top_k": ALL}, example={"grid": (2, 3, 4), "tile": (1, 3, 2), "partition": "3d",
                                                  "top_k": 2})
def vmoba_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, grid, tile,
             partition: str, top_k: int, threshold: float | None) -> Tensor:
    """Bidirectional VMoBA over the video ``grid`` (raster order): q (B, H, T, D), k, v (B, Hkv, T, D)."""
    _check(grid, tile, partition, top_k, threshold)
    return vmoba_attention(q, k, v, tuple(grid), tuple(tile), partition, top_k, threshold, scale)


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
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        _check(self.grid, self.tile, self.partition, self.top_k, self.threshold)
        self.check()


@register(
    "vmoba", family="routing", papers=("D56",), year=2025, config=VMoBAConfig, decodes=False,
    summary="video MoBA: 1-D/2-D/3-D grid tiles as blocks, per-query top-k (or threshold) by mean-key gate",
)
class VMoBAAttention(RoutingLayer):
    op = "vmoba"
