"""Induction-head copy with length extrapolation: a segment seen once is recognized and continued later.

A sequence of ``T`` distinct random tokens contains one segment ``s`` of length ``L = T / 4`` twice: the first
copy starts anywhere in the first half, the second anywhere in the second half, so the distance between the
copies varies and no fixed positional offset solves the task -- only content matching does
([A][B] ... [A] -> [B]). In the second copy, at token ``s_i`` the model predicts ``s_{i+1}``. Training uses
``T = seq_len``; the test splits use ``T`` 1x, 2x, 4x and 8x longer (``extrapolate``), with ``L`` and the
distances growing alike.

    x:  r r a b c d r r r r a b c d r      (B, T)
    y:                        b c d        (scored)
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
    layout: str = "random-offsets"  # recorded so that runs of the earlier fixed-offset layout do not resume

    def __post_init__(self) -> None:
        if self.seq_len % 4 or self.seq_len < 8:
            raise ValueError("seq_len must be a multiple of 4 and >= 8")
        longest = self.seq_len * max(self.extrapolate)
        if self.vocab - 1 < longest - longest // 4:
            raise ValueError("vocab too small for distinct tokens at the longest test length")


def induction_batch(n: int, gen: torch.Generator, seq_len: int, vocab: int) -> Batch:
    T, L = seq_len, seq_len // 4
    x = distinct_tokens(n, T, 1, vocab, gen)  # only the repeat below breaks distinctness
    a = torch.randint(0, T // 2 - L + 1, (n,), generator=gen)
    b = torch.randint(T // 2, T - L + 1, (n,), generator=gen)
    offs = torch.arange(L)
    rows = torch.arange(n)[:, None]
    x[rows, b[:, None] + offs] = x[rows, a[:, None] + offs]
    y = torch.zeros(n, T, dtype=torch.long)
    mask = torch.zeros(n, T, dtype=torch.bool)
    scored = b[:, None] + offs[:-1]  # positions of s_0 .. s_{L-2} in the second copy
    y[rows, scored] = x[rows, scored + 1]
    mask[rows, scored] = True
    return Batch(x, y, mask)


class Induction(Task):
    name = "induction"

    cfg: InductionConfig

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        return induction_batch(n, gen, self.cfg.seq_len, self.cfg.vocab)

    def primary(self) -> tuple[str, ...]:
        return (f"T{self.cfg.extrapolate[0]}x",)

    def test_samplers(self):
        c = self.cfg
        return {f"T{m}x": partial(induction_batch, seq_len=c.seq_len * m, vocab=c.vocab) for m in c.extrapolate}
