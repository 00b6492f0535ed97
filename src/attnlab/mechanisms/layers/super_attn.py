"""Super Attention (paper L156, "You Need to Pay Better Attention").

Efficient Attention plus a learned alignment kernel ``W_A`` (``max_len x max_len``, shared by the heads) that
mixes the values along the sequence, "from the left":

    Q_i = X W_Q^i,   K_i = X_i,   V_i = W_A X_i
    out = concat_i softmax(Q_i X_i^T / sqrt(d) + mask) V_i  W_O

Causal use keeps ``W_A`` lower-triangular (value ``t`` mixes inputs ``<= t`` only); a sequence shorter than
``max_len`` uses the top-left block. ``W_A`` starts as the identity (Efficient Attention). Parameters:
``2 dim^2 + max_len^2``. Fast path: one matmul for the values, then SDPA; the cache holds the input slices
(the keys) and the mixed values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ..common import split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register


@dataclass(frozen=True)
class SuperAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    max_len: int = 1024  # size of the alignment kernel: the longest sequence the layer accepts

    fixed = ("kv_heads", "head_dim", "rope", "rope_base")

    def validate(self) -> None:
        positive_int("max_len", self.max_len)


@register("super_attn", family="layers", papers=("L156",), year=2024, config=SuperAttnConfig,
          summary="efficient attention plus a learned max_len x max_len kernel mixing the values")
class SuperAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): the aligned values, then op ``sdpa``. The decoding cache holds the input slices
    (the keys) and the mixed values."""

    length_option = "max_len"  # the config option bounding the sequence length (benchmarks size it)

    def __init__(self, cfg: SuperAttnConfig) -> None:
        super().__init__(cfg, proj="qo")
        self.align = nn.Parameter(torch.eye(cfg.max_len))  # W_A

    def _kernel(self, rows: slice, cols: int) -> Tensor:
        w = self.align[rows, :cols]
        if self.causal:
            r = torch.arange(rows.start, rows.stop, device=w.device)[:, None]
            w = w * (torch.arange(cols, device=w.device)[None, :] <= r).to(w.dtype)
        return w

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim); T (plus cached positions) at most max_len."""
        start = self.check_cache(x, cache)
        T = x.shape[1]
        if start + T > self.cfg.max_len:
            raise ValueError(f"super_attn: {start + T} positions exceed max_len={self.cfg.max_len}")
        q, xh = split_heads(self.q_proj(x), self.heads), split_heads(x, self.heads)
        if cache is None:
            k, v = xh, self._kernel(slice(0, T), T) @ xh
        else:  # new value rows mix the cached inputs (the keys) and the new ones
            w = self._kernel(slice(start, start + T), start + T)
            v_new = w[:, start:] @ xh
            if start:
                v_new = v_new + w[:, :start] @ cache.state["keys"]
            k, v = cache.kv.append(xh, v_new)
            cache.state["keys"] = k  # a view of the cached inputs
        return self.out(self.attend(q, k, v, start, None if cache is None else cache.state))

    def reference(self, x: Tensor) -> Tensor:
        """Head by head, with W_A applied to each head's input slice as a (T, T) matrix product."""
        T, d = x.shape[1], self.head_dim
        A = self.align[:T, :T]
        if self.causal:
            A = A * torch.ones(T, T, dtype=x.dtype, device=x.device).tril()
        heads = []
        for i in range(self.heads):
            rows = slice(i * d, (i + 1) * d)
            xi = x[..., rows]
            s = (x @ self.q_proj.weight[rows].T) @ xi.transpose(-1, -2) / d ** 0.5
            if self.causal:
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
            heads.append(torch.softmax(s, dim=-1) @ (A @ xi))
        return self.o_proj(torch.cat(heads, dim=-1))
