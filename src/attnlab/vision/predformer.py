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
SwiGLU feed-forward, given here as :class:`SwiGLU`.

:class:`PredFormer` is the whole predictor: each of the ``t`` input frames is cut into ``p x p`` patches (a
linear patch embedding), learned absolute positions are added on the ``(t, h, w)`` grid, ``depth`` gated blocks
``x + attn_kind(LN x); x + SwiGLU(LN x)`` follow the layout, and a linear head turns the token at ``(f, y, x)``
into the pixels of patch ``(y, x)`` of future frame ``f`` (``t`` frames in, the next ``t`` out, MSE loss).
``attnlab bench vision --task video`` trains the three layouts on :class:`attnlab.vision.data.VideoTask`.
Deviations: no dropout / drop-path, learned positions (the paper's are fixed), a tiny model.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class PredFormerConfig:
    """frames: input frames (= predicted frames); image_size / patch / channels: frames and patches;
    attn: widths (non-causal HeadsConfig); depth: blocks; layout: full | factorized | interleaved;
    mlp_ratio: SwiGLU hidden / dim."""

    frames: int = 4
    image_size: int = 16
    patch: int = 4
    channels: int = 1
    attn: HeadsConfig = HeadsConfig(dim=32, heads=2, causal=False)
    depth: int = 4
    layout: str = "interleaved"
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        for name in ("frames", "image_size", "patch", "channels", "depth"):
            positive_int(name, getattr(self, name))
        if self.image_size % self.patch:
            raise ValueError(f"patch ({self.patch}) must divide image_size ({self.image_size})")
        if self.attn.causal:
            raise ValueError("attn.causal must be False")
        predformer_layout(self.depth, self.layout)  # validates layout and depth

    @property
    def grid(self) -> tuple[int, int, int]:
        n = self.image_size // self.patch
        return (self.frames, n, n)


class GatedBlock(nn.Module):
    """PredFormer's gated transformer block: ``x + attn(LN x)``, then ``x + SwiGLU(LN x)``."""

    def __init__(self, dim: int, attn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), attn
        self.norm2, self.ffn = nn.LayerNorm(dim), SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class PredFormer(nn.Module):
    """video (B, frames, channels, S, S) -> the next ``frames`` frames (B, frames, channels, S, S)."""

    def __init__(self, cfg: PredFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t, h, w = cfg.grid
        p, c, dim = cfg.patch, cfg.channels, cfg.attn.dim
        self.embed = nn.Linear(c * p * p, dim)
        self.pos = nn.Parameter(torch.randn(1, t * h * w, dim) * 0.02)
        hidden = max(1, round(cfg.mlp_ratio * dim))
        self.kinds = predformer_layout(cfg.depth, cfg.layout)
        self.blocks = nn.ModuleList(GatedBlock(dim, video_attention(k, cfg.attn, cfg.grid), hidden)
                                    for k in self.kinds)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, c * p * p)

    def patchify(self, video: Tensor) -> Tensor:
        """(B, t, C, S, S) -> (B, t h w, C p p), row-major over (frame, row, column)."""
        cfg = self.cfg
        B = video.shape[0]
        t, h, w = cfg.grid
        p = cfg.patch
        if video.shape[1:] != (t, cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"video must be (B, {t}, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(video.shape)}")
        x = video.reshape(B, t, cfg.channels, h, p, w, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(B, t * h * w, cfg.channels * p * p)

    def unpatchify(self, x: Tensor) -> Tensor:
        cfg = self.cfg
        t, h, w = cfg.grid
        p = cfg.patch
        x = x.reshape(x.shape[0], t, h, w, cfg.channels, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], t, cfg.channels, h * p, w * p)

    def forward(self, video: Tensor) -> Tensor:
        x = self.embed(self.patchify(video)) + self.pos.to(video.dtype)
        for block in self.blocks:
            x = block(x)
        return self.unpatchify(self.head(self.norm(x)))
