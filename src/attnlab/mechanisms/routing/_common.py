"""The base of the routing layers: :class:`~attnlab.mechanisms.heads.OpLayer` (projections, RoPE, the cache)
whose op is the method's registered op, plus the float64 reference of the whole layer.

The rule of this package: a method's file holds its functions (selection, execution, a plain dense mask), its
op (registered with :func:`attnlab.ops.sparse.sparse_op`, at the q/k/v level, no ``nn.Module`` parameters) and
its layer (``RoutingLayer`` + the layer's own parameters, which it hands to the op as tensors in the options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from attnlab.core.checks import positive_int
from attnlab.ops import reference as op_reference
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


__all__ = ["RoutingHeadsConfig", "RoutingLayer"]
