"""Multi-Token Attention (paper L154): convolutions over the score map and across heads.

A weight can depend on several nearby queries and keys: before the softmax each head convolves its score map
over (query, key) with a learned ``query_kernel x key_kernel`` filter; after the softmax, heads in groups of
``head_kernel`` are mixed by a learned matrix:

    S^h_ij  = q_i . k_j / sqrt(d), set to 0 where key j is not visible to query i
    C^h_ij  = sum_{a=0}^{cq-1} sum_{b=-(ck//2)}^{ck//2} theta^h_{a,b} S^h_{i-a, j+b}      (0 outside the map)
    A^h     = softmax_j(C^h_ij masked to visible keys)
    out^h   = (sum_{h' in group(h)} w_{h h'} A^{h'}) v^{h'}

Causal-safe: the query taps look only back (``a >= 0``) and masked scores are zeroed before the convolution,
so no score of a later key enters; decoding keeps the last ``cq - 1`` queries. The kernels start as the
identity (plain attention). Cost: the score map is materialized (``H x T x T``) plus ``cq * ck`` multiply-adds
per score. Deviation: the paper's group normalization after the head mix is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register
from ._scored import visible


@dataclass(frozen=True)
class MTAConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    query_kernel: int = 3  # cq: this and the cq - 1 previous queries
    key_kernel: int = 3  # ck (odd): keys j - ck//2 .. j + ck//2
    head_kernel: int = 2  # heads mixed per group (1: no mixing)

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        for f in ("query_kernel", "key_kernel", "head_kernel"):
            positive_int(f, getattr(self, f))
        if self.key_kernel % 2 == 0:
            raise ValueError(f"mta: key_kernel must be odd (centred on the key), got {self.key_kernel}")
        if self.heads % self.head_kernel:
            raise ValueError(f"mta: heads={self.heads} is not divisible by head_kernel={self.head_kernel}")


@register("mta", family="layers", papers=("L154",), year=2025, config=MTAConfig,
          summary="key-query convolution over the score map and head-mixing convolution")
class MultiTokenAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); the decoding cache holds keys/values plus the last ``query_kernel - 1``
    queries (``state["q_hist"]``, the query taps of the next rows)."""

    def __init__(self, cfg: MTAConfig) -> None:
        super().__init__(cfg)
        cq, ck, g = cfg.query_kernel, cfg.key_kernel, cfg.head_kernel
        theta = torch.zeros(cfg.heads, cq, ck)
        theta[:, 0, ck // 2] = 1.0  # identity tap: the query itself, the key itself
        self.theta = nn.Parameter(theta)  # theta[h, a, b + ck//2]: query lag a, key offset b
        self.head_mix = nn.Parameter(torch.eye(g).repeat(cfg.heads // g, 1, 1))  # (groups, g, g)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len + self.dim * min(seq_len, self.cfg.query_kernel - 1)

    def _mix_heads(self, a: Tensor) -> Tensor:
        B, H, T, Tk = a.shape
        g = self.cfg.head_kernel
        mixed = torch.einsum("nij,bnjqk->bniqk", self.head_mix, a.view(B, H // g, g, T, Tk))
        return mixed.reshape(B, H, T, Tk)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        B, H, T, _ = q.shape
        cq, ck = self.cfg.query_kernel, self.cfg.key_kernel
        prev = q[:, :, :0] if cache is None or "q_hist" not in cache.state else cache.state["q_hist"]
        if cache is not None:
            k, v = cache.kv.append(k, v)
            cache.state["q_hist"] = torch.cat([prev, q], dim=2)[:, :, max(0, prev.shape[2] + T - (cq - 1)):]
        P, Tk = prev.shape[2], k.shape[2]
        qe = torch.cat([prev, q], dim=2)  # queries at positions start - P .. start + T - 1
        s = (qe @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        s = s.masked_fill(~visible(P + T, Tk, start - P, self.causal, x.device), 0.0)
        s = F.pad(s, (0, 0, cq - 1 - P, 0))  # queries before position 0: zero rows
        # conv2d correlates: weight row r multiplies query lag cq - 1 - r, so flip the query axis of theta
        c = F.conv2d(s, self.theta.flip(1).unsqueeze(1), padding=(0, ck // 2), groups=H)  # (B, H, T, Tk)
        a = torch.softmax(c.masked_fill(~visible(T, Tk, start, self.causal, x.device), float("-inf")), dim=-1)
        return self.out(self._mix_heads(a) @ v)

    def reference(self, x: Tensor) -> Tensor:
        """Each convolution tap as an explicitly shifted copy of the score map; head mixing head by head."""
        q, k, v = self.project(x, 0)
        B, H, T, _ = q.shape
        cq, ck, g = self.cfg.query_kernel, self.cfg.key_kernel, self.cfg.head_kernel
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5 * allowed
        c = torch.zeros_like(s)
        for a in range(cq):
            for b in range(-(ck // 2), ck // 2 + 1):
                shifted = torch.zeros_like(s)  # shifted[i, j] = s[i - a, j + b] where both exist
                j0, j1 = max(0, -b), min(T, T - b)
                shifted[:, :, a:, j0:j1] = s[:, :, : T - a, j0 + b : j1 + b]
                c = c + self.theta[:, a, b + ck // 2].view(1, H, 1, 1) * shifted
        w = torch.softmax(c.masked_fill(~allowed, float("-inf")), dim=-1)
        mixed = torch.zeros_like(w)
        for h in range(H):
            grp, i = divmod(h, g)
            for j in range(g):
                mixed[:, h] = mixed[:, h] + self.head_mix[grp, i, j] * w[:, grp * g + j]
        return self.out(mixed @ v)
