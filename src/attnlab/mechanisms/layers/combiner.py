"""Combiner: factorized full attention (paper P283, "Combiner: Full Attention Transformer with Sparse Computation
Cost"), its Fixed, Axial and Logsparse factorizations (``factorization=``).

Attention is the conditional expectation ``E_{p(j|i)}[v_j]``; Combiner factorizes ``p(j|i)`` so that every key
keeps a non-zero probability at sub-quadratic cost. Keys are cut into blocks of ``block`` positions. Query ``i``
(absolute position ``p``, block ``b = p // block``) attends directly to the keys of its own block (``j <= p`` when
causal): ``p(j|i) = exp(s_ij) / Z_i``, and to each of its *spans* ``c`` (disjoint sets of the other visible keys)
through the span's abstraction: ``p(j|i) = exp(q_i . kbar_c * scale) / Z_i * r_c(j)`` for ``j`` in span ``c``,
with ``s_ij = q_i . k_j * scale``, one partition function ``Z_i`` over the direct and abstraction scores, the
abstraction key ``kbar_c`` = max-pooling (``pool="max"``) or mean-pooling of the span's keys, and the in-span
distribution ``r_c(j) = softmax_{j in c}(w . k_j)`` (``w = span_query[h]`` per query head when given, a learned
vector in the paper; parameter-free default ``w = kbar_c * scale``). Output
``(sum_local exp(s_ij) v_j + sum_c exp(q_i . kbar_c * scale) vbar_c) / Z_i``, ``vbar_c = sum_{j in c} r_c(j) v_j``:
each row's probabilities over all visible keys sum to 1 and every visible key gets a positive share.

The factorizations differ in the spans of a row (``nb = ceil(kv_len / block)`` blocks):

* ``"fixed"`` (Combiner-Fixed): every other visible block is one span (``c < b`` causal, ``c != b`` otherwise).
  Per query ``block + nb`` scores: ``O(L sqrt L)`` at ``block = sqrt L``.
* ``"axial"`` (Combiner-Axial): the keys as a row-major matrix with rows of ``block`` positions; the own block is
  the own row, and each column ``c`` is one span: its keys in the earlier rows (causal) or in every other row.
  Per query ``block + block`` scores; the spans' pooled keys and values cost ``O(L rows)`` (each row's column
  prefixes: a cumulative max / mean and a ``rows x rows`` softmax per column), ``O(L sqrt L)`` at
  ``block = sqrt L``.
* ``"logsparse"`` (Combiner-Logsparse): spans are aligned dyadic groups of blocks (nodes of a binary tree over the
  blocks, ``2 nb`` nodes, pooled once, ``O(L log L)``); walking away from the own block, each span is the largest
  aligned node no more than twice the previous span, so the span sizes grow geometrically with distance:
  ``<= log2(nb) + 1`` spans per causal query (``<= 3 log2(nb)`` bidirectional), ``O(L log L)`` at a fixed
  ``block``.

Causal: the spans of a row hold only keys of complete earlier blocks, so decoding with the KV cache equals the full
forward. A free mask is refused (the abstractions pool whole spans).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.ops import reference as op_reference
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ...core.softmax import masked_softmax
from ..heads import HeadsConfig, OpLayer, one_of
from ..registry import register
from ._scored import per_head, repeat_kv

POOLS = ("max", "mean")
FACTORIZATIONS = ("fixed", "axial", "logsparse")


def _check(name: str, mask: Tensor | None, block: int, pool: str, factorization: str = "fixed") -> None:
    if mask is not None:
        raise ValueError(f"op {name!r} does not take a free mask (its abstractions pool whole key spans)")
    positive_int("block", block)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")


def _pool(x: Tensor, ok: Tensor, pool: str, dim: int) -> Tensor:
    """Max or mean of ``x`` over ``dim`` where ``ok`` (broadcast); an empty set gives 0 (its span is unused)."""
    n = ok.sum(dim, keepdim=True)
    if pool == "max":
        out = x.masked_fill(~ok, float("-inf")).amax(dim, keepdim=True)
    else:
        out = (x * ok).sum(dim, keepdim=True) / n.clamp(min=1)
    return torch.where(n > 0, out, torch.zeros_like(out)).squeeze(dim)


def _span_values(kb: Tensor, vb: Tensor, ok: Tensor, pool: str, sq: Tensor | None, scale: float):
    """Spans laid out as members on axis -2: kb (B, H, S, m, D), vb (B, H, S, m, Dv), ok (S, m) ->
    kbar (B, H, S, D), vbar (B, H, S, Dv), r (B, H, S, m) the in-span distribution."""
    kbar = _pool(kb, ok[..., None], pool, -2)
    H, D = kb.shape[1], kb.shape[-1]
    w = kbar * scale if sq is None else sq.view(1, H, 1, D).expand_as(kbar)
    r = masked_softmax((kb @ w.unsqueeze(-1)).squeeze(-1), ok)
    return kbar, (r.unsqueeze(-2) @ vb).squeeze(-2), r


def _fixed_spans(k, v, kb, vb, valid, block, pool, sq, scale, causal):
    """Each block is a span; block b's row lists every block, visible where c < b (causal) or c != b."""
    nb = kb.shape[2]
    kbar, vbar, r = _span_values(kb, vb, valid, pool, sq, scale)
    c = torch.arange(nb, device=k.device)
    ok = (c[None, :] < c[:, None]) if causal else (c[None, :] != c[:, None])
    dense = lambda: torch.diag_embed(r.transpose(-1, -2)).permute(0, 1, 3, 4, 2).flatten(-2)  # noqa: E731
    return kbar, vbar, c.expand(nb, nb), ok, dense


def _axial_spans(k, v, kb, vb, valid, block, pool, sq, scale, causal):
    """Span (row r, column c): column c's keys in the rows before r (causal) or in every other row; row r lists
    its ``block`` columns. Column prefixes: cumulative max / sum; in-span softmax: rows x rows per column."""
    B, H, R, m, D = kb.shape
    dev = k.device
    rows = torch.arange(R, device=dev)
    member = (rows[None, :] < rows[:, None]) if causal else (rows[None, :] != rows[:, None])  # (r, s)
    count = (member.long() @ valid.long())  # (R, m): members of span (r, c)
    x = kb.masked_fill(~valid[..., None], float("-inf")) if pool == "max" else kb * valid[..., None]

    def excl(t: Tensor, flip: bool) -> Tensor:  # exclusive prefix along rows: rows < r (or > r when flipped)
        t = t.flip(2) if flip else t
        acc = torch.cummax(t, 2).values if pool == "max" else torch.cumsum(t, 2)
        fill = torch.full_like(acc[:, :, :1], float("-inf") if pool == "max" else 0.0)
        acc = torch.cat([fill, acc[:, :, :-1]], 2)
        return acc.flip(2) if flip else acc

    tot = excl(x, False)
    if not causal:
        tot = torch.maximum(tot, excl(x, True)) if pool == "max" else tot + excl(x, True)
    if pool == "mean":
        tot = tot / count.clamp(min=1)[..., None]
    ok = count > 0
    kbar = torch.where(ok[..., None], tot, torch.zeros_like(tot))  # (B, H, R, m, D)
    w = kbar * scale if sq is None else sq.view(1, H, 1, 1, D).expand_as(kbar)
    logits = torch.einsum("bhrcd,bhscd->bhrcs", w, kb)  # (B, H, r, c, s): w of span (r, c) . k of row s, col c
    allow = member[:, None, :] & valid.t()[None, :, :]  # (r, c, s)
    r = masked_softmax(logits, allow)
    vbar = torch.einsum("bhrcs,bhscd->bhrcd", r, vb)
    lists = (rows[:, None] * m + torch.arange(m, device=dev)).contiguous()

    def dense() -> Tensor:  # key s * m + c' of span (r, c) gets r[r, c, s] when c' == c
        eye = torch.eye(m, dtype=r.dtype, device=dev).view(1, 1, 1, m, 1, m)
        return (r.unsqueeze(-1) * eye).reshape(B, H, R * m, R * m)

    return kbar.flatten(2, 3), vbar.flatten(2, 3), lists, ok, dense


def _lowbit(n: int) -> int:
    return n & -n


@lru_cache(maxsize=64)
def logsparse_spans(nb: int, causal: bool) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per block ``b`` its spans as ``(level, index)`` nodes (blocks ``[index 2^level, (index + 1) 2^level)``),
    nearest first: going left from ``b``, each span is the largest aligned node ending at the current edge and
    at most twice the previous one (the first at most one block); bidirectional rows also go right."""
    out = []
    for b in range(nb):
        spans, cur, cap = [], b, 1
        while cur > 0:
            s = min(_lowbit(cur), cap)
            spans.append((s.bit_length() - 1, (cur - s) // s))
            cur, cap = cur - s, 2 * cap
        cur, cap = b + 1, 1
        while not causal and cur < nb:
            s = min(_lowbit(cur), cap, 1 << ((nb - cur).bit_length() - 1))
            spans.append((s.bit_length() - 1, cur // s))
            cur, cap = cur + s, 2 * cap
        out.append(tuple(spans))
    return tuple(out)


def _logsparse_spans(k, v, kb, vb, valid, block, pool, sq, scale, causal):
    """Nodes of every level (level l: ``nb // 2^l`` aligned groups of ``2^l`` blocks), pooled once; each row lists
    the nodes of ``logsparse_spans``."""
    B, H, nb = kb.shape[:3]
    Tk, dev = k.shape[2], k.device
    kbars, vbars, rs, offset, level = [], [], [0], 0, 0
    while (1 << level) <= nb:
        n, size = nb >> level, (1 << level) * block
        kk, vv = (F.pad(t[:, :, : n * size], (0, 0, 0, n * size - min(Tk, n * size))) for t in (k, v))
        ok = (torch.arange(n * size, device=dev) < Tk).view(n, size)
        kbar, vbar, r = _span_values(kk.view(B, H, n, size, -1), vv.view(B, H, n, size, -1), ok, pool, sq, scale)
        kbars.append(kbar)
        vbars.append(vbar)
        rs.append(r)
        offset += n
        level += 1
    starts = [0]
    for lv in range(level):
        starts.append(starts[-1] + (nb >> lv))
    table = logsparse_spans(nb, causal)
    A = max(len(t) for t in table)
    lists = torch.zeros(nb, A, dtype=torch.long)
    ok = torch.zeros(nb, A, dtype=torch.bool)
    for b, spans in enumerate(table):
        for a, (lv, idx) in enumerate(spans):
            lists[b, a], ok[b, a] = starts[lv] + idx, True

    def dense() -> Tensor:  # node (l, n) spreads r over its keys
        out = torch.zeros(B, H, starts[-1], nb * block, dtype=kb.dtype, device=dev)
        for lv, r in enumerate(rs[1:]):
            size = (1 << lv) * block
            for n in range(r.shape[2]):
                out[:, :, starts[lv] + n, n * size : (n + 1) * size] = r[:, :, n]
        return out

    return torch.cat(kbars, 2), torch.cat(vbars, 2), lists.to(dev), ok.to(dev), dense


SPANS = {"fixed": _fixed_spans, "axial": _axial_spans, "logsparse": _logsparse_spans}


def _parts(q, k, v, scale, q_offset, causal, block, pool, span_query, factorization):
    """The direct and abstraction probabilities of every row: pl (B, H, Tq, block) over the row's own block,
    ps (B, H, Tq, A) over the row's spans, plus the blocks of v, the spans' values gathered per query block
    (B, H, nqb, A, Dv), and the dense in-span distribution (a callable, for inspection)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if q_offset + Tq > Tk:
        raise ValueError(f"combiner: queries at {q_offset}..{q_offset + Tq - 1} need keys up to there, "
                         f"got kv_len={Tk}")
    sq = per_head("span_query", span_query, (H, D), q)
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    nb = -(-Tk // block)
    pad = nb * block - Tk
    kb = F.pad(k, (0, 0, 0, pad)).view(B, H, nb, block, D)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, H, nb, block, v.shape[-1])
    valid = (torch.arange(nb * block, device=k.device) < Tk).view(nb, block)
    kbar, vbar, lists, ok, dense = SPANS[factorization](k, v, kb, vb, valid, block, pool, sq, scale, causal)
    pos = torch.arange(Tq, device=q.device) + q_offset
    own = pos // block  # (Tq,)
    # everything per query block (rows padded to whole blocks): the rows of a block share their own keys and spans
    first, lead = q_offset // block, q_offset % block
    nqb = -(-(lead + Tq) // block)
    qb = F.pad(q, (0, 0, lead, nqb * block - lead - Tq)).view(B, H, nqb, block, D)
    rows = lambda t: t.flatten(2, 3)[:, :, lead : lead + Tq]  # noqa: E731
    local = rows(qb @ kb[:, :, first : first + nqb].transpose(-1, -2)) * scale  # (B, H, Tq, block)
    key_pos = own[:, None] * block + torch.arange(block, device=q.device)
    ok_local = valid[own] & ((key_pos <= pos[:, None]) if causal else True)
    local = local.masked_fill(~ok_local, float("-inf"))
    sel = lists[first : first + nqb]  # (nqb, A)
    summ = rows(qb @ kbar[:, :, sel].transpose(-1, -2)) * scale  # (B, H, Tq, A)
    summ = summ.masked_fill(~ok[own], float("-inf"))
    w = torch.cat([local, summ], dim=-1).softmax(-1)  # one partition function Z_i
    return w[..., :block], w[..., block:], own, vb, vbar[:, :, sel], lists, dense


def combiner_probs(q: Tensor, k: Tensor, *, scale: float, q_offset: int = 0, causal: bool = True, block: int = 64,
                   pool: str = "max", span_query: Tensor | None = None, factorization: str = "fixed") -> Tensor:
    """The fast path's factorized ``p(j|i)`` spread over every key: (B, H, Tq, Tk), rows summing to 1 (for
    inspection and tests; materializes Tq x Tk)."""
    _check("combiner", None, block, pool, factorization)
    pl, ps, own, _, _, lists, dense = _parts(q, k, k, scale, q_offset, causal, block, pool, span_query,
                                             factorization)
    B, H, Tq = q.shape[:3]
    nb = -(-k.shape[2] // block)
    spread = dense()[:, :, lists[own]]  # (B, H, Tq, A, nb * block): each span's in-span distribution
    full = torch.einsum("bhqa,bhqak->bhqk", ps, spread)
    direct = torch.zeros_like(full).view(B, H, Tq, nb, block)
    direct[:, :, torch.arange(Tq, device=q.device), own] = pl
    return (full + direct.view(B, H, Tq, nb * block))[..., : k.shape[2]]


def _plain_spans(factorization: str, p: int, Tk: int, block: int, causal: bool) -> tuple[list[int], list[list[int]]]:
    """Row at position ``p``: its direct keys and its spans' member keys, from the factorization's rule written
    with plain loops over positions (independent of the fast path's tables)."""
    b = p // block
    nb = -(-Tk // block)
    direct = [j for j in range(b * block, min(b * block + block, Tk)) if not causal or j <= p]
    blocks = lambda lo, hi: list(range(lo * block, min(hi * block, Tk)))  # noqa: E731  keys of blocks lo..hi-1
    spans: list[list[int]] = []
    if factorization == "fixed":
        spans = [blocks(c, c + 1) for c in range(nb) if ((c < b) if causal else (c != b))]
    elif factorization == "axial":
        for c in range(block):
            members = [j for j in range(c, Tk, block) if ((j // block < b) if causal else (j // block != b))]
            if members:
                spans.append(members)
    else:  # logsparse: leftwards from b, then (bidirectional) rightwards; sizes at most double, nodes aligned
        edge, cap = b, 1
        while edge > 0:
            size = 1
            while size * 2 <= cap and edge % (size * 2) == 0:
                size *= 2
            spans.append(blocks(edge - size, edge))
            edge, cap = edge - size, cap * 2
        edge, cap = b + 1, 1
        while not causal and edge < nb:
            size = 1
            while size * 2 <= cap and edge % (size * 2) == 0 and edge + size * 2 <= nb:
                size *= 2
            spans.append(blocks(edge, edge + size))
            edge, cap = edge + size, cap * 2
    return direct, spans


def _combiner_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                        causal: bool = True, block: int = 64, pool: str = "max", span_query: Tensor | None = None,
                        factorization: str = "fixed") -> Tensor:
    """Float64, explicit factorization: for each row, its direct keys and its spans (``_plain_spans``), each span's
    pooled key and in-span distribution from an explicit loop over its members, one partition function; the
    probability of every key is written into a (Tq, Tk) matrix, then applied to v."""
    _check("combiner", mask, block, pool, factorization)
    H, Tq, Tk, D = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
    q, k, v = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    sq = per_head("span_query", span_query, (H, D), q)
    rows = []
    for i in range(Tq):
        p = q_offset + i
        direct, spans = _plain_spans(factorization, p, Tk, block, causal)
        scores = [(q[:, :, i] * k[:, :, j]).sum(-1) * scale for j in direct]
        dists = []
        for members in spans:
            ks = torch.stack([k[:, :, j] for j in members], dim=2)  # (B, H, m, D)
            kbar = ks.max(dim=2).values if pool == "max" else ks.mean(dim=2)
            w = kbar * scale if sq is None else sq.view(1, H, D).expand_as(kbar)
            dists.append(torch.softmax(torch.einsum("bhmd,bhd->bhm", ks, w), dim=-1))
            scores.append((q[:, :, i] * kbar).sum(-1) * scale)
        prob = torch.softmax(torch.stack(scores, -1), dim=-1)
        row = torch.zeros(q.shape[0], H, Tk, dtype=torch.float64)
        for n, j in enumerate(direct):
            row[:, :, j] = row[:, :, j] + prob[..., n]
        for n, (members, r) in enumerate(zip(spans, dists)):
            row[:, :, members] = row[:, :, members] + prob[..., len(direct) + n : len(direct) + n + 1] * r
        rows.append(row)
    return torch.stack(rows, dim=2) @ v


@register_op("combiner", family="dense", papers=("P283",),
             summary="Combiner (Fixed / Axial / Logsparse): direct attention in the own block, pooled abstractions "
             "of the other keys' spans, one partition function; every key reachable, O(L sqrt L) or O(L log L)",
             options={"causal": True, "block": 64, "pool": "max", "span_query": None, "factorization": "fixed"},
             reference=_combiner_reference, example={"block": 5})
def combiner_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                state: dict | None = None, causal: bool = True, block: int = 64, pool: str = "max",
                span_query: Tensor | None = None, factorization: str = "fixed") -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) at positions q_offset.. over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). Stateless (the KV cache
    holds everything the abstractions need)."""
    _check("combiner", mask, block, pool, factorization)
    pl, ps, own, vb, vbar, _, _ = _parts(q, k, v, scale, q_offset, causal, block, pool, span_query, factorization)
    # per query block (rows padded to whole blocks, as in _parts): the own block's values, the block's spans' values
    Tq, first, lead = q.shape[2], q_offset // block, q_offset % block
    nqb = -(-(lead + Tq) // block)
    blocks = lambda t: F.pad(t, (0, 0, lead, nqb * block - lead - Tq)).view(*t.shape[:2], nqb, block, -1)  # noqa: E731
    out = blocks(pl) @ vb[:, :, first : first + nqb] + blocks(ps) @ vbar
    out = out.flatten(2, 3)[:, :, lead : lead + Tq]
    return out if state is None else (out, state)


# ---- the layer -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CombinerConfig(HeadsConfig):
    """block: keys per block (the own block; Fixed's spans; Axial's row length; Logsparse's leaves) -- about
    sqrt(T) for Fixed / Axial; pool: the span's abstraction key; factorization: "fixed" | "axial" | "logsparse"."""

    dim: int = 64
    heads: int = 4
    rope: bool = True
    block: int = 64
    pool: str = "max"
    factorization: str = "fixed"

    def validate(self) -> None:
        positive_int("block", self.block)
        one_of("pool", self.pool, POOLS)
        one_of("factorization", self.factorization, FACTORIZATIONS)


@register("combiner", family="layers", papers=("P283",), year=2021, config=CombinerConfig,
          summary="Combiner (Fixed / Axial / Logsparse): direct attention in the own block, pooled abstractions of "
          "the other keys' spans with a learned in-span distribution; every key reachable")
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


__all__ = ["FACTORIZATIONS", "CombinerAttention", "CombinerConfig", "combiner_op", "combiner_probs", "logsparse_spans"]
