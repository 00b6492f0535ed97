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

from attnlab.core.attention import attention
from attnlab.core.cache import KVCache
from attnlab.core.patterns import Causal

from ..common import split_heads
from ..registry import register
from ._scored import ProjectedAttention, check_config, check_positive


@dataclass(frozen=True)
class SuperAttnConfig:
    dim: int = 64
    heads: int = 4
    causal: bool = True
    max_len: int = 1024  # size of the alignment kernel: the longest sequence the layer accepts

    def __post_init__(self) -> None:
        check_config("super_attn", self.dim, self.heads)
        check_positive("super_attn", "max_len", self.max_len)


class SuperCache:
    """Input slices (the keys) and mixed values so far; ``keys`` is a view of the cached inputs."""

    def __init__(self) -> None:
        self.kv = KVCache()
        self.keys: Tensor | None = None

    @property
    def length(self) -> int:
        return self.kv.length


@register("super_attn", family="layers", papers=("L156",), year=2024, config=SuperAttnConfig,
          summary="efficient attention plus a learned max_len x max_len kernel mixing the values")
class SuperAttention(ProjectedAttention):
    def __init__(self, cfg: SuperAttnConfig) -> None:
        super().__init__(cfg.dim, cfg.heads, cfg.causal, proj="q")
        self.cfg = cfg
        self.align = nn.Parameter(torch.eye(cfg.max_len))  # W_A

    def init_cache(self, batch: int = 1) -> SuperCache:
        super().init_cache(batch)
        return SuperCache()

    def _kernel(self, rows: slice, cols: int) -> Tensor:
        w = self.align[rows, :cols]
        if self.causal:
            r = torch.arange(rows.start, rows.stop, device=w.device)[:, None]
            w = w * (torch.arange(cols, device=w.device)[None, :] <= r).to(w.dtype)
        return w

    def forward(self, x: Tensor, cache=None) -> Tensor:
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
            if cache.keys is not None:
                v_new = v_new + w[:, :start] @ cache.keys
            k, v = cache.kv.append(xh, v_new)
            cache.keys = k
        return self.out(attention(q, k, v, Causal() if self.causal else None))

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
