"""The backbone every mechanism is scored in: only the sequence mixer changes.

Zoology's recipe, 2 blocks by default::

    h = embed(x)                                   # tokens (B, T) -> (B, T, d); real features via a linear map
    for each block:
        h = h + conv(norm(h))                      # short causal depthwise convolution (kernel 4)
        h = h + mixer(norm(h))                     # the attention mechanism under test
        h = h + mlp(norm(h))                       # optional
    logits = head(norm(h)[mask])                   # only the scored positions are projected

There are no position embeddings: position enters through the convolution and the mechanism itself (e.g. RoPE),
so a mechanism that extrapolates in length is not held back by the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...mechanisms.common import RMSNorm


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 64
    heads: int = 2
    layers: int = 2
    conv_kernel: int = 4
    mlp: bool = False
    mlp_ratio: int = 2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if self.layers < 1 or self.conv_kernel < 1:
            raise ValueError("layers and conv_kernel must be >= 1")


class ShortConv(nn.Module):
    """Causal depthwise convolution over time: (B, T, d) -> (B, T, d); position t sees t-k+1..t."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, padding=kernel - 1)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :T].transpose(1, 2)


class Block(nn.Module):
    def __init__(self, cfg: BackboneConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.norm_conv = RMSNorm(cfg.dim)
        self.conv = ShortConv(cfg.dim, cfg.conv_kernel)
        self.norm_mix = RMSNorm(cfg.dim)
        self.mixer = mixer
        self.mlp = None
        if cfg.mlp:
            self.norm_mlp = RMSNorm(cfg.dim)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
            )

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h = h + self.conv(self.norm_conv(h))
        if hasattr(self.mixer, "forward_with_aux"):
            y, aux = self.mixer.forward_with_aux(self.norm_mix(h))
        else:
            y, aux = self.mixer(self.norm_mix(h)), {}
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.norm_mlp(h))
        aux_total = sum(aux.values(), torch.zeros((), device=h.device))
        return h, aux_total


class Backbone(nn.Module):
    """``forward(x) -> (hidden (B, T, d), aux loss scalar)``; ``logits(hidden[mask]) -> (N, classes)``.

    ``x`` is ``(B, T)`` token ids when ``vocab`` is given, else ``(B, T, in_features)`` real features.
    ``make_mixer(layer_index)`` builds the mechanism of each block.
    """

    def __init__(
        self,
        cfg: BackboneConfig,
        make_mixer: Callable[[int], nn.Module],
        *,
        vocab: int | None,
        num_classes: int,
        in_features: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        if vocab is not None:
            self.embed: nn.Module = nn.Embedding(vocab, cfg.dim)
            nn.init.normal_(self.embed.weight, std=0.02)
        else:
            self.embed = nn.Linear(in_features, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, make_mixer(i)) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes, bias=False)
        if cfg.tie_embeddings:
            if vocab is None or vocab != num_classes:
                raise ValueError("tie_embeddings needs token inputs and outputs over the same vocabulary")
            self.head.weight = self.embed.weight

    @property
    def mixers(self) -> list[nn.Module]:
        return [b.mixer for b in self.blocks]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(x)
        aux = torch.zeros((), device=h.device)
        for block in self.blocks:
            h, a = block(h)
            aux = aux + a
        return self.norm(h), aux

    def logits(self, hidden: Tensor) -> Tensor:
        """(N, d) -> (N, classes)."""
        return self.head(hidden)


def task_loss(
    model: Backbone, kind: str, x: Tensor, y: Tensor, mask: Tensor, *, score: bool = True
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(loss incl. aux, per-position correctness or squared error (N,), aux) over the masked positions.

    ``score=False`` skips the correctness (``None``): training does not need it, and at MQAR's vocabulary of
    8192 the argmax over the logits costs about 5% of a step."""
    hidden, aux = model(x)
    out = model.logits(hidden[mask])
    target = y[mask]
    if kind == "classify":
        loss = F.cross_entropy(out, target)
        correct = (out.argmax(-1) == target).float() if score else None
    else:
        pred = out.squeeze(-1)
        err = (pred - target) ** 2
        loss, correct = err.mean(), err.detach()
    return loss + aux, correct, aux


def causality_leak(model: Backbone, x: Tensor, at: int) -> float:
    """Largest change of the hidden states before position ``at`` when the inputs from ``at`` on change.

    Zero for a causal model; a mechanism that looks ahead would score tasks by reading the answer.
    """
    x2 = x.clone()
    if x.dtype == torch.long:
        x2[:, at:] = (x2[:, at:] + 1) % model.embed.num_embeddings
    else:
        x2[:, at:] = x2[:, at:] + 1.0
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    return float((a[:, :at] - b[:, :at]).abs().max())
