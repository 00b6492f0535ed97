"""Combiner-Fixed: factorized full attention (paper P283, "Combiner: Full Attention Transformer with Sparse
Computation Cost").

Attention is the conditional expectation ``E_{p(j|i)}[v_j]``; Combiner factorizes ``p(j|i)`` so that every key
keeps a non-zero probability at sub-quadratic cost. Keys are cut into blocks (spans) of ``block`` positions.
Query ``i`` (absolute position ``p``, block ``b = p // block``) attends

* directly to the keys of its own block (``j <= p`` when causal): ``p(j|i) = exp(s_ij) / Z_i``,
* to every other visible block ``c`` (``c < b`` when causal, ``c != b`` otherwise) through its abstraction:
  ``p(j|i) = exp(q_i . kbar_c * scale) / Z_i * r_c(j)`` for ``j`` in block ``c``,

with ``s_ij = q_i . k_j * scale``, one partition function ``Z_i`` over the direct scores and the abstraction
scores, the abstraction key ``kbar_c`` = max-pooling (``pool="max"``) or mean-pooling of the block's keys, and the
in-span distribution ``r_c(j) = softmax_{j in c}(w . k_j)`` (``w = span_query[h]`` per query head when given, a
learned vector in the paper; parameter-free default ``w = kbar_c * scale``, the span's own pooled key). The
output ``sum_j p(j|i) v_j = (sum_local exp(s_ij) v_j + sum_c exp(q_i . kbar_c * scale) vbar_c) / Z_i`` with
``vbar_c = sum_{j in c} r_c(j) v_j``: every row's probabilities over all visible keys sum to 1 and each visible key
gets a positive share. Cost per query: ``block + kv_len / block`` scores (``O(L sqrt L)`` at ``block = sqrt L``).

Causal: the abstractions of earlier blocks depend only on complete blocks of earlier keys, so decoding with the KV
cache equals the full forward. A free mask is refused (the abstractions pool whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.ops import reference as op_reference
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer, one_of
from ..registry import register
from ._scored import per_head, repeat_kv

POOLS = ("max", "mean")


def _check(name: str, mask: Tensor | None, block: int, pool: str) -> None:
    if mask is not None:
        raise ValueError(f"op {name!r} does not take a free mask (its abstractions pool whole key blocks)")
    positive_int("block", block)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def _blocks(k: Tensor, v: Tensor, block: int, pool: str, span_query: Tensor | None, scale: float):
    """Keys/values in blocks and each block's abstraction. k, v (B, H, Tk, D) ->
    kb, vb (B, H, nb, block, D) zero-padded, valid (nb, block) bool, kbar (B, H, nb, D), vbar (B, H, nb, Dv),
    r (B, H, nb, block) the in-span distribution."""
    B, H, Tk, D = k.shape
    nb = -(-Tk // block)
    pad = nb * block - Tk
    kb = F.pad(k, (0, 0, 0, pad)).view(B, H, nb, block, D)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, H, nb, block, v.shape[-1])
    valid = (torch.arange(nb * block, device=k.device) < Tk).view(nb, block)
    if pool == "max":
        kbar = kb.masked_fill(~valid[..., None], float("-inf")).amax(3)
    else:
        kbar = kb.sum(3) / valid.sum(1, keepdim=True).to(k.dtype)
    w = kbar * scale if span_query is None else span_query.view(1, H, 1, D).expand(B, H, nb, D)
    logits = (kb @ w.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, float("-inf"))
    r = logits.softmax(-1)
    vbar = (r.unsqueeze(-2) @ vb).squeeze(-2)
    return kb, vb, valid, kbar, vbar, r


def _parts(q, k, v, scale, q_offset, causal, block, pool, span_query):
    """The direct and abstraction probabilities of every row: pl (B, H, Tq, block) over the row's own block,
    ps (B, H, Tq, nb) over blocks, plus the blocks (see ``_blocks``) and each row's block index."""
    H, Tq, D = q.shape[1], q.shape[2], q.shape[3]
    if q_offset + Tq > k.shape[2]:
        raise ValueError(f"combiner: queries at {q_offset}..{q_offset + Tq - 1} need keys up to there, "
                         f"got kv_len={k.shape[2]}")
    sq = per_head("span_query", span_query, (H, D), q)
    kb, vb, valid, kbar, vbar, r = _blocks(repeat_kv(k, H), repeat_kv(v, H), block, pool, sq, scale)
    nb = kb.shape[2]
    pos = torch.arange(Tq, device=q.device) + q_offset
    own = pos // block  # (Tq,)
    # direct scores against the row's own block only, as one batched product per query block: (B, H, Tq, block)
    first, lead = q_offset // block, q_offset % block
    nqb = -(-(lead + Tq) // block)
    qb = F.pad(q, (0, 0, lead, nqb * block - lead - Tq)).view(*q.shape[:2], nqb, block, D)
    local = (qb @ kb[:, :, first : first + nqb].transpose(-1, -2)).flatten(2, 3)[:, :, lead : lead + Tq] * scale
    key_pos = own[:, None] * block + torch.arange(block, device=q.device)
    ok_local = valid[own] & ((key_pos <= pos[:, None]) if causal else True)
    local = local.masked_fill(~ok_local, float("-inf"))
    # abstraction scores: (B, H, Tq, nb)
    summ = (q @ kbar.transpose(-1, -2)) * scale
    c = torch.arange(nb, device=q.device)
    ok_summ = (c[None, :] < own[:, None]) if causal else (c[None, :] != own[:, None])
    summ = summ.masked_fill(~ok_summ, float("-inf"))
    w = torch.cat([local, summ], dim=-1).softmax(-1)  # one partition function Z_i
    return w[..., :block], w[..., block:], own, vb, vbar, r


def combiner_probs(q: Tensor, k: Tensor, *, scale: float, q_offset: int = 0, causal: bool = True, block: int = 64,
                   pool: str = "max", span_query: Tensor | None = None) -> Tensor:
    """The fast path's factorized ``p(j|i)`` spread over every key: (B, H, Tq, Tk), rows summing to 1 (for
    inspection and tests; materializes Tq x Tk)."""
    _check("combiner", None, block, pool)
    pl, ps, own, _, _, r = _parts(q, k, k, scale, q_offset, causal, block, pool, span_query)
    B, H, Tq = q.shape[:3]
    nb = ps.shape[-1]
    full = (ps.unsqueeze(-1) * r.unsqueeze(2)).reshape(B, H, Tq, nb * block)  # abstraction mass over members
    direct = torch.zeros_like(full).view(B, H, Tq, nb, block)
    direct[:, :, torch.arange(Tq, device=q.device), own] = pl
    return (full + direct.view(B, H, Tq, nb * block))[..., : k.shape[2]]


def _combiner_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                        causal: bool = True, block: int = 64, pool: str = "max",
                        span_query: Tensor | None = None) -> Tensor:
    """Float64, explicit factorization: for each row, each block is either direct (its own) or an abstraction
    (pooled key from an explicit loop over its members), one partition function; the probability of every key
    is written into a (Tq, Tk) matrix, then applied to v."""
    _check("combiner", mask, block, pool)
    H, Tq, Tk, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    q, k, v = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    sq = per_head("span_query", span_query, (H, D), q)
    spans = [list(range(s, min(s + block, Tk))) for s in range(0, Tk, block)]
    kbars, rs = [], []
    for members in spans:
        ks = torch.stack([k[:, :, j] for j in members], dim=2)  # (B, H, m, D)
        kbar = ks.max(dim=2).values if pool == "max" else ks.mean(dim=2)
        w = kbar * scale if sq is None else sq.view(1, H, D).expand_as(kbar)
        rs.append(torch.softmax(torch.einsum("bhmd,bhd->bhm", ks, w), dim=-1))
        kbars.append(kbar)
    rows = []
    for i in range(Tq):
        p = q_offset + i
        b = p // block
        scores, targets = [], []  # one score per direct key or abstraction; target = key index or -(block + 1)
        for j in spans[b]:
            if not causal or j <= p:
                scores.append((q[:, :, i] * k[:, :, j]).sum(-1) * scale)
                targets.append(j)
        for c in range(len(spans)):
            if (c < b) if causal else (c != b):
                scores.append((q[:, :, i] * kbars[c]).sum(-1) * scale)
                targets.append(-(c + 1))
        prob = torch.softmax(torch.stack(scores, -1), dim=-1)
        row = torch.zeros(q.shape[0], H, Tk, dtype=torch.float64)
        for n, t in enumerate(targets):
            if t >= 0:
                row[:, :, t] = row[:, :, t] + prob[..., n]
            else:
                c = -t - 1
                row[:, :, spans[c]] = row[:, :, spans[c]] + prob[..., n : n + 1] * rs[c]
        rows.append(row)
    return torch.stack(rows, dim=2) @ v


@register_op("combiner", family="dense", papers=("P283",),
             summary="Combiner-Fixed: direct attention in the own block, max-pooled abstractions of the other "
             "blocks, one partition function; every key reachable, O(L (block + L / block))",
             options={"causal": True, "block": 64, "pool": "max", "span_query": None},
             reference=_combiner_reference, example={"block": 5})
def combiner_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                state: dict | None = None, causal: bool = True, block: int = 64, pool: str = "max",
                span_query: Tensor | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). Stateless (the KV cache
    holds everything the abstractions need)."""
    _check("combiner", mask, block, pool)
    pl, ps, own, vb, vbar, _ = _parts(q, k, v, scale, q_offset, causal, block, pool, span_query)
    # direct part per query block (rows padded to whole blocks, as in _parts), abstraction part as one product
    Tq, first, lead = q.shape[2], q_offset // block, q_offset % block
    nqb = -(-(lead + Tq) // block)
    plb = F.pad(pl, (0, 0, lead, nqb * block - lead - Tq)).view(*pl.shape[:2], nqb, block, block)
    direct = (plb @ vb[:, :, first : first + nqb]).flatten(2, 3)[:, :, lead : lead + Tq]
    out = direct + ps @ vbar
    return out if state is None else (out, state)


# ---- the layer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombinerConfig(HeadsConfig):
    """block: keys per span (about sqrt(T) for the O(T sqrt T) cost); pool: the span's abstraction key."""

    dim: int = 64
    heads: int = 4
    rope: bool = True
    block: int = 64
    pool: str = "max"

    def validate(self) -> None:
        positive_int("block", self.block)
        one_of("pool", self.pool, POOLS)


@register("combiner", family="layers", papers=("P283",), year=2021, config=CombinerConfig,
          summary="Combiner-Fixed: direct attention in the own block, pooled abstractions of the other blocks with "
          "a learned in-span distribution; every key reachable")
class CombinerAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``combiner`` with the paper's learned in-span query
    ``w`` per head (``span_query``, (heads, head_dim)): ``r_c(j) = softmax_{j in c}(w . k_j)``. Causal layers
    decode with the KV cache (the op is stateless)."""

    op = "combiner"

    def __init__(self, cfg: CombinerConfig) -> None:
        super().__init__(cfg)
        self.span_query = nn.Parameter(torch.randn(cfg.heads, cfg.d) * cfg.d**-0.5)

    def op_options(self) -> dict[str, Any]:
        return {**super().op_options(), "span_query": self.span_query}

    def reference(self, x: Tensor) -> Tensor:
        """The op's float64 oracle (the factorization written row by row) on this layer's projections."""
        q, k, v = self.project(x, 0)
        return self.out(op_reference("combiner", q, k, v, scale=self.cfg.d**-0.5, q_offset=0, **self.op_options()))


__all__ = ["CombinerAttention", "CombinerConfig", "combiner_op", "combiner_probs"]
