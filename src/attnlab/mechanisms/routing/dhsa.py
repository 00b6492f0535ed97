"""DHSA: dynamic hierarchical sparse attention [D290] -- variable-length chunks, chunk-level top-k routing.

1. **Dynamic chunking** (from content): the sequence is cut where adjacent keys stop resembling each other.
   ``sim_t`` is the cosine similarity of keys ``t - 1`` and ``t`` (averaged over kv heads); scanning left to
   right, position ``t`` opens a new chunk when the current one has ``max_len`` tokens, or has at least
   ``min_len`` and ``sim_t < threshold``. The rule is causal: a prefix is chunked the same way whatever follows,
   so decoding recomputes the same boundaries.
2. **Chunk representations**, length-normalized: ``sqrt(n) * mean`` of the chunk's keys (per kv head) and
   of its queries (per head) -- the square root keeps long and short chunks on one scale.
3. **Chunk similarity** ``<q_chunk, k_chunk>`` routes: each query reads its own chunk (causally) plus the
   ``top_k - 1`` past chunks of highest similarity (the chunk-level score upsampled to every token pair).
   Causality: the query side of a row is its chunk's queries *so far* (positions ``start .. i``); for the last
   row of a chunk this is the paper's whole-chunk representation, and every row depends only on the past, so
   decoding with a cache matches the full forward token by token.

The op ``dhsa`` has no learned parameters (training-free, as in the paper: chunks and routing come from q and k);
it keeps the queries of earlier calls in its state (``state["queries"]``): the own chunk's query
representation reads its earlier rows. A call at ``q_offset > 0`` therefore needs the state of the earlier calls.

Execution: key-centric tiles (``core.sparse.plan_selection``) with the chunks as key sets
``(B, 1, S, max_len)`` (padded with -1): queries that picked the same chunk share one gather of it; the own
(partial) chunk runs with its causal mask. Selection has no gradient (indices), as in the paper (training-free).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_scores
from attnlab.ops._engine import tile_attention, tiles_from_selection
from attnlab.ops.sparse import ALL, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def dhsa_chunks(k: Tensor, min_len: int, max_len: int, threshold: float) -> Tensor:
    """Chunk id of every key position: k (B, Hkv, T, D) -> (B, T) long, ids 0, 1, .. increasing along T."""
    positive_int("min_len", min_len)
    positive_int("max_len", max_len)
    if min_len > max_len:
        raise ValueError(f"min_len ({min_len}) must not exceed max_len ({max_len})")
    B, _, T, _ = k.shape
    with torch.no_grad():
        kn = F.normalize(k, dim=-1)
        sim = (kn[:, :, 1:] * kn[:, :, :-1]).sum(-1).mean(1)  # (B, T - 1): sim of keys t and t + 1
        low = (sim < threshold).tolist()
    ids = []
    for b in range(B):
        row, c, s = [], -1, 0
        for t in range(T):
            n = t - s
            if t == 0 or n == max_len or (n >= min_len and low[b][t - 1]):
                c, s = c + 1, t
            row.append(c)
        ids.append(row)
    return torch.tensor(ids, dtype=torch.long, device=k.device)


def chunk_layout(chunk_id: Tensor, max_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """chunk_id (B, T) -> starts (B, S), lengths (B, S), key_sets (B, 1, S, max_len) (-1 = padding)."""
    B, T = chunk_id.shape
    S = int(chunk_id.max()) + 1
    lengths = torch.zeros(B, S, dtype=torch.long, device=chunk_id.device).scatter_add_(
        1, chunk_id, torch.ones_like(chunk_id))
    starts = torch.cumsum(lengths, 1) - lengths  # chunks are contiguous and in order
    off = torch.arange(max_len, device=chunk_id.device)
    sets = torch.where(off < lengths.unsqueeze(-1), starts.unsqueeze(-1) + off, -1)
    return starts, lengths, sets.unsqueeze(1)


def chunk_keys(k: Tensor, chunk_id: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalized chunk keys ``sqrt(n) * mean = sum / sqrt(n)``: k (B, Hkv, T, D) -> (B, Hkv, S, D)."""
    B, Hkv, T, D = k.shape
    S = lengths.shape[1]
    idx = chunk_id.view(B, 1, T, 1).expand(B, Hkv, T, D)
    sums = k.new_zeros(B, Hkv, S, D).scatter_add_(2, idx, k)
    return sums / lengths.clamp(min=1).to(k.dtype).sqrt().view(B, 1, S, 1)


def dhsa_select(
    q: Tensor, q_all: Tensor, k: Tensor, top_k: int, min_len: int, max_len: int, threshold: float, q_offset: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routing: (sel, valid) each (B, H, Tq, top_k) chunk ids (entry 0: the own chunk) and key_sets.

    q (B, H, Tq, D) the call's queries at ``q_offset + r``; q_all (B, H, Tk, D) queries of every position so
    far (only the own chunks' are read); k (B, Hkv, Tk, D).
    """
    positive_int("top_k", top_k)
    B, H, Tq, D = q.shape
    dev = q.device
    chunk_id = dhsa_chunks(k, min_len, max_len, threshold)
    starts, lengths, sets = chunk_layout(chunk_id, max_len)
    with torch.no_grad():
        S = starts.shape[1]
        pos = torch.arange(Tq, device=dev) + q_offset
        cur = chunk_id[:, pos]  # (B, Tq)
        s_row = torch.gather(starts, 1, cur)  # (B, Tq) start of each row's chunk
        # query side: sum of the chunk's queries from its start to the row, / sqrt(count)
        s0 = int(s_row.min())
        cs = torch.cumsum(q_all[:, :, s0:], dim=2)  # (B, H, Tk - s0, D)
        take = lambda i: torch.gather(cs, 2, i.view(B, 1, Tq, 1).expand(B, H, Tq, D))  # noqa: E731
        before = torch.where((s_row > s0).view(B, 1, Tq, 1), take((s_row - 1 - s0).clamp(min=0)), 0.0)
        count = (pos.view(1, Tq) - s_row + 1).to(q.dtype)
        q_rep = (take(pos.view(1, Tq).expand(B, Tq) - s0) - before) / count.sqrt().view(B, 1, Tq, 1)
        k_rep = chunk_keys(k, chunk_id, lengths)  # (B, Hkv, S, D)
        score = grouped_scores(q_rep, k_rep)
        past = torch.arange(S, device=dev).view(1, 1, S) < cur.unsqueeze(-1)  # (B, Tq, S)
        score = score.masked_fill(~past.unsqueeze(1), float("-inf"))
        n = min(top_k - 1, S)
        val, idx = score.topk(n, dim=-1)
        sel = torch.cat([cur.view(B, 1, Tq, 1).expand(B, H, Tq, 1), idx], -1)
        valid = torch.cat([torch.ones(B, H, Tq, 1, dtype=torch.bool, device=dev), torch.isfinite(val)], -1)
    return sel, valid, sets


def dhsa_attention(
    q: Tensor, k: Tensor, v: Tensor, top_k: int, min_len: int, max_len: int, threshold: float = 0.5,
    q_all: Tensor | None = None, scale: float | None = None, q_offset: int | None = None, q_block: int = 128,
) -> Tensor:
    """Causal DHSA. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); rows at ``q_offset + r``.

    ``q_all`` (B, H, Tk, D): the queries of every position (defaults to q when Tq == Tk); decoding passes
    the cached queries so the own chunk's representation sees its earlier rows.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    if q_all is None:
        if Tq != Tk:
            raise ValueError("dhsa needs q_all (queries of every position) when Tq != Tk")
        q_all = q
    if q_all.shape[:3] != (B, H, Tk):
        raise ValueError(f"q_all must have shape (B, H, Tk, D) = {(B, H, Tk, D)}, got {tuple(q_all.shape)}")
    sel, valid, sets = dhsa_select(q, q_all, k, top_k, min_len, max_len, threshold, q_offset)
    parts = tiles_from_selection(sel, valid, sets, Hkv, Tk, q_offset, True, q_block)
    return tile_attention(q, k, v, parts, default_scale(D, scale))


def dhsa_mask(q: Tensor, k: Tensor, top_k: int, min_len: int, max_len: int, threshold: float) -> Tensor:
    """Dense (B, H, T, T) mask of DHSA's selection (prefill), written plainly with loops (for the reference)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    cid = dhsa_chunks(k, min_len, max_len, threshold)
    mask = torch.zeros(B, H, T, T, dtype=torch.bool, device=q.device)
    for b in range(B):
        ids = cid[b].tolist()
        members = {}
        for t, c in enumerate(ids):
            members.setdefault(c, []).append(t)
        for h in range(H):
            kh = k[b, h // (H // Hkv)]
            k_rep = {c: kh[m].mean(0) * len(m) ** 0.5 for c, m in members.items()}
            for i in range(T):
                c = ids[i]
                seen = [t for t in members[c] if t <= i]
                q_rep = q[b, h, seen].mean(0) * len(seen) ** 0.5
                scores = torch.stack([q_rep @ k_rep[p] for p in range(c)]) if c else torch.zeros(0)
                chosen = [c] + scores.topk(min(top_k - 1, c)).indices.tolist()
                for p in chosen:
                    mask[b, h, i, members[p]] = True
    return mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()


# ---- the op and the layer ----------------------------------------------------------------------------------


def _dhsa_weights(q: Tensor, k: Tensor, *, q_offset: int, top_k: int = 4, min_len: int = 16, max_len: int = 64,
                  threshold: float = 0.5, **_: Any) -> Tensor:
    if q_offset != 0 or q.shape[2] != k.shape[2]:
        raise ValueError("dhsa's selection reads the queries of every position: its weights_mask needs the full "
                         "sequence (q_offset 0, Tq == Tk)")
    return dhsa_mask(q, k, top_k, min_len, max_len, threshold)


@sparse_op("dhsa", papers=("D290",), summary="dynamic variable-length chunks (adjacent-key similarity); "
           "length-normalized chunk top-k routing", options={"top_k": 4, "min_len": 16, "max_len": 64,
           "threshold": 0.5}, weights_mask=_dhsa_weights, stateful=True, causal_only=True,
           dense_options={"top_k": ALL}, example={"top_k": 2, "min_len": 2, "max_len": 5, "threshold": 0.0})
def dhsa_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, top_k: int, min_len: int,
            max_len: int, threshold: float) -> Tensor:
    """Causal DHSA: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). ``state["queries"]``: the queries of
    every position so far (appended here), which the own chunk's representation reads."""
    q_all = q if "queries" not in state else torch.cat([state["queries"], q], 2)
    if q_all.shape[2] != k.shape[2]:
        raise ValueError(f"dhsa needs the queries of every position ({k.shape[2]} keys, {q_all.shape[2]} queries "
                         "seen): pass the same state=OpState() from the first call on")
    state["queries"] = q_all.detach()
    return dhsa_attention(q, k, v, top_k, min_len, max_len, threshold, q_all=q_all, scale=scale, q_offset=q_offset)


@dataclass(frozen=True)
class DHSAConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    top_k: int = 4  # chunks per query, the own chunk included
    min_len: int = 16
    max_len: int = 64
    threshold: float = 0.5  # cosine similarity of adjacent keys below which a boundary may open
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        self.check("top_k", "min_len", "max_len")
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must not exceed max_len ({self.max_len})")


@register(
    "dhsa", family="routing", papers=("D290",), year=2025, config=DHSAConfig,
    summary="dynamic variable-length chunks (adjacent-key similarity); length-normalized chunk top-k routing",
)
class DHSAAttention(RoutingLayer):
    op = "dhsa"
