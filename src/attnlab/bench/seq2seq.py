"""A tiny encoder-decoder with cross-attention, trained on a generated translation-like task (for B17).

Model (pre-norm residual blocks; self-attention layers are attnlab's ``mha`` built with ``attnlab.build``)::

    encoder: h = tok(src) + pos;     per block: h += mha_full(norm h);   h += mlp(norm h)
    decoder: g = tok(tgt_in) + pos;  per block: g += mha_causal(norm g); g += cross(norm g, enc);
                                                g += mlp(norm g)
    logits = head(norm g)

Absolute learned positions on both sides: RoPE alone moves no position information into the values, and
cross-attention must know which source position a target step aligns with.

Task ("translation-like"): a source of ``n`` random words, the target is each word mapped through a fixed
random dictionary with adjacent pairs swapped (target ``i`` translates source ``i ^ 1``), so the alignment is
known and is not the diagonal. With ``agreement`` (default) the first source word's parity selects one of two
dictionaries, as grammatical gender selects a word form: every target word then depends on two source words,
its aligned word and the first one, which the encoder may carry to every position before cross-attention
reads it. The decoder reads ``[BOS, t_0 .. t_{n-2}]`` and predicts ``t_0 .. t_{n-1}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.softmax import masked_softmax
from ..mechanisms.common import RMSNorm


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab: int = 24  # source words; target words are a permutation of them
    src_len: int = 10  # even: words are swapped in pairs
    dim: int = 64
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    seed: int = 0  # the dictionary
    agreement: bool = True  # the first word's parity picks the dictionary

    def __post_init__(self) -> None:
        if self.src_len < 2 or self.src_len % 2:
            raise ValueError(f"src_len must be an even number >= 2, got {self.src_len}")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        if self.vocab < 2 or self.enc_layers < 1 or self.dec_layers < 1:
            raise ValueError("vocab must be >= 2 and enc_layers, dec_layers >= 1")

    @property
    def bos(self) -> int:
        return self.vocab


def alignment_target(src_len: int) -> Tensor:
    """(src_len,) the source position each target step translates: ``i ^ 1`` (adjacent pairs swapped)."""
    return torch.arange(src_len) ^ 1


def make_batch(cfg: Seq2SeqConfig, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(src, tgt_in, tgt_out)``, each (n, src_len) long."""
    dictionary = torch.randperm(cfg.vocab, generator=torch.Generator().manual_seed(cfg.seed + 7))
    src = torch.randint(0, cfg.vocab, (n, cfg.src_len), generator=gen)
    aligned = src[:, alignment_target(cfg.src_len)]
    if cfg.agreement:  # the second dictionary: the first, read half the vocabulary further on
        aligned = (aligned + (src[:, :1] % 2) * (cfg.vocab // 2)) % cfg.vocab
    tgt = dictionary[aligned]
    tgt_in = torch.cat([torch.full((n, 1), cfg.bos), tgt[:, :-1]], dim=1)
    return src, tgt_in, tgt


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder: (B, Tt, dim), (B, Ts, dim) -> (B, Tt, dim).

    Weights ``softmax(q k^T / sqrt(d))`` (no mask: every target step sees the whole source); the last call's
    weights (B, H, Tt, Ts) stay in ``self.weights`` when ``keep_weights``.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.keep_weights = False
        self.weights: Tensor | None = None

    def forward(self, x: Tensor, enc: Tensor) -> Tensor:
        B, Tt, _ = x.shape
        Ts = enc.shape[1]
        q = self.q_proj(x).view(B, Tt, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(enc).view(B, Ts, self.heads, self.d).transpose(1, 2)
        v = self.v_proj(enc).view(B, Ts, self.heads, self.d).transpose(1, 2)
        w = masked_softmax((q @ k.transpose(-1, -2)) * self.d**-0.5)
        if self.keep_weights:
            self.weights = w
        return self.o_proj((w @ v).transpose(1, 2).reshape(B, Tt, -1))


class _Block(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig, causal: bool, cross: bool) -> None:
        super().__init__()
        from ..mechanisms.registry import build

        self.norm1, self.norm3 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = build("mha", dim=cfg.dim, heads=cfg.heads, causal=causal)
        self.cross = CrossAttention(cfg.dim, cfg.heads) if cross else None
        self.norm2 = RMSNorm(cfg.dim) if cross else None
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 2 * cfg.dim), nn.GELU(), nn.Linear(2 * cfg.dim, cfg.dim))

    def forward(self, h: Tensor, enc: Tensor | None = None) -> Tensor:
        h = h + self.attn(self.norm1(h))
        if self.cross is not None:
            h = h + self.cross(self.norm2(h), enc)
        return h + self.mlp(self.norm3(h))


class TinySeq2Seq(nn.Module):
    """``forward(src, tgt_in) -> logits (B, Tt, vocab)``; ``embed_src(src)`` gives the encoder's input vectors
    (token + position), ``forward_embedded(src_emb, tgt_in)`` runs from them (saliency is taken there)."""

    def __init__(self, cfg: Seq2SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.tgt_tok = nn.Embedding(cfg.vocab + 1, cfg.dim)
        self.src_pos = nn.Embedding(cfg.src_len, cfg.dim)
        self.tgt_pos = nn.Embedding(cfg.src_len, cfg.dim)
        self.encoder = nn.ModuleList(_Block(cfg, causal=False, cross=False) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(_Block(cfg, causal=True, cross=True) for _ in range(cfg.dec_layers))
        self.norm_enc, self.norm_dec = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    @property
    def cross_layers(self) -> list[CrossAttention]:
        return [b.cross for b in self.decoder]

    def embed_src(self, src: Tensor) -> Tensor:
        return self.src_tok(src) + self.src_pos(torch.arange(src.shape[1], device=src.device))

    def forward_embedded(self, src_emb: Tensor, tgt_in: Tensor) -> Tensor:
        h = src_emb
        for b in self.encoder:
            h = b(h)
        enc = self.norm_enc(h)
        g = self.tgt_tok(tgt_in) + self.tgt_pos(torch.arange(tgt_in.shape[1], device=tgt_in.device))
        for b in self.decoder:
            g = b(g, enc)
        return self.head(self.norm_dec(g))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        return self.forward_embedded(self.embed_src(src), tgt_in)


def train_seq2seq(
    cfg: Seq2SeqConfig, *, steps: int = 300, batch: int = 64, lr: float = 3e-3, seed: int = 0
) -> tuple[TinySeq2Seq, dict[str, float]]:
    """Train with teacher forcing; returns the model (eval mode) and ``{"loss", "accuracy"}`` (token accuracy
    on 512 held-out sequences, teacher-forced)."""
    torch.manual_seed(seed)
    model = TinySeq2Seq(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed * 31 + 1)
    loss = torch.zeros(())
    for step in range(steps):
        for g in opt.param_groups:  # short warmup, then linear decay to a tenth
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (1 - 0.9 * step / steps)
        src, tgt_in, tgt = make_batch(cfg, batch, gen)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    src, tgt_in, tgt = make_batch(cfg, 512, torch.Generator().manual_seed(seed * 31 + 2))
    with torch.no_grad():
        acc = float((model(src, tgt_in).argmax(-1) == tgt).float().mean())
    return model, {"loss": round(float(loss.detach()), 4), "accuracy": round(acc, 4)}


__all__ = [
    "CrossAttention",
    "Seq2SeqConfig",
    "TinySeq2Seq",
    "alignment_target",
    "make_batch",
    "train_seq2seq",
]
