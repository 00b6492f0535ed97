"""Delta attention [D99]: correct any sparse attention output toward dense attention, cheaply.

Sparse attention shifts the distribution of the outputs. The correction computes *dense* attention for a
strided subset of the queries only (every ``stride``-th row: ``Tq / stride`` rows over all keys), takes the
difference to the sparse output on those rows, and adds each sampled row's difference to the ``stride``
queries of its group (row ``i`` uses the sample at ``stride * floor(i / stride)``, which is at or before
``i``, so causality holds; positions are absolute, so decoding with a cache samples the same rows).
Output ``= sparse + repeat(dense[sampled] - sparse[sampled])``; with ``stride = 1`` it is dense attention
exactly. The cost added to the sparse method is ``Tq * Tk / stride`` pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int


def sampled_dense(
    q: Tensor, k: Tensor, v: Tensor, rows: Tensor, causal: bool = True, scale: float | None = None,
    q_offset: int | None = None,
) -> Tensor:
    """Dense attention of the query rows ``rows`` (n,) only: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, n, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    mask = None
    if causal:
        mask = torch.arange(Tk, device=q.device).view(1, Tk) <= (rows + q_offset).view(-1, 1)
    return F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=default_scale(D, scale),
                                          enable_gqa=H != Hkv)


def correction_terms(
    q: Tensor, k: Tensor, v: Tensor, sparse_out: Tensor, stride: int, causal: bool = True,
    scale: float | None = None, q_offset: int | None = None, carry: Tensor | None = None,
) -> Tensor:
    """The delta added to each row (B, H, Tq, Dv): ``dense - sparse`` of the latest sampled row at or before it.

    Rows are sampled at absolute positions ``q_offset + r`` that are multiples of ``stride``, so a decoding
    call (queries at the end of a cache) samples the same rows as the full forward; rows before the call's first
    sample use ``carry`` (B, H, Dv), the delta of the last row of the previous call (without it, the call's first
    row is sampled too).
    """
    positive_int("stride", stride)
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    if sparse_out.shape[:3] != q.shape[:3]:
        raise ValueError(f"sparse_out must be (B, H, Tq, Dv) like q {tuple(q.shape[:3])}, got {tuple(sparse_out.shape)}")
    q_offset = Tk - Tq if q_offset is None else q_offset
    is_sample = (torch.arange(Tq, device=q.device) + q_offset) % stride == 0
    if carry is None:
        is_sample[0] = True
    rows = is_sample.nonzero().flatten()
    delta = sampled_dense(q, k, v, rows, causal, scale, q_offset).to(sparse_out.dtype) - sparse_out[:, :, rows]
    group = torch.cumsum(is_sample.long(), 0) - 1  # latest sample at or before each row (-1: before the first)
    if carry is not None:
        delta, group = torch.cat([carry.to(delta.dtype).unsqueeze(2), delta], 2), group + 1
    return delta[:, :, group]


def delta_correction(
    q: Tensor, k: Tensor, v: Tensor, sparse_out: Tensor, stride: int, causal: bool = True,
    scale: float | None = None, q_offset: int | None = None, carry: Tensor | None = None,
) -> Tensor:
    """Delta-corrected output (B, H, Tq, Dv) from a sparse method's ``sparse_out`` (B, H, Tq, Dv) on q, k, v
    (see :func:`correction_terms` for ``carry``)."""
    return sparse_out + correction_terms(q, k, v, sparse_out, stride, causal, scale, q_offset, carry)
