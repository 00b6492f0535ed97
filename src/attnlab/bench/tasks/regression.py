"""In-context linear regression (Garg et al.; "Trained Transformers Learn Linear Models In-Context", A112).

Each sequence draws a task ``w ~ N(0, I_d)`` and points ``x_i ~ N(0, I_d)``, ``y_i = w . x_i / sqrt(d)`` (unit
variance). Tokens alternate ``[x_i, 0]`` and ``[0, y_i]`` (``F = d + 1`` features); at the token of ``x_i`` the
model predicts ``y_i`` from the ``i - 1`` labelled examples before it. Scored on the queries with at least ``d``
examples in context (where least squares is exact), as ``1 - MSE`` (``MSE`` = 1 for predicting zero).

    x:  [x1,0] [0,y1] [x2,0] [0,y2] ...     (B, T, d + 1)
    y:   y1            y2                   (scored from the (d+1)-th pair on)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Batch, Task


@dataclass(frozen=True)
class RegressionConfig:
    dim: int = 8
    num_points: int = 32
    noise: float = 0.0
    test_size: int = 1000
    val_size: int = 256

    def __post_init__(self) -> None:
        if self.num_points <= self.dim:
            raise ValueError("num_points must exceed dim")


class InContextRegression(Task):
    name = "regression"
    kind = "regress"

    cfg: RegressionConfig

    @property
    def vocab(self) -> None:
        return None

    @property
    def num_classes(self) -> int:
        return 1

    @property
    def in_features(self) -> int:
        return self.cfg.dim + 1

    @property
    def train_len(self) -> int:
        return 2 * self.cfg.num_points

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        c = self.cfg
        d, m = c.dim, c.num_points
        w = torch.randn(n, d, 1, generator=gen)
        xs = torch.randn(n, m, d, generator=gen)
        ys = (xs @ w).squeeze(-1) / math.sqrt(d) + c.noise * torch.randn(n, m, generator=gen)
        x = torch.zeros(n, 2 * m, d + 1)
        x[:, 0::2, :d] = xs
        x[:, 1::2, d] = ys
        y = torch.zeros(n, 2 * m)
        y[:, 0::2] = ys
        mask = torch.zeros(n, 2 * m, dtype=torch.bool)
        mask[:, 2 * d :: 2] = True  # query i (0-based) has i examples before it; score i >= d
        return Batch(x, y, mask)
