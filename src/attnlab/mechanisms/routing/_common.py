"""The base of the routing layers: :class:`~attnlab.mechanisms.heads.OpLayer` (projections, RoPE, the cache)
whose op is the method's registered op, plus the float64 reference of the whole layer.

The rule of this package: a method's file holds its functions (selection, execution, a plain dense mask), its
op (registered with :func:`attnlab.ops.sparse.sparse_op`, at the q/k/v level, no ``nn.Module`` parameters) and
its layer (``RoutingLayer`` + the layer's own parameters, which it hands to the op as tensors in the options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import positive_int
from attnlab.ops import reference as op_reference
from attnlab.ops._engine import Tiles, flat_key_index
from attnlab.ops.sparse import check_delta, check_prefill

from ..heads import HeadsConfig, OpLayer


@dataclass(frozen=True)
class RoutingHeadsConfig(HeadsConfig):
    """Heads options shared by the routing layers, plus ``delta`` (D99 stride, 0 = off) in every subclass."""

    renamed: ClassVar[dict[str, str]] = {"delta_correction": "delta"}

    def check(self, *positive: str) -> None:
        for name in positive:
            positive_int(name, getattr(self, name))
        check_delta(getattr(self, "delta", 0))
        if hasattr(self, "prefill"):
            check_prefill(self.prefill)


class RoutingLayer(OpLayer):
    """Projections + the method's op. ``call_options(q, k, v)`` are the op's options for one call (the config's,
    plus the layer's parameters as tensors where the op takes them)."""

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        return self.op_options()

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state) -> Tensor:
        res = self.spec(q, k, v, scale=self.cfg.d**-0.5, q_offset=q_offset, state=state,
                        **self.call_options(q, k, v))
        return res if state is None else res[0]

    def reference(self, x: Tensor) -> Tensor:
        """The op's float64 oracle on this layer's projections (run it on a float64 copy: ``.double()``)."""
        q, k, v = self.project(x)
        out = op_reference(self.spec, q, k, v, scale=self.cfg.d**-0.5, q_offset=0, **self.call_options(q, k, v))
        return self.finish(out, x)


def set_tiles(rows: Tensor, kpos: Tensor, kok: Tensor, B: int, H: int, Hkv: int, Tq: int, Tk: int,
              q_offset: int) -> Tiles:
    """Query-centric tiles from explicit key sets: tile ``t`` of every (batch, head) holds the call's query rows
    ``rows[t]`` (S, R) (-1: padding) and reads key positions ``kpos[..., t, :]`` where ``kok`` holds, causally.

    kpos, kok: (B or 1, H or 1, S, K); positions distinct per tile where valid. Rows in no tile see nothing.
    """
    S, R = rows.shape
    K = kpos.shape[-1]
    dev = rows.device
    kpos, kok = kpos.expand(B, H, S, K), kok.expand(B, H, S, K)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H * S, K)
    row_ok = (rows >= 0).expand(B * H, S, R).reshape(-1, R)
    r = torch.where(rows >= 0, rows, rows[:, :1].clamp(min=0))  # padding repeats a real row of its tile
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1, 1) * Tq + r).reshape(-1, R)
    mask = kok.unsqueeze(-2) & (kpos.unsqueeze(-2) <= (r + q_offset).view(1, 1, S, R, 1))  # (B, H, S, R, K)
    return Tiles(q_idx, k_idx, row_ok, mask.reshape(B * H * S, R, K))


__all__ = ["RoutingHeadsConfig", "RoutingLayer", "set_tiles"]
