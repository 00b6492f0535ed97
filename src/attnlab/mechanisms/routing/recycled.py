"""Recycled attention [D27]: decode with the top-k keys of the last full attention step.

Inference-time, on a pretrained model's q, k, v. Every ``stride`` decoding steps (and at the first step, the
prefill) the step runs *full* attention and records, per head, the ``top_k`` keys its last query attended
most. The steps in between *recycle* that key set: their queries attend only to the recorded keys plus the
keys appended since that full step (which the recorded pattern cannot rank), causally. ``top_k`` >= every
position makes recycling exact; ``dense_refresh=False`` makes a full step attend to its own top-k instead of
every key (then ``stride=1`` is per-step top-k attention -- the oracle the recycling approximates).
``refresh_below`` adds the paper's dynamic schedule: a step also refreshes when the cosine similarity of its
query to the last full step's query (averaged over heads) drops below it.

The sparse steps run through the tile engine (``core.selection``): one query-centric tile per (batch, head)
gathers the recorded keys and the recent ones -- ``top_k + recent`` keys, never the whole cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.selection import Tiles, flat_key_index, masked_reference, tile_attention


def full_step(q: Tensor, k: Tensor, v: Tensor, top_k: int, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Full causal attention of the newest ``Tq`` positions and the top-k keys of the last query.

    q (B, H, Tq, D) at positions ``Tk - Tq ..``; k, v (B, Hkv, Tk, D) -> out (B, H, Tq, Dv), keys (B, H, n)
    with n = min(top_k, Tk).
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    scale = default_scale(D, scale)
    rep = H // Hkv
    s = (q @ k.repeat_interleave(rep, 1).transpose(-1, -2)) * scale  # a full step reads every key anyway
    causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    keys = p[:, :, -1].detach().topk(min(top_k, Tk), dim=-1).indices
    return p @ v.repeat_interleave(rep, 1), keys


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
