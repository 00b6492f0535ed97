"""InLine attention (R289, "Bridging the Divide"): injective linear attention plus a local term.

Linear attention normalizes by division, ``w_ij = phi(q_i).phi(k_j) / sum_s phi(q_i).phi(k_s)``, which maps
queries that differ only in scale to the same weights (not injective). InLine normalizes by subtraction:

    w_ij = phi(q_i).phi(k_j) - (1/N) sum_s phi(q_i).phi(k_s) + 1/N          (rows still sum to 1)

Causal: ``N = i`` (the keys seen), so ``o_i = phi(q_i) S_i - (phi(q_i).z_i) vbar_i + vbar_i`` with the linear-attention
state ``S_i, z_i`` and the running mean ``vbar_i`` of the values. The local term the paper adds (a learned
weighting of the nearest tokens' values) is, in 1-D and causal, ``sum_{o < window} r_io v_{i-o}`` with
``r_i = X_i W_r`` predicted per head from the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import nonneg_int
from ..heads import LayerCache
from ..registry import register
from ._common import FEATURE_MAPS, LinearHeadsConfig, LinearLayer, causal_mask, feature_map

INLINE_MAPS = tuple(f for f in FEATURE_MAPS if f != "taylor")


@dataclass(frozen=True)
class InLineConfig(LinearHeadsConfig):
    """feature_map: any kernel (the subtraction keeps rows summing to 1 regardless); window: local-term width
    (0: none)."""

    feature_map: str = "identity"
    window: int = 3

    def validate(self) -> None:
        super().validate()
        if self.feature_map not in INLINE_MAPS:
            raise ValueError(f"feature_map must be one of {list(INLINE_MAPS)}, got {self.feature_map!r}")
        nonneg_int("window", self.window)


@register(
    "inline",
    family="linear",
    papers=("R289",),
    year=2024,
    summary="InLine: injective linear attention (subtractive normalization) plus a learned local window term",
    config=InLineConfig,
)
class InLineAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * (d (d + 1) + d + (window - 1) d)`` numbers. Op ``linear``
    (no denominator) on values with a column of ones, so one state holds ``S`` and ``z``."""

    op = "linear"

    def __init__(self, cfg: InLineConfig) -> None:
        super().__init__(cfg)
        self.r_proj = nn.Linear(cfg.dim, cfg.heads * cfg.window) if cfg.window else None

    def _local(self, x: Tensor, v: Tensor, past_v: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """sum_{o < w} r_{i,o} v_{i-o}; v (B, H, T, d), past_v (B, H, w - 1, d)."""
        w = self.cfg.window
        if not w:
            return torch.zeros_like(v), None
        B, H, T, d = v.shape
        if past_v is None:
            past_v = v.new_zeros(B, H, w - 1, d)
        vv = torch.cat([past_v, v], dim=2)  # (B, H, w - 1 + T, d)
        r = self.r_proj(x).view(B, T, H, w).transpose(1, 2)  # (B, H, T, w)
        local = sum(r[..., o, None] * vv[:, :, w - 1 - o : w - 1 - o + T] for o in range(w))
        return local, vv[:, :, vv.shape[2] - (w - 1) :]

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        q, k, v = self.qkv(x)
        fq, fk = feature_map(q, self.cfg.feature_map), feature_map(k, self.cfg.feature_map)
        T, d = x.shape[1], self.d
        st = None if cache is None else cache.state
        aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # [S | z] in one state
        res = self.spec(fq, fk, aug, q_offset=start, state=st, feature_map="identity", normalize=False,
                        mode=self.cfg.mode, chunk=self.cfg.chunk)
        o = res if st is None else res[0]
        sum_v = v.cumsum(2)
        if st is not None and "sum_v" in st:
            sum_v = sum_v + st["sum_v"][:, :, None]
        n = torch.arange(start + 1, start + T + 1, device=x.device, dtype=x.dtype)[:, None]
        vbar = sum_v / n
        out = o[..., :d] - o[..., d:] * vbar + vbar
        local, past_v = self._local(x, v, None if st is None else st.get("past_v"))
        if cache is not None:
            cache.length = start + T
            st["sum_v"] = sum_v[:, :, -1]
            if past_v is not None and self.cfg.window > 1:
                st["past_v"] = past_v
        return self.out(out + local)

    def reference(self, x: Tensor) -> Tensor:
        """W = A - rowmean(A) + 1/i over the causal prefix, O = W V, plus the local term offset by offset."""
        q, k, v = self.qkv(x)
        T = x.shape[1]
        m = causal_mask(T, x.device)
        A = (feature_map(q, self.cfg.feature_map) @ feature_map(k, self.cfg.feature_map).transpose(-1, -2)) * m
        n = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)[:, None]
        W = (A - A.sum(-1, keepdim=True) / n + 1.0 / n) * m
        out = W @ v
        if self.cfg.window:
            B, H, _, _ = v.shape
            r = self.r_proj(x).view(B, T, self.heads, self.cfg.window).transpose(1, 2)
            for o in range(self.cfg.window):
                shifted = torch.nn.functional.pad(v, (0, 0, o, 0))[:, :, :T]  # v_{i-o}, zero before the start
                out = out + r[..., o, None] * shifted
        return self.out(out)

    def state_size(self, seq_len: int) -> int:
        d, H = self.d, self.heads
        past = (self.cfg.window - 1) * d if self.cfg.window > 1 else 0
        return H * (d * (d + 1) + d + past)
