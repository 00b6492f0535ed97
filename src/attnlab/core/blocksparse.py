"""Block-sparse execution that computes only allowed work, forward and backward, on any device.

A *gather plan* splits the queries into groups of ``group`` rows (in the pattern's ``query_order``) and
lists, per group (and per head for per-head patterns), the union of keys any of its queries may see.
Execution gathers those keys and values and makes one batched call to PyTorch's fused SDPA kernel with
the exact mask of the tile, so the cost is ``queries x keys-in-union`` instead of ``queries x all keys``,
and autograd comes from SDPA's own backward plus the gathers' scatter-add.

Plans for static patterns are cached by (pattern, lengths, offset, group, device). Dynamic methods
(top-k blocks, routing) build a plan per call with :func:`plan_from_blocks`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .patterns import Pattern
from .score_mods import ScoreMod

# Query rows per tile, per device type. `attnlab bench speed` measures the fastest and saves it in
# ~/.cache/attnlab/tuning.json (ATTNLAB_CACHE overrides the folder); later processes start from it.
DEFAULT_GROUP = {"cpu": 128, "cuda": 128}


def _tuning_file() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab")) / "tuning.json"


def save_tuned_group(device_type: str, group: int) -> None:
    path = _tuning_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data[f"group/{device_type}"] = group
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    except (OSError, ValueError):  # a read-only or corrupt cache must not break a benchmark
        pass


def _load_tuned() -> None:
    try:
        data = json.loads(_tuning_file().read_text())
    except (OSError, ValueError):
        return
    for key, val in data.items():
        if key.startswith("group/") and isinstance(val, int) and val in (32, 64, 128, 256, 512):
            DEFAULT_GROUP[key.split("/", 1)[1]] = val


_load_tuned()
_EVAL_BUDGET = 1 << 25  # mask elements evaluated at once while building a plan


@dataclass(frozen=True, eq=False)
class GatherPlan:
    """Which keys each group of queries reads.

    q_rows:   (G, Bq)          call-relative query rows of each group (the last group padded by repeats)
    inv:      (Tq,)            position of query row i in the flattened (G * Bq) layout
    kv_index: (Bp, Hp, G, Kg)  key positions gathered for each group (Bp: 1 or batch; Hp: 1 or heads)
    mask:     (Bp, Hp, G, Bq, Kg) which gathered keys each query may see
    empty:    (Bp, Hp, G, Bq, 1) or None: rows that see no key at all (their output is zero)
    pairs:    allowed (query, key) pairs averaged over heads and batch, for FLOP accounting
    span:     (first, pad_front, pad_back) when group g reads the contiguous keys first + g*Bq + [0, Kg)
              and queries are in natural order: the engine then takes overlapping *views* of the padded
              keys (``unfold``) instead of gathering copies -- sliding windows, chunks, local bands.
    """

    q_rows: Tensor
    inv: Tensor
    kv_index: Tensor
    mask: Tensor
    empty: Tensor | None
    pairs: float
    span: tuple[int, int, int] | None = None

    @property
    def computed_pairs(self) -> int:
        """Pairs the kernel really computes per head (allowed plus padding inside tiles)."""
        G, Bq = self.q_rows.shape
        return G * Bq * self.kv_index.shape[-1]


def _finish(
    q_rows: Tensor, inv: Tensor, kv_index: Tensor, mask: Tensor, span: tuple[int, int, int] | None = None
) -> GatherPlan:
    row_any = mask.any(dim=-1, keepdim=True)
    empty = None if bool(row_any.all()) else ~row_any
    if empty is not None:
        mask = mask | empty  # let empty rows see their tile; their output is zeroed afterwards
    pairs = float(mask.sum(dtype=torch.float64) - (0 if empty is None else empty.sum() * mask.shape[-1]))
    pairs /= mask.shape[0] * mask.shape[1]
    # duplicate padding rows of the last group were counted too; remove them
    G, Bq = q_rows.shape
    pad = G * Bq - inv.numel()
    if pad:
        last = mask[:, :, -1, Bq - pad :].sum(dtype=torch.float64) / (mask.shape[0] * mask.shape[1])
        pairs -= float(last)
    return GatherPlan(q_rows, inv, kv_index, mask, empty, pairs, span)


def _query_groups(order: Tensor, group: int) -> tuple[Tensor, Tensor]:
    Tq = order.numel()
    G = math.ceil(Tq / group)
    pad = G * group - Tq
    padded = torch.cat([order, order[-1:].expand(pad)]) if pad else order
    inv = torch.empty_like(order)
    inv[order] = torch.arange(Tq, device=order.device)
    return padded.view(G, group), inv


@lru_cache(maxsize=64)
def _static_plan(pattern: Pattern, Tq: int, Tk: int, q_offset: int, group: int, device: str) -> GatherPlan:
    order = pattern.query_order(Tq, q_offset)
    order = torch.arange(Tq) if order is None else order.to(torch.long)
    q_rows, inv = _query_groups(order, group)
    G = q_rows.shape[0]
    Hp = pattern.num_heads or 1
    kv_pos = torch.arange(Tk)
    # pass 1: union of keys per group (chunks of groups keep the evaluated mask bounded)
    per_chunk = max(1, _EVAL_BUDGET // (Hp * group * Tk))
    unions = []
    for g0 in range(0, G, per_chunk):
        qp = (q_rows[g0 : g0 + per_chunk] + q_offset)[..., None]  # (g, Bq, 1)
        unions.append(pattern.eval_mask(qp, kv_pos).any(dim=-2))  # (Hp, g, Tk)
    union = torch.cat(unions, dim=1)
    counts = union.sum(dim=-1)
    Kg = max(1, int(counts.max()))
    span = _uniform_span(union, counts, group, Kg) if Hp == 1 and pattern.query_order(Tq, q_offset) is None else None
    if span is not None:
        first, K = span
        kv_index = (first + group * torch.arange(G).view(1, G, 1) + torch.arange(K)).view(1, G, K)
        inside = (kv_index >= 0) & (kv_index < Tk)
        pad = (max(0, -first), max(0, int(kv_index.max()) - (Tk - 1)))
        kv_index = kv_index.clamp(0, Tk - 1)
        span_info = (first, pad[0], pad[1])
    else:
        # stable sort puts the allowed keys first, in increasing position
        kv_index = torch.sort(union.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :Kg]
        inside = torch.gather(union, -1, kv_index)  # padded keys are never allowed
        span_info = None
    # pass 2: exact mask of each tile
    K = kv_index.shape[-1]
    qp = (q_rows + q_offset).view(1, G, group, 1)
    mask = pattern.eval_mask(qp, kv_index.view(Hp, G, 1, K), heads=torch.arange(Hp).view(Hp, 1, 1, 1))
    mask = mask & inside.unsqueeze(-2)
    dev = torch.device(device)
    return _finish(
        q_rows.to(dev), inv.to(dev), kv_index.unsqueeze(0).to(dev), mask.unsqueeze(0).to(dev), span_info
    )


def _uniform_span(union: Tensor, counts: Tensor, group: int, Kg: int) -> tuple[int, int] | None:
    """(first, K) if every group's keys are one contiguous run inside ``first + g*group + [0, K)`` with
    K at most 25% above the largest union -- then overlapping views replace gathers."""
    G, Tk = union.shape[1], union.shape[2]
    pos = torch.arange(Tk)
    lo = torch.where(union[0], pos, Tk).min(dim=-1).values
    hi = torch.where(union[0], pos, -1).max(dim=-1).values
    nonempty = counts[0] > 0
    if not bool(nonempty.any()) or not bool((counts[0] == (hi - lo + 1))[nonempty].all()):
        return None
    base = group * torch.arange(G)
    first = int((lo - base)[nonempty].min())
    last = int((hi - base)[nonempty].max())
    K = last - first + 1
    return (first, K) if K <= 1.25 * Kg + 8 else None


def static_plan(pattern: Pattern, Tq: int, Tk: int, q_offset: int, group: int, device: torch.device) -> GatherPlan:
    return _static_plan(pattern, Tq, Tk, q_offset, group, str(device))


def plan_from_blocks(
    block_index: Tensor,
    block_valid: Tensor,
    Tq: int,
    Tk: int,
    block: int,
    q_offset: int = 0,
    causal: bool = True,
) -> GatherPlan:
    """Plan for dynamic block selection: query block g reads key blocks ``block_index[..., g, :]``.

    block_index: (B, H, G, nsel) long, key-block ids per query block of ``block`` rows (G = ceil(Tq / block))
    block_valid: (B, H, G, nsel) bool, False for padding entries
    The exact tile mask adds causality (absolute positions, query row r at ``q_offset + r``) if asked.
    """
    B, H, G, nsel = block_index.shape
    dev = block_index.device
    q_rows, inv = _query_groups(torch.arange(Tq, device=dev), block)
    offs = torch.arange(block, device=dev)
    kv_index = (block_index.unsqueeze(-1) * block + offs).flatten(-2)  # (B, H, G, nsel * block)
    valid = (block_valid.unsqueeze(-1) & (kv_index.view(B, H, G, nsel, block) < Tk)).flatten(-2)
    kv_index = kv_index.clamp(max=Tk - 1)
    valid = valid.unsqueeze(-2)  # (B, H, G, 1, K)
    if causal:
        qp = (q_rows + q_offset).view(1, 1, G, block, 1)
        valid = valid & (kv_index.unsqueeze(-2) <= qp)
    mask = valid.expand(B, H, G, block, kv_index.shape[-1])
    return _finish(q_rows, inv, kv_index, mask)


def _gather_heads(t: Tensor, kv_index: Tensor) -> Tensor:
    """t (B, Hkv, Tk, D), kv_index (Bp, Hp, G, Kg) -> (B, Hg, G, Kg, D).

    Hp is 1 (every head reads the same keys: Hg = Hkv), Hkv (per key/value head) or the query heads
    (per query head: each reads its own kv head's keys, Hg = Hp).
    """
    B, Hkv = t.shape[:2]
    Bp, Hp = kv_index.shape[:2]
    if Bp == 1 and Hp == 1:
        return t[:, :, kv_index[0, 0]]
    hsel = torch.arange(max(Hp, Hkv), device=t.device)
    if Hp > Hkv:
        hsel = hsel // (Hp // Hkv)
    bidx = torch.arange(B, device=t.device).view(B, 1, 1, 1)
    idx = kv_index.expand(B, hsel.numel(), *kv_index.shape[2:])
    return t[bidx, hsel.view(1, -1, 1, 1), idx]


def _to_heads(x: Tensor, dim: int, heads: int) -> Tensor:
    """Repeat a per-kv-head axis to query heads (GQA); leave size 1 or ``heads`` alone."""
    n = x.shape[dim]
    return x if n in (1, heads) else x.repeat_interleave(heads // n, dim=dim)


def run_plan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    plan: GatherPlan,
    scale: float,
    score_mod: ScoreMod | None = None,
    q_offset: int = 0,
) -> Tensor:
    """Attention restricted to the plan's tiles. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    B, H, Tq, D = q.shape
    G, Bq = plan.q_rows.shape
    Kg = plan.kv_index.shape[-1]
    if score_mod is not None and score_mod.kind == "scale":
        q = q * score_mod.factor(H, q.device, q.dtype).view(1, H, 1, 1)
        score_mod = None
    if plan.span is not None:
        qg, kg, vg = _span_views(q, k, v, plan)
    else:
        qg = q[:, :, plan.q_rows].transpose(1, 2).reshape(B * G, H, Bq, D)
        kg = _gather_heads(k, plan.kv_index)
        vg = _gather_heads(v, plan.kv_index)
        kg = kg.transpose(1, 2).reshape(B * G, kg.shape[1], Kg, D)
        vg = vg.transpose(1, 2).reshape(B * G, vg.shape[1], Kg, v.shape[-1])
    Hg = kg.shape[1]
    mask = _to_heads(plan.mask, 1, H).transpose(1, 2)  # (Bp, G, Hp, Bq, Kg), Hp in {1, H}
    Hp = mask.shape[2]
    if score_mod is None:
        attn_mask = mask.expand(B, G, Hp, Bq, Kg).reshape(B * G, Hp, Bq, Kg)
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=attn_mask, scale=scale, enable_gqa=Hg != H)
    else:
        # absolute positions of every tile entry, to evaluate the modifier on gathered indices
        q_pos = (plan.q_rows + q_offset).view(1, G, 1, Bq, 1)
        kv_pos = _to_heads(plan.kv_index, 1, H).transpose(1, 2).unsqueeze(-2)  # (Bp, G, Hp, 1, Kg)
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, 1, H, 1, 1)
        if score_mod.kind == "additive":
            bias = score_mod.bias(b, h, q_pos, kv_pos).to(q.dtype)
            bias = bias.masked_fill(~mask, float("-inf")).expand(B, G, H, Bq, Kg).reshape(B * G, H, Bq, Kg)
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale, enable_gqa=Hg != H)
        else:
            if Hg != H:
                kg = kg.repeat_interleave(H // Hg, dim=1)
                vg = vg.repeat_interleave(H // Hg, dim=1)
            s = (qg @ kg.transpose(-1, -2)) * scale
            s = score_mod.score_mod(s.view(B, G, H, Bq, Kg), b, h, q_pos, kv_pos)
            s = s.masked_fill(~mask, float("-inf"))
            out = (torch.softmax(s, dim=-1).view(B * G, H, Bq, Kg) @ vg)
    Dv = v.shape[-1]
    out = out.view(B, G, H, Bq, Dv)
    if plan.empty is not None:
        out = out.masked_fill(_to_heads(plan.empty, 1, H).transpose(1, 2), 0.0)
    out = out.transpose(1, 2).reshape(B, H, G * Bq, Dv)
    return out[:, :, :Tq] if plan.span is not None else out[:, :, plan.inv]


def _span_views(q: Tensor, k: Tensor, v: Tensor, plan: GatherPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Tiles as views: queries split in place, keys/values as overlapping windows of the padded sequence."""
    B, H, Tq, D = q.shape
    G, Bq = plan.q_rows.shape
    Kg = plan.kv_index.shape[-1]
    first, pad_front, pad_back = plan.span
    if G * Bq != Tq:
        q = F.pad(q, (0, 0, 0, G * Bq - Tq))
    qg = q.view(B, H, G, Bq, D).transpose(1, 2).reshape(B * G, H, Bq, D)

    def windows(t: Tensor) -> Tensor:
        t = F.pad(t, (0, 0, pad_front, pad_back))
        start = first + pad_front  # where group 0's window begins in the padded sequence
        t = t[:, :, start : start + (G - 1) * Bq + Kg]
        w = t.unfold(2, Kg, Bq)  # (B, Hkv, G, Dh, Kg) -- a view, no copy
        return w.permute(0, 2, 1, 4, 3).reshape(B * G, t.shape[1], Kg, t.shape[-1])

    return qg, windows(k), windows(v)
