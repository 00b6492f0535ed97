"""Flip-flop language modeling (Liu et al., "Exposing Attention Glitches", B214).

A sequence is ``T / 2`` instructions, each an opcode and a bit: ``w b`` (write ``b``), ``r b`` (read: ``b`` is
the last written bit), ``i b`` (ignore). The first instruction is a write; the others are ``i`` with probability
``p_ignore`` and ``w`` / ``r`` with ``(1 - p_ignore) / 2`` each. Only the bit after a read is determined, so it is
the only position scored (and trained on): at each ``r`` the model predicts the next token.

Splits (the paper's FFL(p)): in-distribution ``p_ignore = 0.8``; sparse out-of-distribution ``0.98`` (long gaps
between a write and its read); dense ``0.1``. The reported figure is the read error rate ``1 - accuracy``.

    x:  w 1 i 0 i 1 r 1 w 0 i 1 r 0      (B, T)
    y:              1           0        (scored at the r positions)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .base import Batch, Task

W, R, IGNORE, ZERO, ONE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class FlipFlopConfig:
    seq_len: int = 256
    p_ignore: float = 0.8
    p_sparse: float = 0.98
    p_dense: float = 0.1
    test_size: int = 1000
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.seq_len % 2 or self.seq_len < 4:
            raise ValueError("seq_len must be even and >= 4")
        for p in (self.p_ignore, self.p_sparse, self.p_dense):
            if not 0 <= p < 1:
                raise ValueError("ignore probabilities must lie in [0, 1)")


def flipflop_batch(n: int, gen: torch.Generator, seq_len: int, p_ignore: float) -> Batch:
    m = seq_len // 2
    u = torch.rand(n, m, generator=gen)
    p_w = (1 - p_ignore) / 2
    ops = torch.where(u < p_w, W, torch.where(u < 2 * p_w, R, IGNORE))
    ops[:, 0] = W
    bits = torch.randint(0, 2, (n, m), generator=gen)
    # the last written bit at each instruction: forward-fill the write positions
    idx = torch.where(ops == W, torch.arange(m).expand(n, m), torch.zeros(n, m, dtype=torch.long))
    last_write = idx.cummax(dim=1).values
    memory = bits.gather(1, last_write)
    bits = torch.where(ops == R, memory, bits)
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, 0::2] = ops
    x[:, 1::2] = bits + ZERO
    y = torch.zeros(n, seq_len, dtype=torch.long)
    y[:, 0::2] = bits + ZERO
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[:, 0::2] = ops == R
    return Batch(x, y, mask)


class FlipFlop(Task):
    name = "flipflop"

    cfg: FlipFlopConfig

    @property
    def vocab(self) -> int:
        return 5

    @property
    def num_classes(self) -> int:
        return 5

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        return flipflop_batch(n, gen, self.cfg.seq_len, self.cfg.p_ignore)

    def primary(self) -> tuple[str, ...]:
        return ("id",)

    def test_samplers(self):
        c = self.cfg
        return {
            "id": partial(flipflop_batch, seq_len=c.seq_len, p_ignore=c.p_ignore),
            "sparse": partial(flipflop_batch, seq_len=c.seq_len, p_ignore=c.p_sparse),
            "dense": partial(flipflop_batch, seq_len=c.seq_len, p_ignore=c.p_dense),
        }

    def describe(self, metrics: dict[str, float]) -> str:
        return " ".join(f"err_{k}={1 - v:.4f}" for k, v in metrics.items())
