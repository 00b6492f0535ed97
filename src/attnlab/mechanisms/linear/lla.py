"""Local Linear Attention (R282): attention as local linear regression at the query (test-time regression view).

Softmax attention is the Nadaraya-Watson estimator (a locally *constant* fit of values on keys with kernel weights
``p_ij = softmax_j(q_i . k_j / sqrt d)``); linear attention is a global linear fit. LLA fits a *local linear*
model around each query with the same weights and returns its value at the query:

    minimize_{a, B}  sum_{j<=i} p_ij |v_j - a - B^T (k_j - q_i)|^2 + ridge |B|^2,     o_i = a

In closed form, with weighted means ``mu_i = sum p k``, ``vbar_i = sum p v``, covariance
``Sigma_i = sum p (k - mu)(k - mu)^T`` and cross-covariance ``C_i = sum p (k - mu)(v - vbar)^T``:

    o_i = vbar_i + C_i^T (Sigma_i + ridge I)^{-1} (q_i - mu_i)

(``ridge -> inf`` gives softmax attention back). Cost ``O(T^2 d^2 + T d^3)`` and a growing key/value cache: LLA
is in this family as the "interpolation" end, not for constant memory. FlashLLA's blockwise kernel is not
reproduced; the chunked form processes ``chunk`` queries at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..heads import LayerCache, OpLayer
from ..registry import register
from ._common import LinearHeadsConfig, causal_mask


@dataclass(frozen=True)
class LLAConfig(LinearHeadsConfig):
    """ridge: the slope's L2 penalty (> 0); mode: parallel (all queries) | chunked (chunk queries at a time) |
    recurrent (one query at a time)."""

    ridge: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@register(
    "lla",
    family="linear",
    papers=("R282",),
    year=2025,
    summary="Local Linear Attention: local linear (ridge) regression of values on keys around each query",
    config=LLAConfig,
)
class LocalLinearAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); decoding keeps all keys and values: ``2 H d T`` numbers."""

    op = None  # the local regression is the layer's own code; it keeps every key and value
    kv_cache = True

    def __init__(self, cfg: LLAConfig) -> None:
        super().__init__(cfg)

    @property
    def d(self) -> int:
        return self.cfg.d

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(x, 0)

    def _rows(self, q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
        """Queries (B, H, Tq, d) at positions start.. over keys (B, H, n, d) at 0..n-1 -> (B, H, Tq, d)."""
        Tq, n, d = q.shape[2], k.shape[2], q.shape[-1]
        visible = torch.arange(n, device=q.device)[None, :] <= torch.arange(start, start + Tq, device=q.device)[:, None]
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~visible, float("-inf")).softmax(-1)
        mu, vbar = p @ k, p @ v  # (B, H, Tq, d)
        sigma = torch.einsum("bhtn,bhnd,bhne->bhtde", p, k, k) - mu[..., :, None] * mu[..., None, :]
        cross = torch.einsum("bhtn,bhnd,bhne->bhtde", p, k, v) - mu[..., :, None] * vbar[..., None, :]
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        slope = torch.linalg.solve(sigma + self.cfg.ridge * eye, (q - mu)[..., None])  # (B, H, Tq, d, 1)
        return vbar + (cross.transpose(-1, -2) @ slope)[..., 0]

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        q, k, v, start = self.qkv_cached(x, cache)
        T = q.shape[2]
        step = {"parallel": T, "chunked": self.cfg.chunk, "recurrent": 1}[self.cfg.mode]
        outs = []
        for i in range(0, T, step):
            hi = min(T, i + step)
            outs.append(self._rows(q[:, :, i:hi], k[:, :, : start + hi], v[:, :, : start + hi], start + i))
        return self.out(torch.cat(outs, dim=2))

    def reference(self, x: Tensor) -> Tensor:
        """Weighted least squares query by query: design [1, k_j - q_i], weights p_ij, ridge on the slope only."""
        q, k, v = self.qkv(x)
        B, H, T, d = q.shape
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~causal_mask(T, x.device), float("-inf"))
        p = p.softmax(-1)
        pen = torch.diag(torch.cat([x.new_zeros(1), x.new_full((d,), self.cfg.ridge)]))
        out = torch.empty_like(v)
        for i in range(T):
            X = torch.cat([torch.ones_like(k[:, :, : i + 1, :1]), k[:, :, : i + 1] - q[:, :, i : i + 1]], dim=-1)
            W = p[:, :, i, : i + 1, None]  # (B, H, i+1, 1)
            beta = torch.linalg.solve(X.transpose(-1, -2) @ (W * X) + pen, X.transpose(-1, -2) @ (W * v[:, :, : i + 1]))
            out[:, :, i] = beta[:, :, 0]
        return self.out(out)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.heads * self.d * seq_len
