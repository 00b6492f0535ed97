"""Flow-Attention, causal form (Flowformer, R46).

Attention as flow from sources (keys, values) to sinks (queries) with capacities ``phi(q_i).phi(k_j)``,
``phi = sigmoid``. Causal: sink ``i`` sees sources ``j <= i`` and source ``j`` has sent to sinks ``l <= j``.

* incoming flow of a sink ``I_i = phi(q_i) . sum_{j<=i} phi(k_j)``; outgoing of a source ``O_j = phi(k_j) . sum_{l<=j} phi(q_l)``
* conservation: ``I^_i = phi(q_i) . sum_{j<=i} phi(k_j) / O_j`` and ``O^_j = phi(k_j) . sum_{l<=j} phi(q_l) / I_l``
* competition among sources: ``v^_j = j * softmax_{l<=j}(O^)_j * v_j`` (a causal softmax, scaled to mean 1)
* aggregation: ``A_i = phi(q_i) / I_i . sum_{j<=i} phi(k_j)^T v^_j``; allocation: ``R_i = sigmoid(I^_i) * A_i``.

All sums over the prefix are running sums (carried in the cache); the last one is the linear-attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..heads import LayerCache
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask


@dataclass(frozen=True)
class FlowformerConfig(LinearHeadsConfig):
    eps: float = 1e-6


def _prefix(x: Tensor, past: Tensor | None) -> Tensor:
    """Inclusive running sum over time (dim 2) continuing from ``past`` (B, H, ...)."""
    s = x.cumsum(2)
    return s if past is None else s + past[:, :, None]


@register(
    "flowformer",
    family="linear",
    papers=("R46",),
    year=2022,
    summary="Flow-Attention: flow-conservation normalization (source competition, sink allocation), causal",
    config=FlowformerConfig,
)
class FlowAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * (d^2 + 4 d + 1)`` numbers at any length. The aggregation
    is op ``linear`` (identity features, no denominator); the flow sums are running sums kept in the state."""

    op = "linear"

    def __init__(self, cfg: FlowformerConfig) -> None:
        super().__init__(cfg)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        eps = self.cfg.eps
        q, k, v = self.qkv(x)
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        st = cache.state if cache is not None else {}
        sum_k, sum_q = _prefix(k, st.get("sum_k")), _prefix(q, st.get("sum_q"))
        inc = (q * sum_k).sum(-1, keepdim=True) + eps  # I_i   (B, H, T, 1)
        out = (k * sum_q).sum(-1, keepdim=True) + eps  # O_j
        sum_k_o, sum_q_i = _prefix(k / out, st.get("sum_k_o")), _prefix(q / inc, st.get("sum_q_i"))
        inc_hat = (q * sum_k_o).sum(-1, keepdim=True)  # conserved incoming
        out_hat = (k * sum_q_i).sum(-1, keepdim=True)  # conserved outgoing
        lse = torch.logcumsumexp(out_hat, dim=2)
        if "lse" in st:
            lse = torch.logaddexp(lse, st["lse"][:, :, None])
        count = torch.arange(start + 1, start + x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        w = count * (out_hat - lse).exp()  # competition
        res = self.spec(q / inc, k, w * v, q_offset=start, state=None if cache is None else cache.state,
                        feature_map="identity", normalize=False, mode=self.cfg.mode, chunk=self.cfg.chunk)
        agg = res if cache is None else res[0]
        if cache is not None:
            cache.length = start + x.shape[1]
            st.update(sum_k=sum_k[:, :, -1], sum_q=sum_q[:, :, -1], sum_k_o=sum_k_o[:, :, -1],
                      sum_q_i=sum_q_i[:, :, -1], lse=lse[:, :, -1])
        return self.out(torch.sigmoid(inc_hat) * agg)

    def reference(self, x: Tensor) -> Tensor:
        """Every flow as a masked (T, T) capacity matrix."""
        eps = self.cfg.eps
        q, k, v = self.qkv(x)
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        T = x.shape[1]
        m = causal_mask(T, x.device)
        cap = (q @ k.transpose(-1, -2)) * m  # cap[i, j] = phi(q_i).phi(k_j), j <= i
        inc = cap.sum(-1, keepdim=True) + eps  # (B, H, T, 1)
        out = ((k @ q.transpose(-1, -2)) * m).sum(-1, keepdim=True) + eps  # O_j = sum_{l<=j} phi(k_j).phi(q_l)
        inc_hat = (cap / out.transpose(-1, -2)).sum(-1, keepdim=True)
        out_hat = (((k @ q.transpose(-1, -2)) * m) / inc.transpose(-1, -2)).sum(-1, keepdim=True)
        logits = out_hat.transpose(-1, -2).expand(-1, -1, T, -1).masked_fill(~m, float("-inf"))
        soft = torch.softmax(logits, dim=-1)  # row j: softmax over sources l <= j
        count = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)[:, None]
        w = count * soft.diagonal(dim1=-2, dim2=-1)[..., None]
        agg = (cap / inc) @ (w * v)
        return self.out(torch.sigmoid(inc_hat) * agg)

    def state_size(self, seq_len: int) -> int:
        d = self.d
        return self.heads * (d * d + 4 * d + 1)
