"""PredFormer's spatial-temporal attention (V3, "PredFormer: Transformers Are Effective Spatial-Temporal
Predictive Learners"): a pure transformer for video prediction whose blocks attend either over everything, over
one frame (spatial) or over one patch position across frames (temporal), arranged in a fixed layout.

Video tokens are a row-major ``(t, h, w)`` grid (``T = t h w``). On that grid, with ``mha`` and the sparse
engine (``MaxViTBlock`` windows, so only the allowed pairs are computed):

    spatial : token (f, y, x) attends to (f, ., .)        window (1, h, w)   -- cost t (h w)^2 d per head
    temporal: token (f, y, x) attends to (., y, x)        window (t, 1, 1)   -- cost h w t^2 d per head
    full    : every token to every token                                      -- cost (t h w)^2 d per head

PredFormer's layouts: ``full`` (all blocks full), ``factorized`` (a run of temporal blocks, then a run of
spatial blocks), ``interleaved`` (its best, the quadruplet T-S-S-T repeated). Its Gated Transformer Block uses a
SwiGLU feed-forward, given here as :class:`SwiGLU`. Deviation: only the attention structure and the gated FFN
are provided (as mixers on a video grid, tested); no video-prediction model or data set is trained here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..core.patterns import MaxViTBlock
from ..mechanisms import registry as mech
from ..mechanisms.heads import HeadsConfig

KINDS = ("spatial", "temporal", "full")
LAYOUTS = ("full", "factorized", "interleaved")


def video_attention(kind: str, attn: HeadsConfig, grid: tuple[int, int, int]) -> nn.Module:
    """An ``mha`` layer over video tokens (B, t h w, dim) attending spatially, temporally or fully."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(grid) != 3:
        raise ValueError(f"grid must be (frames, rows, columns), got {grid!r}")
    t, h, w = grid
    pattern = {"spatial": MaxViTBlock(grid=grid, window=(1, h, w)),
               "temporal": MaxViTBlock(grid=grid, window=(t, 1, 1)), "full": None}[kind]
    opts = {"dim": attn.dim, "heads": attn.heads, "causal": False, "rope": False, "pattern": pattern}
    if attn.kv_heads is not None:
        opts["kv_heads"] = attn.kv_heads
    return mech.build("mha", **opts)


def predformer_layout(depth: int, layout: str = "interleaved") -> tuple[str, ...]:
    """The attention kind of each of ``depth`` blocks: ``interleaved`` repeats T-S-S-T (depth a multiple of 4),
    ``factorized`` is ``depth / 2`` temporal then ``depth / 2`` spatial blocks, ``full`` all full."""
    positive_int("depth", depth)
    if layout == "full":
        return ("full",) * depth
    if layout == "factorized":
        if depth % 2:
            raise ValueError(f"factorized needs an even depth, got {depth}")
        return ("temporal",) * (depth // 2) + ("spatial",) * (depth // 2)
    if layout == "interleaved":
        if depth % 4:
            raise ValueError(f"interleaved (T-S-S-T quadruplets) needs depth a multiple of 4, got {depth}")
        return ("temporal", "spatial", "spatial", "temporal") * (depth // 4)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class SwiGLU(nn.Module):
    """The gated feed-forward of PredFormer's Gated Transformer Block: ``W_3 (SiLU(X W_1) * X W_2)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def video_attention_ref(layer: nn.Module, x: Tensor, grid: tuple[int, int, int], kind: str) -> Tensor:
    """Reference: reshape to (B, t, h, w, dim), attend densely along the frame's positions (spatial), along the
    frames (temporal) or over all tokens, head by head with an explicit softmax."""
    cfg = layer.cfg
    B, T, D = x.shape
    t, h, w = grid
    H, d, group = cfg.heads, cfg.d, cfg.heads // cfg.kvh
    q = (x @ layer.q_proj.weight.T).view(B, t, h * w, H, d)
    k = (x @ layer.k_proj.weight.T).view(B, t, h * w, cfg.kvh, d)
    v = (x @ layer.v_proj.weight.T).view(B, t, h * w, cfg.kvh, d)
    o = torch.zeros_like(q)
    for i in range(H):
        qi, ki, vi = q[..., i, :], k[..., i // group, :], v[..., i // group, :]
        if kind == "spatial":  # softmax over the h w positions of the same frame
            a = torch.einsum("bfpd,bfqd->bfpq", qi, ki) / d**0.5
            o[..., i, :] = torch.einsum("bfpq,bfqd->bfpd", a.softmax(-1), vi)
        elif kind == "temporal":  # softmax over the t frames at the same position
            a = torch.einsum("bfpd,bgpd->bpfg", qi, ki) / d**0.5
            o[..., i, :] = torch.einsum("bpfg,bgpd->bfpd", a.softmax(-1), vi)
        else:
            a = torch.einsum("bnd,bmd->bnm", qi.reshape(B, T, d), ki.reshape(B, T, d)) / d**0.5
            o[..., i, :] = (a.softmax(-1) @ vi.reshape(B, T, d)).view(B, t, h * w, d)
    return o.reshape(B, T, H * d) @ layer.o_proj.weight.T
