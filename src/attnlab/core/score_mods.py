"""Score modifiers: change scores before the softmax. Each maps to FlexAttention's ``score_mod``.

``score_mod(score, b, h, q_idx, kv_idx)`` uses tensor ops only, so the same function runs inside
FlexAttention and, broadcast over index grids, in the dense reference. Positions are absolute (as in
patterns). ``kind`` tells the block-sparse engine how to fuse it with SDPA:

* ``"additive"``: ``score + bias(b, h, q, kv)`` -- folded into SDPA's float mask;
* ``"scale"``: ``score * factor[h]`` -- folded into the queries;
* ``"elementwise"``: anything else (soft-capping) -- runs the gathered tiles through an explicit softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


class ScoreMod:
    kind: str = "elementwise"

    def score_mod(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.score_mod(score, b, h, q_idx, kv_idx)

    def bias(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """For additive mods: the added term."""
        if self.kind != "additive":
            raise TypeError(f"{type(self).__name__} is not additive")
        zero = torch.zeros((), dtype=torch.float32, device=q_idx.device)
        return self.score_mod(zero, b, h, q_idx, kv_idx)

    def factor(self, heads: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """For scale mods: the per-head factor, shape (heads,)."""
        raise TypeError(f"{type(self).__name__} is not a scale")


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's geometric slopes (Press et al.), extended to head counts that are not powers of two."""
    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if heads <= 0:
        raise ValueError(f"heads must be positive, got {heads}")
    if math.log2(heads).is_integer():
        return torch.tensor(pow2(heads))
    closest = 2 ** math.floor(math.log2(heads))
    extra = pow2(2 * closest)[0::2][: heads - closest]
    return torch.tensor(pow2(closest) + extra)


@dataclass(frozen=True, eq=False)
class ALiBi(ScoreMod):
    """Linear distance penalty ``-slope[h] * |q - kv|`` (Press et al., 2022)."""

    heads: int
    slopes: Tensor | None = None
    kind = "additive"

    def __post_init__(self):
        s = alibi_slopes(self.heads) if self.slopes is None else torch.as_tensor(self.slopes, dtype=torch.float32)
        if s.shape != (self.heads,):
            raise ValueError(f"slopes must have shape ({self.heads},), got {tuple(s.shape)}")
        object.__setattr__(self, "slopes", s)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        slope = self.slopes.to(device=q_idx.device)[h]
        return score - slope * (q_idx - kv_idx).abs()


@dataclass(frozen=True, eq=False)
class SoftCap(ScoreMod):
    """``cap * tanh(score / cap)`` (Gemma 2, Grok): bounds logits without changing their order."""

    cap: float
    kind = "elementwise"

    def __post_init__(self):
        if not self.cap > 0:
            raise ValueError(f"cap must be positive, got {self.cap!r}")

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return self.cap * torch.tanh(score / self.cap)


@dataclass(frozen=True, eq=False)
class Temperature(ScoreMod):
    """Per-head multiplicative temperature: ``score * factors[h]`` (a tensor; may be a learnable parameter)."""

    factors: Tensor
    kind = "scale"

    def __post_init__(self):
        if self.factors.dim() != 1:
            raise ValueError(f"factors must be 1-D (one per head), got shape {tuple(self.factors.shape)}")

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score * self.factors.to(device=q_idx.device)[h]

    def factor(self, heads, device, dtype):
        if self.factors.numel() != heads:
            raise ValueError(f"Temperature has {self.factors.numel()} factors but the call has {heads} heads")
        return self.factors.to(device=device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Bias(ScoreMod):
    """An explicit additive bias ``(batch or 1, heads or 1, q_len, kv_len)``; row r is position q_offset + r."""

    values: Tensor
    q_offset: int = 0
    kind = "additive"

    def __post_init__(self):
        if self.values.dim() != 4:
            raise ValueError(
                f"values must have shape (batch or 1, heads or 1, q_len, kv_len), got {tuple(self.values.shape)}"
            )

    def score_mod(self, score, b, h, q_idx, kv_idx):
        t = self.values.to(device=q_idx.device)
        bb = b if t.shape[0] > 1 else torch.zeros_like(b)
        hh = h if t.shape[1] > 1 else torch.zeros_like(h)
        return score + t[bb, hh, q_idx - self.q_offset, kv_idx]


@dataclass(frozen=True, eq=False)
class Compose(ScoreMod):
    """Apply several modifiers in order."""

    mods: tuple[ScoreMod, ...] = field(default_factory=tuple)

    def __post_init__(self):
        kinds = {m.kind for m in self.mods}
        kind = kinds.pop() if len(kinds) == 1 and "scale" not in kinds else "elementwise"
        object.__setattr__(self, "kind", kind)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        for m in self.mods:
            score = m.score_mod(score, b, h, q_idx, kv_idx)
        return score


def as_score_mod(mod: ScoreMod | tuple | list | None) -> ScoreMod | None:
    if mod is None or isinstance(mod, ScoreMod):
        return mod
    if isinstance(mod, (tuple, list)):
        mods = tuple(as_score_mod(m) for m in mod)
        return mods[0] if len(mods) == 1 else Compose(mods)
    raise TypeError(f"score_mod must be a ScoreMod (ALiBi, SoftCap, Temperature, Bias, ...), got {type(mod).__name__}")
