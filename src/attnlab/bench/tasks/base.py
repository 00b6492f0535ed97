"""What a synthetic task is: a seeded generator of training batches and fixed, named test splits.

A :class:`Batch` holds model inputs and the positions that are scored:

* ``x``: ``(B, T)`` token ids (``long``), or ``(B, T, F)`` real features (in-context regression);
* ``y``: ``(B, T)`` targets -- class ids (``long``) or real values (``float``); meaningless where ``mask`` is off;
* ``mask``: ``(B, T)`` bool, the positions whose prediction is scored (and trained on).

Training batches are sampled online from a ``torch.Generator``; test splits are fixed by a seed, so two runs
(and two mechanisms) are scored on exactly the same sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class Batch:
    x: Tensor  # (B, T) long or (B, T, F) float
    y: Tensor  # (B, T) long or float
    mask: Tensor  # (B, T) bool

    def __post_init__(self) -> None:
        if self.x.shape[:2] != self.y.shape or self.y.shape != self.mask.shape:
            raise ValueError(f"x {tuple(self.x.shape)}, y {tuple(self.y.shape)}, mask {tuple(self.mask.shape)} disagree")
        if self.mask.dtype != torch.bool:
            raise TypeError("mask must be bool")

    def __len__(self) -> int:
        return self.x.shape[0]

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.x[start:stop], self.y[start:stop], self.mask[start:stop])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def distinct_tokens(n: int, k: int, low: int, high: int, gen: torch.Generator) -> Tensor:
    """``(n, k)`` tokens from ``[low, high)``, distinct within each row (random permutation prefix)."""
    if high - low < k:
        raise ValueError(f"cannot draw {k} distinct tokens from [{low}, {high})")
    # the k smallest of uniform draws: a uniform k-subset in random order; topk avoids sorting the whole row
    # (MQAR at vocabulary 8192 draws 16 keys from 4096 per sequence)
    return torch.rand(n, high - low, generator=gen).topk(k, dim=1, largest=False).indices + low


class Task:
    """A task generator. Subclasses set ``name``, ``kind`` and implement ``sample`` (and ``test_samplers``).

    * ``kind``: ``"classify"`` (cross-entropy over ``num_classes``, scored by accuracy) or ``"regress"``
      (squared error, scored by ``1 - normalized MSE``).
    * ``vocab``: input token ids lie in ``[0, vocab)`` (``None`` for real-valued inputs; then ``in_features``).
    * ``sample(n, gen)``: ``n`` training sequences.
    * ``test_samplers()``: name -> sampler ``(n, gen) -> Batch`` of each fixed test split; ``primary()`` names
      the split(s) averaged into the headline score; ``val_set`` is sampled like training data (early
      stopping, learning-rate choice).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classify"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # -- to implement (the defaults read the config's ``vocab`` / ``seq_len``) ------------------------
    @property
    def vocab(self) -> int | None:
        return self.cfg.vocab

    @property
    def num_classes(self) -> int:
        return self.vocab

    @property
    def in_features(self) -> int:
        return 0

    @property
    def train_len(self) -> int:
        return self.cfg.seq_len

    def sample(self, n: int, gen: torch.Generator) -> Batch:
        raise NotImplementedError

    def test_samplers(self) -> dict[str, Any]:
        """name -> callable(n, gen) -> Batch for each fixed test split (default: one split like training)."""
        return {"test": self.sample}

    def primary(self) -> tuple[str, ...]:
        """The split(s) averaged into the headline score."""
        return ("test",)

    # -- shared --------------------------------------------------------------------------------------
    def test_sets(self, seed: int) -> dict[str, Batch]:
        """The fixed test splits: the same sequences for every mechanism and every run with this seed."""
        out = {}
        for i, (split, sampler) in enumerate(self.test_samplers().items()):
            out[split] = sampler(self.cfg.test_size, generator(seed * 7919 + 104729 + i))
        return out

    def val_set(self, seed: int) -> Batch:
        return self.sample(self.cfg.val_size, generator(seed * 7919 + 15485863))

    def config_dict(self) -> dict[str, Any]:
        return {"task": self.name, **dataclasses.asdict(self.cfg)}

    def score(self, metrics: dict[str, float]) -> float:
        """Headline score in [0, 1] (higher is better): mean of the primary splits."""
        return sum(metrics[s] for s in self.primary()) / len(self.primary())

    def describe(self, metrics: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())
