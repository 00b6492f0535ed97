"""Needle-in-a-haystack-lite: find one key-value needle at a given depth of a haystack of a given length.

Vocabulary: filler tokens, keys and values in disjoint ranges. A sequence of length ``L`` is filler with
``1 + distractors`` key-value pairs inserted; the needle's key is asked at the last position and the model
predicts its value. The needle sits at relative depth ``depth`` (0 = start, 1 = just before the query); the
distractors sit at random depths. Training samples lengths from ``lengths`` and random depths; the test grid
is every ``depth x length`` cell (one split per cell, named ``d0.50/L128``), plus a ``longer`` set of lengths
never trained on.

    x:  f f k7 v3 f f k2 v9 f f f k7      (B, L)
    y:                              v3    (scored at the last position)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .base import Batch, Task, distinct_tokens


@dataclass(frozen=True)
class NeedleConfig:
    filler: int = 256
    keys: int = 128
    values: int = 128
    lengths: tuple[int, ...] = (64, 128)  # trained on
    longer: tuple[int, ...] = (256,)  # test only
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    distractors: int = 3
    test_size: int = 100
    val_size: int = 256

    def __post_init__(self) -> None:
        if min(self.lengths + self.longer) < 2 * (self.distractors + 1) + 2:
            raise ValueError("lengths too short for the needles")
        if self.keys < self.distractors + 1:
            raise ValueError("need distinct keys for the needle and distractors")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError("depths lie in [0, 1]")

    @property
    def vocab(self) -> int:
        return self.filler + self.keys + self.values


def needle_batch(n: int, gen: torch.Generator, cfg: NeedleConfig, length: int, depth: float | None) -> Batch:
    """``depth=None``: a random depth per sequence (training)."""
    L, K = length, cfg.distractors + 1
    key0, val0 = cfg.filler, cfg.filler + cfg.keys
    x = torch.randint(0, cfg.filler, (n, L), generator=gen)
    keys = distinct_tokens(n, K, key0, key0 + cfg.keys, gen)
    values = torch.randint(val0, val0 + cfg.values, (n, K), generator=gen)
    slots = L - 2  # pair starts in [0, L - 3]: the pair ends before the query at L - 1
    rows = torch.arange(n)
    # distractor pairs on even offsets not overlapping the needle: choose from the 2-aligned grid
    grid = (slots + 1) // 2
    if depth is None:
        needle_slot = torch.randint(0, grid, (n,), generator=gen)
    else:
        needle_slot = torch.full((n,), round(depth * (grid - 1)), dtype=torch.long)
    others = torch.rand(n, grid, generator=gen)
    others[rows, needle_slot] = 2.0  # never pick the needle's slot for a distractor
    dslots = others.argsort(dim=1)[:, : K - 1]
    pos = torch.cat([needle_slot[:, None], dslots], dim=1) * 2  # (n, K)
    r = rows[:, None]
    x[r, pos] = keys
    x[r, pos + 1] = values
    x[:, L - 1] = keys[:, 0]
    y = torch.zeros(n, L, dtype=torch.long)
    y[:, L - 1] = values[:, 0]
    mask = torch.zeros(n, L, dtype=torch.bool)
    mask[:, L - 1] = True
    return Batch(x, y, mask)


class Needle(Task):
    name = "needle"

    cfg: NeedleConfig

    @property
    def train_len(self) -> int:
        return max(self.cfg.lengths)

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        i = int(torch.randint(0, len(self.cfg.lengths), (1,), generator=gen))
        return needle_batch(n, gen, self.cfg, self.cfg.lengths[i], None)

    def test_samplers(self):
        c = self.cfg
        return {
            f"d{d:.2f}/L{L}": partial(needle_batch, cfg=c, length=L, depth=d)
            for L in c.lengths + c.longer
            for d in c.depths
        }

    def primary(self) -> tuple[str, ...]:
        return tuple(f"d{d:.2f}/L{L}" for L in self.cfg.lengths for d in self.cfg.depths)

    def describe(self, metrics: dict[str, float]) -> str:
        by_len: dict[str, list[float]] = {}
        for k, v in metrics.items():
            by_len.setdefault(k.split("/")[1], []).append(v)
        return " ".join(f"{L}={sum(v) / len(v):.3f}" for L, v in by_len.items())
