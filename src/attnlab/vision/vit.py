"""A small Vision Transformer whose token mixer is chosen by name.

    image (B, C, H, W)
      -> patch embedding (a ``patch`` x ``patch`` stride-``patch`` convolution; or V149's polyphase-anchored one)
      -> + 2-D positions (``sincos``: fixed 2-D sin-cos; ``learned``; ``none``), [class token] prepended
      -> depth x block:  x = x + mixer(LN(x));  x = x + MLP(LN(x))
      -> LN -> pool (``cls``: the class token; ``mean``: mean of the grid tokens) -> linear head -> logits

The mixer of each block is a name (one for all blocks, or a tuple of ``depth`` names: SpectFormer's spectral
blocks before attention blocks, ViTDet's window blocks with a few global ones), resolved by
:func:`attnlab.vision.registry.build_mixer`: a vision mixer of this package or a registered attention layer
run non-causally. Widths come from the repo's :class:`HeadsConfig` (``dim``, ``heads``, ``kv_heads``,
``head_dim``), which must be non-causal (``causal=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..mechanisms.heads import HeadsConfig
from .registry import MixerContext, build_mixer

POOLINGS = ("cls", "mean")
POSITIONS = ("sincos", "learned", "none")
EMBEDS = ("patch", "aps")


@dataclass(frozen=True)
class ViTConfig:
    """image_size: square image side; patch: patch side (divides image_size); channels: input channels;
    attn: widths and heads (a non-causal HeadsConfig); depth: blocks; mlp_ratio: MLP hidden / dim;
    pooling: cls | mean; classes: output classes; positions: sincos | learned | none; embed: patch | aps
    (V149's polyphase-anchored patch embedding); mixer: a mixer name or one per block;
    mixer_options: ``{mixer name: {option: value}}`` for every block using that mixer."""

    image_size: int = 16
    patch: int = 4
    channels: int = 1
    attn: HeadsConfig = HeadsConfig(dim=32, heads=2, causal=False)
    depth: int = 2
    mlp_ratio: float = 2.0
    pooling: str = "mean"
    classes: int = 2
    positions: str = "sincos"
    embed: str = "patch"
    mixer: str | tuple[str, ...] = "mha"
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch", "channels", "depth", "classes"):
            positive_int(name, getattr(self, name))
        if self.image_size % self.patch:
            raise ValueError(f"patch ({self.patch}) must divide image_size ({self.image_size})")
        if not isinstance(self.attn, HeadsConfig):
            raise TypeError(f"attn must be a HeadsConfig, got {type(self.attn).__name__}")
        if self.attn.causal:
            raise ValueError("attn.causal must be False: a ViT's token mixer sees the whole image")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        for name, value, choices in (("pooling", self.pooling, POOLINGS), ("positions", self.positions, POSITIONS),
                                     ("embed", self.embed, EMBEDS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.positions == "sincos" and self.dim % 4:
            raise ValueError(f"positions='sincos' needs dim divisible by 4, got {self.dim}")
        if not isinstance(self.mixer, str):
            if not isinstance(self.mixer, tuple) or not all(isinstance(m, str) for m in self.mixer):
                raise TypeError(f"mixer must be a name or a tuple of names, got {self.mixer!r}")
            if len(self.mixer) != self.depth:
                raise ValueError(f"mixer names {len(self.mixer)} blocks, depth is {self.depth}")
        unknown = sorted(set(self.mixer_options) - set(self.mixers))
        if unknown:
            raise ValueError(f"mixer_options names mixers {unknown} that no block uses "
                             f"({sorted(set(self.mixers))})")

    @property
    def dim(self) -> int:
        return self.attn.dim

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch
        return (n, n)

    @property
    def mixers(self) -> tuple[str, ...]:
        """The mixer name of each block."""
        return (self.mixer,) * self.depth if isinstance(self.mixer, str) else self.mixer

    @property
    def prefix(self) -> int:
        """Tokens before the grid tokens (the class token)."""
        return 1 if self.pooling == "cls" else 0


def sincos_2d(grid: tuple[int, int], dim: int, base: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos positions (gh * gw, dim), row-major: a quarter of the channels each for
    ``sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)`` with ``w_k = base^(-k / (dim / 4))``."""
    gh, gw = grid
    q = dim // 4
    w = base ** (-torch.arange(q, dtype=torch.float64) / q)
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                          indexing="ij")
    ay, ax = y.reshape(-1, 1) * w, x.reshape(-1, 1) * w
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, gh * gw, dim): one linear map per non-overlapping patch (a strided convolution)."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, img: Tensor) -> Tensor:
        return self.proj(img).flatten(2).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + mixer(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, mixer: nn.Module, hidden: int) -> None:
        super().__init__()
        self.norm1, self.mixer = nn.LayerNorm(dim), mixer
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """images (B, channels, image_size, image_size) -> logits (B, classes)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, grid = cfg.dim, cfg.grid
        if cfg.embed == "aps":
            from .aps import PolyphaseAnchoredEmbed

            self.embed: nn.Module = PolyphaseAnchoredEmbed(cfg.channels, dim, cfg.patch)
        else:
            self.embed = PatchEmbed(cfg.channels, dim, cfg.patch)
        n = grid[0] * grid[1]
        if cfg.positions == "sincos":
            self.register_buffer("pos", sincos_2d(grid, dim)[None], persistent=False)
        elif cfg.positions == "learned":
            self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        else:
            self.pos = None
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cfg.pooling == "cls" else None
        ctx = MixerContext(cfg.attn, grid, cfg.prefix)
        hidden = max(1, round(cfg.mlp_ratio * dim))
        self.blocks = nn.ModuleList(
            Block(dim, build_mixer(name, ctx, **cfg.mixer_options.get(name, {})), hidden) for name in cfg.mixers
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.classes)

    def tokens(self, img: Tensor) -> Tensor:
        """images -> embedded tokens (B, prefix + gh * gw, dim) entering the first block."""
        cfg = self.cfg
        if img.dim() != 4 or img.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"images must be (B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(img.shape)}")
        x = self.embed(img)
        if self.pos is not None:
            x = x + self.pos.to(x.dtype)
        if self.cls is not None:
            x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def features(self, img: Tensor, regions: Tensor | None = None) -> Tensor:
        """images -> final normalized tokens (B, prefix + gh * gw, dim). ``regions`` (B, gh * gw) long: the
        segmentation prior of region attention (V82) mixers (default: :func:`intensity_regions`)."""
        x = self.tokens(img)
        needs = [b.mixer for b in self.blocks if getattr(b.mixer, "needs_regions", False)]
        if needs:
            from .region import intensity_regions

            r = regions if regions is not None else intensity_regions(img, self.cfg.patch)
            for m in needs:
                m.set_regions(r)
        elif regions is not None:
            raise ValueError("regions were given but no block uses region attention")
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        """(B, T, dim) -> (B, dim): the class token, or the mean of the grid tokens."""
        return x[:, 0] if self.cfg.pooling == "cls" else x[:, self.cfg.prefix:].mean(1)

    def forward(self, img: Tensor, regions: Tensor | None = None) -> Tensor:
        return self.head(self.pool(self.features(img, regions)))


def build_vit(**options: Any) -> ViT:
    """``ViT(ViTConfig(**options))``; ``dim`` / ``heads`` may be given directly (they form ``attn``)."""
    dim, heads = options.pop("dim", None), options.pop("heads", None)
    if dim is not None or heads is not None:
        if "attn" in options:
            raise TypeError("give either attn or dim / heads, not both")
        options["attn"] = HeadsConfig(dim=dim or 32, heads=heads or 2, causal=False)
    return ViT(ViTConfig(**options))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MLP", "Block", "PatchEmbed", "ViT", "ViTConfig", "build_vit", "param_count", "sincos_2d"]
