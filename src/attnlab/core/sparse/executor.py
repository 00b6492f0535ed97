"""The one executor: runs any :class:`~attnlab.core.sparse.plan.Plan`, forward and backward, and merges partial
results with the one log-sum-exp merge (:func:`attnlab.core.softmax.lse_merge`).

Engines (``engine=``):

* ``"python"``   -- the tile path in PyTorch. Pattern plans: batched SDPA over gathered (or, for contiguous
  bands, viewed) tiles with their exact masks. Selection / block / hand-made tiles: PyTorch's fused CPU flash
  kernel per part (it returns the log-sum-exp), merged exactly by log-sum-exp; the backward calls the flash
  backward per part with the *merged* output and log-sum-exp, which is exactly the gradient of the softmax over
  the union. Off CPU (or for dtypes the CPU kernel lacks) the same tiles run as explicit matmuls.
* ``"explicit"`` -- the same tiles as explicit matmuls under autograd (the independent check of the fused path).
* ``"native"``   -- the native CPU kernel (:mod:`attnlab.core.sparse.native`) on the plan's
  :class:`~attnlab.core.sparse.layout.BlockLayout`.
* ``"flex"``     -- compiled FlexAttention (pattern plans; GPU training, CPU forward only).
* ``"auto"``     -- native on CPU when it is built and the score modifier maps onto the kernel's (temperature,
  softcap, bias, ALiBi): pattern and block plans on their layout (patterns with a ``query_order`` in that order,
  via ``q_order``/``k_order``), and key-centric selections whose key sets are aligned blocks (MoBA, NSA-style
  block selection: :class:`BlockTiles` parts plus the causal diagonal) with the queries that chose each block
  gathered into whole tiles of it, merged by log-sum-exp; flex for pattern plans on CUDA; python otherwise.

Shapes: q ``(B, H, Tq, D)``; k, v ``(B, Hkv, Tk, D)`` (grouped-query heads read their kv head; K/V are never
repeated); out ``(B, H, Tq, Dv)``; lse ``(B, H, Tq)`` (``-inf`` for rows that see no key; their output is 0).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import flex
from ..score_mods import ALiBi, Bias, Compose, ScoreMod, SoftCap, Temperature, as_score_mod
from ..softmax import lse_merge
from .layout import BlockLayout
from .plan import BlockTiles, PatternTiles, Plan, Tiles

ENGINES = ("auto", "python", "explicit", "native", "flex")
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


# ---- selection / block / hand-made tiles through the fused CPU flash kernel ---------------------------------


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
        return xf.view(-1, Kb * xf.shape[-1]).index_select(0, t.k_block.reshape(-1)).view(N, 1, m * Kb, xf.shape[-1])
    # index_select: about 3x faster than advanced indexing for the same rows on CPU
    return xf.index_select(0, t.k_idx.reshape(-1)).view(*t.k_idx.shape, xf.shape[-1]).unsqueeze(1)


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


def _softmax_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Log-sum-exp and softmax of score rows that may be all ``-inf`` (then: ``-inf`` and zeros, with finite
    zero gradients -- a plain logsumexp would send NaN back through such rows)."""
    seen = torch.isfinite(s).any(-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(~seen, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse)  # zero wherever s is -inf
    lse = lse.masked_fill(~seen, float("-inf")).squeeze(-1)
    return lse, p


def _explicit_part(qf, kf, vf, t: Tiles, scale: float):
    Q, Kt, V = qf[t.q_idx].unsqueeze(1), _gather_kv(kf, t), _gather_kv(vf, t)
    s = (Q @ Kt.transpose(-1, -2)) * scale  # (N, 1, R, K)
    if t.mask is not None:
        s = s.masked_fill(~t.mask.unsqueeze(1), float("-inf"))
    lse, p = _softmax_lse(s)
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
        o[:, i], lse[:, i] = lse_merge([(o[:, i], lse[:, i]), (oi.squeeze(1), li.squeeze(1))])
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
        if not outs:  # no part and no diagonal: every row sees nothing
            outs.append((qf.new_zeros(B * H * Tq, Dv), qf.new_full((B * H * Tq,), float("-inf")), None, None))
        out, L = lse_merge(outs, rows=B * H * Tq)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        ctx.save_for_backward(q, k, v, out, L)
        ctx.scale, ctx.diag_block, ctx.parts = scale, diag_block, parts
        return out.view(B, H, Tq, Dv), L.view(B, H, Tq)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, L = ctx.saved_tensors
        scale, diag_block = ctx.scale, ctx.diag_block
        if dout is None:
            dout = torch.zeros(*q.shape[:3], v.shape[-1], dtype=v.dtype, device=v.device)
        if dlse is not None and bool(torch.where(torch.isfinite(L), dlse.reshape(-1), 0).any()):
            # the log-sum-exp itself is differentiated (a caller merges it further): rare, so recompute the
            # explicit matmul path under autograd rather than carrying a second fused backward
            return (*_explicit_grads(q, k, v, ctx.parts, scale, diag_block, dout, dlse), None, None, None)
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




# ---- pattern plans through batched SDPA ---------------------------------------------------------------------


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


def _pattern_sdpa(
    q: Tensor, k: Tensor, v: Tensor, plan: PatternTiles, scale: float, score_mod: ScoreMod | None, q_offset: int
) -> Tensor:
    """A pattern part through batched SDPA with the tiles' exact masks (heads in one call, autograd from SDPA's
    own backward plus the gathers' scatter-add). q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
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


def _span_views(q: Tensor, k: Tensor, v: Tensor, plan: PatternTiles) -> tuple[Tensor, Tensor, Tensor]:
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


# ---- the explicit (autograd) tile path ---------------------------------------------------------------------


def _explicit_tiles(q, k, v, parts, scale, diag_block) -> tuple[Tensor, Tensor]:
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
    if not outs:
        outs.append((qf.new_zeros(B * H * Tq, Dv), qf.new_full((B * H * Tq,), float("-inf")), None, None))
    out, L = lse_merge(outs, rows=B * H * Tq)
    return out.view(B, H, Tq, Dv), L.view(B, H, Tq)


def _explicit_grads(q, k, v, parts, scale, diag_block, dout, dlse):
    with torch.enable_grad():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o, L = _explicit_tiles(qq, kk, vv, parts, scale, diag_block)
        seen = torch.isfinite(L)
        # rows that see nothing have no gradient; keep their -inf out of the graph
        L = torch.where(seen, L, torch.zeros_like(L))
        gl = torch.where(seen, dlse, torch.zeros_like(dlse))
        return torch.autograd.grad([o, L], [qq, kk, vv], [dout, gl], allow_unused=True)


def _explicit_pattern(q, k, v, pt: PatternTiles, scale, mod: ScoreMod | None, q_offset) -> tuple[Tensor, Tensor]:
    """A pattern part as explicit matmuls over gathered tiles (autograd): output and log-sum-exp."""
    B, H, Tq, D = q.shape
    G, Bq = pt.q_rows.shape
    qg = q[:, :, pt.q_rows]  # (B, H, G, Bq, D)
    kg = _gather_heads(k, pt.kv_index)  # (B, Hg, G, Kg, D)
    vg = _gather_heads(v, pt.kv_index)
    if kg.shape[1] != H:
        kg, vg = kg.repeat_interleave(H // kg.shape[1], 1), vg.repeat_interleave(H // vg.shape[1], 1)
    s = (qg @ kg.transpose(-1, -2)) * scale  # (B, H, G, Bq, Kg)
    if mod is not None:
        q_pos = (pt.q_rows + q_offset).view(1, 1, G, Bq, 1)
        kv_pos = _to_heads(pt.kv_index, 1, H).unsqueeze(-2)  # (Bp, Hp, G, 1, Kg)
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
        h = torch.arange(H, device=q.device).view(1, H, 1, 1, 1)
        s = mod.score_mod(s, b, h, q_pos, kv_pos)
    mask = _to_heads(pt.mask, 1, H)
    if pt.empty is not None:
        mask = mask & ~_to_heads(pt.empty, 1, H)
    lse, p = _softmax_lse(s.masked_fill(~mask, float("-inf")))
    out = (p @ vg).reshape(B, H, G * Bq, -1)
    lse = lse.reshape(B, H, G * Bq)
    if pt.span is not None:
        return out[:, :, :Tq], lse[:, :, :Tq]
    return out[:, :, pt.inv], lse[:, :, pt.inv]


# ---- the engine interface ----------------------------------------------------------------------------------


def _native_module():
    try:
        from . import native
    except ImportError:
        return None
    try:
        return native if native.available() else None
    except Exception:  # a kernel that fails to load must not take the Python path down with it
        return None


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_ok(native, q: Tensor, grad: bool) -> bool:
    if native is None or q.device.type != "cpu" or q.dtype not in _NATIVE_DTYPES:
        return False
    return not grad or bool(getattr(native, "supports_backward", lambda: False)())


def _native_mods(mod: ScoreMod | None, plan: Plan, heads: int) -> dict | None:
    """The native kernel's score-modifier arguments for ``mod``, or None when it cannot express it.

    The kernel applies ``temperature``, then ``softcap``, then ``bias`` and ``alibi`` (additive), so a
    composition is accepted in that order only; a ``Bias`` is cut to this call's query rows.
    """
    if mod is None:
        return {}
    out: dict = {}
    stage = 0  # 0: temperature may come, 1: softcap may come, 2: only additive terms
    for m in mod.mods if isinstance(mod, Compose) else (mod,):
        if isinstance(m, Temperature) and stage == 0 and m.factors.numel() == heads:
            out["temperature"], stage = m.factors, 1
        elif isinstance(m, SoftCap) and stage <= 1:
            out["softcap"], stage = float(m.cap), 2
        elif isinstance(m, ALiBi) and "alibi" not in out and m.slopes.numel() == heads:
            out["alibi"], stage = m.slopes, 2
        elif isinstance(m, Bias) and "bias" not in out and plan.q_len is not None:
            r0 = plan.q_offset - m.q_offset
            if r0 < 0 or m.values.shape[2] < r0 + plan.q_len or m.values.shape[3] != plan.kv_len:
                return None
            out["bias"], stage = m.values[:, :, r0 : r0 + plan.q_len], 2
        else:
            return None
    return out


# ---- key-centric selections through the native kernel ------------------------------------------------------


def _native_tile_kb(plan: Plan) -> int | None:
    """The kernel's key block for a selection plan made only of aligned key blocks (BlockTiles) and the causal
    diagonal, or None when some part is a general Tiles (those stay on the Python tiles)."""
    if not plan.parts and not plan.diag_block:
        return None
    if not all(isinstance(t, BlockTiles) for t in plan.parts):
        return None
    from .plan import layout_block

    sizes = [t.block for t in plan.parts] + ([plan.diag_block] if plan.diag_block else [])
    # the tuned block when it divides every key set, else the largest smaller kernel block that does (a method's
    # 64-key blocks still reach the kernel on a machine tuned to 128)
    tuned = layout_block("cpu")
    for kb in (tuned, *(b for b in (128, 64, 32) if b < tuned)):
        if all(s % kb == 0 for s in sizes):
            return kb
    return None


def _block_tiles_layout(bt: BlockTiles, B: int, H: int, Tq: int, Tk: int, kb: int, q_offset: int):
    """A BlockTiles part as a query-gathered BlockLayout: the queries of each key block's segment are laid out
    in tiles of ``kb`` rows (segments padded to whole tiles), so every tile reads exactly one key set -- all of
    it, no mask (BlockTiles parts are the fully visible sets). Returns ``(layout, rows (B*H, P), ok (B*H, P))``:
    layout row p of batch-head bh is flat query row ``rows[bh, p]``; ``ok`` marks the real (non-padding) slots.
    """
    BH = B * H
    dev = bt.q_idx.device
    nseg = len(bt.blocks)
    c0 = torch.tensor(bt.cols[:-1], dtype=torch.long, device=dev)
    w = torch.tensor(bt.cols[1:], dtype=torch.long, device=dev) - c0  # (nseg,) widths
    ntile = (w + kb - 1) // kb
    tstart = torch.cumsum(ntile, 0) - ntile
    G = int(ntile.sum())
    P = G * kb
    seg_of_tile = torch.repeat_interleave(torch.arange(nseg, device=dev), ntile)  # (G,)
    slot = (torch.arange(G, device=dev) - tstart[seg_of_tile]).view(G, 1) * kb + torch.arange(kb, device=dev)
    inside = slot < w[seg_of_tile].view(G, 1)  # (G, kb)
    col = (c0[seg_of_tile].view(G, 1) + slot).masked_fill(~inside, 0).view(-1)  # (P,)
    rows = bt.q_idx[:, col]  # (BH, P)
    ok = bt.row_ok[:, col] & inside.view(1, P)
    rows = torch.where(ok, rows, rows[:, :1])
    N = bt.block // kb
    blocks = torch.tensor(bt.blocks, dtype=torch.long, device=dev)[seg_of_tile]  # (G,)
    kv_index = (blocks.view(G, 1) * N + torch.arange(N, device=dev)).view(1, 1, G, N).expand(B, H, G, N)
    live = ok.view(BH, G, kb).any(-1).view(B, H, G)  # tiles holding no real query of this head: skipped
    # keys past kv_len in a last, short block do not exist: the kernel reads only listed blocks that exist
    nk = -(-Tk // kb)
    exists = kv_index < nk
    kv_index = torch.where(exists, kv_index, torch.zeros_like(kv_index))
    count = (exists.sum(-1) * live).to(torch.int32)
    full = exists & live.unsqueeze(-1)
    tail = Tk % kb != 0 and bool((exists & (kv_index == nk - 1)).any())
    bits = None
    if tail:  # the last key block is short: mark its keys exactly
        kpos = kv_index.unsqueeze(-1) * kb + torch.arange(kb, device=dev)
        bits = ((kpos < Tk).unsqueeze(-2) & full.unsqueeze(-1).unsqueeze(-1)).expand(B, H, G, N, kb, kb)
        full = full & ~(kv_index == nk - 1)
        bits = bits.contiguous()
    pairs = float(ok.sum()) * bt.block / BH
    lay = BlockLayout(kb, kb, P, Tk, q_offset, kv_index.to(torch.int32).contiguous(), count.contiguous(), full, bits,
                      pairs)
    return lay, rows, ok


@lru_cache(maxsize=32)
def _diag_layout_native(T: int, block: int, kb: int, device: str) -> BlockLayout:
    """Causal attention inside each contiguous block of ``block`` rows, as a BlockLayout of kb x kb tiles."""
    from .plan import _blocks_layout

    G = -(-T // kb)
    per = block // kb
    g = torch.arange(G, device=device)
    first = (g // per) * per
    idx = first.view(G, 1) + torch.arange(per, device=device)
    valid = idx <= g.view(G, 1)
    return _blocks_layout(idx.view(1, 1, G, per), valid.view(1, 1, G, per), kb, kb, T, T, 0, True)


def _gather_back(rows: Tensor, ok: Tensor, n: int) -> list[tuple[Tensor, Tensor]]:
    """Inverse maps of a query-gathered part: a query may sit in several slots (one per key set it chose), so
    its slots are ranked and, per rank r, ``(src (n,), hit (n,))`` says which gathered slot holds row i's r-th
    entry (``hit`` False: none). Gathering back per rank turns the part into parts over every row in order, which
    the log-sum-exp merge combines elementwise instead of scattering."""
    flat_rows, flat_ok = rows.reshape(-1), ok.reshape(-1)
    slots = flat_ok.nonzero().squeeze(-1)
    r = flat_rows[slots]
    order = torch.sort(r, stable=True).indices
    r, slots = r[order], slots[order]
    counts = torch.bincount(r, minlength=n)
    rank = torch.arange(r.numel(), device=r.device) - (torch.cumsum(counts, 0) - counts)[r]
    maps = []
    for j in range(int(counts.max()) if counts.numel() else 0):
        pick = rank == j
        src = torch.zeros(n, dtype=torch.long, device=r.device)
        hit = torch.zeros(n, dtype=torch.bool, device=r.device)
        src[r[pick]] = slots[pick]
        hit[r[pick]] = True
        maps.append((src, hit))
    return maps


def _native_tiles(native, q, k, v, plan: Plan, scale: float, mods: dict) -> tuple[Tensor, Tensor]:
    """A key-centric plan (aligned key blocks + causal diagonal) on the native kernel: the queries that chose
    each key block are gathered into whole tiles of it (one kernel call per part, K/V read in place), the
    diagonal runs on its own layout, and the parts merge by log-sum-exp (the kernel's lse has exact gradients,
    so the merge differentiates exactly)."""
    B, H, Tq, D = q.shape
    Dv, Tk = v.shape[-1], k.shape[2]
    n = B * H * Tq
    kb = _native_tile_kb(plan)
    key = ("native_tiles", B, H, Tq, Tk, kb)
    cached = plan._cache.get(key)
    if cached is None:
        cached = []
        for t in plan.parts:
            lay, rows, ok = _block_tiles_layout(t, B, H, Tq, Tk, kb, plan.q_offset)
            cached.append((lay, rows.reshape(-1), _gather_back(rows, ok, n)))
        plan._cache[key] = cached
    outs = []
    if plan.diag_block:
        lay = _diag_layout_native(Tq, plan.diag_block, kb, str(q.device))
        outs.append(native.block_attention(q, k, v, lay, scale, **mods))
    qf = q.reshape(n, D)
    ninf = float("-inf")
    if q.dtype == torch.float32 and not _needs_grad(q, k, v, *(t for t in mods.values() if isinstance(t, Tensor))):
        # inference: merge each gathered call straight into the natural-order rows (one pass per rank, in place)
        if outs:
            out, lse = outs[0][0].reshape(n, Dv).contiguous(), outs[0][1].reshape(n).contiguous()
        else:
            out, lse = q.new_zeros(n, Dv), q.new_full((n,), ninf)
        for lay, rows, maps in cached:
            o, lg = native.block_attention(qf.index_select(0, rows).view(B, H, -1, D), k, v, lay, scale, **mods)
            o, lg = o.reshape(-1, Dv).contiguous(), lg.reshape(-1).contiguous()
            for src, hit in maps:
                native.merge_gathered_(out, lse, o, lg, src, hit)
        return out.view(B, H, Tq, Dv), lse.view(B, H, Tq)
    for lay, rows, maps in cached:
        qg = qf.index_select(0, rows).view(B, H, -1, D)
        o, lse = native.block_attention(qg, k, v, lay, scale, **mods)
        o, lse = o.reshape(-1, Dv), lse.reshape(-1)
        for src, hit in maps:
            outs.append((o.index_select(0, src).view(B, H, Tq, Dv),
                         lse.index_select(0, src).masked_fill(~hit, ninf).view(B, H, Tq)))
    if not outs:
        return q.new_zeros(B, H, Tq, Dv), q.new_full((B, H, Tq), ninf, dtype=torch.float32)
    return lse_merge(outs)


def _native_tiles_ok(plan: Plan, q: Tensor, k: Tensor) -> bool:
    if plan.mode not in ("selection", "tiles") or _native_tile_kb(plan) is None:
        return False
    if plan.diag_block and q.shape[2] != k.shape[2]:
        return False
    return True


def choose_engine(q: Tensor, k: Tensor, v: Tensor, plan: Plan, score_mod: ScoreMod | None = None) -> str:
    """The engine ``engine="auto"`` runs ``plan`` on."""
    mod = as_score_mod(score_mod)
    native_ok = _native_ok(_native_module(), q, _needs_grad(q, k, v))
    if (plan.mode in ("pattern", "blocks") and native_ok
            and _native_mods(mod, plan, q.shape[1]) is not None):
        return "native"
    if (native_ok and _native_tiles_ok(plan, q, k) and (mods := _native_mods(mod, plan, q.shape[1])) is not None
            and not ("bias" in mods or "alibi" in mods)):
        return "native"
    if q.device.type == "cuda" and plan.pattern is not None and flex.flex_available():
        return "flex"
    return "python"


def _check(q: Tensor, k: Tensor, v: Tensor, plan: Plan, engine: str) -> None:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be an attnlab.core.sparse Plan, got {type(plan).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q (B, H, Tq, D), k, v (B, Hkv, Tk, D) with H a multiple of Hkv; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if plan.q_len is not None and (q.shape[2], k.shape[2]) != (plan.q_len, plan.kv_len):
        raise ValueError(f"the plan is for q_len={plan.q_len}, kv_len={plan.kv_len}; got {q.shape[2]}, {k.shape[2]}")
    if plan.diag_block and q.shape[2] != k.shape[2]:
        raise ValueError("the diagonal part needs self-attention prefill (Tq == Tk, q_offset 0)")


def run_lse(
    q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float, score_mod=None, engine: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Attention over what ``plan`` allows: ``(out (B, H, Tq, Dv), lse (B, H, Tq))``, both differentiable.

    Rows that see no key give zero output and ``lse = -inf``. ``score_mod`` (ALiBi, SoftCap, Bias, ...) is
    supported by pattern plans (and by the native engine on block plans); the Python tiles of other plans take
    only a per-head ``scale`` modifier. With the Python engine a pattern plan's log-sum-exp comes from the
    explicit tile path (batched SDPA does not return it), and a gradient through the log-sum-exp of a tile plan
    is recomputed on the explicit path; the native engine does both natively.
    """
    return _run(q, k, v, plan, scale, score_mod, engine, True)


def run(q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float, score_mod=None, engine: str = "auto") -> Tensor:
    """Attention over what ``plan`` allows: ``(B, H, Tq, Dv)``; see :func:`run_lse`."""
    return _run(q, k, v, plan, scale, score_mod, engine, False)


def _run(q, k, v, plan: Plan, scale, score_mod, engine, want_lse):
    _check(q, k, v, plan, engine)
    mod = as_score_mod(score_mod)
    if engine == "auto":
        engine = choose_engine(q, k, v, plan, mod)
    if mod is not None and mod.kind == "scale" and plan.mode != "pattern" and engine != "native":
        q = q * mod.factor(q.shape[1], q.device, q.dtype).view(1, -1, 1, 1)
        mod = None
    if mod is not None and plan.mode != "pattern" and engine != "native":
        raise ValueError("score_mod needs a pattern plan (plan_pattern) or the native engine; the Python tiles of "
                         "selections take only a 'scale' modifier")
    if engine == "native":
        native = _native_module()
        if native is None:
            raise RuntimeError("engine='native': the native sparse kernel is not built (attnlab.core.sparse.native)")
        mods = _native_mods(mod, plan, q.shape[1])
        if mods is None:
            raise ValueError(f"engine='native' cannot express the score modifier {mod!r}")
        if plan.mode in ("selection", "tiles") and _native_tile_kb(plan) is not None:
            if any(key in mods for key in ("bias", "alibi")):
                raise ValueError("engine='native' on a selection takes temperature / softcap modifiers only")
            out, lse = _native_tiles(native, q, k, v, plan, scale, mods)
            return (out, lse) if want_lse else out
        layout = plan.layout()
        if layout is None:
            raise ValueError(f"engine='native' needs a plan with a BlockLayout; a {plan.mode!r} plan has none")
        q_order, k_order = plan.layout_orders()
        out, lse = native.block_attention(q, k, v, layout, scale, q_order=q_order, k_order=k_order, **mods)
        return (out, lse) if want_lse else out
    if engine == "flex":
        if plan.pattern is None:
            raise ValueError("engine='flex' runs pattern plans (plan_pattern) only")
        return flex.flex_attention(q, k, v, plan.pattern, scale, mod, plan.q_offset, return_lse=want_lse)
    if plan.mode == "pattern":
        pt = plan.parts[0]
        if engine == "explicit" or want_lse:
            out, lse = _explicit_pattern(q, k, v, pt, scale, mod, plan.q_offset)
            return (out, lse) if want_lse else out
        return _pattern_sdpa(q, k, v, pt, scale, mod, plan.q_offset)
    # the CPU kernel reads K/V block views with their strides but assumes a unit stride along head_dim
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if engine == "python" and _use_flash(q):
        out, lse = _FlashTiles.apply(q, k, v, scale, plan.diag_block, plan.parts)
    else:
        out, lse = _explicit_tiles(q, k, v, plan.parts, scale, plan.diag_block)
    return (out, lse) if want_lse else out


__all__ = ["ENGINES", "choose_engine", "run", "run_lse"]
