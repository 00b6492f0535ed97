"""ComplexFormer: head-specific complex-vector attention (paper L78, CMHA).

Each head reads its query/key as ``d/2`` complex numbers (first half real, second half imaginary), in polar
form ``r e^{i theta}`` (the "Euler transformation"). The score of query ``m`` and key ``n`` is

    S_mn = sum_f r_q,f r_k,f cos( gamma_h (theta_q,f - theta_k,f) + lambda_h omega_f (m - n) ) / sqrt(d)

-- a semantic angle difference adapted per head by ``gamma_h`` plus a relative-position rotation at a
per-head rate ``lambda_h`` (``omega_f`` are RoPE's frequencies). With gamma = lambda = 1 it is exactly RoPE
attention. Because the angle is linear in each side, ``S`` is the real dot product of
``r (cos, sin)(gamma theta + lambda omega pos)`` vectors: the fast path maps q and k once and runs SDPA.
Deviation: the paper's ``Adapt(.)`` is a learned per-head map of the angle difference; here it is a
learned per-head scale, the choice that keeps the score a dot product (and so SDPA and a KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..common import positions_for
from ..heads import HeadsConfig, OpLayer
from ..registry import register


@dataclass(frozen=True)
class ComplexFormerConfig(HeadsConfig):
    """rope_base: frequency base of omega_f, as in RoPE (the layer's own rotation replaces ``rope``)."""

    dim: int = 64
    heads: int = 4

    fixed = ("kv_heads", "head_dim", "rope")
    renamed = {"base": "rope_base"}

    def validate(self) -> None:
        if self.d % 2:
            raise ValueError(f"complexformer: head dim {self.d} (dim / heads) must be even (complex pairs)")


@register("complexformer", family="layers", papers=("L78",), year=2025, config=ComplexFormerConfig,
          summary="polar complex q/k; per-head adaptive angle difference plus per-head relative rotation")
class ComplexFormerAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): q and k mapped to their polar form once, then op ``sdpa``."""

    def __init__(self, cfg: ComplexFormerConfig) -> None:
        super().__init__(cfg)
        self.gamma = nn.Parameter(torch.ones(cfg.heads))  # semantic angle adaptation
        self.lam = nn.Parameter(torch.ones(cfg.heads))  # relative-position rotation rate

    def _omega(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        F_ = self.head_dim // 2
        return self.cfg.rope_base ** (-torch.arange(F_, dtype=dtype, device=device) * 2 / self.head_dim)

    def _euler(self, t: Tensor, pos: Tensor) -> Tensor:
        """(B, H, T, d) real -> (B, H, T, d) = r (cos phi, sin phi), phi = gamma theta + lambda omega pos."""
        a, b = t.chunk(2, dim=-1)
        r, theta = torch.sqrt(a * a + b * b), torch.atan2(b, a)
        om = self._omega(t.dtype, t.device)
        phi = self.gamma.view(1, -1, 1, 1) * theta + self.lam.view(1, -1, 1, 1) * (
            pos.to(t.dtype).view(1, 1, -1, 1) * om
        )
        return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], dim=-1)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        pos = positions_for(x, start)
        q, k = self._euler(q, pos), self._euler(k, pos)
        if cache is not None:
            k, v = cache.kv.append(k, v)
        return self.out(self.attend(q, k, v, start, None if cache is None else cache.state))

    def reference(self, x: Tensor) -> Tensor:
        """Complex pairs (m, n): S = Re sum_f r_q r_k exp(i(gamma dtheta + lambda omega (m - n)))."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        zq = torch.complex(*q.chunk(2, dim=-1))  # (B, H, T, F)
        zk = torch.complex(*k.chunk(2, dim=-1))
        dtheta = zq.angle()[:, :, :, None, :] - zk.angle()[:, :, None, :, :]  # (B, H, T, T, F)
        pos = torch.arange(T, dtype=x.dtype, device=x.device)
        dpos = (pos[:, None] - pos[None, :])[None, None, :, :, None] * self._omega(x.dtype, x.device)
        angle = self.gamma.view(1, -1, 1, 1, 1) * dtheta + self.lam.view(1, -1, 1, 1, 1) * dpos
        mag = zq.abs()[:, :, :, None, :] * zk.abs()[:, :, None, :, :]
        s = torch.real(torch.polar(mag, angle)).sum(-1) / self.head_dim ** 0.5
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self.out(torch.softmax(s, dim=-1) @ v)
