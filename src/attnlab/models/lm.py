"""A small decoder-only language model with one registered attention mechanism per layer.

    cfg = LMConfig(vocab=256, dim=128, layers=4, heads=4, mechanisms=("mha", "moh", "mha", "diff"))
    model = TransformerLM(cfg)
    logits, loss = model(idx, targets)          # idx, targets: (B, T) token ids
    out = model.generate(idx, max_new_tokens=32) # decodes with each layer's cache

Pre-norm residual blocks (RMSNorm), a GELU MLP, tied input/output embeddings. Positions come from the
layers themselves (RoPE in the built-in layers). The loss is the mean next-token cross-entropy plus the sum
of every auxiliary loss the layers return (e.g. MoH's load balance, already scaled by its coefficient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..mechanisms.common import RMSNorm
from ..mechanisms.registry import build, config_options, get


@dataclass(frozen=True)
class LMConfig:
    """mechanisms: one name for every layer, or a tuple with one name per layer (hybrid stacks).
    mechanism_options: options passed to ``attnlab.build`` for every layer (only those the mechanism takes), or a tuple with one dict per layer. ``dim`` and ``heads`` are passed unless the options set them."""

    vocab: int = 256
    dim: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    mechanisms: tuple[str, ...] | str = "mha"
    mechanism_options: dict[str, Any] | tuple[dict[str, Any], ...] = field(default_factory=dict)
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "layers", "heads"):
            positive_int(name, getattr(self, name))
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        mechs = self.layer_mechanisms()
        if len(mechs) != self.layers:
            raise ValueError(f"mechanisms names {len(mechs)} layers but layers={self.layers}")
        opts = self.mechanism_options
        if isinstance(opts, tuple) and len(opts) != self.layers:
            raise ValueError(f"mechanism_options has {len(opts)} entries but layers={self.layers}")
        valid: set[str] = set()
        for m in mechs:  # unknown names fail here
            valid |= set(config_options(get(m).config))
        if isinstance(opts, dict) and set(opts) - valid:
            raise TypeError(f"mechanism_options {sorted(set(opts) - valid)} fit none of {sorted(set(mechs))}")

    def layer_mechanisms(self) -> tuple[str, ...]:
        m = self.mechanisms
        return (m,) * self.layers if isinstance(m, str) else tuple(m)

    def layer_options(self, i: int) -> dict[str, Any]:
        """Keyword options for layer ``i``: dim and heads, then the user's options (only valid keys when a
        single dict is shared by a hybrid stack)."""
        name = self.layer_mechanisms()[i]
        fields = set(config_options(get(name).config))
        base = {k: v for k, v in (("dim", self.dim), ("heads", self.heads)) if k in fields}
        opts = self.mechanism_options
        if isinstance(opts, tuple):
            return {**base, **opts[i]}
        return {**base, **{k: v for k, v in opts.items() if k in fields or len(set(self.layer_mechanisms())) == 1}}


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). (B, T, dim) -> (B, T, dim), plus the layer's aux losses."""

    def __init__(self, cfg: LMConfig, i: int) -> None:
        super().__init__()
        name = cfg.layer_mechanisms()[i]
        self.attn = build(name, **cfg.layer_options(i))
        self.norm1 = RMSNorm(cfg.dim)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: Tensor, cache: Any | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        a, aux = self.attn.forward_with_aux(self.norm1(x), cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), aux


class TransformerLM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, caches: list[Any] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab), and the loss if ``targets`` (B, T) are given
        (cross-entropy, ignore_index -1, plus the layers' aux losses). With ``caches`` (from ``init_caches``)
        ``idx`` holds the next tokens after those already cached."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, seq), got {tuple(idx.shape)}")
        x = self.embed(idx)
        aux_total = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, aux = block(x, None if caches is None else caches[i])
            for v in aux.values():
                aux_total = aux_total + v
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, ce + aux_total

    def init_caches(self, batch: int = 1) -> list[Any]:
        """One decoding cache per layer (raises if a layer cannot decode incrementally)."""
        return [b.attn.init_cache(batch) for b in self.blocks]

    def supports_cache(self) -> bool:
        return all(get(n).decodes for n in self.cfg.layer_mechanisms())

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None, use_cache: bool = True,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); temperature 0 means greedy.
        Prefills every layer's cache once, then feeds one token per step."""
        caches = self.init_caches(idx.shape[0]) if use_cache else None
        out = idx
        step_in = idx
        for _ in range(max_new_tokens):
            logits, _ = self(step_in if caches is not None else out, caches=caches)
            logits = logits[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
            step_in = nxt
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["LMConfig", "TransformerLM"]
