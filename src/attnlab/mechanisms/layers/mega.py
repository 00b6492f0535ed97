"""Mega: moving-average equipped gated attention (paper L190).

A single-head attention whose queries and keys come from a damped multi-dimensional EMA of the input (local,
position-aware smoothing), wrapped in gates:

    EMA per channel with N dims:  h_t = a * (b x_t) + (1 - a * delta) * h_{t-1},   EMA(X)_t = eta . h_t
    X' = SiLU(EMA(X))
    Z  = SiLU(X' W_z + b_z);   Q = kappa_q * Z + mu_q;   K = kappa_k * Z + mu_k;   V = SiLU(X W_v + b_v)
    O  = softmax(Q K^T / sqrt(z) + mask) V
    gamma = SiLU(X' W_g + b_g);  phi = sigmoid(X' W_f + b_f);  H = SiLU(X' W_h + (gamma * O) U_h + b_h)
    Y  = phi * H + (1 - phi) * X

``a = sigmoid(alpha)``, ``delta = sigmoid(delta')`` keep the EMA stable. The EMA runs through the shared
kernel ``attnlab.core.linear.ema`` (causal FFT convolution, carrying its ``(B, dim, N)`` state between
decoding calls); attention goes through ``attnlab.attention``. Cost: ``O(T log T * dim * N)`` for the
EMA plus single-head attention of width ``z_dim``. Deviations: no relative-position bias and no chunked
(linear-time) variant; with ``causal=False`` the attention is bidirectional but the EMA stays forward-only.
``Y`` contains the paper's own gated residual to ``X``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.linear import ema

from ...core.checks import positive_int
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register


@dataclass(frozen=True)
class MegaConfig(HeadsConfig):
    """One head of width z_dim over the EMA-smoothed input; z_dim, v_dim, ema_dim: see the module docstring."""

    dim: int = 64
    heads: int = 1
    z_dim: int = 32  # width of the shared query/key representation
    v_dim: int | None = None  # value width (None: 2 * dim, as in the paper)
    ema_dim: int = 4  # N: EMA dimensions per channel

    fixed = ("heads", "kv_heads", "head_dim", "rope", "rope_base")  # a single head; positions from the EMA

    def validate(self) -> None:
        for f in ("z_dim", "ema_dim"):
            positive_int(f, getattr(self, f))
        if self.v_dim is not None:
            positive_int("v_dim", self.v_dim)


@register("mega", family="layers", papers=("L190",), year=2022, config=MegaConfig,
          summary="damped multi-dimensional EMA feeding single-head gated attention")
class MegaAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): its own projections (EMA, gates) and op ``sdpa`` on one head. The decoding
    cache holds the head's keys/values plus the EMA state ``(B, dim, N)`` (``state["ema"]``)."""

    def __init__(self, cfg: MegaConfig) -> None:
        super().__init__(cfg, proj="")
        D, N, z = cfg.dim, cfg.ema_dim, cfg.z_dim
        v = cfg.v_dim or 2 * D
        self.alpha = nn.Parameter(torch.randn(D, N) * 0.5)
        self.delta = nn.Parameter(torch.randn(D, N) * 0.5)
        self.beta = nn.Parameter(torch.randn(D, N) * 0.5)
        self.eta = nn.Parameter(torch.randn(D, N) * N ** -0.5)
        self.z_proj = nn.Linear(D, z)
        self.kappa = nn.Parameter(torch.ones(2, z))  # rows: query, key
        self.mu = nn.Parameter(torch.zeros(2, z))
        self.v_proj = nn.Linear(D, v)
        self.g_proj = nn.Linear(D, v)  # gamma
        self.f_proj = nn.Linear(D, D)  # phi (update gate)
        self.h_proj = nn.Linear(D, D)  # W_h, b_h
        self.u_proj = nn.Linear(v, D, bias=False)  # U_h

    def state_size(self, seq_len: int) -> int:
        return (self.cfg.z_dim + (self.cfg.v_dim or 2 * self.dim)) * seq_len + self.dim * self.cfg.ema_dim

    def _qkv(self, x: Tensor, x_ema: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xp = F.silu(x_ema)
        z = F.silu(self.z_proj(xp))
        q, k = self.kappa[0] * z + self.mu[0], self.kappa[1] * z + self.mu[1]
        return xp, q, k, F.silu(self.v_proj(x))

    def _gate(self, x: Tensor, xp: Tensor, o: Tensor) -> Tensor:
        gamma, phi = F.silu(self.g_proj(xp)), torch.sigmoid(self.f_proj(xp))
        h = F.silu(self.h_proj(xp) + self.u_proj(gamma * o))
        return phi * h + (1 - phi) * x

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        state = None if cache is None else cache.state.get("ema")
        a, d = torch.sigmoid(self.alpha), torch.sigmoid(self.delta)
        x_ema, new_state = ema(x, a, d, self.eta * self.beta, state=state)  # beta folds into eta (linear)
        xp, q, k, v = self._qkv(x, x_ema)
        q, k, v = q[:, None], k[:, None], v[:, None]  # one head
        if cache is not None:
            cache.state["ema"] = new_state
            k, v = cache.kv.append(k, v)
        o = self.spec(q, k, v, scale=self.cfg.z_dim**-0.5, q_offset=start, causal=self.causal)[:, 0]
        return self._gate(x, xp, o)

    def reference(self, x: Tensor) -> Tensor:
        """The EMA as its recurrence, step by step; attention with the score matrix materialized."""
        B, T, D = x.shape
        a, d = torch.sigmoid(self.alpha), torch.sigmoid(self.delta)
        h = x.new_zeros(B, D, self.cfg.ema_dim)
        ys = []
        for t in range(T):
            h = a * (self.beta * x[:, t, :, None]) + (1 - a * d) * h
            ys.append((self.eta * h).sum(-1))
        xp, q, k, v = self._qkv(x, torch.stack(ys, dim=1))
        s = q @ k.transpose(-1, -2) / self.cfg.z_dim ** 0.5
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self._gate(x, xp, torch.softmax(s, dim=-1) @ v)
