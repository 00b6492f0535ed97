"""The one tile planner: static patterns and dynamic selections become one :class:`Plan`.

A plan says, for every query row, which keys it reads, as *parts* over disjoint key sets (a query may appear in
several parts, one per selected key set; the executor merges them by log-sum-exp). Part kinds, chosen by the
planner mode for speed, all executed by :mod:`attnlab.core.sparse.executor`:

* :class:`PatternTiles` (``plan_pattern``, static patterns): queries in groups of ``q_block`` rows (in the
  pattern's ``query_order``), each group reading the union of the keys any of its rows may see, with the exact
  mask; heads are batched in one kernel call, and contiguous bands (sliding windows, chunks) are read as
  overlapping *views* of K/V instead of gathered copies. Cached per (pattern, lengths, offset, q_block, device).
* :class:`Tiles`, query-centric (``plan_blocks``: query block ``g`` reads key blocks ``block_index[..., g, :]``;
  or built by hand for per-query key lists): a tile is some query rows and the keys they read, with an exact mask.
* :class:`Tiles` / :class:`BlockTiles`, key-centric (``plan_selection``: per-query selections of key sets, MoBA,
  routing, clusters): pairs (query, set) are grouped by set, so a key set is read once per tile of up to
  ``q_block`` queries that chose it, never once per query; aligned block sets run with no K/V copy at all.
* the causal *diagonal* (``diag_block``): causal attention inside each contiguous block (MoBA's own block).

Every plan can also be described as a :class:`~attnlab.core.sparse.layout.BlockLayout` (``Plan.layout()``,
built lazily and only when an engine needs it: the native CPU kernel), the interface any kernel implements.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..patterns import Pattern
from .layout import BlockLayout

# Query rows per tile of a pattern plan, per device type. `attnlab bench speed` measures the fastest and saves
# it in ~/.cache/attnlab/tuning.json (ATTNLAB_CACHE overrides the folder); later processes start from it.
DEFAULT_Q_BLOCK = {"cpu": 128, "cuda": 128}
_TUNED = (32, 64, 128, 256, 512)


def _tuning_file() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab")) / "tuning.json"


def save_tuned_q_block(device_type: str, q_block: int) -> None:
    """Remember the measured best ``q_block`` of pattern plans for a device type (and use it from now on)."""
    DEFAULT_Q_BLOCK[device_type] = q_block
    path = _tuning_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        data.pop(f"group/{device_type}", None)  # the knob's old name
        data[f"q_block/{device_type}"] = q_block
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
    except (OSError, ValueError):  # a read-only or corrupt cache must not break a benchmark
        pass


def _load_tuned() -> None:
    try:
        data = json.loads(_tuning_file().read_text())
    except (OSError, ValueError):
        return
    for prefix in ("group/", "q_block/"):  # files written before the rename still count
        for key, val in data.items():
            if key.startswith(prefix) and isinstance(val, int) and val in _TUNED:
                DEFAULT_Q_BLOCK[key.split("/", 1)[1]] = val


_load_tuned()
_EVAL_BUDGET = 1 << 25  # mask elements evaluated at once while building a plan


def default_q_block(device: torch.device | str) -> int:
    return DEFAULT_Q_BLOCK.get(torch.device(device).type, 128)


@dataclass(frozen=True, eq=False)
class PatternTiles:
    """A static pattern's part: which keys each group of ``q_block`` queries reads (heads batched).

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
) -> PatternTiles:
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
    return PatternTiles(q_rows, inv, kv_index, mask, empty, pairs, span)


def _query_groups(order: Tensor, q_block: int) -> tuple[Tensor, Tensor]:
    Tq = order.numel()
    G = math.ceil(Tq / q_block)
    pad = G * q_block - Tq
    padded = torch.cat([order, order[-1:].expand(pad)]) if pad else order
    inv = torch.empty_like(order)
    inv[order] = torch.arange(Tq, device=order.device)
    return padded.view(G, q_block), inv


def _static_plan(pattern: Pattern, Tq: int, Tk: int, q_offset: int, q_block: int, device: str) -> PatternTiles:
    order = pattern.query_order(Tq, q_offset)
    order = torch.arange(Tq) if order is None else order.to(torch.long)
    q_rows, inv = _query_groups(order, q_block)
    G = q_rows.shape[0]
    Hp = pattern.num_heads or 1
    kv_pos = torch.arange(Tk)
    # pass 1: union of keys per group (chunks of groups keep the evaluated mask bounded)
    per_chunk = max(1, _EVAL_BUDGET // (Hp * q_block * Tk))
    unions = []
    for g0 in range(0, G, per_chunk):
        qp = (q_rows[g0 : g0 + per_chunk] + q_offset)[..., None]  # (g, Bq, 1)
        unions.append(pattern.eval_mask(qp, kv_pos).any(dim=-2))  # (Hp, g, Tk)
    union = torch.cat(unions, dim=1)
    counts = union.sum(dim=-1)
    Kg = max(1, int(counts.max()))
    span = _uniform_span(union, counts, q_block, Kg) if Hp == 1 and pattern.query_order(Tq, q_offset) is None else None
    if span is not None:
        first, K = span
        kv_index = (first + q_block * torch.arange(G).view(1, G, 1) + torch.arange(K)).view(1, G, K)
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
    qp = (q_rows + q_offset).view(1, G, q_block, 1)
    mask = pattern.eval_mask(qp, kv_index.view(Hp, G, 1, K), heads=torch.arange(Hp).view(Hp, 1, 1, 1))
    mask = mask & inside.unsqueeze(-2)
    dev = torch.device(device)
    return _finish(
        q_rows.to(dev), inv.to(dev), kv_index.unsqueeze(0).to(dev), mask.unsqueeze(0).to(dev), span_info
    )


def _uniform_span(union: Tensor, counts: Tensor, q_block: int, Kg: int) -> tuple[int, int] | None:
    """(first, K) if every group's keys are one contiguous run inside ``first + g*q_block + [0, K)`` with
    K at most 25% above the largest union -- then overlapping views replace gathers."""
    G, Tk = union.shape[1], union.shape[2]
    pos = torch.arange(Tk)
    lo = torch.where(union[0], pos, Tk).min(dim=-1).values
    hi = torch.where(union[0], pos, -1).max(dim=-1).values
    nonempty = counts[0] > 0
    if not bool(nonempty.any()) or not bool((counts[0] == (hi - lo + 1))[nonempty].all()):
        return None
    base = q_block * torch.arange(G)
    first = int((lo - base)[nonempty].min())
    last = int((hi - base)[nonempty].max())
    K = last - first + 1
    return (first, K) if K <= 1.25 * Kg + 8 else None


@dataclass(frozen=True, eq=False)
class Tiles:
    """One part of a selection: tile ``t`` reads keys ``k_idx[t]`` for query rows ``q_idx[t]``.

    q_idx:  (N, R) long, flat query row in ``(B * H * Tq)`` (padding slots repeat a real row)
    k_idx:  (N, K) long, flat key row in ``(B * Hkv * Tk)``
    row_ok: (N, R) bool, False for padding slots
    mask:   (N, R, K) bool or None (None: every key of the tile is visible to every row)
    k_block: (N, m) long or None: when each tile's keys are m aligned blocks of K / m rows, their indices
            among the ``(B * Hkv * Tk * m / K)`` blocks (gathers then copy whole blocks, not rows)
    q_in_order: the tiles cover every query row once, in order (the fused path then reads Q and writes the
            output and its gradient as views)
    """

    q_idx: Tensor
    k_idx: Tensor
    row_ok: Tensor
    mask: Tensor | None = None
    k_block: Tensor | None = None
    q_in_order: bool = False  # q_idx is arange(N * R).view(N, R): queries are read as a view, not gathered

    @property
    def computed_pairs(self) -> int:
        return self.q_idx.numel() * self.k_idx.shape[-1]

    def allowed_pairs(self) -> int:
        """(query, key) pairs that really count (padding rows and masked keys excluded)."""
        if self.mask is None:
            return int(self.row_ok.sum()) * self.k_idx.shape[-1]
        return int((self.mask & self.row_ok.unsqueeze(-1)).sum())


@dataclass(frozen=True, eq=False)
class BlockTiles:
    """Key-centric part over aligned key blocks, run as one kernel call per key block with *no* K/V copy.

    Key block ``blocks[i]`` (positions ``blocks[i] * block ..``, the same block for every batch row and
    head) is read by queries ``q_idx[:, cols[i]:cols[i + 1]]``:
    q_idx:  (B * H, C) long, flat query rows (padding slots repeat a real row); C = sum of the per-block widths
    row_ok: (B * H, C) bool
    """

    block: int
    blocks: list[int]
    cols: list[int]
    q_idx: Tensor
    row_ok: Tensor

    @property
    def computed_pairs(self) -> int:
        return self.q_idx.numel() * self.block

    def allowed_pairs(self) -> int:
        return int(self.row_ok.sum()) * self.block


def flat_key_index(pos: Tensor, b: Tensor, hkv: Tensor, Hkv: int, Tk: int) -> Tensor:
    """Flat key rows ``(b * Hkv + hkv) * Tk + pos`` (pos clamped into range; masks handle padding)."""
    return (b * Hkv + hkv) * Tk + pos.clamp(0, Tk - 1)


def _selection_parts(
    sel: Tensor,
    valid: Tensor,
    key_sets: Tensor,
    Hkv: int,
    Tk: int,
    q_offset: int = 0,
    causal: bool = True,
    rows: int = 128,
) -> list[Tiles]:
    """Key-centric tiles for per-query set selections.

    sel:      (B, H, Tq, n) long, key-set ids per query (distinct per query where valid)
    valid:    (B, H, Tq, n) bool
    key_sets: (Bs, Hs, S, K) long key positions of each set (Bs in {1, B}, Hs in {1, H}); entries < 0 or
              >= Tk are padding
    Returns up to two parts: sets every selecting query sees entirely (no mask), and the rest (exact mask
    from padding and, if ``causal``, key position <= query position ``q_offset + row``).
    """
    B, H, Tq, n = sel.shape
    Bs, Hs, S, K = key_sets.shape
    dev = sel.device
    rep = H // Hkv
    set_ok = (key_sets >= 0) & (key_sets < Tk)  # (Bs, Hs, S, K)
    set_max = key_sets.masked_fill(~set_ok, -1).amax(-1)  # (Bs, Hs, S)
    set_full = set_ok.all(-1)
    bi, hi, qi, si = valid.nonzero(as_tuple=True)
    sid = sel[bi, hi, qi, si]
    bs, hs = (bi if Bs > 1 else torch.zeros_like(bi)), (hi if Hs > 1 else torch.zeros_like(hi))
    qpos = qi + q_offset
    full = set_full[bs, hs, sid]
    if causal:
        full = full & (set_max[bs, hs, sid] <= qpos)
    parts = []
    for want_full in (True, False):
        keep = full if want_full else ~full
        if not bool(keep.any()):
            continue
        parts.append(
            _key_centric(bi[keep], hi[keep], qi[keep], sid[keep], key_sets, set_ok, B, H, Tq, S, Hkv, rep, Tk,
                         q_offset, causal, rows, masked=not want_full, device=dev)
        )
    return parts


def _key_centric(bi, hi, qi, sid, key_sets, set_ok, B, H, Tq, S, Hkv, rep, Tk, q_offset, causal, rows, masked,
                 device) -> Tiles | BlockTiles:
    if not masked and Tk % key_sets.shape[-1] == 0 and (blocks := _aligned_blocks(key_sets)) is not None:
        return _block_tiles(bi * H + hi, qi, blocks, sid, B * H, Tq, key_sets.shape[-1], device)
    group = (bi * H + hi) * S + sid  # one group per (batch, head, set)
    order = torch.sort(group, stable=True).indices  # stable: queries stay in increasing order inside a group
    group, bi, hi, qi, sid = group[order], bi[order], hi[order], qi[order], sid[order]
    counts = torch.bincount(group, minlength=B * H * S)
    starts = torch.cumsum(counts, 0) - counts
    ntiles = (counts + rows - 1) // rows
    tile_start = torch.cumsum(ntiles, 0) - ntiles
    rank = torch.arange(group.numel(), device=device) - starts[group]
    R = min(rows, int(counts.max()))  # slot < R always: rank % rows < min(rows, count)
    tile = tile_start[group] + rank // rows
    slot = rank % rows
    N = int(ntiles.sum())
    q_raw = torch.full((N, R), -1, dtype=torch.long, device=device)
    q_raw[tile, slot] = (bi * H + hi) * Tq + qi
    row_ok = q_raw >= 0
    q_idx = torch.where(row_ok, q_raw, q_raw[:, :1])
    # per-tile key set
    first = torch.zeros(N, dtype=torch.long, device=device)
    first[tile] = torch.arange(group.numel(), device=device)  # any member of the tile identifies it
    tb, th, ts = bi[first], hi[first], sid[first]
    kb = tb if key_sets.shape[0] > 1 else torch.zeros_like(tb)
    kh = th if key_sets.shape[1] > 1 else torch.zeros_like(th)
    kpos = key_sets[kb, kh, ts]  # (N, K)
    k_idx = flat_key_index(kpos, tb[:, None], (th // rep)[:, None], Hkv, Tk)
    K = kpos.shape[-1]
    aligned = Tk % K == 0 and bool(((kpos - kpos[:, :1]) == torch.arange(K, device=device)).all()) and bool(
        (kpos[:, 0] % K == 0).all()
    )
    k_block = (k_idx[:, 0] // K).unsqueeze(-1) if aligned else None
    mask = None
    if masked:
        mask = set_ok[kb, kh, ts].unsqueeze(1)  # (N, 1, K)
        if causal:
            qpos = q_idx % Tq + q_offset  # (N, R)
            mask = mask & (kpos.unsqueeze(1) <= qpos.unsqueeze(-1))
        mask = mask.expand(N, R, kpos.shape[-1])
    return Tiles(q_idx, k_idx, row_ok, mask, k_block)


def _query_block_tiles(
    block_index: Tensor,
    block_valid: Tensor,
    q_block: int,
    k_block: int,
    Tq: int,
    Tk: int,
    Hkv: int,
    q_offset: int = 0,
    causal: bool = False,
) -> Tiles:
    """Query-centric tiles: query block g (rows ``g*q_block ..``) reads key blocks ``block_index[..., g, :]``.

    block_index, block_valid: (B, H, G, nsel) with G = ceil(Tq / q_block); key blocks hold ``k_block`` keys.
    """
    B, H, G, nsel = block_index.shape
    dev = block_index.device
    rep = H // Hkv
    rows = torch.arange(G * q_block, device=dev)
    row_ok = (rows < Tq).view(1, G, q_block)
    bh = torch.arange(B * H, device=dev).view(B * H, 1, 1)
    q_idx = (bh * Tq + rows.clamp(max=Tq - 1).view(1, G, q_block)).reshape(-1, q_block)
    row_ok = row_ok.expand(B * H, G, q_block).reshape(-1, q_block)
    kpos = (block_index.unsqueeze(-1) * k_block + torch.arange(k_block, device=dev)).flatten(-2)  # (B,H,G,K)
    ok = (block_valid.unsqueeze(-1) & (kpos.view(B, H, G, nsel, k_block) < Tk)).flatten(-2)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // rep).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H * G, -1)
    kb = None
    if Tk % k_block == 0:
        kb = ((b * Hkv + hkv) * (Tk // k_block) + block_index.clamp(0, Tk // k_block - 1)).reshape(B * H * G, nsel)
    mask = ok.reshape(B * H * G, 1, -1)
    if causal:
        qpos = (rows + q_offset).view(1, G, q_block, 1)
        mask = mask.view(B * H, G, 1, -1) & (kpos.view(B * H, G, 1, -1) <= qpos)
        mask = mask.reshape(B * H * G, q_block, -1)
    if bool(mask.all()):
        mask = None
    else:
        mask = mask.expand(B * H * G, q_block, mask.shape[-1])
    return Tiles(q_idx, k_idx, row_ok, mask, kb, q_in_order=G * q_block == Tq)


def _block_tiles(bh, qi, set_block, sid, BH, Tq, K, device) -> BlockTiles:
    blk = set_block[sid]
    nblk = int(set_block.max()) + 1
    group = blk * BH + bh  # by key block, then batch-head; stable sort keeps queries in order
    order = torch.sort(group, stable=True).indices
    group, bh, qi, blk = group[order], bh[order], qi[order], blk[order]
    counts = torch.bincount(group, minlength=nblk * BH)
    rank = torch.arange(group.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[group]
    width = counts.view(nblk, BH).amax(1)  # per key block: the most queries any batch-head sends it
    cols = torch.cumsum(width, 0) - width
    q_raw = torch.full((BH, int(width.sum())), -1, dtype=torch.long, device=device)
    q_raw[bh, cols[blk] + rank] = bh * Tq + qi
    row_ok = q_raw >= 0
    # padding slots repeat a real row of the same key block (any batch-head), so no row sees nothing
    first = torch.zeros(nblk, dtype=torch.long, device=device)
    first[blk] = bh * Tq + qi
    col_blk = torch.repeat_interleave(torch.arange(nblk, device=device), width)
    q_idx = torch.where(row_ok, q_raw, first[col_blk].unsqueeze(0))
    used = [j for j in range(nblk) if int(width[j]) > 0]
    edges = [int(c) for c in cols] + [int(width.sum())]
    return BlockTiles(K, used, [edges[j] for j in used] + [edges[used[-1] + 1]] if used else [0], q_idx, row_ok)




# ---- the plan and the planners ---------------------------------------------------------------------------

#: tile sizes of the BlockLayout built for static patterns when the native kernel's measured choice is unknown
LAYOUT_BLOCK = 64


def layout_block(device_type: str = "cpu") -> int:
    """Block size (q_block = k_block) of layouts planned for a kernel: the native kernel's measured, cached
    per-device choice (``native.default_block``), else ``LAYOUT_BLOCK``."""
    try:
        from . import native

        return int(native.default_block(device_type))
    except Exception:  # no extension module importable: the constant
        return LAYOUT_BLOCK


@dataclass(frozen=True, eq=False)
class Plan:
    """What the executor runs: parts over disjoint key sets, plus optional causal diagonal blocks.

    parts:      PatternTiles (a static pattern plan: exactly one part), or Tiles / BlockTiles
    diag_block: causal attention inside each contiguous block of this many rows (0: none); self-attention
                prefill only (``q_len == kv_len``, ``q_offset == 0``)
    q_len, kv_len, q_offset: the call the plan was made for (None when built from hand-made tiles)
    pattern:    the static pattern of a pattern plan (FlexAttention runs it from its ``mask_mod``)
    mode:       "pattern", "blocks", "selection" or "tiles": which planner made it
    """

    parts: tuple
    diag_block: int = 0
    q_len: int | None = None
    kv_len: int | None = None
    q_offset: int = 0
    pattern: Pattern | None = None
    mode: str = "tiles"
    layout_fn: Callable[[], BlockLayout] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def layout(self) -> BlockLayout | None:
        """The plan as a :class:`BlockLayout` (built once, on first use), or None when the planner cannot
        describe it (hand-made tiles). The layout may be over reordered sequences: see :meth:`layout_orders`."""
        if self.layout_fn is None:
            return None
        if "layout" not in self._cache:
            got = self.layout_fn()
            lay, orders = (got[0], got[1:]) if isinstance(got, tuple) else (got, (None, None))
            self._cache["layout"], self._cache["orders"] = lay, orders
        return self._cache["layout"]

    def layout_orders(self) -> tuple[Tensor | None, Tensor | None]:
        """``(q_order (Tq,), k_order (Tk,))`` of :meth:`layout`: layout query row r is query row q_order[r],
        layout key j is key k_order[j] (None: natural order). Patterns with a ``query_order`` (2-D grids in
        Z-order, dilations by residue) are laid out in that order, so square patches become blocks."""
        if self.layout() is None:
            return None, None
        return self._cache["orders"]

    @property
    def computed_pairs(self) -> int:
        """(query, key) pairs the tiles compute, padding included (per head for pattern plans)."""
        n = sum(p.computed_pairs for p in self.parts)
        if self.diag_block and self.q_len:
            n += self.q_len * self.diag_block
        return n


def _check_q_block(q_block: int, name: str = "q_block") -> int:
    if isinstance(q_block, bool) or not isinstance(q_block, int) or q_block < 1:
        raise ValueError(f"{name} must be a positive integer, got {q_block!r}")
    return q_block


def plan_pattern(
    pattern: Pattern, q_len: int, kv_len: int, q_offset: int = 0, q_block: int | None = None,
    device: torch.device | str = "cpu",
) -> Plan:
    """Plan of a static pattern for queries at absolute positions ``q_offset ..`` over keys ``0 .. kv_len``.

    ``q_block``: query rows per tile (default: the measured per-device choice, ``DEFAULT_Q_BLOCK``). Cached.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be an attnlab Pattern, got {type(pattern).__name__}")
    q_block = _check_q_block(default_q_block(device) if q_block is None else q_block)
    return _pattern_plan(pattern, q_len, kv_len, q_offset, min(q_block, max(1, q_len)), str(torch.device(device)))


@lru_cache(maxsize=64)
def _pattern_plan(pattern: Pattern, Tq: int, Tk: int, q_offset: int, q_block: int, device: str) -> Plan:
    tiles = _static_plan(pattern, Tq, Tk, q_offset, q_block, device)
    q_order = pattern.query_order(Tq, q_offset)

    def layout() -> BlockLayout | tuple:
        nb = min(layout_block(torch.device(device).type), max(1, Tq))
        if q_order is None:  # from the tiles' exact masks: work ~ queries x keys-per-tile, never the whole square
            t = tiles if nb == q_block else _static_plan(pattern, Tq, Tk, q_offset, nb, device)
            return _tiles_layout(t, Tq, Tk, q_offset, nb)
        # over the pattern's own order, applied to keys too (2-D grids in Z-order: square patches become blocks)
        k_order = pattern.query_order(Tk, 0)
        qo = q_order.to(device=device, dtype=torch.long)
        ko = torch.arange(Tk, device=device) if k_order is None else k_order.to(device=device, dtype=torch.long)
        dense = pattern.dense(Tq, Tk, q_offset).to(device)[:, qo][:, :, ko].unsqueeze(0)  # (1, Hp, Tq, Tk)
        return BlockLayout.from_dense(dense, nb, nb, q_offset), qo, (None if k_order is None else ko)

    return Plan((tiles,), 0, Tq, Tk, q_offset, pattern, "pattern", layout)


def plan_blocks(
    block_index: Tensor,
    block_valid: Tensor,
    q_block: int,
    k_block: int,
    q_len: int,
    kv_len: int,
    kv_heads: int,
    q_offset: int = 0,
    causal: bool = False,
) -> Plan:
    """Query block ``g`` (rows ``g*q_block ..``) reads key blocks ``block_index[..., g, :]`` of ``k_block`` keys.

    block_index, block_valid: ``(B, H, G, n)`` long / bool with ``G = ceil(q_len / q_block)`` and H the query
    heads; the block ids of one query block must be distinct where valid. ``causal`` adds key position <=
    query position (query row r at ``q_offset + r``).
    """
    _check_q_block(q_block)
    _check_q_block(k_block, "k_block")
    tiles = _query_block_tiles(block_index, block_valid, q_block, k_block, q_len, kv_len, kv_heads, q_offset, causal)

    def layout() -> BlockLayout:
        return _blocks_layout(block_index, block_valid, q_block, k_block, q_len, kv_len, q_offset, causal)

    return Plan((tiles,), 0, q_len, kv_len, q_offset, None, "blocks", layout)


def plan_selection(
    sel: Tensor,
    valid: Tensor,
    key_sets: Tensor,
    kv_heads: int,
    kv_len: int,
    q_offset: int = 0,
    causal: bool = True,
    q_block: int = 128,
    diag_block: int | None = None,
) -> Plan:
    """Key-centric plan of per-query selections of key sets (the planner's mode for MoBA, routing, clusters).

    sel:      ``(B, H, Tq, n)`` long, key-set ids per query (distinct per query where valid)
    valid:    ``(B, H, Tq, n)`` bool
    key_sets: ``(Bs, Hs, S, K)`` long key positions of each set (Bs in {1, B}, Hs in {1, H}); entries < 0 or
              >= kv_len are padding; the sets one query selects must be disjoint
    q_block:  most queries per tile (queries that chose the same set share its tile)
    diag_block: also causal attention inside each contiguous block of this many rows (MoBA's own block, run
              with no gather); the selections must then exclude it. Self-attention prefill only.

    A call of at most ``ROW_QUERIES`` query rows (decoding) is planned per row instead: aligned block sets as a
    ``"blocks"`` plan of one-row query blocks, other sets as one gathered tile per row.
    """
    _check_q_block(q_block)
    Tq = sel.shape[2]
    if diag_block:
        _check_q_block(diag_block, "diag_block")
        if Tq != kv_len or q_offset != 0:
            raise ValueError("the diagonal part needs self-attention prefill (q_len == kv_len, q_offset 0)")
    elif Tq <= ROW_QUERIES:
        return _row_plan(sel, valid, key_sets, kv_heads, kv_len, q_offset, causal)
    parts = tuple(_selection_parts(sel, valid, key_sets, kv_heads, kv_len, q_offset, causal, q_block))

    def layout() -> BlockLayout:
        from .select import selection_mask

        mask = selection_mask(sel, valid, key_sets, kv_len, q_offset, causal)
        if diag_block:
            r = torch.arange(Tq, device=sel.device)
            own = (r.view(-1, 1) // diag_block == r.view(1, -1) // diag_block) & (r.view(1, -1) <= r.view(-1, 1))
            mask = mask | own
        return BlockLayout.from_dense(mask, q_block, key_sets.shape[-1], q_offset)

    return Plan(parts, diag_block or 0, Tq, kv_len, q_offset, None, "selection", layout)


#: selections of at most this many query rows (decoding) are planned per row, not key-centric: a key set chosen
#: by one query would fill one row of a kernel tile (measured: a MoBA decode step on SmolLM2's shapes took 25x
#: dense attention key-centric, 1.0x / 0.55x / 0.25x with 16 / 8 / 4 of 33 blocks per row)
ROW_QUERIES = 4


def _aligned_blocks(key_sets: Tensor) -> Tensor | None:
    """Per set its key block id, when the sets are aligned blocks shared by every batch row and head (key
    positions ``b * K .. b * K + K - 1``; positions past the keys are the last block's padding), else None."""
    if key_sets.shape[:2] != (1, 1):
        return None
    ks = key_sets[0, 0]
    K = ks.shape[-1]
    if bool((ks == ks[:, :1] + torch.arange(K, device=ks.device)).all()) and bool((ks[:, 0] % K == 0).all()):
        return ks[:, 0] // K
    return None


def key_set_tiles(rows: Tensor, kpos: Tensor, kok: Tensor, B: int, H: int, Hkv: int, Tq: int, Tk: int,
                  q_offset: int) -> Tiles:
    """Query-centric tiles from explicit key sets: tile ``t`` of every (batch, head) holds the call's query rows
    ``rows[t]`` (S, R) (-1: padding) and reads key positions ``kpos[..., t, :]`` where ``kok`` holds, causally.

    kpos, kok: (B or 1, H or 1, S, K); positions distinct per tile where valid. Rows in no tile see nothing.
    """
    S, R = rows.shape
    K = kpos.shape[-1]
    dev = rows.device
    kpos, kok = kpos.expand(B, H, S, K), kok.expand(B, H, S, K)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H * S, K)
    row_ok = (rows >= 0).expand(B * H, S, R).reshape(-1, R)
    r = torch.where(rows >= 0, rows, rows[:, :1].clamp(min=0))  # padding repeats a real row of its tile
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1, 1) * Tq + r).reshape(-1, R)
    mask = kok.unsqueeze(-2) & (kpos.unsqueeze(-2) <= (r + q_offset).view(1, 1, S, R, 1))  # (B, H, S, R, K)
    return Tiles(q_idx, k_idx, row_ok, mask.reshape(B * H * S, R, K))


def _row_plan(sel: Tensor, valid: Tensor, key_sets: Tensor, Hkv: int, Tk: int, q_offset: int, causal: bool) -> Plan:
    """A few query rows: every row its own tile. Aligned block sets become a block plan of one-row query blocks
    (the native kernel reads each chosen block in place); other sets, one tile per row over its gathered keys."""
    B, H, Tq, n = sel.shape
    S, K = key_sets.shape[-2:]
    blocks = _aligned_blocks(key_sets)
    if blocks is not None:
        return plan_blocks(blocks[sel.clamp(0, S - 1)], valid, 1, K, Tq, Tk, Hkv, q_offset, causal)
    dev = sel.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    kpos = key_sets[b if key_sets.shape[0] > 1 else 0, h if key_sets.shape[1] > 1 else 0, sel.clamp(0, S - 1)]
    ok = valid.unsqueeze(-1) & (kpos >= 0) & (kpos < Tk)  # (B, H, Tq, n, K)
    rows = torch.arange(Tq, device=dev).view(Tq, 1)
    # the tiles are causal at the rows' positions; placed after every key they are not
    tiles = key_set_tiles(rows, kpos.flatten(-2), ok.flatten(-2), B, H, Hkv, Tq, Tk, q_offset if causal else Tk)
    return Plan((tiles,), 0, Tq, Tk, q_offset, None, "tiles", None)


def plan_tiles(
    parts: list, diag_block: int | None = None, q_len: int | None = None, kv_len: int | None = None,
    q_offset: int = 0,
) -> Plan:
    """A plan from hand-made :class:`Tiles` (per-query key lists of a method's own design). The union of the
    parts (and the diagonal) is what each query reads; the parts must be disjoint per query."""
    for t in parts:
        if not isinstance(t, (Tiles, BlockTiles)):
            raise TypeError(f"plan_tiles takes Tiles / BlockTiles parts, got {type(t).__name__}")
    if diag_block:
        _check_q_block(diag_block, "diag_block")
    return Plan(tuple(parts), diag_block or 0, q_len, kv_len, q_offset, None, "tiles", None)


def _tiles_layout(pt: PatternTiles, Tq: int, Tk: int, q_offset: int, k_block: int) -> BlockLayout:
    """BlockLayout of a pattern plan whose groups are consecutive rows (q_block = the group size): each tile's
    exact mask is scattered into the key blocks its keys fall in."""
    Bp, Hp, G, Kg = pt.kv_index.shape
    Bq = pt.q_rows.shape[1]
    dev = pt.kv_index.device
    m = pt.mask if pt.empty is None else pt.mask & ~pt.empty
    m = m & (torch.arange(G * Bq, device=dev) < Tq).view(G, Bq, 1)  # padding rows of the last group
    nk = -(-Tk // k_block)
    blk = torch.div(pt.kv_index, k_block, rounding_mode="floor")
    used_col = m.any(-2)
    listed = torch.zeros(Bp, Hp, G, nk + 1, dtype=torch.bool, device=dev)
    listed.scatter_(-1, torch.where(used_col, blk, torch.full_like(blk, nk)), True)
    listed = listed[..., :nk]
    count = listed.sum(-1)
    N = max(1, int(count.max()))
    idx = torch.sort(listed.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :N]
    used = torch.arange(N, device=dev) < count.unsqueeze(-1)
    idx = torch.where(used, idx, torch.zeros_like(idx))
    slot = torch.gather(listed.cumsum(-1) - 1, -1, blk.clamp(max=nk - 1)).clamp(min=0)  # listed rank of a key's block
    lin = (slot.unsqueeze(-2) * Bq + torch.arange(Bq, device=dev).view(Bq, 1)) * k_block + (pt.kv_index % k_block
                                                                                             ).unsqueeze(-2)
    bits = torch.zeros(Bp, Hp, G, N * Bq * k_block, dtype=torch.bool, device=dev)
    bits.scatter_reduce_(-1, lin.reshape(Bp, Hp, G, -1), m.reshape(Bp, Hp, G, -1), "amax")
    bits = bits.view(Bp, Hp, G, N, Bq, k_block)
    rows = torch.arange(G * Bq, device=dev).view(G, 1, Bq, 1)
    kpos = idx.unsqueeze(-1) * k_block + torch.arange(k_block, device=dev)  # (Bp, Hp, G, N, kb)
    exists = (rows < Tq) & (kpos.unsqueeze(-2) < Tk)
    full = (bits | ~exists).all(-1).all(-1) & used
    return BlockLayout(Bq, k_block, Tq, Tk, q_offset, idx.to(torch.int32), count.to(torch.int32), full,
                       None if bool((full | ~used).all()) else bits, pt.pairs)


def _blocks_layout(block_index: Tensor, block_valid: Tensor, q_block: int, k_block: int, Tq: int, Tk: int,
                   q_offset: int, causal: bool) -> BlockLayout:
    """BlockLayout of a query-block plan, straight from the block ids (no dense mask)."""
    B, H, G, n = block_index.shape
    dev = block_index.device
    nk = -(-Tk // k_block)
    ok = block_valid & (block_index >= 0) & (block_index < nk)
    big = torch.full_like(block_index, nk)
    idx = torch.sort(torch.where(ok, block_index, big), dim=-1).values
    count = ok.sum(-1)
    N = max(1, int(count.max()))
    idx, used = idx[..., :N], (torch.arange(N, device=dev) < count.unsqueeze(-1))
    idx = torch.where(used, idx, torch.zeros_like(idx))
    # full blocks follow from the ids alone: every existing key of the block is visible to the block's first row
    kmax = ((idx + 1) * k_block).clamp(max=Tk) - 1
    full = used
    if causal:
        first_row = torch.arange(G, device=dev).view(G, 1) * q_block + q_offset
        full = full & (kmax <= first_row)
    bits = None
    if bool((used & ~full).any()):  # the exact mask only when some listed block is partial
        rows = torch.arange(G * q_block, device=dev).view(G, 1, q_block, 1)  # (G, 1, qb, 1)
        kpos = idx.unsqueeze(-1) * k_block + torch.arange(k_block, device=dev)  # (B, H, G, N, kb)
        bits = (rows < Tq) & (kpos.unsqueeze(-2) < Tk) & used.view(B, H, G, N, 1, 1)  # (B, H, G, N, qb, kb)
        if causal:
            bits = bits & (kpos.unsqueeze(-2) <= rows + q_offset)
        pairs = float(bits.sum(dtype=torch.float64)) / (B * H)
    else:
        nrows = (Tq - torch.arange(G, device=dev) * q_block).clamp(max=q_block).view(G, 1)
        pairs = float(((kmax - idx * k_block + 1) * nrows * used).sum(dtype=torch.float64)) / (B * H)
    return BlockLayout(q_block, k_block, Tq, Tk, q_offset, idx.to(torch.int32), count.to(torch.int32), full,
                       bits, pairs)


__all__ = [
    "BlockTiles",
    "DEFAULT_Q_BLOCK",
    "LAYOUT_BLOCK",
    "PatternTiles",
    "Plan",
    "ROW_QUERIES",
    "Tiles",
    "default_q_block",
    "flat_key_index",
    "key_set_tiles",
    "layout_block",
    "plan_blocks",
    "plan_pattern",
    "plan_selection",
    "plan_tiles",
    "save_tuned_q_block",
]
