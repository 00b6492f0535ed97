"""Superlinear multi-step attention [D275]: N - 1 span-search steps, then span attention.

Keys are cut into spans of ``stride`` positions; span ``m`` covers ``[m * stride, (m + 1) * stride)`` and its
*anchor* is its centre key ``m * stride + stride // 2``.

1. **Span search**: a query at position ``i`` scores every eligible span by ``<q_i, k_anchor>`` -- one strided
   key per span, ``T / stride`` scores per query (like looking at every ``stride``-th entry in jump search) --
   and keeps the ``top_k`` best.
2. **Span attention**: standard attention over the kept spans plus a local window: the keys from the start of
   the span holding ``i - window + 1`` up to ``i`` (so the local part covers ``window`` to
   ``window + stride - 1`` keys and never cuts a span). Eligible spans are the complete spans before the local
   part, so every past position is either local or selectable (no structural exclusion).

With ``stride ~ sqrt(T)`` and fixed ``top_k`` both steps cost ``O(T^{3/2})``. ``chunk`` is the query rows per
local tile.

**Trainable routing** (``route``, ``route_keys``): the span choice itself is a top-k (indices, no gradient); the
paper makes the search trainable by combining the span outputs with a softmax gate over their routing scores.
Here (our reading) the routing score of a kept span ``s``, ``a_is = <q_i, r_anchor(s)> * scale`` (``r`` =
``route_keys`` (B, Hkv, Tk, D), the per-position representatives the search scores, default ``k``), enters the
span attention as a log-weight: every key of span ``s`` gets ``route * a_is`` added to its score, the local part
gets 0. Per span this multiplies its softmax mass ``Z_s`` by ``exp(route * a_is)``, i.e. the output is
``sum_s pi_is o_is`` with ``pi_is = softmax_s(log Z_is + route * a_is)`` (local part included, ``a = 0``): the
paper's gated combination of span outputs, with the span's own attention mass kept in the gate. Gradients reach
``q`` and ``r`` (routing parameters upstream of ``route_keys``: the layer's ``route_proj``) through ``a``.
``route = 0`` is the plain op (same spans, same outputs); the selection always uses ``r``. With ``route != 0`` the
op runs a gathered path (each chunk of rows gathers its local keys and its kept spans' keys: ``O(T (window +
top_k stride))``, the same order as the sparse path, in PyTorch) and the float64 reference is the dense form with
the bias written per key.

**N > 2 steps** (``stride`` a tuple ``(s_1, ..., s_{N-1})``, coarse to fine, each dividing the one before):
the local part starts at the finest span ``s_{N-1}`` holding ``i - window + 1``. Step 1 scores the complete
``s_1``-spans before it by their anchors and keeps ``top_k``; step ``l`` scores the ``s_{l-1} / s_l`` children of
each span kept at step ``l - 1``, plus the complete ``s_l``-spans between the last complete ``s_{l-1}``-span and the
local part (so nothing is structurally excluded), and keeps ``top_k``; the last step attends the kept
``s_{N-1}``-spans plus the local part. With ``s_l ~ T^{(N-l)/N}`` every step costs ``O(T^{1+1/N})``. An int
``stride`` is the N = 2 case above.

Execution: the kept spans are aligned key blocks, run key-centric (``core.sparse.plan_selection``:
queries that picked the same span share it, no K/V copy when ``T`` is a multiple of ``stride``); the local part
is query-centric (a chunk of ``chunk`` rows gathers the contiguous keys its rows may see, exact mask). The
parts are disjoint and merged exactly by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_scores, masked_softmax
from attnlab.ops._engine import Tiles, flat_key_index, tile_attention, tiles_from_selection
from attnlab.ops.sparse import ALL, nonneg_int, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer
from .moba import block_sets


def local_start(pos: Tensor, stride: int, window: int) -> Tensor:
    """First key of the local part of queries at absolute positions ``pos``: the start of the span holding
    ``pos - window + 1`` (clamped at 0)."""
    return (pos - window + 1).clamp(min=0) // stride * stride


def span_search(q: Tensor, k: Tensor, stride: int, window: int, top_k: int, q_offset: int) -> tuple[Tensor, Tensor]:
    """Step 1: (sel, valid) each (B, H, Tq, n) span ids per query, n = min(top_k, complete spans)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dev = q.device
    with torch.no_grad():
        nb = Tk // stride  # complete spans (the eligible ones are complete)
        if nb == 0 or top_k == 0:
            z = torch.zeros(B, H, Tq, 0, dtype=torch.long, device=dev)
            return z, z.bool()
        anchors = torch.arange(nb, device=dev) * stride + stride // 2
        ka = k[:, :, anchors]  # (B, Hkv, nb, D): one strided key per span
        s = grouped_scores(q, ka)
        lo = local_start(torch.arange(Tq, device=dev) + q_offset, stride, window)
        eligible = (torch.arange(nb, device=dev).view(1, nb) + 1) * stride <= lo.view(Tq, 1)
        s = s.masked_fill(~eligible, float("-inf"))
        val, idx = s.topk(min(top_k, nb), dim=-1)
    return idx, torch.isfinite(val)


def strides_of(stride: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``stride`` as the tuple of span lengths per search step (coarse to fine); checks each divides the last."""
    if isinstance(stride, int) and not isinstance(stride, bool):
        positive_int("stride", stride)
        return (stride,)
    if not isinstance(stride, (tuple, list)) or not stride:
        raise ValueError(f"stride must be a positive integer or a non-empty tuple of them, got {stride!r}")
    out = tuple(stride)
    for i, s in enumerate(out):
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"stride must hold positive integers, got {stride!r}")
        if i and (s >= out[i - 1] or out[i - 1] % s):
            raise ValueError(f"stride must decrease, each dividing the one before, got {stride!r}")
    return out


def _keep_spans(q: Tensor, k: Tensor, cand: Tensor, ok: Tensor, span: int, top_k: int) -> tuple[Tensor, Tensor]:
    """The ``top_k`` candidate spans (ids (B, H, Tq, C) of length ``span``, ``ok`` eligible) by anchor score."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    n = min(top_k, cand.shape[-1])
    if n == 0:
        z = cand[..., :0]
        return z, z.bool()
    anchors = (cand * span + span // 2).clamp(max=Tk - 1)  # ineligible candidates may lie past the keys
    b = torch.arange(B, device=q.device).view(B, 1, 1, 1)
    h = (torch.arange(H, device=q.device) // (H // Hkv)).view(1, H, 1, 1)
    score = (k[b, h, anchors] @ q.unsqueeze(-1)).squeeze(-1).masked_fill(~ok, float("-inf"))  # (B, H, Tq, C)
    val, idx = score.topk(n, dim=-1)
    valid = torch.isfinite(val)
    return torch.where(valid, cand.gather(-1, idx), 0), valid


def multi_step_search(q: Tensor, k: Tensor, strides: tuple[int, ...], window: int, top_k: int,
                      q_offset: int) -> tuple[Tensor, Tensor]:
    """Steps 1 .. N-1: (sel, valid) each (B, H, Tq, n), ids of the kept finest spans (``strides[-1]`` long)."""
    B, H, Tq, D = q.shape
    Tk, dev = k.shape[2], q.device
    with torch.no_grad():
        lo = local_start(torch.arange(Tq, device=dev) + q_offset, strides[-1], window).view(Tq, 1)
        nb = torch.arange(Tk // strides[0], device=dev)
        cand = nb.expand(B, H, Tq, nb.numel())
        sel, valid = _keep_spans(q, k, cand, (nb + 1) * strides[0] <= lo, strides[0], top_k)
        for parent, span in zip(strides, strides[1:]):
            r = torch.arange(parent // span, device=dev)
            kids = (sel.unsqueeze(-1) * r.numel() + r).flatten(-2)
            left = lo // parent * r.numel() + r  # (Tq, r): complete spans after the last complete parent
            cand = torch.cat([kids, left.expand(B, H, Tq, r.numel())], -1)
            ok = torch.cat([valid.unsqueeze(-1).expand(*valid.shape, r.numel()).flatten(-2),
                            ((left + 1) * span <= lo).expand(B, H, Tq, r.numel())], -1)
            sel, valid = _keep_spans(q, k, cand, ok, span, top_k)
    return sel, valid


def local_tiles(B: int, H: int, Hkv: int, Tq: int, Tk: int, stride: int, window: int, block: int,
                q_offset: int, device: torch.device | None = None) -> Tiles:
    """Query-centric tiles of the local part: rows of a block gather keys from their first row's local start
    up to their last row; the exact mask keeps ``local_start(i) <= j <= i`` per row."""
    dev = device
    Bq = min(block, Tq)
    G = math.ceil(Tq / Bq)
    rows = torch.arange(G * Bq, device=dev).view(G, Bq)
    pos = rows + q_offset
    K = Bq + window + stride - 2  # the most keys a block's rows can see together
    kpos = local_start(pos[:, :1], stride, window) + torch.arange(K, device=dev)  # (G, K)
    lo = local_start(pos, stride, window)
    mask = (kpos.unsqueeze(1) >= lo.unsqueeze(-1)) & (kpos.unsqueeze(1) <= pos.unsqueeze(-1)) & (kpos.unsqueeze(1) < Tk)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev).view(1, H, 1, 1)
    k_idx = flat_key_index(kpos.view(1, 1, G, K), b, h // (H // Hkv), Hkv, Tk).reshape(B * H * G, K)
    q_idx = ((b * H + h) * Tq + rows.clamp(max=Tq - 1).view(1, 1, G, Bq)).reshape(B * H * G, Bq)
    row_ok = (rows < Tq).expand(B * H, G, Bq).reshape(B * H * G, Bq)
    mask = mask.expand(B * H, G, Bq, K).reshape(B * H * G, Bq, K)
    return Tiles(q_idx, k_idx, row_ok, mask)


def _check_route(route: float, route_keys: Tensor | None, k: Tensor) -> None:
    if isinstance(route, bool) or not isinstance(route, (int, float)) or not math.isfinite(route):
        raise ValueError(f"route must be a finite number (the routing term's weight, 0 = off), got {route!r}")
    if route_keys is not None and (not isinstance(route_keys, Tensor) or route_keys.shape != k.shape):
        got = tuple(route_keys.shape) if isinstance(route_keys, Tensor) else repr(route_keys)
        raise ValueError(f"route_keys must be a tensor shaped like k {tuple(k.shape)}, got {got}")


def _routed(q: Tensor, k: Tensor, v: Tensor, rk: Tensor, sel: Tensor, valid: Tensor, stride: int, window: int,
            route: float, scale: float, q_offset: int, chunk: int) -> Tensor:
    """Span attention with the routing log-weight, gathered per chunk of query rows: each row reads its local keys
    (bias 0) and the keys of its kept spans (bias ``route * <q_i, rk_anchor> * scale``), one softmax."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dev = q.device
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1, 1)
    outs = []
    for a in range(0, Tq, chunk):
        e = min(a + chunk, Tq)
        pos = torch.arange(a, e, device=dev) + q_offset
        lo = local_start(pos, stride, window)
        kl = lo.view(-1, 1) + torch.arange(window + stride - 1, device=dev)  # (c, Kl) local key positions
        okl = kl <= pos.view(-1, 1)
        sl, vl = sel[:, :, a:e], valid[:, :, a:e]  # (B, H, c, n)
        ks = (sl.unsqueeze(-1) * stride + torch.arange(stride, device=dev)).flatten(-2)  # (B, H, c, n * stride)
        kpos = torch.cat([kl.expand(B, H, *kl.shape), ks], -1).clamp(max=Tk - 1)
        ok = torch.cat([okl.expand(B, H, *okl.shape), vl.repeat_interleave(stride, -1)], -1)
        qc = q[:, :, a:e]
        anchor = rk[b, h, (sl * stride + stride // 2).clamp(max=Tk - 1)]  # (B, H, c, n, D)
        score_r = (anchor @ qc.unsqueeze(-1)).squeeze(-1) * scale * route  # (B, H, c, n)
        bias = torch.cat([torch.zeros_like(okl, dtype=q.dtype).expand(B, H, *okl.shape),
                          score_r.repeat_interleave(stride, -1)], -1)
        kg, vg = k[b, h, kpos], v[b, h, kpos]  # (B, H, c, K, D)
        s = (kg @ qc.unsqueeze(-1)).squeeze(-1) * scale + bias
        w = masked_softmax(s, ok)
        outs.append((w.unsqueeze(-2) @ vg).squeeze(-2))
    return torch.cat(outs, 2)


def superlinear_attention(
    q: Tensor, k: Tensor, v: Tensor, stride: int | tuple[int, ...], window: int, top_k: int, chunk: int = 64,
    scale: float | None = None, q_offset: int | None = None, q_block: int = 128, route: float = 0.0,
    route_keys: Tensor | None = None,
) -> Tensor:
    """Causal span search + span attention. q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv).

    ``stride``: an int (N = 2) or the span lengths of the N - 1 search steps, coarse to fine. ``route_keys``
    (B, Hkv, Tk, D): what the span search scores (default ``k``); ``route``: the weight of the routing term in the
    span attention (0: the plain op, no gradient to the routing)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    strides = strides_of(stride)
    positive_int("window", window)
    positive_int("chunk", chunk)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    _check_route(route, route_keys, k)
    q_offset = Tk - Tq if q_offset is None else q_offset
    stride = strides[-1]
    rk = k if route_keys is None else route_keys
    if len(strides) == 1:
        sel, valid = span_search(q, rk, stride, window, top_k, q_offset)
    else:
        sel, valid = multi_step_search(q, rk, strides, window, top_k, q_offset)
    if route != 0:
        return _routed(q, k, v, rk, sel, valid, stride, window, float(route), default_scale(D, scale), q_offset,
                       chunk)
    parts: list = [local_tiles(B, H, Hkv, Tq, Tk, stride, window, chunk, q_offset, q.device)]
    if sel.shape[-1]:
        parts += tiles_from_selection(sel, valid, block_sets(Tk, stride, q.device), Hkv, Tk, q_offset, True, q_block)
    return tile_attention(q, k, v, parts, default_scale(D, scale))


def superlinear_mask(q: Tensor, k: Tensor, stride: int | tuple[int, ...], window: int, top_k: int,
                     q_offset: int | None = None) -> Tensor:
    """Dense (B, H, Tq, Tk) mask of the selection, built plainly row by row (for the reference): each step's
    candidates as a Python list of span starts, sorted by anchor score."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    strides = (stride,) if isinstance(stride, int) else tuple(stride)
    fine = strides[-1]
    q_offset = Tk - Tq if q_offset is None else q_offset
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool, device=q.device)
    for r in range(Tq):
        i = q_offset + r
        lo = max(0, i - window + 1) // fine * fine
        mask[:, :, r, lo : i + 1] = True
        for b in range(B):
            for h in range(H):
                kh, qr = k[b, h // (H // Hkv)], q[b, h, r]
                kept: list[int] = []  # span starts kept by the previous step
                for n, span in enumerate(strides):
                    if n == 0:
                        starts = list(range(0, lo - span + 1, span))  # complete spans before the local part
                    else:
                        par = strides[n - 1]
                        starts = [a + c for a in kept for c in range(0, par, span)]
                        starts += list(range(lo // par * par, lo - span + 1, span))
                    score = {a: float(kh[a + span // 2].detach() @ qr.detach()) for a in starts}
                    kept = sorted(starts, key=lambda a: score[a], reverse=True)[:top_k]
                for a in kept:
                    mask[b, h, r, a : a + fine] = True
    return mask


# ---- the op and the layer ----------------------------------------------------------------------------------


def _superlinear_weights(q: Tensor, k: Tensor, *, q_offset: int, stride: int = 64, window: int = 64, top_k: int = 4,
                         route_keys: Tensor | None = None, **_: Any) -> Tensor:
    return superlinear_mask(q, k if route_keys is None else route_keys, stride, window, top_k, q_offset)


def routing_bias(q: Tensor, rk: Tensor, mask: Tensor, stride: int | tuple[int, ...], window: int, route: float,
                 scale: float, q_offset: int) -> Tensor:
    """Dense (B, H, Tq, Tk) routing log-weight, written per key with loops: a selected key outside the row's local
    part gets ``route * <q_i, rk[anchor of its finest span]> * scale``; local and unselected keys get 0."""
    B, H, Tq, D = q.shape
    Hkv, Tk = rk.shape[1], rk.shape[2]
    fine = stride if isinstance(stride, int) else tuple(stride)[-1]
    rows = []
    for r in range(Tq):
        i = q_offset + r
        lo = max(0, i - window + 1) // fine * fine
        cols = []
        for j in range(Tk):
            if j >= lo or not bool(mask[..., r, j].any()):
                cols.append(torch.zeros(B, H, dtype=q.dtype, device=q.device))
                continue
            a = (j // fine) * fine + fine // 2
            kk = torch.stack([rk[:, h // (H // Hkv), a] for h in range(H)], 1)  # (B, H, D)
            cols.append((q[:, :, r] * kk).sum(-1) * scale * route * mask[..., r, j].to(q.dtype))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, 2)


def _superlinear_dense(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None,
                       dtype: torch.dtype | None, stride: int | tuple[int, ...] = 64, window: int = 64,
                       top_k: int = 4, route: float = 0.0, route_keys: Tensor | None = None, **_: Any) -> Tensor:
    """The op written densely: attention over the selection (``superlinear_mask`` on ``route_keys``) with the
    routing log-weight (``routing_bias``) added to the scores; the float64 reference and the free-mask path."""
    _check_route(route, route_keys, k)
    rk = k if route_keys is None else route_keys
    with torch.no_grad():
        sel = superlinear_mask(q, rk, stride, window, top_k, q_offset)
    allowed = sel if mask is None else sel & mask
    if dtype is not None:
        q, k, v, rk = q.to(dtype), k.to(dtype), v.to(dtype), rk.to(dtype)
    H = q.shape[1]
    kr = k.repeat_interleave(H // k.shape[1], 1)
    vr = v.repeat_interleave(H // v.shape[1], 1)
    s = (q @ kr.transpose(-1, -2)) * scale
    if route != 0:
        s = s + routing_bias(q, rk, allowed, stride, window, float(route), scale, q_offset)
    return masked_softmax(s, allowed) @ vr


@sparse_op("superlinear", papers=("D275",), summary="two-step jump search: score span anchors (strided keys), "
           "attend top-k spans plus a local window; trainable routing as a span log-weight (route)",
           options={"stride": 64, "window": 64, "top_k": 4, "chunk": 64, "route": 0.0, "route_keys": None},
           weights_mask=_superlinear_weights, dense=_superlinear_dense, causal_only=True, renamed={"block": "chunk"},
           dense_options={"top_k": ALL}, example={"stride": 4, "window": 5, "top_k": 2, "chunk": 4})
def superlinear_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict,
                   stride: int | tuple[int, ...], window: int, top_k: int, chunk: int, route: float = 0.0,
                   route_keys: Tensor | None = None) -> Tensor:
    """Causal span search + span attention: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); stateless."""
    return superlinear_attention(q, k, v, stride, window, top_k, chunk, scale, q_offset, route=route,
                                 route_keys=route_keys)


@dataclass(frozen=True)
class SuperlinearConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    # span length = anchor spacing (about sqrt(T) for the O(T^1.5) setting); a tuple: N - 1 search steps
    stride: int | tuple[int, ...] = 64
    window: int = 64  # local keys (rounded down to a span start)
    top_k: int = 4  # spans per query
    chunk: int = 64  # query rows per local tile
    route: float = 0.0  # weight of the trainable routing term (0: hard top-k only, no routing parameters)
    delta: int = 0  # D99 correction stride, 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)
    renamed: ClassVar[dict[str, str]] = {"delta_correction": "delta", "block": "chunk"}

    def validate(self) -> None:
        strides_of(self.stride)
        self.check("window", "chunk")
        nonneg_int("top_k", self.top_k)
        if isinstance(self.route, bool) or not isinstance(self.route, (int, float)) or not math.isfinite(self.route):
            raise ValueError(f"route must be a finite number, got {self.route!r}")


@register(
    "superlinear", family="routing", papers=("D275",), year=2025, config=SuperlinearConfig,
    summary="two-step jump search: score span anchors (strided keys), attend top-k spans plus a local window",
)
class SuperlinearAttention(RoutingLayer):
    """With ``route != 0`` the layer owns ``route_proj`` (kv_heads, d, d), identity at init: the span search scores
    ``route_keys = k @ route_proj[h]``, and the routing term trains it."""

    op = "superlinear"

    def __init__(self, cfg: SuperlinearConfig) -> None:
        super().__init__(cfg)
        self.route_proj = None
        if cfg.route != 0:
            self.route_proj = nn.Parameter(torch.eye(cfg.d).repeat(cfg.kvh, 1, 1))

    def call_options(self, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Any]:
        opts = self.op_options()
        if self.route_proj is not None:
            opts["route_keys"] = k @ self.route_proj.to(k.dtype).unsqueeze(0)
        return opts
