"""Selective copying (MAD-style): copy the data tokens scattered among noise, in order, ignoring the noise.

The first ``C = T - N`` positions hold ``N`` distinct data tokens at random sorted positions among noise (token 0);
then a separator (token 1) and the data tokens again, teacher-forced. After the separator the model predicts
the first data token, after data token ``d_i`` the next one ``d_{i+1}`` -- a lookup that must skip the noise.

    x:  0 d1 0 0 d2 0 d3 0 | SEP d1 d2        (B, T)
    y:                       d1  d2 d3        (scored)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Batch, Task, distinct_tokens

NOISE, SEP = 0, 1


@dataclass(frozen=True)
class SelectiveCopyConfig:
    vocab: int = 64
    seq_len: int = 128
    num_tokens: int = 16
    test_size: int = 1000
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.vocab - 2 < self.num_tokens:
            raise ValueError("vocab too small for distinct data tokens")
        if self.seq_len < 3 * self.num_tokens:
            raise ValueError("seq_len must be at least 3 * num_tokens")


class SelectiveCopy(Task):
    name = "selective_copy"

    cfg: SelectiveCopyConfig

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        T, N = c.seq_len, c.num_tokens
        C = T - N
        data = distinct_tokens(n, N, 2, c.vocab, gen)
        where = torch.rand(n, C, generator=gen).argsort(dim=1)[:, :N].sort(dim=1).values  # (n, N) sorted
        rows = torch.arange(n)[:, None]
        x = torch.full((n, T), NOISE, dtype=torch.long)
        x[rows, where] = data
        x[:, C] = SEP
        x[:, C + 1 :] = data[:, :-1]
        y = torch.zeros(n, T, dtype=torch.long)
        y[:, C:] = data
        mask = torch.zeros(n, T, dtype=torch.bool)
        mask[:, C:] = True
        return Batch(x, y, mask)
