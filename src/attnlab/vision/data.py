"""Tiny offline image tasks for tests and quick runs: procedurally drawn shapes, seeded.

* ``shapes``: one shape per image -- class 0 a square outline, class 1 a cross (a plus sign) -- of random size
  (side 3..min(7, size - 2), odd for the cross) at a random position, on Gaussian noise of std ``noise``. Telling
  them apart needs the spatial arrangement of several pixels: a bag of pixel values does not suffice.
* ``count``: 1..``max_count`` filled 2 x 2 squares at distinct non-touching random places; the class is the
  count minus one (a global, compositional read-out).

Images are ``(N, 1, size, size)`` float32 in ``[0, 1] + noise``; labels ``(N,)`` long. The same seed gives the
same images; test sets use their own seed (``split_seed``).

:class:`VideoTask` is a video-prediction task for V3 (PredFormer): ``squares`` side x side squares, each starting
at a random place with a random diagonal velocity ``(+-1, +-1)`` pixels per frame and bouncing off the walls
(a coordinate that would leave ``[0, size - side]`` is reflected and its velocity flips); frames are the union of
the squares (1 on a square, 0 elsewhere, no noise). Given ``frames`` frames, predict the next ``frames``.
"""


from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.checks import positive_int

TASKS = ("shapes", "count")


@dataclass(frozen=True)
class ImageTask:
    """kind: shapes | count; size: image side; noise: std of the background noise; max_count: count's classes."""

    kind: str = "shapes"
    size: int = 16
    noise: float = 0.1
    max_count: int = 4

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"kind must be one of {TASKS}, got {self.kind!r}")
        positive_int("size", self.size)
        if self.size < 8:
            raise ValueError(f"size must be at least 8, got {self.size}")
        positive_int("max_count", self.max_count)
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)) or self.noise < 0:
            raise ValueError(f"noise must be a number >= 0, got {self.noise!r}")

    @property
    def classes(self) -> int:
        return 2 if self.kind == "shapes" else self.max_count

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` images and labels drawn from ``gen``."""
        positive_int("n", n)
        imgs = torch.zeros(n, 1, self.size, self.size)
        labels = torch.randint(self.classes, (n,), generator=gen)
        for i in range(n):
            if self.kind == "shapes":
                _draw_shape(imgs[i, 0], int(labels[i]), gen)
            else:
                _draw_count(imgs[i, 0], int(labels[i]) + 1, gen)
        if self.noise:
            imgs += self.noise * torch.randn(imgs.shape, generator=gen)
        return imgs, labels

    def split(self, n: int, split_seed: int) -> tuple[Tensor, Tensor]:
        """A fixed set of ``n`` images for ``split_seed`` (validation / test)."""
        return self.sample(n, torch.Generator().manual_seed(int(split_seed)))


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """An int in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _draw_shape(img: Tensor, label: int, gen: torch.Generator) -> None:
    S = img.shape[0]
    side = _randint(3, min(7, S - 2), gen)
    if label == 1 and side % 2 == 0:
        side -= 1  # a cross needs a centre pixel
    r, c = _randint(0, S - side, gen), _randint(0, S - side, gen)
    if label == 0:  # square outline
        img[r, c:c + side] = img[r + side - 1, c:c + side] = 1.0
        img[r:r + side, c] = img[r:r + side, c + side - 1] = 1.0
    else:  # plus sign
        m = side // 2
        img[r + m, c:c + side] = 1.0
        img[r:r + side, c + m] = 1.0


def _draw_count(img: Tensor, count: int, gen: torch.Generator) -> None:
    S = img.shape[0]
    taken = torch.zeros(S, S, dtype=torch.bool)
    placed, tries = 0, 0
    while placed < count:
        tries += 1
        if tries > 10_000:
            raise ValueError(f"cannot place {count} separated 2 x 2 squares on a {S} x {S} image")
        r, c = _randint(0, S - 2, gen), _randint(0, S - 2, gen)
        if taken[max(0, r - 1):r + 3, max(0, c - 1):c + 3].any():
            continue  # keep squares apart, so they stay countable
        img[r:r + 2, c:c + 2] = 1.0
        taken[r:r + 2, c:c + 2] = True
        placed += 1


def bounce(pos: int, vel: int, steps: int, limit: int) -> tuple[list[int], int]:
    """Positions of one coordinate over ``steps`` frames in ``[0, limit]`` (reflected at the walls) and the
    final velocity. ``bounce(0, -1, 3, 4) == ([0, 1, 2], 1)``."""
    out = []
    for _ in range(steps):
        out.append(pos)
        pos += vel
        if pos < 0 or pos > limit:
            vel = -vel
            pos += 2 * vel
    return out, vel


@dataclass(frozen=True)
class VideoTask:
    """size: frame side; frames: input frames (and frames to predict); squares: moving squares; side: their
    side in pixels."""

    size: int = 16
    frames: int = 4
    squares: int = 2
    side: int = 2

    def __post_init__(self) -> None:
        for name in ("size", "frames", "squares", "side"):
            positive_int(name, getattr(self, name))
        if self.side + 2 > self.size:
            raise ValueError(f"side ({self.side}) must leave room to move on a {self.size}-pixel frame")

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` clips: inputs and targets, each (n, frames, 1, size, size)."""
        positive_int("n", n)
        t, limit = 2 * self.frames, self.size - self.side
        video = torch.zeros(n, t, 1, self.size, self.size)
        for i in range(n):
            for _ in range(self.squares):
                r, c = _randint(0, limit, gen), _randint(0, limit, gen)
                vr, vc = (2 * _randint(0, 1, gen) - 1 for _ in range(2))
                rows, _ = bounce(r, vr, t, limit)
                cols, _ = bounce(c, vc, t, limit)
                for f in range(t):
                    video[i, f, 0, rows[f]:rows[f] + self.side, cols[f]:cols[f] + self.side] = 1.0
        return video[:, :self.frames], video[:, self.frames:]

    def split(self, n: int, split_seed: int) -> tuple[Tensor, Tensor]:
        return self.sample(n, torch.Generator().manual_seed(int(split_seed)))
