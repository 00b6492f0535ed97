"""Key/value cache for incremental decoding: one per layer, grown by doubling so appends are amortized O(1)."""

from __future__ import annotations

from torch import Tensor


class KVCache:
    """Holds ``(batch, kv_heads, length, head_dim)`` keys and values seen so far.

    ``append(k, v)`` stores the new positions and returns views of everything cached. ``length`` is the
    number of positions already cached, i.e. the absolute position of the next query.
    """

    def __init__(self) -> None:
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        if self._k is None:
            cap = max(16, n)
            self._k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        elif k.shape[:2] != self._k.shape[:2] or k.shape[3] != self._k.shape[3]:
            raise ValueError(f"cache holds shape {tuple(self._k.shape)}, cannot append {tuple(k.shape)}")
        if self.length + n > self._k.shape[2]:
            cap = max(2 * self._k.shape[2], self.length + n)
            self._k = _grow(self._k, cap, self.length)
            self._v = _grow(self._v, cap, self.length)
        self._k[:, :, self.length : self.length + n] = k
        self._v[:, :, self.length : self.length + n] = v
        self.length += n
        return self._k[:, :, : self.length], self._v[:, :, : self.length]

    def nbytes(self) -> int:
        if self._k is None:
            return 0
        per_pos = self._k[:, :, :1].numel() * self._k.element_size() + self._v[:, :, :1].numel() * self._v.element_size()
        return per_pos * self.length


def _grow(t: Tensor, cap: int, used: int) -> Tensor:
    out = t.new_empty(t.shape[0], t.shape[1], cap, t.shape[3])
    out[:, :, :used] = t[:, :, :used]
    return out


__all__ = ["KVCache"]
