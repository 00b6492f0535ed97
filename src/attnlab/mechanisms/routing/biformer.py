"""BiFormer bi-level routing attention [D39] on a 2-D grid of tokens.

The ``gh x gw`` grid is cut into ``rh x rw`` regions. Region-level queries and keys are the means of their
tokens' queries and keys (all heads' channels together, as the routing in the paper is shared by heads);
their affinity ``A = Q_r K_r^T`` picks, for every query region, the ``top_k`` key regions. Token-to-token
attention then runs inside the union of the routed regions.

Execution: q, k, v are permuted once into region-major order (a copy of size T, not k copies), so each region
is a contiguous, aligned block; every query region is one tile that gathers its ``top_k`` key regions as whole
blocks. Memory is ``top_k * T * d`` for the gathered tiles -- it grows with the selected regions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.ops._engine import tile_attention, tiles_from_blocks
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def region_order(grid: tuple[int, int], regions: tuple[int, int], device=None) -> Tensor:
    """(T,) raster positions listed region by region (row-major regions, row-major tokens inside)."""
    gh, gw = grid
    rh, rw = regions
    if gh % rh or gw % rw:
        raise ValueError(f"grid {grid} must divide into {regions} regions")
    pos = torch.arange(gh * gw, device=device).view(rh, gh // rh, rw, gw // rw)
    return pos.permute(0, 2, 1, 3).reshape(-1)


def route(q: Tensor, k: Tensor, region: int, top_k: int) -> Tensor:
    """Region routing on region-major q (B, H, T, D), k (B, Hkv, T, D): (B, nR, top_k) key regions per query region."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    with torch.no_grad():
        qr = q.reshape(B, H, T // region, region, D).mean(3)  # (B, H, nR, D)
        kr = k.reshape(B, Hkv, T // region, region, D).mean(3).repeat_interleave(H // Hkv, 1)
        aff = torch.einsum("bhid,bhjd->bij", qr, kr)  # channels of all heads together
        return aff.topk(min(top_k, aff.shape[-1]), dim=-1).indices


def biformer_attention(
    q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int], regions: tuple[int, int], top_k: int,
    scale: float | None = None,
) -> Tensor:
    """Bi-level routing attention. q (B, H, T, D), k, v (B, Hkv, T, D) in raster order, T = gh * gw."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    positive_int("top_k", top_k)
    if Tq != grid[0] * grid[1] or Tk != Tq:
        raise ValueError(f"BiFormer needs q and k of length {grid[0] * grid[1]} (grid {grid}), got {Tq}, {Tk}")
    scale = default_scale(D, scale)
    region_order(grid, regions)  # checks that the regions divide the grid
    region = Tq // (regions[0] * regions[1])
    qp, kp, vp = (_to_regions(x, grid, regions) for x in (q, k, v))
    sel = route(qp, kp, region, top_k)  # (B, nR, k)
    nR = sel.shape[1]
    block_index = sel.unsqueeze(1).expand(B, H, nR, sel.shape[-1])
    tiles = tiles_from_blocks(block_index, torch.ones_like(block_index, dtype=torch.bool), region, region,
                              Tq, Tk, Hkv)
    out = tile_attention(qp, kp, vp, [tiles], scale)
    return _to_regions(out, grid, regions, inverse=True)


def _to_regions(x: Tensor, grid: tuple[int, int], regions: tuple[int, int], inverse: bool = False) -> Tensor:
    """(B, H, T, d) raster order <-> region-major order (``region_order``), as one strided copy (whole rows of a
    region are contiguous runs, so this beats a per-token gather)."""
    (gh, gw), (rh, rw) = grid, regions
    B, H, T, d = x.shape
    if inverse:
        return x.reshape(B, H, rh, rw, gh // rh, gw // rw, d).transpose(3, 4).reshape(B, H, T, d)
    return x.reshape(B, H, rh, gh // rh, rw, gw // rw, d).transpose(3, 4).reshape(B, H, T, d)


def biformer_mask(q: Tensor, k: Tensor, grid: tuple[int, int], regions: tuple[int, int], top_k: int) -> Tensor:
    """Dense (B, 1, T, T) mask in raster order, built plainly: region id of every token, routed region pairs."""
    B, H, T, D = q.shape
    gh, gw = grid
    rh, rw = regions
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rid = ((ys // (gh // rh)) * rw + xs // (gw // rw)).reshape(-1).to(q.device)  # (T,)
    nR = rh * rw
    onehot = torch.nn.functional.one_hot(rid, nR).to(q.dtype)  # (T, nR)
    cnt = onehot.sum(0)
    rep = H // k.shape[1]
    qr = torch.einsum("bhtd,tr->bhrd", q, onehot) / cnt.view(1, 1, nR, 1)
    kr = torch.einsum("bhtd,tr->bhrd", k.repeat_interleave(rep, 1), onehot) / cnt.view(1, 1, nR, 1)
    aff = torch.einsum("bhid,bhjd->bij", qr, kr)
    routed = torch.zeros(B, nR, nR, dtype=torch.bool, device=q.device)
    routed.scatter_(-1, aff.topk(min(top_k, nR), dim=-1).indices, True)
    return routed[:, rid][:, :, rid].unsqueeze(1)


# ---- the op and the layer ----------------------------------------------------------------------------------


def _biformer_weights(q: Tensor, k: Tensor, *, q_offset: int, grid=(8, 8), regions=(4, 4), top_k: int = 4,
                      **_: Any) -> Tensor:
    return biformer_mask(q, k, tuple(grid), tuple(regions), top_k)


@sparse_op("biformer", papers=("D39",), summary="bi-level routing: top-k key regions per query region by region "
           "affinity (2-D grid, shared by heads), token attention inside", options={"grid": (8, 8),
           "regions": (4, 4), "top_k": 4}, weights_mask=_biformer_weights, causal=lambda o: False, decodes=False,
           dense_options={"top_k": ALL}, example={"grid": (4, 6), "regions": (2, 3), "top_k": 2})
def biformer_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, grid, regions,
                top_k: int) -> Tensor:
    """Bidirectional over the ``grid`` (raster order, T = gh * gw): q (B, H, T, D), k, v (B, Hkv, T, D)."""
    return biformer_attention(q, k, v, tuple(grid), tuple(regions), top_k, scale)


@dataclass(frozen=True)
class BiFormerConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    causal: bool = False  # bidirectional over an image grid
    grid: tuple[int, int] = (8, 8)
    regions: tuple[int, int] = (4, 4)
    top_k: int = 4
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        self.check("top_k")
        region_order(self.grid, self.regions)  # validates divisibility


@register(
    "biformer", family="routing", papers=("D39",), year=2023, config=BiFormerConfig, decodes=False,
    summary="bi-level routing: top-k key regions per query region by region affinity, token attention inside",
)
class BiFormerAttention(RoutingLayer):
    op = "biformer"
