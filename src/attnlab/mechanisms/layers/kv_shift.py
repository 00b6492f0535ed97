"""KV shifting attention (paper L121, "KV Shifting Attention Enhances Language Modeling").

Each head mixes its key and value at position ``t`` with those of position ``t - 1`` by learned weights,
then runs ordinary causal softmax attention:

    k'_t = a1 k_t + a2 k_{t-1}      v'_t = b1 v_t + b2 v_{t-1}      (k_{-1} = v_{-1} = 0)
    out  = softmax(q k'^T / sqrt(d) + causal mask) v'

so one layer can match "the token after an earlier copy of me" (an induction head) without a second layer.
RoPE (if on) rotates the mixed key at its own position ``t``. The shift is free next to attention, and the
attention itself goes through ``attnlab.attention`` (SDPA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.patterns import Causal
from attnlab.core.reference import reference_attention

from ..common import apply_rope, split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register


@dataclass(frozen=True)
class KVShiftConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True

    fixed = ("kv_heads", "head_dim")


@register("kv_shift", family="layers", papers=("L121",), year=2024, config=KVShiftConfig,
          summary="keys and values mixed with the previous position's by learned per-head weights")
class KVShiftAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): the shift, RoPE on the mixed keys, then op ``sdpa``. The decoding cache holds
    the mixed keys/values plus the last raw key and value (``state["last_k"]``, ``state["last_v"]``)."""

    def __init__(self, cfg: KVShiftConfig) -> None:
        super().__init__(cfg)
        init = torch.tensor([1.0, 0.0]).repeat(cfg.heads, 1)  # (H, 2): starts as plain attention
        self.alpha = nn.Parameter(init.clone())  # key mix (current, previous)
        self.beta = nn.Parameter(init.clone())  # value mix

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * (seq_len + 1)  # mixed keys/values plus the last raw key and value

    def _mix(self, w: Tensor, cur: Tensor, prev: Tensor) -> Tensor:
        return w[:, 0].view(1, -1, 1, 1) * cur + w[:, 1].view(1, -1, 1, 1) * prev

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Unrotated q, k, v: RoPE goes after the shift."""
        return tuple(split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        carried = cache is not None and "last_k" in cache.state
        first_k = cache.state["last_k"] if carried else torch.zeros_like(k[:, :, :1])
        first_v = cache.state["last_v"] if carried else torch.zeros_like(v[:, :, :1])
        k_prev = torch.cat([first_k, k[:, :, :-1]], dim=2)
        v_prev = torch.cat([first_v, v[:, :, :-1]], dim=2)
        k2, v2 = self._mix(self.alpha, k, k_prev), self._mix(self.beta, v, v_prev)
        if self.cfg.rope:
            q, k2 = self.rotate(q, start), self.rotate(k2, start)
        if cache is not None:
            cache.state["last_k"], cache.state["last_v"] = k[:, :, -1:], v[:, :, -1:]
            k2, v2 = cache.kv.append(k2, v2)
        return self.out(self.attend(q, k2, v2, start, None if cache is None else cache.state))

    def reference(self, x: Tensor) -> Tensor:
        """Shift by zero-padding one step in time, then the dense oracle."""
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        k_prev = F.pad(k, (0, 0, 1, 0))[:, :, :-1]
        v_prev = F.pad(v, (0, 0, 1, 0))[:, :, :-1]
        k2 = self.alpha[:, 0, None, None] * k + self.alpha[:, 1, None, None] * k_prev
        v2 = self.beta[:, 0, None, None] * v + self.beta[:, 1, None, None] * v_prev
        if self.cfg.rope:
            pos = torch.arange(x.shape[1], device=x.device)
            q, k2 = apply_rope(q, pos), apply_rope(k2, pos)
        out = reference_attention(q, k2, v2, Causal() if self.causal else None, dtype=x.dtype)
        return self.out(out)
