"""What every registered layer is: an ``nn.Module`` over ``(batch, seq, dim)`` hidden states.

* ``forward(x, cache=None) -> y``: ``x`` is ``(B, T, dim)``; with a cache (from ``init_cache``), ``x`` holds the
  next ``T`` positions after those already cached, and the result equals the matching rows of a full forward.
* ``forward_with_aux(x, cache=None) -> (y, aux)``: the same plus auxiliary losses (e.g. MoH's load balance),
  returned to the caller -- no global state.
* ``reference(x) -> y``: the paper's formula written plainly (dense, materialized scores); the fast path is
  tested against it in float64.

Every registered layer builds on :class:`attnlab.mechanisms.heads.OpLayer` (projections + an op + the decoding
cache), with a config that subclasses :class:`attnlab.mechanisms.heads.HeadsConfig`; this module only states
the interface.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class AttentionLayer(nn.Module):
    registry_name: str = ""

    def forward(self, x: Tensor, cache: Any | None = None) -> Tensor:
        return self.forward_with_aux(x, cache)[0]

    def forward_with_aux(self, x: Tensor, cache: Any | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        return self.forward(x, cache), {}

    def reference(self, x: Tensor) -> Tensor:  # pragma: no cover - every layer overrides
        raise NotImplementedError(f"{type(self).__name__} has no reference implementation")

    def init_cache(self, batch: int = 1) -> Any:
        raise TypeError(f"{type(self).__name__} ({self.registry_name}) does not support incremental decoding")

    def state_size(self, seq_len: int) -> int:
        """Numbers held per sequence to decode the next token after ``seq_len`` tokens (for the quality bench)."""
        raise TypeError(f"{type(self).__name__} does not report its state size")


def check_hidden(x: Tensor, dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (batch, seq, {dim}), got {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x has an empty sequence (seq=0)")
