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
    """

    q_idx: Tensor
    k_idx: Tensor
    row_ok: Tensor
    mask: Tensor | None = None

    @property
    def computed_pairs(self) -> int:
        return self.q_idx.numel() * self.k_idx.shape[-1]

    def allowed_pairs(self) -> int:
        """(query, key) pairs that really count (padding rows and masked keys excluded)."""
        if self.mask is None:
            return int(self.row_ok.sum()) * self.k_idx.shape[-1]
        return int((self.mask & self.row_ok.unsqueeze(-1)).sum())


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
                 device) -> Tiles:
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
    mask = None
    if masked:
        mask = set_ok[kb, kh, ts].unsqueeze(1)  # (N, 1, K)
        if causal:
            qpos = q_idx % Tq + q_offset  # (N, R)
            mask = mask & (kpos.unsqueeze(1) <= qpos.unsqueeze(-1))
        mask = mask.expand(N, R, kpos.shape[-1])
    return Tiles(q_idx, k_idx, row_ok, mask)


# ---- execution -----------------------------------------------------------------------------------------


def _use_flash(q: Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype in _FLASH_DTYPES


def _bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)


def _gather_part(qf: Tensor, kf: Tensor, vf: Tensor, t: Tiles):
    return qf[t.q_idx].unsqueeze(1), kf[t.k_idx].unsqueeze(1), vf[t.k_idx].unsqueeze(1)


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


def _diag_rows(B: int, H: int, T: int, block: int, device) -> tuple[Tensor, Tensor]:
    nb = math.ceil(T / block)
    pos = torch.arange(nb * block, device=device)
    rows = (torch.arange(B * H, device=device).view(-1, 1) * T + pos.clamp(max=T - 1)).reshape(-1)
    ok = (pos < T).expand(B * H, -1).reshape(-1)
    return rows, ok


def _merge(parts: list[tuple[Tensor, Tensor, Tensor, Tensor]], nrows: int, Dv: int, like: Tensor):
    """Exact union of softmaxes over disjoint key sets: parts are (out (n, Dv), lse (n,), row (n,), ok (n,))."""
    o = torch.cat([p[0] for p in parts])
    lse = torch.cat([p[1] for p in parts])
    row = torch.cat([p[2] for p in parts])
    ok = torch.cat([p[3] for p in parts])
    lse = lse.masked_fill(~ok, float("-inf"))
    neg = torch.full((nrows,), float("-inf"), dtype=lse.dtype, device=lse.device)
    m = neg.scatter_reduce(0, row, lse.detach(), "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lse - m[row])
    s = torch.zeros(nrows, dtype=lse.dtype, device=lse.device).index_add(0, row, e)
    L = m + torch.log(s)  # -inf for rows that see no key
    w = torch.where(ok, e / s.clamp(min=torch.finfo(s.dtype).tiny)[row], torch.zeros_like(e))
    o = torch.where(ok.unsqueeze(-1), o, torch.zeros_like(o))  # fully masked rows may hold NaN
    out = torch.zeros(nrows, Dv, dtype=like.dtype, device=like.device).index_add(0, row, w.unsqueeze(-1) * o)
    return out, L


def _explicit_part(qf, kf, vf, t: Tiles, scale: float):
    Q, Kt, V = _gather_part(qf, kf, vf, t)
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
    rows, ok = _diag_rows(B, H, T, block, q.device)
    return o.reshape(-1, V.shape[-1]), lse.reshape(-1), rows, ok


class _FlashTiles(torch.autograd.Function):
    """Fused CPU path: flash forward per part, LSE merge; flash backward per part with the merged out/lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale, diag_block, parts):
        B, H, Tq, D = q.shape
        Dv = v.shape[-1]
        qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        outs = []
        if diag_block:
            Q, Kt, V = (_diag_layout(x, diag_block, H) for x in (q, k, v))
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(Q, Kt, V, 0.0, True, scale=scale)
            rows, ok = _diag_rows(B, H, Tq, diag_block, q.device)
            outs.append((o.reshape(-1, Dv), lse.reshape(-1), rows, ok))
        for t in parts:
            Q, Kt, V = _gather_part(qf, kf, vf, t)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                Q, Kt, V, 0.0, False, attn_mask=_bias(t.mask, q.dtype), scale=scale
            )
            outs.append((o.reshape(-1, Dv), lse.reshape(-1), t.q_idx.reshape(-1), _row_valid(t).reshape(-1)))
        out, L = _merge(outs, B * H * Tq, Dv, q)
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
        dof = (dout.reshape(-1, Dv) * seen.unsqueeze(-1)).contiguous()
        qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        if diag_block:
            Q, Kt, V = (_diag_layout(x, diag_block, H) for x in (q, k, v))
            rows, ok = _diag_rows(B, H, Tq, diag_block, q.device)
            shape = Q.shape[:3]
            g = (dof[rows] * ok.unsqueeze(-1)).view(*shape, Dv)
            gq, gk, gv = bwd(g, Q, Kt, V, out[rows].view(*shape, Dv), Ls[rows].view(shape), 0.0, True, scale=scale)
            dq.index_add_(0, rows, gq.reshape(-1, D) * ok.unsqueeze(-1))
            _add_kv(dk, gk, k, diag_block, H)
            _add_kv(dv, gv, v, diag_block, H)
        for t in ctx.parts:
            Q, Kt, V = _gather_part(qf, kf, vf, t)
            r = t.q_idx.reshape(-1)
            ok = _row_valid(t).reshape(-1, 1)
            shape = Q.shape[:3]
            g = (dof[r] * ok).view(*shape, Dv)
            gq, gk, gv = bwd(g, Q, Kt, V, out[r].view(*shape, Dv), Ls[r].view(shape), 0.0, False,
                             attn_mask=_bias(t.mask, q.dtype), scale=scale)
            dq.index_add_(0, r, gq.reshape(-1, D) * ok)
            dk.index_add_(0, t.k_idx.reshape(-1), gk.reshape(-1, D))
            dv.index_add_(0, t.k_idx.reshape(-1), gv.reshape(-1, Dv))
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
    parts: list[Tiles],
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
    fused = _use_flash(q) if fused is None else fused
    if fused:
        return _FlashTiles.apply(q, k, v, scale, diag_block or 0, parts)
    B, H, Tq, D = q.shape
    Dv = v.shape[-1]
    qf, kf, vf = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)
    outs = [_explicit_part(qf, kf, vf, t, scale) for t in parts]
    if diag_block:
        outs.append(_explicit_diag(q, k, v, diag_block, scale))
    out, _ = _merge(outs, B * H * Tq, Dv, q)
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
    "Tiles",
    "flat_key_index",
    "masked_reference",
    "selection_mask",
    "selection_recall",
    "tile_attention",
    "tiles_from_selection",
]
