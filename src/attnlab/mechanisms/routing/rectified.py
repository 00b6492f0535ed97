"""Rectified SpaAttn [D276]: block-sparse attention rectified against an implicit full-attention reference.

Keys are cut into blocks of ``block``; block ``m`` has mean key ``kbar_m``, mean value ``vbar_m`` and ``n_m`` keys.
A query's pooled estimate of the block's share of full attention is ``a_im = scale * q_i . kbar_m + log n_m``
(``n_m exp(q.kbar)`` stands for ``sum_j exp(q.k_j)`` over the block: exact when the block's keys are equal).
Each query reads its ``top_k`` critical blocks by ``a_im`` exactly (causal: its own block always, causally), which
alone renormalizes the critical weights to 1 -- the amplification bias. The rectification merges, by log-sum-exp
(``core.softmax.lse_merge``), the exact critical part ``(O_c, L_c)`` with

* IPAR (``ipar``): the pooled mass of the non-critical blocks enters the normalizer, so each critical weight is
  scaled by ``Z_c / (Z_c + Z_pooled)`` -- its share under the implicit full attention;
* GAPR (``gapr``): the non-critical blocks whose estimated share ``exp(a_im) / (Z_c + Z_pooled)`` is at least
  ``min_gain`` add their pooled value ``vbar_m`` with that weight (blocks under ``min_gain`` keep only their
  IPAR mass, or are dropped when ``ipar`` is off).

``ipar=False, gapr=False`` is plain per-query block top-k. All blocks critical = dense; blocks of equal keys and
values = exact dense at any ``top_k`` (pooling is then exact). The selection is per query (not per query block as
in the paper's video kernels), so causal decoding equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, positive_int
from attnlab.core.softmax import lse_merge, masked_softmax
from attnlab.core.sparse import run_lse
from attnlab.ops._engine import plan_selection
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import block_means, block_sets


def check_rectified(block: Any, top_k: Any, min_gain: Any) -> None:
    positive_int("block", block)
    positive_int("top_k", top_k)
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain <= 1:
        raise ValueError(f"min_gain must be a number in [0, 1] (a share of attention), got {min_gain!r}")


def _grouped(x: Tensor, H: int) -> Tensor:
    """(B, Hkv, n, D) -> (B, Hkv, 1, n, D), to broadcast against queries viewed (B, Hkv, H/Hkv, Tq, D)."""
    return x.unsqueeze(2)


def pooled_logits(q: Tensor, kbar: Tensor, counts: Tensor, scale: float) -> Tensor:
    """``a_im = scale * q_i . kbar_m + log n_m``: q (B, H, Tq, D), kbar (B, Hkv, nb, D) -> (B, H, Tq, nb)."""
    B, H, Tq, D = q.shape
    Hkv = kbar.shape[1]
    a = (q.view(B, Hkv, H // Hkv, Tq, D) @ _grouped(kbar, H).transpose(-1, -2)).view(B, H, Tq, -1)
    return a * scale + counts.log().to(a.dtype)


def rectified_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, block: int, top_k: int,
                        ipar: bool = True, gapr: bool = True, min_gain: float = 0.0, causal: bool = True,
                        q_block: int = 128) -> Tensor:
    """q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); queries sit at ``q_offset + i``."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    check_rectified(block, top_k, min_gain)
    nb = math.ceil(Tk / block)
    counts = torch.full((nb,), float(block), dtype=q.dtype, device=q.device)
    counts[-1] = Tk - (nb - 1) * block
    kbar, vbar = block_means(k, block), block_means(v, block)
    a = pooled_logits(q, kbar, counts, scale)  # (B, H, Tq, nb); carries gradients to q, k, v
    blk = torch.arange(nb, device=q.device)
    own = (torch.arange(Tq, device=q.device) + q_offset) // block  # (Tq,)
    with torch.no_grad():
        if causal:
            past = blk.view(1, nb) < own.view(Tq, 1)  # whole blocks strictly before the query's block
            n = min(top_k - 1, nb)
            s = a.masked_fill(~past, float("-inf"))
            if n > 0:
                val, idx = s.topk(n, dim=-1)
                ok = torch.isfinite(val)
            else:
                idx = s.new_zeros(B, H, Tq, 0, dtype=torch.long)
                ok = idx.bool()
            sel = torch.cat([own.view(1, 1, Tq, 1).expand(B, H, Tq, 1), idx], -1)
            valid = torch.cat([torch.ones(B, H, Tq, 1, dtype=torch.bool, device=q.device), ok], -1)
            visible = past.view(1, 1, Tq, nb).expand(B, H, Tq, nb)
        else:
            idx = a.topk(min(top_k, nb), dim=-1).indices
            sel, valid = idx, torch.ones_like(idx, dtype=torch.bool)
            visible = torch.ones(B, H, Tq, nb, dtype=torch.bool, device=q.device)
        hits = torch.zeros(B, H, Tq, nb, dtype=torch.long, device=q.device)  # invalid entries may repeat ids
        critical = hits.scatter_add_(-1, sel.masked_fill(~valid, 0), valid.long()) > 0
        pooled = visible & ~critical
    plan = plan_selection(sel, valid, block_sets(Tk, block, q.device), Hkv, Tk, q_offset, causal, q_block=q_block)
    out_c, lse_c = run_lse(q, k, v, plan, scale)
    if not (ipar or gapr) or not bool(pooled.any()):
        return out_c
    ninf = float("-inf")
    a_p = a.masked_fill(~pooled, ninf)
    with torch.no_grad():  # the estimated share of each pooled block under the implicit full attention
        total = torch.logaddexp(lse_c.detach(), a_p.detach().logsumexp(-1))
        gain = (a_p.detach() - total.unsqueeze(-1)).exp() >= min_gain
        take = pooled & gain if gapr else torch.zeros_like(pooled)
        rest = pooled & ~take
    parts = [(out_c, lse_c)]
    if bool(take.any()):
        a_t = a.masked_fill(~take, ninf)
        w = masked_softmax(a_t)  # rows without a taken block: zero weights
        Bq, Hq = w.shape[:2]
        o_t = (w.view(B, Hkv, H // Hkv, Tq, nb) @ _grouped(vbar, H)).view(Bq, Hq, Tq, -1)
        parts.append((o_t, a_t.logsumexp(-1)))
    if ipar and bool(rest.any()):  # IPAR: the rest's mass is in the normalizer, its values are not estimated
        parts.append((torch.zeros_like(out_c), a.masked_fill(~rest, ninf).logsumexp(-1)))
    return lse_merge(parts)[0]


def _rectified_dense(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None,
                     dtype: torch.dtype | None, block: int, top_k: int, ipar: bool, gapr: bool, min_gain: float,
                     causal: bool) -> Tensor:
    """The formula written densely (the float64 reference and the free-mask path): one explicit normalizer over
    the exact critical scores and the pooled block logits. A free mask limits the exact keys; a non-critical block
    is pooled for a row only where the mask allows all its keys."""
    check_rectified(block, top_k, min_gain)
    dt = dtype or q.dtype
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qd = q.to(dt)
    kd = k.to(dt).repeat_interleave(H // Hkv, 1)
    vd = v.to(dt).repeat_interleave(H // Hkv, 1)
    nb = math.ceil(Tk / block)
    kbar = torch.stack([kd[:, :, m * block:(m + 1) * block].mean(2) for m in range(nb)], 2)  # (B, H, nb, D)
    vbar = torch.stack([vd[:, :, m * block:(m + 1) * block].mean(2) for m in range(nb)], 2)
    n = torch.tensor([min(Tk, (m + 1) * block) - m * block for m in range(nb)], dtype=dt, device=q.device)
    a = scale * qd @ kbar.transpose(-1, -2) + n.log()  # (B, H, Tq, nb)
    s = scale * qd @ kd.transpose(-1, -2)  # (B, H, Tq, Tk)
    pos = torch.arange(Tq, device=q.device) + q_offset
    kblk = torch.arange(Tk, device=q.device) // block
    own = pos // block
    crit = torch.zeros(B, H, Tq, nb, dtype=torch.bool, device=q.device)
    if causal:
        crit[..., torch.arange(Tq), own] = True
        past = torch.arange(nb, device=q.device).view(1, nb) < own.view(Tq, 1)
        if top_k > 1:
            g = a.detach().masked_fill(~past, float("-inf"))
            val, idx = g.topk(min(top_k - 1, nb), -1)
            crit.scatter_(-1, idx, torch.isfinite(val) | crit.gather(-1, idx))
        seen = past.expand(B, H, Tq, nb)
        rule = torch.arange(Tk, device=q.device).view(1, Tk) <= pos.view(Tq, 1)
    else:
        crit.scatter_(-1, a.detach().topk(min(top_k, nb), -1).indices, True)
        seen = torch.ones(B, H, Tq, nb, dtype=torch.bool, device=q.device)
        rule = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    exact = crit[..., kblk] & rule
    whole = torch.ones(B, H, Tq, nb, dtype=torch.bool, device=q.device)
    if mask is not None:
        exact = exact & mask
        mk = mask.expand(B, H, Tq, Tk)
        whole = torch.stack([mk[..., m * block:(m + 1) * block].all(-1) for m in range(nb)], -1)
    pool = seen & ~crit & whole
    big = torch.cat([s.masked_fill(~exact, float("-inf")), a.masked_fill(~pool, float("-inf"))], -1)
    mx = big.detach().amax(-1, keepdim=True).clamp(min=-1e30).nan_to_num(0.0)
    e_c = (s.masked_fill(~exact, float("-inf")) - mx).exp()
    e_p = (a.masked_fill(~pool, float("-inf")) - mx).exp()
    z_c, z_p = e_c.sum(-1, keepdim=True), e_p.sum(-1, keepdim=True)
    with torch.no_grad():
        share = e_p / (z_c + z_p).clamp(min=1e-300)
        taken = pool & (share >= min_gain) if gapr else torch.zeros_like(pool)
    e_t = e_p * taken
    num = e_c @ vd + e_t @ vbar
    den = z_c + e_t.sum(-1, keepdim=True) + ((z_p - e_t.sum(-1, keepdim=True)) if ipar else 0.0)
    if not (ipar or gapr):
        num, den = e_c @ vd, z_c
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _rectified_core_dense(q, k, v, *, scale, q_offset, mask, dtype, **o):
    return _rectified_dense(q, k, v, scale=scale, q_offset=q_offset, mask=mask, dtype=dtype, **o)


@sparse_op("rectified", papers=("D276",), summary="Rectified SpaAttn: per-query top-k key blocks read exactly, merged "
           "by log-sum-exp with pooled (block-mean) keys/values of the other blocks: critical weights de-amplified "
           "(IPAR), non-critical share recovered where its estimated gain >= min_gain (GAPR)",
           options={"block": 64, "top_k": 4, "ipar": True, "gapr": True, "min_gain": 0.0, "causal": True},
           weights_mask=None, dense=_rectified_core_dense, dense_options={"top_k": ALL},
           example={"block": 4, "top_k": 2})
def rectified_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, block: int, top_k: int,
                 ipar: bool, gapr: bool, min_gain: float, causal: bool) -> Tensor:
    """Rectified SpaAttn on q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless (block means are
    read from the cached keys; causal rows pool only whole past blocks), so decoding equals the full forward."""
    return rectified_attention(q, k, v, scale=scale, q_offset=q_offset, block=block, top_k=top_k, ipar=ipar,
                               gapr=gapr, min_gain=min_gain, causal=causal)


@dataclass(frozen=True)
class RectifiedConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    block: int = 64
    top_k: int = 4
    ipar: bool = True
    gapr: bool = True
    min_gain: float = 0.0
    delta: int = 0  # D99 correction stride, 0 = off

    renamed: ClassVar[dict[str, str]] = {"delta_correction": "delta"}

    def validate(self) -> None:
        self.check("block", "top_k")
        check_rectified(self.block, self.top_k, self.min_gain)


@register("rectified", family="routing", papers=("D276",), year=2025, config=RectifiedConfig,
          summary="Rectified SpaAttn: block top-k attention rectified with pooled keys/values (IPAR + GAPR)")
class RectifiedAttention(RoutingLayer):
    op = "rectified"
