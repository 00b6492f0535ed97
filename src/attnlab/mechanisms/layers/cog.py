"""Cog attention (paper L134, "More Expressive Attention with Negative Weights").

Weights keep the sign of the score and take the softmax of its magnitude:

    S = q k^T / sqrt(d)            W = sign(S) * softmax(|S|)          out = W v

so a head can copy (positive weight), delete (negative weight) or ignore (small |S|) a token. The absolute
values of a row's weights sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnlab.core.softmax import masked_softmax
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


def _cog_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   causal: bool = True, chunk: int = 128) -> Tensor:
    """Float64, dense: W_ij = sign(S_ij) exp|S_ij| / sum_{allowed j'} exp|S_ij'| (zero rows where nothing is
    allowed)."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    qd, kd, vd = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    ok = dense_allowed(Tq, Tk, q_offset, causal, mask, q.device).expand_as(s)
    mag = torch.where(ok, s.abs(), torch.full_like(s, -torch.inf))
    e = torch.exp(mag - mag.amax(-1, keepdim=True).clamp(min=0)) * ok
    w = torch.sign(s) * e / e.sum(-1, keepdim=True).clamp(min=1e-300)
    return w @ vd


@register_op("cog", family="dense", papers=("L134",), summary="signed attention: sign(qk) * softmax(|qk|), so heads "
             "can subtract tokens", options={"causal": True, "chunk": 128}, reference=_cog_reference,
             example={"chunk": 7})
def cog_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
           state: dict | None = None, causal: bool = True, chunk: int = 128) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv), ``chunk`` query rows
    at a time; a free ``mask`` restricts the keys of the softmax. Stateless (the caller keeps the KV cache)."""
    positive_int("chunk", chunk)
    check_free_mask("cog", mask, q, k)

    def rows(a: int, b: int) -> Tensor:
        s = grouped_scores(q[:, :, a:b], k) * scale  # (B, H, rows, Tk)
        m = allowed(a, b, k.shape[2], q_offset, causal, mask, q.device)
        w = masked_softmax(s.abs(), m) * torch.sign(s)
        return grouped_apply(w, v)

    out = by_rows(rows, q.shape[2], chunk)
    return out if state is None else (out, state)


@dataclass(frozen=True)
class CogConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    chunk: int = 128  # query rows per block of the fast path

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        positive_int("chunk", self.chunk)


@register("cog", family="layers", papers=("L134",), year=2024, config=CogConfig,
          summary="signed attention: sign(qk) * softmax(|qk|), so heads can subtract tokens")
class CogAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``cog`` (no parameters of its own)."""

    op = "cog"

    def __init__(self, cfg: CogConfig) -> None:
        super().__init__(cfg)

    def reference(self, x: Tensor) -> Tensor:
        """Dense: W_ij = sign(S_ij) exp|S_ij| / sum_{visible j'} exp|S_ij'| over the whole score matrix."""
        q, k, v = self.project(x, 0)
        T = x.shape[1]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / self.head_dim ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
        if self.causal:
            allowed = allowed.tril()
        mag = torch.where(allowed, s.abs(), torch.zeros_like(s))
        e = torch.exp(mag - mag.amax(-1, keepdim=True)) * allowed
        w = torch.sign(s) * e / e.sum(-1, keepdim=True)
        return self.out(torch.einsum("bhij,bhjd->bhid", w, v))
