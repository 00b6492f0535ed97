"""ListOps at reduced length, after the generator logic of Long Range Arena (Nangia & Bowman; LRA).

An expression is a tree of operators over digits 0-9: ``MAX``, ``MIN``, ``MED`` (median, truncated to an
integer) and ``SM`` (sum modulo 10). The root is an operator; below it a node is a digit with probability
``leaf_p`` (always at ``max_depth``), else an operator with 2..``max_args`` arguments. Expressions whose token
length falls outside ``[min_len, max_len]`` are redrawn. Tokens: ``[MAX [MIN [MED [SM ]`` and the digits;
sequences are left-padded to ``max_len`` and end with ``=``, where the model predicts the value (10 classes).

    x:  PAD PAD [MAX 2 9 [MIN 4 7 ] 0 ] =     (B, max_len + 1)
    y:                                  9     (scored at the last position)
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch

from .base import Batch, Task

OPS = ("MAX", "MIN", "MED", "SM")
# token ids: digits 0-9 are their own ids (and the 10 classes), then the operators, ']', '=', PAD
OP_ID = {op: 10 + i for i, op in enumerate(OPS)}
CLOSE, EQUALS, PAD = 14, 15, 16


@dataclass(frozen=True)
class ListOpsConfig:
    max_depth: int = 4
    max_args: int = 5
    leaf_p: float = 0.25
    min_len: int = 16
    max_len: int = 96
    test_size: int = 1000
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.max_args < 2 or self.max_depth < 1 or self.min_len > self.max_len:
            raise ValueError("invalid ListOps configuration")


def evaluate(op: str, args: list[int]) -> int:
    if op == "MAX":
        return max(args)
    if op == "MIN":
        return min(args)
    if op == "MED":
        return int(statistics.median(args))
    return sum(args) % 10


def expression(rng: random.Random, depth: int, cfg: ListOpsConfig) -> tuple[list[int], int]:
    """(tokens, value) of a random subtree at ``depth`` (1 = root)."""
    if depth > 1 and (depth >= cfg.max_depth or rng.random() < cfg.leaf_p):
        d = rng.randrange(10)
        return [d], d
    op = rng.choice(OPS)
    tokens, values = [OP_ID[op]], []
    for _ in range(rng.randint(2, cfg.max_args)):
        t, v = expression(rng, depth + 1, cfg)
        tokens += t
        values.append(v)
    return tokens + [CLOSE], evaluate(op, values)


def listops_batch(n: int, gen: torch.Generator, cfg: ListOpsConfig) -> Batch:
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
    T = cfg.max_len + 1
    x = torch.full((n, T), PAD, dtype=torch.long)
    y = torch.zeros(n, T, dtype=torch.long)
    for b in range(n):
        while True:
            tokens, value = expression(rng, 1, cfg)
            if cfg.min_len <= len(tokens) <= cfg.max_len:
                break
        x[b, T - 1 - len(tokens) : T - 1] = torch.tensor(tokens)
        y[b, T - 1] = value
    x[:, T - 1] = EQUALS
    mask = torch.zeros(n, T, dtype=torch.bool)
    mask[:, T - 1] = True
    return Batch(x, y, mask)


class ListOps(Task):
    name = "listops"

    cfg: ListOpsConfig

    @property
    def vocab(self) -> int:
        return PAD + 1

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def train_len(self) -> int:
        return self.cfg.max_len + 1

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        return listops_batch(n, gen, self.cfg)
