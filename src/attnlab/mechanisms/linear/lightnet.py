"""LightNet's additive linear recurrence (R40).

Instead of a multiplicative decay, LightNet normalizes by a running sum: per feature ``i``,
``M_t = M_{t-1} + exp(k_t) v_t^T`` and ``z_t = z_{t-1} + exp(k_t)``, output ``o_t = sum_i q_ti M_t[i] / z_ti`` -- that
is, each key feature takes a softmax over the prefix:
``o_t = sum_i q_ti sum_{j<=t} softmax_{j<=t}(k_{.i})_j v_j``. (Equivalently a multiplicative recurrence with data-
dependent decay ``z_{t-1} / z_t``; one scan serves any order of the tokens, the paper's point for 2-D data.)
Queries through SiLU; the output is RMS-normalized and gated by ``sigmoid(X W_g)`` before the projection.
The multi-dimensional positional encodings (MD-TPE, MD-LRPE) are not included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.linear import cumulative_softmax_attention
from ..base import check_hidden
from ..common import merge_heads
from ..registry import register
from ._common import QKVLayer, RecurrentCache, causal_mask, check_common


@dataclass(frozen=True)
class LightNetConfig:
    dim: int = 256
    heads: int = 4
    norm_eps: float = 1e-6
    mode: str = "chunked"
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_common(self.dim, self.heads, self.mode, self.chunk_size)


@register(
    "lightnet",
    family="linear",
    papers=("R40",),
    year=2024,
    summary="LightNet additive linear recurrence: per-feature softmax of keys over the prefix, one scan",
    config=LightNetConfig,
)
class LightNetAttention(QKVLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * d * (d + 2)`` numbers at any length."""

    def __init__(self, cfg: LightNetConfig) -> None:
        super().__init__(cfg.dim, cfg.heads)
        self.cfg = cfg
        self.g_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def _finish(self, x: Tensor, o: Tensor) -> Tensor:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return self.o_proj(merge_heads(o) * torch.sigmoid(self.g_proj(x)))

    def forward(self, x: Tensor, cache: RecurrentCache | None = None) -> Tensor:
        check_hidden(x, self.cfg.dim)
        q, k, v = self.qkv(x)
        o, st = cumulative_softmax_attention(torch.nn.functional.silu(q), k, v, mode=self.cfg.mode,
                                             chunk_size=self.cfg.chunk_size, state=None if cache is None else cache.state)
        if cache is not None:
            cache.state, cache.length = st, cache.length + x.shape[1]
        return self._finish(x, o)

    def reference(self, x: Tensor) -> Tensor:
        """The additive recurrence written as the plain sums: exp(k) accumulated, divided per feature."""
        q, k, v = self.qkv(x)
        q = torch.nn.functional.silu(q)
        T = x.shape[1]
        e = k.exp()  # small test inputs: no stabilizer needed in the reference
        m = causal_mask(T, x.device).to(x.dtype)
        z = m @ e  # (B, H, T, d): running sum of exp(k)
        # o_t = sum_i q_ti / z_ti sum_{j<=t} e_ji v_j  ->  ((q / z) e^T masked) v
        o = (((q / z) @ e.transpose(-1, -2)) * m) @ v
        return self._finish(x, o)

    def state_size(self, seq_len: int) -> int:
        return self.heads * self.d * (self.d + 2)
