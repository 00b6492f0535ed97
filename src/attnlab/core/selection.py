"""Dynamic (content-based) selection executed as gathered tiles: forward and backward skip unselected work.

A content-based method decides, per query, which *key sets* it reads (key blocks, routed regions, k-means
clusters, vertical columns, ...). This module turns such decisions into :class:`Tiles` and runs them:

* **key-centric tiles** (:func:`tiles_from_selection`): per-query selections ``sel (B, H, Tq, n)`` of key-set
  ids. Pairs (query, set) are sorted by set; each tile holds up to ``rows`` queries that read the *same* key
  set, so a key set is gathered once per tile (never once per query: no k-fold copy of K/V).
* **query-centric tiles** (built directly, e.g. vertical-slash): a tile is a block of queries and the union
  of the keys they may see, with an exact mask.

A query usually appears in several tiles (one per selected set). :func:`tile_attention` runs each part with
the fused CPU flash kernel (which returns the log-sum-exp), merges the partial outputs exactly by
log-sum-exp weights, and in the backward pass calls the flash backward per tile with the *merged* output and
log-sum-exp -- which yields exactly the gradient of softmax over the union. Off CPU (or for dtypes the CPU
kernel lacks) the same tiles run through an explicit matmul path with autograd, which also serves as the
independent check of the fused path in the tests.

Key sets of one query must be disjoint (the merge adds their softmax masses). The *diagonal* part
(``diag_block``): causal attention inside each contiguous block of ``diag_block`` rows (MoBA's current block),
run without any gather; valid for self-attention prefill (``Tq == Tk``, ``q_offset == 0``).

Also here: :func:`selection_mask` (dense boolean mask of a selection, for the float64 reference) and
:func:`selection_recall` (the selection-quality diagnostic: attention mass and top-set recall per head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


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


def tiles_from_selection(
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
    if not masked and key_sets.shape[:2] == (1, 1):
        K = key_sets.shape[-1]
        ks = key_sets[0, 0]
        if Tk % K == 0 and bool((ks == ks[:, :1] + torch.arange(K, device=device)).all()) and bool(
            (ks[:, 0] % K == 0).all()
        ):
            return _block_tiles(bi * H + hi, qi, ks[:, 0] // K, sid, B * H, Tq, K, device)
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


def tiles_from_blocks(
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
    The same contract as ``blocksparse.plan_from_blocks`` (which ties the two block sizes), as :class:`Tiles`.
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


# ---- execution -----------------------------------------------------------------------------------------


def _use_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _FLASH_DTYPES


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)


def _gather_kv(xf: Tensor, t: Tiles) -> Tensor:
    """(rows, D) -> (N, 1, K, D); whole aligned blocks are copied as blocks (far faster than row gathers)."""
    if t.k_block is not None:
        N, m = t.k_block.shape
        Kb = t.k_idx.shape[-1] // m
        return xf.view(-1, Kb, xf.shape[-1])[t.k_block].view(N, 1, m * Kb, xf.shape[-1])
    return xf[t.k_idx].unsqueeze(1)


def _tile_rows(xf: Tensor, t: Tiles) -> Tensor:
    """Rows of flat (B * H * Tq, d) for every tile, as the kernel's (N, 1, R, d): a view when in order."""
    if t.q_in_order:
        return xf.view(*t.q_idx.shape, xf.shape[-1]).unsqueeze(1)
    return xf[t.q_idx].unsqueeze(1)


def _scatter_kv(acc: Tensor, g: Tensor, t: Tiles) -> None:
    if t.k_block is not None:
        Kb = t.k_idx.shape[-1] // t.k_block.shape[-1]
        acc.view(-1, Kb * acc.shape[-1]).index_add_(0, t.k_block.reshape(-1), g.reshape(t.k_block.numel(), -1))
    else:
        acc.index_add_(0, t.k_idx.reshape(-1), g.reshape(-1, acc.shape[-1]))


def _row_valid(t: Tiles) -> Tensor:
    ok = t.row_ok
    if t.mask is not None:
        ok = ok & t.mask.any(-1)  # fully masked rows: the kernel reports lse 0, they must not count
    return ok


def _diag_layout(x: Tensor, block: int, heads: int) -> Tensor:
    """(B, Hx, T, D) -> (B * heads * nb, 1, block, D), zero-padded to whole blocks; kv heads repeated."""
    B, Hx, T, D = x.shape
    if Hx != heads:
        x = x.repeat_interleave(heads // Hx, dim=1)
    nb = math.ceil(T / block)
    if nb * block != T:
        x = F.pad(x, (0, 0, 0, nb * block - T))
    return x.reshape(B * heads * nb, 1, block, D)


def _diag_unlayout(y: Tensor, B: int, H: int, T: int) -> Tensor:
    """(B * H * nb, 1, block[, D]) -> flat rows (B * H * T[, D]) (drops the padding rows)."""
    y = y.reshape(B * H, -1, *y.shape[3:])[:, :T]
    return y.reshape(B * H * T, *y.shape[2:])


def _merge(parts: list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]], nrows: int, Dv: int):
    """Exact union of softmaxes over disjoint key sets.

    parts: (out (n, Dv), lse (n,), row (n,) or None for all rows in order, ok (n,) or None for all valid).
    Returns the merged output (nrows, Dv) and log-sum-exp (nrows,) (-inf where a row sees no key).
    Without autograd (the fused path) the accumulators are updated in place: the merge touches every
    partial output once instead of copying the whole result per part.
    """
    ref = parts[0][1]
    if len(parts) == 1 and parts[0][2] is None and parts[0][3] is None:  # one part over every row, in order
        return parts[0][0], parts[0][1]
    inplace = not torch.is_grad_enabled()
    m = torch.full((nrows,), float("-inf"), dtype=ref.dtype, device=ref.device)
    lses = []
    for _o, lse, row, ok in parts:
        if ok is not None:
            lse = lse.masked_fill(~ok, float("-inf"))
        lses.append(lse)
        m = torch.maximum(m, lse.detach()) if row is None else m.scatter_reduce(0, row, lse.detach(), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = out = None
    for (o, _, row, _), lse in zip(parts, lses):
        if row is None and out is None:  # a part over every row starts the sums (no zero fill)
            s = torch.exp(lse - m)
            out = s.unsqueeze(-1) * o
            continue
        if out is None:
            s = torch.zeros(nrows, dtype=ref.dtype, device=ref.device)
            out = torch.zeros(nrows, Dv, dtype=o.dtype, device=ref.device)
        if row is None:
            e = torch.exp(lse - m)
            if inplace:
                s += e
                out.addcmul_(e.unsqueeze(-1), o)
            else:
                s = s + e
                out = out + e.unsqueeze(-1) * o
        else:
            e = torch.exp(lse - m[row])
            if inplace:
                s.index_add_(0, row, e)
                out.index_add_(0, row, e.unsqueeze(-1) * o)
            else:
                s = s.index_add(0, row, e)
                out = out.index_add(0, row, e.unsqueeze(-1) * o)
    L = m + torch.log(s)
    norm = s.clamp(min=torch.finfo(s.dtype).tiny).unsqueeze(-1)
    return (out.div_(norm) if inplace else out / norm), L


def _block_kv(x: Tensor, j: int, K: int, H: int) -> Tensor:
    """View of key block j, (B, Hkv, K, D) -> (B, H, K, D) (a copy only for grouped-query heads)."""
    xb = x[:, :, j * K : (j + 1) * K]
    if x.shape[1] != H:
        xb = xb.repeat_interleave(H // x.shape[1], dim=1)
    return xb


def _fold_heads(g: Tensor, Hkv: int) -> Tensor:
    B, H = g.shape[:2]
    return g if H == Hkv else g.view(B, Hkv, H // Hkv, *g.shape[2:]).sum(2)


# per-(batch, head) calls beat one padded call per key block when padding wastes more than this share of the
# rows, as long as the calls stay few (each costs a kernel launch and a thread barrier: on 2 cores the padded
# calls won at 17% padding, the per-head ones only on 1 thread)
_PAD_WASTE = 0.5
_MAX_HEAD_CALLS = 1024


def _block_calls(bt: BlockTiles, B: int, H: int, per_head: bool = True) -> list[tuple[int | None, int, Tensor, Tensor]]:
    """The kernel calls of a BlockTiles part: ``(bh, j, rows, ok)``.

    ``bh is None``: one call for key block j over every batch-head, rows and ok (B * H, w) with padding
    slots; otherwise one call for batch-head ``bh``, rows (n,) exactly its queries (the valid slots of a
    (batch-head, key block) segment are a prefix, see ``_block_tiles``), ok all True.
    """
    nblk, BH = len(bt.blocks), B * H
    seg = [(bt.cols[i], bt.cols[i + 1]) for i in range(nblk)]
    padded = [(None, j, bt.q_idx[:, c0:c1], bt.row_ok[:, c0:c1]) for j, (c0, c1) in zip(bt.blocks, seg)]
    if not per_head or BH * nblk > _MAX_HEAD_CALLS or bool(bt.row_ok.all()):
        return padded
    counts = torch.stack([bt.row_ok[:, c0:c1].sum(1) for c0, c1 in seg], 1)  # (BH, nblk)
    if int(counts.sum()) >= (1 - _PAD_WASTE) * bt.row_ok.numel():
        return padded
    calls = []
    for bh, row in enumerate(counts.tolist()):
        for (c0, _), j, n in zip(seg, bt.blocks, row):
            if n:
                r = bt.q_idx[bh, c0 : c0 + n]
                calls.append((bh, j, r, torch.ones_like(r, dtype=torch.bool)))
    return calls


def _call_kv(x: Tensor, bh: int | None, j: int, K: int, H: int) -> Tensor:
    """Key block j for a call: (B, H, K, D) over every batch-head, or (1, 1, K, D) for batch-head bh (views)."""
    if bh is None:
        return _block_kv(x, j, K, H)
    b, h = divmod(bh, H)
    return x[b, h // (H // x.shape[1]), j * K : (j + 1) * K][None, None]


def _call_q(x: Tensor, rows: Tensor, bh: int | None, B: int, H: int) -> Tensor:
    """Rows of flat (B * H * Tq, d) as the kernel's (B, H, w, d) or (1, 1, n, d)."""
    return x[rows].view(B, H, -1, x.shape[-1]) if bh is None else x[rows][None, None]


def _block_part(q, k, v, bt: BlockTiles, scale: float, fused: bool):
    """Forward of a BlockTiles part: one call per key block (or, fused, per batch-head and key block when
    padding would waste work), K/V read as views. Returns the merge parts."""
    B, H, Tq, D = q.shape
    Dv = v.shape[-1]
    qf = q.reshape(-1, D)
    parts = []
    for bh, j, r, ok in _block_calls(bt, B, H, per_head=fused):
        Q = _call_q(qf, r, bh, B, H)
        Kj, Vj = _call_kv(k, bh, j, bt.block, H), _call_kv(v, bh, j, bt.block, H)
        if fused:
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(Q, Kj, Vj, 0.0, False, scale=scale)
        else:
            s = (Q @ Kj.transpose(-1, -2)) * scale
            lse = torch.logsumexp(s, dim=-1)
            o = torch.exp(s - lse.unsqueeze(-1)) @ Vj
        parts.append((o.reshape(-1, Dv), lse.reshape(-1), r.reshape(-1), ok.reshape(-1)))
    return parts  # one merge part per call: concatenating them first would copy every output once more


def _block_part_backward(q, k, v, bt: BlockTiles, scale, dof, out, Ls, dq, dk, dv) -> None:
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    qf = q.reshape(-1, D)
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dk4, dv4 = dk.view_as(k), dv.view_as(v)
    K = bt.block
    for bh, j, rows, ok in _block_calls(bt, B, H):
        r = rows.reshape(-1)
        Q = _call_q(qf, rows, bh, B, H)
        g = _call_q(dof, rows, bh, B, H)
        if bh is None:
            g = g * ok.view(B, H, -1, 1)  # padding slots repeat a real row: they must add nothing
        gq, gk, gv = bwd(g, Q, _call_kv(k, bh, j, K, H), _call_kv(v, bh, j, K, H), _call_q(out, rows, bh, B, H),
                         Ls[r].view(Q.shape[:3]), 0.0, False, scale=scale)
        dq.index_add_(0, r, gq.reshape(-1, D))
        if bh is None:
            dk4[:, :, j * K : (j + 1) * K] += _fold_heads(gk, Hkv)
            dv4[:, :, j * K : (j + 1) * K] += _fold_heads(gv, Hkv)
        else:
            b, h = divmod(bh, H)
            dk4[b, h // (H // Hkv), j * K : (j + 1) * K] += gk[0, 0]
            dv4[b, h // (H // Hkv), j * K : (j + 1) * K] += gv[0, 0]


def _explicit_part(qf, kf, vf, t: Tiles, scale: float):
    Q, Kt, V = qf[t.q_idx].unsqueeze(1), _gather_kv(kf, t), _gather_kv(vf, t)
    s = (Q @ Kt.transpose(-1, -2)) * scale  # (N, 1, R, K)
    if t.mask is not None:
        s = s.masked_fill(~t.mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return (p @ V).reshape(-1, V.shape[-1]), lse.reshape(-1), t.q_idx.reshape(-1), _row_valid(t).reshape(-1)


def _explicit_diag(q, k, v, block, scale):
    B, H, T, D = q.shape
    Q, Kt, V = (_diag_layout(x, block, H) for x in (q, k, v))
    s = (Q @ Kt.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(block, block, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ V
    return _diag_unlayout(o, B, H, T), _diag_unlayout(lse, B, H, T), None, None


_DIAG_SUB = 256  # the CPU kernel computes whole 512-key chunks even when causal: cut the diagonal finer (256 measured
# best for 512-key blocks on 2 cores: 128-row sub-blocks make the kernel split queries into 32-row chunks)


def _diag_split(block: int) -> tuple[int, int]:
    sub = _DIAG_SUB if block > _DIAG_SUB and block % _DIAG_SUB == 0 else block
    return sub, block // sub


def _diag_forward(q, k, v, block, scale):
    """Causal attention inside each block, as causal sub-blocks plus a staircase of full rectangles
    (rows of sub-block i read sub-blocks 0..i-1 of their block, as views), merged in the block layout
    by log-sum-exp (every row sees its own key, so no -inf). Returns one merge part covering all rows."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    sub, ns = _diag_split(block)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    Q = _diag_layout(q, block, H).view(-1, ns, sub, D)  # (B*H*nb, ns, sub, D)
    K = _diag_layout(k, block, H).view(-1, block, D)
    V = _diag_layout(v, block, H).view(-1, block, Dv)
    o, lse = flash(Q.reshape(-1, 1, sub, D), K.reshape(-1, 1, sub, D), V.reshape(-1, 1, sub, Dv), 0.0, True,
                   scale=scale)
    o, lse = o.view(-1, ns, sub, Dv), lse.view(-1, ns, sub)
    for i in range(1, ns):
        oi, li = flash(Q[:, i].unsqueeze(1), K[:, None, : i * sub], V[:, None, : i * sub], 0.0, False, scale=scale)
        oi, li = oi.squeeze(1), li.squeeze(1)
        L = torch.logaddexp(lse[:, i], li)
        o[:, i].mul_(torch.exp(lse[:, i] - L).unsqueeze(-1)).addcmul_(torch.exp(li - L).unsqueeze(-1), oi)
        lse[:, i] = L
    return [(_diag_unlayout(o.view(-1, 1, block, Dv), B, H, T), _diag_unlayout(lse.view(-1, 1, block), B, H, T),
             None, None)]


def _diag_backward(q, k, v, block, scale, dof, out, Ls, dq, dk, dv) -> None:
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    sub, ns = _diag_split(block)
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    lay = lambda t, d: _diag_layout(t.view(B, H, T, d), block, H).view(-1, ns, sub, d)  # noqa: E731
    Q, G, O = lay(q, D), lay(dof, Dv), lay(out, Dv)  # padded rows of G are zero: they add nothing
    L = lay(Ls.unsqueeze(-1), 1).squeeze(-1)
    K = _diag_layout(k, block, H).view(-1, block, D)
    V = _diag_layout(v, block, H).view(-1, block, Dv)
    dQ, dK, dV = torch.zeros_like(Q), torch.zeros_like(K), torch.zeros_like(V)
    gq, gk, gv = bwd(G.reshape(-1, 1, sub, Dv), Q.reshape(-1, 1, sub, D), K.reshape(-1, 1, sub, D),
                     V.reshape(-1, 1, sub, Dv), O.reshape(-1, 1, sub, Dv), L.reshape(-1, 1, sub), 0.0, True,
                     scale=scale)
    dQ += gq.view_as(dQ)
    dK += gk.view_as(dK)
    dV += gv.view_as(dV)
    for i in range(1, ns):
        gq, gk, gv = bwd(G[:, i].unsqueeze(1).contiguous(), Q[:, i].unsqueeze(1), K[:, None, : i * sub],
                         V[:, None, : i * sub], O[:, i].unsqueeze(1).contiguous(), L[:, i].unsqueeze(1).contiguous(),
                         0.0, False, scale=scale)
        dQ[:, i] += gq.squeeze(1)
        dK[:, : i * sub] += gk.squeeze(1)
        dV[:, : i * sub] += gv.squeeze(1)
    dq += _diag_unlayout(dQ.view(-1, 1, block, D), B, H, T)
    _add_kv(dk, dK, k, block, H)
    _add_kv(dv, dV, v, block, H)


class _FlashTiles(torch.autograd.Function):
    """Fused CPU path: flash forward per part, LSE merge; flash backward per part with the merged out/lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale, diag_block, parts):
        B, H, Tq, D = q.shape
        Dv = v.shape[-1]
        qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        outs = []
        if diag_block:
            outs.extend(_diag_forward(q, k, v, diag_block, scale))
        for t in parts:
            if isinstance(t, BlockTiles):
                outs.extend(_block_part(q, k, v, t, scale, True))
                continue
            Q = _tile_rows(qf, t)
            o, lse = flash(Q, _gather_kv(kf, t), _gather_kv(vf, t), 0.0, False, attn_mask=_bias(t.mask, q.dtype),
                           scale=scale)
            ok = None if t.q_in_order and t.mask is None else _row_valid(t).reshape(-1)
            outs.append((o.reshape(-1, Dv), lse.reshape(-1), None if t.q_in_order else t.q_idx.reshape(-1), ok))
        out, L = _merge(outs, B * H * Tq, Dv)
        ctx.save_for_backward(q, k, v, out, L)
        ctx.scale, ctx.diag_block, ctx.parts = scale, diag_block, parts
        return out.view(B, H, Tq, Dv)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, L = ctx.saved_tensors
        scale, diag_block = ctx.scale, ctx.diag_block
        B, H, Tq, D = q.shape
        Dv = v.shape[-1]
        bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        seen = torch.isfinite(L)
        Ls = torch.where(seen, L, torch.zeros_like(L))
        dof = dout.reshape(-1, Dv) * seen.unsqueeze(-1)  # rows that see nothing have zero gradient
        qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        if diag_block:
            _diag_backward(q, k, v, diag_block, scale, dof, out, Ls, dq, dk, dv)
        for t in ctx.parts:
            if isinstance(t, BlockTiles):
                _block_part_backward(q, k, v, t, scale, dof, out, Ls, dq, dk, dv)
                continue
            Q = _tile_rows(qf, t)
            ok = _row_valid(t).reshape(-1, 1)
            shape = Q.shape[:3]
            g = (_tile_rows(dof, t).reshape(-1, Dv) * ok).view(*shape, Dv)
            gq, gk, gv = bwd(g, Q, _gather_kv(kf, t), _gather_kv(vf, t), _tile_rows(out, t),
                             _tile_rows(Ls.unsqueeze(-1), t).view(shape), 0.0, False,
                             attn_mask=_bias(t.mask, q.dtype), scale=scale)
            if t.q_in_order:
                dq += gq.reshape(-1, D)
            else:
                dq.index_add_(0, t.q_idx.reshape(-1), gq.reshape(-1, D))
            _scatter_kv(dk, gk, t)
            _scatter_kv(dv, gv, t)
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), None, None, None


def _add_kv(acc: Tensor, g: Tensor, x: Tensor, block: int, H: int) -> None:
    """Fold the diagonal layout's gradient (B*H*nb, 1, block, D) back onto flat (B*Hkv*T, D) rows."""
    B, Hx, T, D = x.shape
    nb = math.ceil(T / block)
    g = g.reshape(B, H, nb * block, D)[:, :, :T]
    if Hx != H:
        g = g.reshape(B, Hx, H // Hx, T, D).sum(2)
    acc += g.reshape(-1, D)


def tile_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    parts: list[Tiles | BlockTiles],
    scale: float,
    diag_block: int | None = None,
    fused: bool | None = None,
) -> Tensor:
    """Attention over the union of the parts' key sets (and the causal diagonal blocks, if asked).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). Rows that see no key give zero.
    ``fused`` (default: on CPU) picks the flash-kernel path; False forces the explicit matmul path.
    """
    if diag_block and (q.shape[2] != k.shape[2]):
        raise ValueError("the diagonal part needs self-attention prefill (Tq == Tk, q_offset 0)")
    if not parts and not diag_block:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    fused = _use_flash(q) if fused is None else fused
    # the CPU kernel reads K/V block views with their strides but assumes a unit stride along head_dim
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if fused:
        return _FlashTiles.apply(q, k, v, scale, diag_block or 0, parts)
    B, H, Tq, D = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
    outs = []
    for t in parts:
        if isinstance(t, BlockTiles):
            outs.extend(_block_part(q, k, v, t, scale, False))
        else:
            outs.append(_explicit_part(qf, kf, vf, t, scale))
    if diag_block:
        outs.append(_explicit_diag(q, k, v, diag_block, scale))
    out, _ = _merge(outs, B * H * Tq, Dv)
    return out.view(B, H, Tq, Dv)


# ---- dense forms for the reference and the diagnostic ----------------------------------------------------


def selection_mask(
    sel: Tensor, valid: Tensor, key_sets: Tensor, Tk: int, q_offset: int = 0, causal: bool = True
) -> Tensor:
    """Dense boolean (B, H, Tq, Tk): query i may see key j iff j is in one of its selected sets (and j <= i
    if causal). Written independently of the tile builder (scatter into a dense table)."""
    B, H, Tq, n = sel.shape
    Bs, Hs, S, K = key_sets.shape
    member = torch.zeros(Bs, Hs, S, Tk + 1, dtype=torch.bool, device=sel.device)
    pos = torch.where((key_sets >= 0) & (key_sets < Tk), key_sets, torch.full_like(key_sets, Tk))
    member.scatter_(-1, pos, True)
    member = member[..., :Tk].expand(B, H, S, Tk)
    idx = sel.clamp(0, S - 1).unsqueeze(-1).expand(B, H, Tq, n, Tk).reshape(B, H, Tq * n, Tk)
    picked = torch.gather(member, 2, idx).view(B, H, Tq, n, Tk) & valid.unsqueeze(-1)
    mask = picked.any(3)
    if causal:
        mask = mask & torch.ones(Tq, Tk, dtype=torch.bool, device=sel.device).tril(q_offset)
    return mask


def masked_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Dense float64 attention with a per-(batch, head) boolean mask (B or 1, H or 1, Tq, Tk); empty rows -> 0.

    The same computation as ``reference.reference_attention`` (whose patterns cannot vary per batch row).
    """
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", qd, kd) * scale
    s = s.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    w = torch.softmax(s.masked_fill(~has, 0.0), dim=-1) * has
    return w @ vd


def selection_recall(
    q: Tensor,
    k: Tensor,
    mask: Tensor,
    causal: bool = True,
    q_offset: int | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Selection-quality diagnostic per head, against dense attention (float64).

    q (B, H, Tq, D), k (B, Hkv, Tk, D), mask (B or 1, H, Tq, Tk) the selection.
    Returns per head (H,) averaged over batch and queries:
      ``mass``:     attention probability the selection keeps (1 = lossless)
      ``top_recall``: fraction of each query's true top-n keys that are selected, n = its selected count
      ``sparsity``: 1 - selected pairs / pairs dense attention allows (causal or full)
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    scale = D**-0.5 if scale is None else scale
    kd = k.double().repeat_interleave(H // k.shape[1], 1)
    mass = torch.zeros(B, H, dtype=torch.float64)
    topr = torch.zeros(B, H, dtype=torch.float64)
    sel = torch.zeros(B, H, dtype=torch.float64)
    allowed = torch.zeros((), dtype=torch.float64)
    for r0 in range(0, Tq, chunk):
        r1 = min(Tq, r0 + chunk)
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, r0:r1].double(), kd) * scale
        ok = torch.ones(r1 - r0, Tk, dtype=torch.bool, device=q.device)
        if causal:
            ok = ok.tril(q_offset + r0)
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1)
        m = mask[:, :, r0:r1].expand(B, H, r1 - r0, Tk) & ok
        mass += (p * m).sum(-1).sum(-1).cpu()
        n = m.sum(-1)  # (B, H, r)
        # rank of each key in its row (0 = largest weight); a selected key counts if its rank < n
        rank = torch.argsort(torch.argsort(p, dim=-1, descending=True, stable=True), dim=-1, stable=True)
        hit = (m & (rank < n.unsqueeze(-1))).sum(-1).double()
        topr += torch.where(n > 0, hit / n.clamp(min=1), torch.ones_like(hit)).sum(-1).cpu()
        sel += n.sum(-1).double().cpu()
        allowed += ok.sum()
    return {
        "mass": (mass / Tq).mean(0),
        "top_recall": (topr / Tq).mean(0),
        "sparsity": 1.0 - (sel / allowed).mean(0),
    }


__all__ = [
    "BlockTiles",
    "Tiles",
    "flat_key_index",
    "masked_reference",
    "selection_mask",
    "selection_recall",
    "tile_attention",
    "tiles_from_blocks",
    "tiles_from_selection",
]
