"""FreeSwim (paper P286): inward sliding-window attention with a dual-path cross-attention override, for running a
video diffusion transformer above its training resolution without training.

Two pieces, each usable on its own:

* ``inward_window(grid, train_grid)``: the self-attention pattern. Every query keeps its *training-scale* receptive
  field: a window of ``train_grid`` tokens per axis around it, shifted inwards at the borders so that it always
  covers exactly ``min(train_grid, grid)`` tokens per axis. That is neighborhood attention with
  ``kernel_size = train_grid`` (``core.patterns.Neighborhood``; even sizes follow NATTEN: ``k/2`` before, ``k/2 - 1``
  after), run by the sparse engine (op ``neighborhood`` or ``pattern``).
* ``CrossOverride``: the dual path. A full-receptive-field branch (full self-attention) runs at some steps and its
  cross-attention outputs (per block) are stored; the window branch's cross-attention outputs are replaced by them,
  so the text-conditioned semantics come from the branch that sees the whole video while the detail comes from the
  window branch. With ``refresh = r`` the full branch runs at steps ``0, r, 2r, ...`` and the stored outputs are
  reused in between (the paper's cross-attention caching, avoiding full 3-D attention at every step).

Reading and deviations: the abstract does not fix which blocks override or the refresh schedule; here every block
that calls ``window_cross`` is overridden and the schedule is one integer. The model wiring (a DiT's blocks calling
these) is the caller's: ``CrossOverride`` only stores, serves and says when the full branch must run.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ...core.checks import int_tuple, positive_int
from ...core.patterns import Neighborhood
from ...core.patterns.neighborhood import as_grid


def inward_window(grid: int | tuple[int, ...], train_grid: int | tuple[int, ...],
                  causal: bool | tuple[bool, ...] = False) -> Neighborhood:
    """FreeSwim's window pattern on a ``grid`` token grid: a ``train_grid`` window per axis (clipped to the axis),
    shifted inwards at the borders. ``causal`` per axis (e.g. causal over frames)."""
    grid = as_grid(grid)
    train = int_tuple("train_grid", train_grid, len(grid))
    return Neighborhood(grid, tuple(min(t, L) for t, L in zip(train, grid)), causal=causal)


class CrossOverride:
    """Stores the full branch's cross-attention outputs per block and serves them to the window branch.

    Per denoising step: ``if co.needs_full(step): run the full branch, calling co.full_cross(block, out)`` in each
    block; then run the window branch, each block calling ``co.window_cross(block, own)`` and using what it
    returns (the stored full-branch output; ``own`` when no full output is stored for that block)."""

    def __init__(self, refresh: int = 1) -> None:
        self.refresh = positive_int("refresh", refresh)
        self._store: dict[int, Tensor] = {}
        self.full_runs = 0  # how many times the full branch was due

    def needs_full(self, step: int) -> bool:
        """Whether the full branch must run at ``step`` (every ``refresh`` steps, and whenever nothing is stored)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        need = not self._store or step % self.refresh == 0
        if need:
            self.full_runs += 1
        return need

    def full_cross(self, block: int, out: Tensor) -> Tensor:
        """Record block ``block``'s full-branch cross-attention output (B, T, dim); returns it unchanged."""
        self._store[block] = out.detach()
        return out

    def window_cross(self, block: int, own: Tensor) -> Tensor:
        """The window branch's cross-attention output for ``block``: the stored full-branch output."""
        full = self._store.get(block)
        if full is None:
            return own
        if full.shape != own.shape:
            raise ValueError(f"block {block}: the full branch stored a cross-attention output of shape "
                             f"{tuple(full.shape)}, the window branch has {tuple(own.shape)}")
        return full.to(own.dtype)

    def run(self, step: int, full_branch: Callable[[], object], window_branch: Callable[[], Tensor]) -> Tensor:
        """One step: the full branch when due (its result is discarded: only its cross outputs matter), then the
        window branch, whose output is returned."""
        if self.needs_full(step):
            full_branch()
        return window_branch()


__all__ = ["CrossOverride", "inward_window"]
