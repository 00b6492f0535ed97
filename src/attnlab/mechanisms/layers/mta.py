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

The op ``mta`` takes the kernels as tensor options: ``theta`` (H, query_kernel, key_kernel) and ``head_mix``
(H / head_kernel, head_kernel, head_kernel) (the layer passes its learned ones). Parameter-free defaults (None):
the box filter (every tap ``1 / (query_kernel * key_kernel)``: each score becomes the mean of its neighbourhood
in the masked score map) and the uniform head mix (``1 / head_kernel``). With all three sizes 1 the op is dense
softmax attention. Decoding: ``state["q_hist"]`` keeps the last ``query_kernel - 1`` queries; rows before the
first query seen count as zero. A free mask is refused (the convolution reads the scores of neighbouring keys
and earlier queries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.softmax import masked_softmax
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._scored import dense_allowed, grouped_apply, grouped_scores, per_head, repeat_kv, visible


def _kernels(q: Tensor, query_kernel: int, key_kernel: int, head_kernel: int, theta: Tensor | None,
             head_mix: Tensor | None) -> tuple[Tensor, Tensor]:
    """Checked sizes; the score kernel (H, cq, ck) and the head mix (H / g, g, g), defaults filled."""
    H = q.shape[1]
    cq, ck, g = (positive_int(n, x) for n, x in (("query_kernel", query_kernel), ("key_kernel", key_kernel),
                                                 ("head_kernel", head_kernel)))
    if ck % 2 == 0:
        raise ValueError(f"mta: key_kernel must be odd (centred on the key), got {ck}")
    if H % g:
        raise ValueError(f"mta: heads={H} is not divisible by head_kernel={g}")
    th = per_head("theta", theta, (H, cq, ck), q)
    mix = per_head("head_mix", head_mix, (H // g, g, g), q)
    th = torch.full((H, cq, ck), 1.0 / (cq * ck), dtype=q.dtype, device=q.device) if th is None else th
    mix = torch.full((H // g, g, g), 1.0 / g, dtype=q.dtype, device=q.device) if mix is None else mix
    return th, mix


def _mta_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   causal: bool = True, query_kernel: int = 1, key_kernel: int = 1, head_kernel: int = 1,
                   theta: Tensor | None = None, head_mix: Tensor | None = None) -> Tensor:
    """Float64: each convolution tap as an explicitly shifted copy of the score map (rows before the first query
    zero); head mixing head by head."""
    if mask is not None:
        raise ValueError("op 'mta': a free mask is not supported")
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    qd = q.double()
    th, mix = _kernels(qd, query_kernel, key_kernel, head_kernel, theta, head_mix)
    cq, ck, g = th.shape[1], th.shape[2], mix.shape[-1]
    ok = dense_allowed(Tq, Tk, q_offset, causal, None, q.device)
    s = torch.einsum("bhid,bhjd->bhij", qd, repeat_kv(k.double(), H)) * scale * ok
    c = torch.zeros_like(s)
    for a in range(cq):
        for b in range(-(ck // 2), ck // 2 + 1):
            shifted = torch.zeros_like(s)  # shifted[i, j] = s[i - a, j + b] where both exist
            j0, j1 = max(0, -b), min(Tk, Tk - b)
            if a < Tq and j0 < j1:
                shifted[:, :, a:, j0:j1] = s[:, :, : Tq - a, j0 + b : j1 + b]
            c = c + th[:, a, b + ck // 2].view(1, H, 1, 1) * shifted
    w = masked_softmax(c, ok)
    mixed = torch.zeros_like(w)
    for h in range(H):
        grp, i = divmod(h, g)
        for j in range(g):
            mixed[:, h] = mixed[:, h] + mix[grp, i, j] * w[:, grp * g + j]
    return mixed @ repeat_kv(v.double(), H)


@register_op("mta", family="dense", papers=("L154",), summary="multi-token attention: key-query convolution over "
             "the score map and head-mixing convolution", options={"causal": True, "query_kernel": 1,
             "key_kernel": 1, "head_kernel": 1, "theta": None, "head_mix": None}, reference=_mta_reference,
             dense_options={"query_kernel": 1, "key_kernel": 1, "head_kernel": 1},
             example={"query_kernel": 2, "key_kernel": 3, "head_kernel": 2})
def mta_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
           state: dict | None = None, causal: bool = True, query_kernel: int = 1, key_kernel: int = 1,
           head_kernel: int = 1, theta: Tensor | None = None,
           head_mix: Tensor | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). The score map is
    materialized; the query taps read ``state["q_hist"]`` (the previous ``query_kernel - 1`` queries) when decoding."""
    if mask is not None:
        raise ValueError("op 'mta': a free mask is not supported (the convolution reads neighbouring scores)")
    th, mix = _kernels(q, query_kernel, key_kernel, head_kernel, theta, head_mix)
    B, H, T, _ = q.shape
    cq, ck, g = th.shape[1], th.shape[2], mix.shape[-1]
    prev = q[:, :, :0] if state is None or "q_hist" not in state else state["q_hist"]
    if state is not None:
        state["q_hist"] = torch.cat([prev, q], dim=2)[:, :, max(0, prev.shape[2] + T - (cq - 1)):]
    P, Tk = prev.shape[2], k.shape[2]
    qe = torch.cat([prev, q], dim=2)  # queries at positions q_offset - P .. q_offset + T - 1
    s = grouped_scores(qe, k) * scale
    s = s.masked_fill(~visible(P + T, Tk, q_offset - P, causal, q.device), 0.0)
    s = F.pad(s, (0, 0, cq - 1 - P, 0))  # queries before the first one seen: zero rows
    # conv2d correlates: weight row r multiplies query lag cq - 1 - r, so flip the query axis of theta
    c = F.conv2d(s, th.flip(1).unsqueeze(1), padding=(0, ck // 2), groups=H)  # (B, H, T, Tk)
    a = masked_softmax(c, visible(T, Tk, q_offset, causal, q.device))
    a = torch.einsum("nij,bnjqk->bniqk", mix, a.view(B, H // g, g, T, Tk)).reshape(B, H, T, Tk)
    out = grouped_apply(a, v)
    return out if state is None else (out, state)


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
    """(B, T, dim) -> (B, T, dim): projections + the op ``mta`` with the learned kernels; the decoding cache holds
    keys/values plus the last ``query_kernel - 1`` queries (``state["q_hist"]``, the query taps of the next rows)."""

    op = "mta"

    def __init__(self, cfg: MTAConfig) -> None:
        super().__init__(cfg)
        cq, ck, g = cfg.query_kernel, cfg.key_kernel, cfg.head_kernel
        theta = torch.zeros(cfg.heads, cq, ck)
        theta[:, 0, ck // 2] = 1.0  # identity tap: the query itself, the key itself
        self.theta = nn.Parameter(theta)  # theta[h, a, b + ck//2]: query lag a, key offset b
        self.head_mix = nn.Parameter(torch.eye(g).repeat(cfg.heads // g, 1, 1))  # (groups, g, g)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len + self.dim * min(seq_len, self.cfg.query_kernel - 1)

    def op_options(self) -> dict:
        return {**super().op_options(), "theta": self.theta, "head_mix": self.head_mix}

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
        w = masked_softmax(c, allowed)
        mixed = torch.zeros_like(w)
        for h in range(H):
            grp, i = divmod(h, g)
            for j in range(g):
                mixed[:, h] = mixed[:, h] + self.head_mix[grp, i, j] * w[:, grp * g + j]
        return self.out(mixed @ v)
