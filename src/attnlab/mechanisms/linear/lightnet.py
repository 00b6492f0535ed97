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

from ..common import merge_heads
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask


@dataclass(frozen=True)
class LightNetConfig(LinearHeadsConfig):
    norm_eps: float = 1e-6


@register(
    "lightnet",
    family="linear",
    papers=("R40",),
    year=2024,
    summary="LightNet additive linear recurrence: per-feature softmax of keys over the prefix, one scan",
    config=LightNetConfig,
)
class LightNetAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * d * (d + 2)`` numbers at any length. Op
    ``cumulative_softmax`` with silu query features, then the RMS norm and the output gate."""

    op = "cumulative_softmax"

    def __init__(self, cfg: LightNetConfig) -> None:
        super().__init__(cfg)
        self.g_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def op_options(self) -> dict:
        return {"q_map": "silu", "mode": self.cfg.mode, "chunk": self.cfg.chunk}

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)
        return self.o_proj(merge_heads(o) * torch.sigmoid(self.g_proj(x)))

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
        return self.finish(o, x)

    def state_size(self, seq_len: int) -> int:
        return self.heads * self.d * (self.d + 2)
