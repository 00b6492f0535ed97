"""ReLU attention (paper L271, "Replacing softmax with ReLU in Vision Transformers").

The softmax is replaced by a point-wise ReLU divided by the sequence length:

    W_ij = relu(q_i . k_j / sqrt(d)) / L          out = W v

Causal choice: ``L`` is the number of keys query ``i`` sees (``i + 1`` at absolute position ``i``), not the
full length. Dividing by the full length would make every earlier output change when a token is appended,
so a prefix's outputs would depend on the future and decoding could not match the full forward. Without a
causal mask the two agree (every query sees all ``L`` keys), which is the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._scored import (
    allowed,
    by_rows,
    check_free_mask,
    dense_allowed,
    grouped_apply,
    grouped_scores,
    repeat_kv,
)


def _relu_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                    causal: bool = True, chunk: int = 128) -> Tensor:
    """Float64, dense: W_ij = max(0, S_ij) / n_i over the n_i keys query i may see (zero rows when n_i = 0)."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q.double(), repeat_kv(k.double(), H)) * scale
    ok = dense_allowed(Tq, Tk, q_offset, causal, mask, q.device).expand_as(s).double()
    n = ok.sum(-1, keepdim=True)
    w = torch.clamp(s, min=0.0) * ok / torch.where(n > 0, n, torch.ones_like(n))
    return w @ repeat_kv(v.double(), H)


@register_op("relu_attn", family="dense", papers=("L271",), summary="softmax replaced by relu(qk)/L, L = keys each "
             "query sees", options={"causal": True, "chunk": 128}, reference=_relu_reference, example={"chunk": 7})
def relu_attn_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                 state: dict | None = None, causal: bool = True, chunk: int = 128) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv), ``chunk`` query rows
    at a time; ``L`` counts the keys a row may see (causal rule and free ``mask``). Stateless."""
    positive_int("chunk", chunk)
    check_free_mask("relu_attn", mask, q, k)

    def rows(a: int, b: int) -> Tensor:
        m = allowed(a, b, k.shape[2], q_offset, causal, mask, q.device)
        s = torch.relu(grouped_scores(q[:, :, a:b], k) * scale).masked_fill(~m, 0.0)
        n = m.sum(-1, keepdim=True).clamp(min=1).to(v.dtype)
        return grouped_apply(s / n, v)

    out = by_rows(rows, q.shape[2], chunk)
    return out if state is None else (out, state)


@dataclass(frozen=True)
class ReLUAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    chunk: int = 128  # query rows per block of the fast path

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        positive_int("chunk", self.chunk)


@register("relu_attn", family="layers", papers=("L271",), year=2023, config=ReLUAttnConfig,
          summary="softmax replaced by relu(qk)/L, L = keys each query sees")
class ReLUAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``relu_attn`` (no parameters of its own)."""

    op = "relu_attn"

    def __init__(self, cfg: ReLUAttnConfig) -> None:
        super().__init__(cfg)

    def reference(self, x: Tensor) -> Tensor:
        """Dense: W_ij = max(0, S_ij) / n_i with n_i = L (full) or i + 1 (causal)."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5
        w = torch.clamp(s, min=0.0)
        if self.causal:
            w = w * torch.ones(T, T, dtype=x.dtype, device=x.device).tril()
            n = torch.arange(1, T + 1, dtype=x.dtype, device=x.device).view(T, 1)
        else:
            n = torch.full((T, 1), float(T), dtype=x.dtype, device=x.device)
        return self.out(torch.einsum("bhij,bhjd->bhid", w / n, v))
