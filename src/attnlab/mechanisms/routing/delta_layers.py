"""DELTA [D42]: a few *selection layers* pick the tokens that the following sparse layers attend to.

Training-free decoding for deep models. Layers are split into three groups: the first layers run full
attention; a *selection layer* also runs full attention and, from its attention map, keeps the ``top_k``
positions with the most attention summed over its heads (and over the step's queries) -- one token set per
sequence, shared by all heads; the *sparse layers* after it attend only to that set (the full cache stays in
memory, so the next selection layer may pick different tokens). ``always`` recent positions (the newest
keys, including the current ones) are always kept.

Functional: :func:`select_tokens` (in the selection layer) and :func:`token_attention` (in a sparse layer),
which runs through the tile engine (``core.selection``): one tile per (batch, head) gathers the selected
keys -- ``top_k + always`` keys instead of the whole cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, default_scale, positive_int
from attnlab.core.selection import Tiles, flat_key_index, tile_attention


def select_tokens(q: Tensor, k: Tensor, top_k: int, always: int = 1, scale: float | None = None) -> Tensor:
    """Selection layer: (B, Tk) bool, the ``top_k`` most attended positions (summed over heads and the step's
    queries, causal; queries at the last Tq positions) plus the last ``always`` positions.

    q (B, H, Tq, D), k (B, Hkv, Tk, D). The full attention map is what this layer computes anyway.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, k)
    positive_int("top_k", top_k)
    with torch.no_grad():
        s = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * default_scale(D, scale)
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        score = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).sum((1, 2))  # (B, Tk)
        keep = torch.zeros(B, Tk, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, score.topk(min(top_k, Tk), dim=-1).indices, True)
        keep[:, max(0, Tk - always) :] = True
    return keep


def token_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float | None = None) -> Tensor:
    """Sparse layer: causal attention of the last Tq positions over the kept positions ``keep`` (B, Tk) only.

    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv); rows that see no kept key give zero.
    """
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    dev = q.device
    n = max(1, int(keep.sum(-1).max()))
    kpos = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :n]  # (B, n)
    kok = torch.gather(keep, -1, kpos)
    kpos = kpos.view(B, 1, n).expand(B, H, n)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    hkv = (torch.arange(H, device=dev) // (H // Hkv)).view(1, H, 1)
    k_idx = flat_key_index(kpos, b, hkv, Hkv, Tk).reshape(B * H, n)
    q_idx = (torch.arange(B * H, device=dev).view(-1, 1) * Tq + torch.arange(Tq, device=dev)).reshape(B * H, Tq)
    qpos = torch.arange(Tk - Tq, Tk, device=dev).view(1, 1, Tq, 1)
    mask = (kok.view(B, 1, 1, n) & (kpos.unsqueeze(2) <= qpos)).reshape(B * H, Tq, n)
    tiles = Tiles(q_idx, k_idx, torch.ones_like(q_idx, dtype=torch.bool), None if bool(mask.all()) else mask)
    return tile_attention(q, k, v, [tiles], default_scale(D, scale))
