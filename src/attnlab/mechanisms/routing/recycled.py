"""Recycled attention [D27]: decode with the top-k keys of the last full attention step.

Inference-time, on a pretrained model's q, k, v. Every ``stride`` decoding steps (and at the first step, the
prefill) the step runs *full* attention and records, per head, the ``top_k`` keys its last query attended
most. The steps in between *recycle* that key set: their queries attend only to the recorded keys plus the
keys appended since that full step (which the recorded pattern cannot rank), causally. ``top_k`` >= every
position makes recycling exact; ``dense_refresh=False`` makes a full step attend to its own top-k instead of
every key (then ``stride=1`` is per-step top-k attention -- the oracle the recycling approximates).
``refresh_below`` adds the paper's dynamic schedule: a step also refreshes when the cosine similarity of its
query to the last full step's query (averaged over heads) drops below it.

The sparse steps run through the tile engine (``core.sparse``): one query-centric tile per (batch, head)
gathers the recorded keys and the recent ones -- ``top_k + recent`` keys, never the whole cache.

The op (and layer) ``recycled`` follows the schedule *per position*, whatever the calls: positions below
``prefill`` are full steps (the prefill, dense); after it, a position is a full step when ``stride`` positions
have passed since the last one (or, with ``refresh_below``, when its query turns away from that one's);
every other position recycles the last full step's top-k keys plus the keys after it. So a forward without a
cache follows the same schedule as decoding token by token, and the two agree. Its state carries the last full
step (``last``, ``keys``, ``ok``, ``q_ref``) and, with ``prefill=None``, the prefill length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.softmax import grouped_apply, grouped_scores, masked_softmax
from attnlab.ops._engine import Tiles, flat_key_index, key_set_tiles, masked_reference, tile_attention
from attnlab.ops.sparse import ALL, check_prefill, prefill_end, sampled_dense, sparse_op

from ..registry import register
from ._common import RoutingHeadsConfig, RoutingLayer


def full_step(q: Tensor, k: Tensor, v: Tensor, top_k: int, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Full causal attention of the newest ``Tq`` positions and the top-k keys of the last query.

    q (B, H, Tq, D) at positions ``Tk - Tq ..``; k, v (B, Hkv, Tk, D) -> out (B, H, Tq, Dv), keys (B, H, n)
    with n = min(top_k, Tk).
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    s = grouped_scores(q, k) * scale  # a full step reads every key anyway
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    p = masked_softmax(s, causal)
    keys = p[:, :, -1].detach().topk(min(top_k, Tk), dim=-1).indices
    return grouped_apply(p, v), keys


def recycled_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, seen: int, scale: float | None = None) -> Tensor:
    """Causal attention of the newest positions over ``keys`` (B, H, n) (all < ``seen``) and keys ``seen ..``.

    q (B, H, Tq, D) at positions ``Tk - Tq ..``; k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv).
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    dev = q.device
    recent = torch.arange(seen, Tk, device=dev).expand(B, H, Tk - seen)
    kpos = torch.cat([keys, recent], -1)  # (B, H, K): disjoint (keys < seen <= recent)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H, -1)
    qpos = torch.arange(Tk - Tq, Tk, device=dev)
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1) * Tq + torch.arange(Tq, device=dev)).reshape(B * H, Tq)
    mask = kpos.reshape(B * H, 1, -1) <= qpos.view(1, Tq, 1)
    tiles = Tiles(q_idx, k_idx, torch.ones_like(q_idx, dtype=torch.bool), None if bool(mask.all()) else mask)
    return tile_attention(q, k, v, [tiles], scale)


@dataclass(frozen=True)
class RecycledConfig:
    top_k: int = 64
    stride: int = 8  # a full step every ``stride`` steps
    dense_refresh: bool = True  # full steps attend to every key (the paper); False: to their own top-k
    refresh_below: float | None = None  # also refresh when query similarity to the last full step falls below

    def __post_init__(self) -> None:
        positive_int("top_k", self.top_k)
        positive_int("stride", self.stride)


class RecycledDecoder:
    """Decode helper holding the recycled key set. Call it once per step with the step's new queries and the
    whole cache: ``out = dec(q, k, v)``, q (B, H, Tq, D) at the last Tq positions, k, v (B, Hkv, Tk, D)."""

    def __init__(self, cfg: RecycledConfig | None = None, scale: float | None = None, **options) -> None:
        self.cfg = cfg if cfg is not None else RecycledConfig(**options)
        self.scale = scale
        self.keys: Tensor | None = None  # (B, H, n) recorded at the last full step
        self.seen = 0  # cache length at the last full step
        self.q_ref: Tensor | None = None
        self.step = 0
        self.full_steps = 0

    def _refresh(self, q: Tensor) -> bool:
        if self.keys is None or self.step % self.cfg.stride == 0:
            return True
        if self.cfg.refresh_below is None:
            return False
        sim = F.cosine_similarity(q[:, :, -1], self.q_ref, dim=-1).mean()
        return bool(sim < self.cfg.refresh_below)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cfg
        if self._refresh(q):
            self.step = 0  # the schedule restarts at every full step
            out, self.keys = full_step(q, k, v, c.top_k, self.scale)
            self.seen, self.q_ref = k.shape[2], q[:, :, -1].detach()
            self.full_steps += 1
            if not c.dense_refresh:
                out = recycled_attention(q, k, v, self.keys, self.seen, self.scale)
        else:
            out = recycled_attention(q, k, v, self.keys, self.seen, self.scale)
        self.step += 1
        return out


def recycled_reference(
    q: Tensor, k: Tensor, v: Tensor, prefill: int, top_k: int, stride: int, dense_refresh: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Float64 outputs of one-token decoding after a ``prefill``, written plainly from the rule.

    q (B, H, T, D), k, v (B, Hkv, T, D) for the whole sequence -> (B, H, T - prefill + 1, Dv): the rows of the
    last prefill position and of every decoded position (step 0 is the prefill's full step).
    """
    B, H, T, D = q.shape
    scale = D**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(H // k.shape[1], 1)
    outs = []
    keys_mask = None
    for step, i in enumerate(range(prefill - 1, T)):
        s = (q[:, :, i].double().unsqueeze(-2) @ kk[:, :, : i + 1].transpose(-1, -2)).squeeze(-2) * scale
        if step % stride == 0:
            top = torch.softmax(s, -1).topk(min(top_k, i + 1), dim=-1).indices
            keys_mask = torch.zeros(B, H, T, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
            keys_mask[..., i + 1 :] = True  # keys appended after this full step are always read
            m = torch.ones_like(keys_mask) if dense_refresh else keys_mask
        else:
            m = keys_mask
        m = m[..., :T].clone()
        m[..., i + 1 :] = False
        outs.append(masked_reference(q[:, :, i : i + 1], k, v, m.unsqueeze(2), scale))
    return torch.cat(outs, 2)


# ---- the registered layer ---------------------------------------------------------------------------------


def full_rows(q: Tensor, q_offset: int, prefill: int, stride: int, refresh_below: float | None,
              last: int | None = None, q_ref: Tensor | None = None) -> list[int]:
    """The call's rows (queries at ``q_offset + r``) that are full steps. ``last``: position of the last full
    step before the call, ``q_ref`` (B, H, D) its query. Positions below ``prefill`` always are full steps."""
    Tq = q.shape[2]
    out: list[int] = []
    r = 0
    while r < Tq:
        p = q_offset + r
        if p < prefill or last is None or p - last >= stride:
            out.append(r)
            last, q_ref, r = p, q[:, :, r], r + 1
            continue
        nxt = min(last + stride - q_offset, Tq)  # the next scheduled full step (> r)
        if refresh_below is not None:  # or the first query that turned away from the last full step's
            sim = F.cosine_similarity(q[:, :, r:nxt], q_ref.unsqueeze(2), dim=-1).mean((0, 1))
            low = (sim < refresh_below).nonzero().flatten()
            if len(low):
                nxt = r + int(low[0])
                out.append(nxt)
                last, q_ref = q_offset + nxt, q[:, :, nxt]
                nxt += 1
        r = nxt
    return out


def recorded_keys(q: Tensor, k: Tensor, rows: Tensor, q_offset: int, top_k: int,
                  chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Top-k keys by attention probability of the query rows ``rows`` (n,): positions and validity, each
    (B, H, n, min(top_k, Tk)) (rows that see fewer keys than top_k have invalid entries). No gradient."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    n = min(top_k, Tk)
    pos = torch.zeros(B, H, len(rows), n, dtype=torch.long, device=q.device)
    with torch.no_grad():
        for c0 in range(0, len(rows), chunk):
            rr = rows[c0 : c0 + chunk]
            vis = torch.arange(Tk, device=q.device).view(1, Tk) <= (rr + q_offset).view(-1, 1)
            s = grouped_scores(q[:, :, rr], k) * D**-0.5
            pos[:, :, c0 : c0 + len(rr)] = masked_softmax(s, vis).topk(n, -1).indices
    return pos, pos <= (rows + q_offset).view(1, 1, -1, 1)


def recycled_layer_attention(
    q: Tensor, k: Tensor, v: Tensor, top_k: int, stride: int, prefill: int, dense_refresh: bool = True,
    refresh_below: float | None = None, q_offset: int | None = None, state: dict | None = None,
    scale: float | None = None,
) -> Tensor:
    """The per-position schedule on the newest Tq positions (see the module notes). q (B, H, Tq, D) at
    ``q_offset + r``; k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). ``state`` (a dict, updated) carries the last
    full step (``last``, ``keys``, ``ok``, ``q_ref``) from one call to the next.

    Full steps attend densely (SDPA; ``dense_refresh=False``: to their own top-k); the other rows, grouped by
    the full step they follow, are one tile each: the recorded keys + the ``stride - 1`` positions after it.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    q_offset = Tk - Tq if q_offset is None else q_offset
    state = {} if state is None else state
    dev = q.device
    full = torch.tensor(full_rows(q, q_offset, prefill, stride, refresh_below, state.get("last"),
                                  state.get("q_ref")), dtype=torch.long, device=dev)
    is_full = torch.zeros(Tq, dtype=torch.bool, device=dev)
    is_full[full] = True
    # full steps whose keys are needed: those followed by a recycled row, and the last one (for the next call)
    need = is_full & torch.cat([~is_full[1:], is_full.new_ones(1)]) if dense_refresh else is_full
    need_rows = need.nonzero().flatten()
    kp, ok = recorded_keys(q, k, need_rows, q_offset, top_k)  # (B, H, m, n)
    n = kp.shape[-1]
    carried = "keys" in state
    if carried:  # the last full step of an earlier call (fewer keys then: pad)
        kc, oc = state["keys"], state["ok"]
        kp = torch.cat([F.pad(kc, (0, n - kc.shape[-1])).unsqueeze(2), kp], 2)
        ok = torch.cat([F.pad(oc, (0, n - oc.shape[-1])).unsqueeze(2), ok], 2)
    f_pos = torch.cat([torch.tensor([state["last"]] if carried else [], dtype=torch.long, device=dev),
                       need_rows + q_offset])
    parts = []
    rec = (~is_full).nonzero().flatten()
    if len(rec):
        sid = (torch.cumsum(need.long(), 0) - 1 + int(carried))[rec]  # the full step each recycled row follows
        segs, counts = torch.unique_consecutive(sid, return_counts=True)
        rank = torch.arange(len(rec), device=dev) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rows = torch.full((len(segs), int(counts.max())), -1, dtype=torch.long, device=dev)
        rows[torch.repeat_interleave(torch.arange(len(segs), device=dev), counts), rank] = rec
        recent = f_pos[segs].view(-1, 1) + 1 + torch.arange(max(1, stride - 1), device=dev)  # (S, W)
        S, W = recent.shape
        kpos = torch.cat([kp[:, :, segs], recent.expand(B, H, S, W)], -1)
        kok = torch.cat([ok[:, :, segs], (recent < Tk).expand(B, H, S, W)], -1)
        parts.append(key_set_tiles(rows, kpos, kok, B, H, Hkv, Tq, Tk, q_offset))
    if not dense_refresh:
        own = slice(int(carried), None)
        parts.append(key_set_tiles(need_rows.view(-1, 1), kp[:, :, own], ok[:, :, own], B, H, Hkv, Tq, Tk, q_offset))
    scale = default_scale(D, scale)
    out = tile_attention(q, k, v, parts, scale)
    if dense_refresh and len(full):
        out = out.index_copy(2, full, sampled_dense(q, k, v, full, True, scale, q_offset).to(out.dtype))
    if len(need_rows):
        state.update(last=int(f_pos[-1]), keys=kp[:, :, -1], ok=ok[:, :, -1], q_ref=q[:, :, need_rows[-1]].detach())
    return out


def recycled_mask(
    q: Tensor, k: Tensor, top_k: int, stride: int, prefill: int, dense_refresh: bool = True,
    refresh_below: float | None = None,
) -> Tensor:
    """Dense (B, H, T, T) mask of the layer's schedule over a whole sequence, written plainly position by
    position (for the reference)."""
    B, H, T, D = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1)
    mask = torch.zeros(B, H, T, T, dtype=torch.bool, device=q.device)
    last, q_ref, rec = None, None, None
    for p in range(T):
        full = p < prefill or last is None or p - last >= stride
        if not full and refresh_below is not None:
            full = bool(F.cosine_similarity(q[:, :, p], q_ref, dim=-1).mean() < refresh_below)
        if full:
            w = torch.softmax(torch.einsum("bhd,bhkd->bhk", q[:, :, p], kk[:, :, : p + 1]) * D**-0.5, -1)
            rec = torch.zeros(B, H, T, dtype=torch.bool, device=q.device).scatter_(-1, w.topk(min(top_k, p + 1), -1).indices, True)
            last, q_ref = p, q[:, :, p]
            mask[:, :, p, : p + 1] = True if dense_refresh else rec[..., : p + 1]
        else:
            mask[:, :, p] = rec
            mask[:, :, p, last + 1 : p + 1] = True
    return mask


# ---- the op and the layer ----------------------------------------------------------------------------------


def _check(top_k: int, stride: int, dense_refresh: bool, refresh_below: float | None, prefill: int | None) -> None:
    positive_int("top_k", top_k)
    positive_int("stride", stride)
    if not isinstance(dense_refresh, bool):
        raise ValueError(f"dense_refresh must be True or False, got {dense_refresh!r}")
    if refresh_below is not None and (isinstance(refresh_below, bool) or not isinstance(refresh_below, (int, float))):
        raise ValueError(f"refresh_below must be a number or None, got {refresh_below!r}")
    check_prefill(prefill)


def _recycled_weights(q: Tensor, k: Tensor, *, q_offset: int, top_k: int = 64, stride: int = 8,
                      dense_refresh: bool = True, refresh_below: float | None = None, prefill: int | None = 1,
                      **_: Any) -> Tensor:
    if q_offset != 0 or q.shape[2] != k.shape[2]:
        raise ValueError("recycled's schedule depends on the earlier full steps: its weights_mask needs the full "
                         "sequence (q_offset 0, Tq == Tk)")
    return recycled_mask(q, k, top_k, stride, q.shape[2] if prefill is None else prefill, dense_refresh,
                         refresh_below)


@sparse_op("recycled", papers=("D27",), summary="recycled attention: a full step every `stride` positions records "
           "top-k keys; the others reuse them", options={"top_k": 64, "stride": 8, "dense_refresh": True,
           "refresh_below": None, "prefill": 1}, weights_mask=_recycled_weights, stateful=True, causal_only=True,
           dense_options={"top_k": ALL}, example={"top_k": 4, "stride": 3, "prefill": 6})
def recycled_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, state: dict, top_k: int,
                stride: int, dense_refresh: bool, refresh_below: float | None, prefill: int | None) -> Tensor:
    """The per-position schedule (module notes) on q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv)."""
    _check(top_k, stride, dense_refresh, refresh_below, prefill)
    P = prefill_end(q_offset, q.shape[2], state, prefill)
    return recycled_layer_attention(q, k, v, top_k, stride, P, dense_refresh, refresh_below, q_offset, state, scale)


@dataclass(frozen=True)
class RecycledAttentionConfig(RoutingHeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    top_k: int = 64  # keys recorded at a full step
    stride: int = 8  # a full step every ``stride`` positions
    dense_refresh: bool = True  # full steps attend to every key (the paper); False: to their own top-k
    refresh_below: float | None = None  # also refresh when query similarity to the last full step falls below
    prefill: int | None = 1  # positions below it are full steps; None: the first call is the prefill
    delta: int = 0  # D99 sampling stride on top of the selection; 0 = off

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        _check(self.top_k, self.stride, self.dense_refresh, self.refresh_below, self.prefill)
        self.check()


@register(
    "recycled", family="routing", papers=("D27",), year=2024, config=RecycledAttentionConfig,
    summary="recycled attention: a full step every `stride` positions records top-k keys; the others reuse them",
)
class RecycledAttention(RoutingLayer):
    op = "recycled"
