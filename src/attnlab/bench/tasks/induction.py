"""Induction-head copy with length extrapolation: a random segment, then the same segment again.

``x = s s`` with ``s`` of length ``L = T / 2`` (distinct tokens). In the second copy, at token ``s_i`` the model
predicts ``s_{i+1}``: find the earlier ``s_i`` and copy what followed it ([A][B] ... [A] -> [B]). Training uses
``T = train_len``; the test splits use ``T`` 1x, 2x, 4x and 8x longer (``extrapolate``).

    x:  a b c d | a b c d      (B, T)
    y:            b c d        (scored)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .base import Batch, Task, distinct_tokens


@dataclass(frozen=True)
class InductionConfig:
    vocab: int = 1024
    seq_len: int = 64  # training length
    extrapolate: tuple[int, ...] = (1, 2, 4, 8)  # test lengths as multiples of seq_len
    test_size: int = 200
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.seq_len % 2:
            raise ValueError("seq_len must be even")
        if self.vocab - 1 < self.seq_len * max(self.extrapolate) // 2:
            raise ValueError("vocab too small for distinct tokens at the longest test length")


def induction_batch(n: int, gen: torch.Generator, seq_len: int, vocab: int) -> Batch:
    L = seq_len // 2
    s = distinct_tokens(n, L, 1, vocab, gen)
    x = torch.cat([s, s], dim=1)
    y = torch.zeros(n, seq_len, dtype=torch.long)
    y[:, L : 2 * L - 1] = s[:, 1:]
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[:, L : 2 * L - 1] = True
    return Batch(x, y, mask)


class Induction(Task):
    name = "induction"

    cfg: InductionConfig

    @property
    def vocab(self) -> int:
        return self.cfg.vocab

    @property
    def num_classes(self) -> int:
        return self.cfg.vocab

    @property
    def train_len(self) -> int:
        return self.cfg.seq_len

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        return induction_batch(n, gen, self.cfg.seq_len, self.cfg.vocab)

    def primary(self) -> tuple[str, ...]:
        return (f"T{self.cfg.extrapolate[0]}x",)

    def test_samplers(self):
        c = self.cfg
        return {f"T{m}x": partial(induction_batch, seq_len=c.seq_len * m, vocab=c.vocab) for m in c.extrapolate}
