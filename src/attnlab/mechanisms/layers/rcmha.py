"""RCMHA: relative convolutional multi-head attention (paper L68).

Two changes to multi-head attention: (1) a depth-wise convolution along the sequence on the query, key and
value projections (each channel its own ``conv_kernel``-tap filter, causal: taps look back only), and (2) a
Transformer-XL style relative position term in the score:

    q, k, v = DWConv(X W_q), DWConv(X W_k), DWConv(X W_v)
    S_ij    = ((q_i + u_h) . k_j + (q_i + w_h) . p_{i-j}) / sqrt(d),   p_delta = W_R sinusoid(delta)
    out     = softmax(S + mask) v

``u_h``, ``w_h`` are learned per-head content and position biases. Fast path: the content term goes
through ``attnlab.attention`` (SDPA) with ``q + u``; the position term is ``(q + w)`` against one projected
sinusoid per distance (``T + Tk - 1`` of them, not ``T x Tk``), gathered into an additive bias. The
convolution starts as the identity. Deviation: the convolution is causal also when ``causal=False``.

The convolution belongs to the projections (the layer's own code); the score is the op ``rcmha``, which takes the
learned parameters as tensor options: ``u``, ``w`` (H, d) and ``pos_proj`` = ``W_R`` (H d, H d) (the layer passes
its own). Parameter-free defaults (None): ``u = w = 0`` and ``W_R = I``, i.e. ``S_ij = (q_i . k_j + q_i .
sinusoid(i - j)_h) / sqrt(d)`` with the raw sinusoid of width ``H d`` split over the heads (``H d`` even).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.attention import attention
from attnlab.core.patterns import Causal, Full
from attnlab.core.score_mods import Bias
from attnlab.core.softmax import masked_softmax
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..common import split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register
from ._scored import check_free_mask, dense_allowed, per_head, repeat_kv


@dataclass(frozen=True)
class RCMHAConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    conv_kernel: int = 3  # taps of the depth-wise convolution (this position and conv_kernel - 1 before it)

    fixed = ("kv_heads", "head_dim", "rope", "rope_base")  # positions: the relative term

    def validate(self) -> None:
        if self.dim % 2:
            raise ValueError(f"rcmha: dim must be even (sinusoid pairs), got {self.dim}")
        positive_int("conv_kernel", self.conv_kernel)


def sinusoid(delta: Tensor, dim: int) -> Tensor:
    """(n,) signed distances -> (n, dim): [sin(delta w_f), cos(delta w_f)], w_f = 10000^(-2f/dim)."""
    w = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=delta.dtype, device=delta.device) / dim)
    ang = delta[:, None] * w[None, :]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def _rel_params(q: Tensor, u: Tensor | None, w: Tensor | None, pos_proj: Tensor | None):
    """u, w (H, d) and W_R (H d, H d) checked, defaults filled (0, 0, identity)."""
    H, d = q.shape[1], q.shape[-1]
    if (H * d) % 2:
        raise ValueError(f"op 'rcmha': heads * head_dim must be even (sinusoid pairs), got {H * d}")
    u, w = per_head("u", u, (H, d), q), per_head("w", w, (H, d), q)
    wr = per_head("pos_proj", pos_proj, (H * d, H * d), q)
    zero = q.new_zeros(H, d)
    return (zero if u is None else u), (zero if w is None else w), wr


def _positions(delta: Tensor, H: int, d: int, wr: Tensor | None) -> Tensor:
    """Signed distances (n,) -> projected sinusoids per head (H, n, d)."""
    p = sinusoid(delta, H * d)
    p = p if wr is None else p @ wr.t()
    return split_heads(p[None], H)[0]


def _rcmha_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                     causal: bool = True, u: Tensor | None = None, w: Tensor | None = None,
                     pos_proj: Tensor | None = None) -> Tensor:
    """Float64: the relative embedding p_{i-j} materialized for every (i, j) pair, content + position scores,
    softmax over the allowed keys (zero rows when none)."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    qd = q.double()
    u, w, wr = _rel_params(qd, u, w, pos_proj)
    i = torch.arange(Tq, dtype=torch.float64, device=q.device) + q_offset
    j = torch.arange(Tk, dtype=torch.float64, device=q.device)
    p = _positions((i[:, None] - j[None, :]).reshape(-1), H, d, wr).view(H, Tq, Tk, d)  # p[h, i, j]: distance i - j
    content = torch.einsum("bhid,bhjd->bhij", qd + u[None, :, None], repeat_kv(k.double(), H))
    position = torch.einsum("bhid,hijd->bhij", qd + w[None, :, None], p)
    s = (content + position) * scale
    a = masked_softmax(s, dense_allowed(Tq, Tk, q_offset, causal, mask, q.device))
    return a @ repeat_kv(v.double(), H)


@register_op("rcmha", family="dense", papers=("L68",), summary="Transformer-XL relative position scores "
             "((q + u).k + (q + w).p_{i-j}); the layer adds depth-wise convolutions on q/k/v",
             options={"causal": True, "u": None, "w": None, "pos_proj": None}, reference=_rcmha_reference)
def rcmha_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
             state: dict | None = None, causal: bool = True, u: Tensor | None = None, w: Tensor | None = None,
             pos_proj: Tensor | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, d) at positions q_offset.. over k, v (B, Hkv, Tk, d) -> (B, H, Tq, Dv). The content term goes
    through ``attnlab.attention`` with ``q + u``; the position term is ``(q + w)`` against one projected sinusoid
    per distance (``Tq + Tk - 1`` of them, not ``Tq x Tk``), gathered into an additive bias. Stateless."""
    check_free_mask("rcmha", mask, q, k)
    B, H, T, d = q.shape
    Tk = k.shape[2]
    u, w, wr = _rel_params(q, u, w, pos_proj)
    # distances q_offset + i - j for i < T, j < Tk run from q_offset - Tk + 1 to q_offset + T - 1
    delta = torch.arange(q_offset - Tk + 1, q_offset + T, device=q.device, dtype=q.dtype)
    p = _positions(delta, H, d, wr)  # (H, n, d)
    rel = torch.einsum("bhid,hnd->bhin", q + w[None, :, None], p)  # (B, H, T, n)
    i, j = torch.arange(T, device=q.device), torch.arange(Tk, device=q.device)
    idx = i[:, None] - j[None, :] + Tk - 1  # column of distance q_offset + i - j in rel
    bias = rel.gather(-1, idx.expand(B, H, T, Tk))
    out = attention(q + u[None, :, None], k, v, Causal() if causal else Full(),
                    score_mod=Bias(bias * scale, q_offset=q_offset), scale=scale, q_offset=q_offset, mask=mask)
    return out if state is None else (out, state)


@register("rcmha", family="layers", papers=("L68",), year=2023, config=RCMHAConfig,
          summary="depth-wise conv on q/k/v plus Transformer-XL relative position scores")
class RCMHAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): depth-wise convolutions on the projections + the op ``rcmha`` with the learned
    ``u``, ``w`` and ``W_R``. The decoding cache holds keys/values plus the last ``conv_kernel - 1`` unconvolved
    projections (``state["tail"]``)."""

    op = "rcmha"

    def __init__(self, cfg: RCMHAConfig) -> None:
        super().__init__(cfg)
        conv = torch.zeros(3 * cfg.dim, cfg.conv_kernel)
        conv[:, -1] = 1.0  # identity: the last tap is the current position
        self.conv = nn.Parameter(conv)  # (3 dim, K) over [q | k | v] channels, taps oldest first
        self.pos_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)  # W_R
        self.u = nn.Parameter(torch.zeros(cfg.heads, self.head_dim))
        self.w = nn.Parameter(torch.zeros(cfg.heads, self.head_dim))

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * seq_len + 3 * self.dim * (self.cfg.conv_kernel - 1)

    def _raw(self, x: Tensor) -> Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, T, 3 dim)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        start = self.check_cache(x, cache)
        K = self.cfg.conv_kernel
        raw = self._raw(x)
        left = raw.new_zeros(raw.shape[0], K - 1, raw.shape[2])
        if cache is not None and "tail" in cache.state:
            left = torch.cat([left, cache.state["tail"]], dim=1)[:, -(K - 1):] if K > 1 else left
        ext = torch.cat([left, raw], dim=1)  # (B, K - 1 + T, 3 dim)
        if cache is not None:
            cache.state["tail"] = ext[:, ext.shape[1] - (K - 1):]
        conv = F.conv1d(ext.transpose(1, 2), self.conv.unsqueeze(1), groups=ext.shape[2]).transpose(1, 2)
        q, k, v = (split_heads(t, self.heads) for t in conv.split(self.dim, dim=-1))
        if cache is not None:
            k, v = cache.kv.append(k, v)
        o = self.spec(q, k, v, scale=self.head_dim ** -0.5, q_offset=start, **self.op_options())
        return self.out(o)

    def op_options(self) -> dict:
        return {**super().op_options(), "u": self.u, "w": self.w, "pos_proj": self.pos_proj.weight}

    def reference(self, x: Tensor) -> Tensor:
        """Convolution tap by tap, and the relative embedding p_{i-j} materialized for every (i, j) pair."""
        B, T, _ = x.shape
        K = self.cfg.conv_kernel
        raw = self._raw(x)
        conv = torch.zeros_like(raw)
        for lag in range(K):  # tap K - 1 - lag multiplies the input lag positions back
            shifted = torch.cat([raw.new_zeros(B, lag, raw.shape[2]), raw[:, : T - lag]], dim=1)
            conv = conv + self.conv[:, K - 1 - lag] * shifted
        q, k, v = (split_heads(t, self.heads) for t in conv.split(self.dim, dim=-1))
        pos = torch.arange(T, dtype=x.dtype, device=x.device)
        dist = pos[:, None] - pos[None, :]  # (T, T)
        p = self.pos_proj(sinusoid(dist.reshape(-1), self.dim)).view(1, T * T, self.dim)
        p = split_heads(p, self.heads).view(self.heads, T, T, self.head_dim)  # p[h, i, j]: distance i - j
        content = torch.einsum("bhid,bhjd->bhij", q + self.u[None, :, None], k)
        position = torch.einsum("bhid,hijd->bhij", q + self.w[None, :, None], p)
        s = (content + position) / self.head_dim ** 0.5
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self.out(torch.softmax(s, dim=-1) @ v)
