"""Image tasks of ``attnlab bench cab``, generated offline and seeded (the same seed, the same images).

Every task has the interface of :class:`attnlab.vision.data.ImageTask`: ``classes``, ``size``,
``sample(n, gen) -> (images (n, 1, S, S) float32, labels (n,) long)`` and ``split(n, seed)`` (a fixed set).

* :class:`Pathfinder` (LRA-style, B24 takes LRA's image tasks over): two dots (value 1.0) and ``2 + distractors``
  paths in either class (value 0.5), drawn as random self-avoiding walks on the pixel grid, kept at least 3 pixels (Chebyshev) apart
  from each other. Label 1: both dots end the same path; label 0: they end two different paths. ``dashed``
  leaves out every third pixel of a path (its end pixels are always drawn), so a path is a chain of ink pixels
  at most 2 apart (Chebyshev) and paths never come within 2 of each other: "connected" means reachable by
  steps of Chebyshev length <= 2 over ink pixels (what the tests check by BFS).
* :class:`SameDifferent`: one shape in the left half and one in the right half, each a square outline, a plus
  or an X of side 3 or 5; label 1 iff both are the same shape of the same side (a comparison across the image).
* ``count`` (shapes counting): :class:`attnlab.vision.data.ImageTask` with ``kind="count"``.
* ``connect`` (long-range connection): a solid :class:`Pathfinder` with two long paths (``size .. 2 size`` pixels)
  and no further distractors.
* :class:`Digits`: scikit-learn's bundled 8 x 8 handwritten digits (1797 images, 10 classes, pixel values
  0..16 scaled to [0, 1]); a seeded permutation holds out ``test_size`` images as the fixed test split and
  training batches are drawn with replacement from the rest.

Noise: Gaussian of std ``noise`` is added to drawn images (not to the digits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ...core.checks import positive_int
from ...vision.data import ImageTask


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """An int in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _check_noise(noise: float) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")


class _Drawn(ABC):
    """Shared sampling loop: ``_draw(img (S, S), label, gen)`` per image, then noise."""

    size: int
    noise: float
    classes: int = 2

    @abstractmethod
    def _draw(self, img: Tensor, label: int, gen: torch.Generator) -> None:
        """Draw one image of class ``label`` into ``img`` (S, S) in place."""

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        positive_int("n", n)
        imgs = torch.zeros(n, 1, self.size, self.size)
        labels = torch.randint(self.classes, (n,), generator=gen)
        for i in range(n):
            self._draw(imgs[i, 0], int(labels[i]), gen)
        if self.noise:
            imgs += self.noise * torch.randn(imgs.shape, generator=gen)
        return imgs, labels

    def split(self, n: int, split_seed: int) -> tuple[Tensor, Tensor]:
        return self.sample(n, torch.Generator().manual_seed(int(split_seed)))


STEPS = ((0, 1), (1, 0), (0, -1), (-1, 0))


@dataclass(frozen=True)
class Pathfinder(_Drawn):
    """size: image side; length: (min, max) pixels per path; distractors: extra paths; dashed: gaps in paths;
    noise: background noise std. Label 1: the two dots are connected."""

    size: int = 16
    length: tuple[int, int] = (8, 14)
    distractors: int = 1
    dashed: bool = True
    noise: float = 0.05

    def __post_init__(self) -> None:
        positive_int("size", self.size)
        if self.size < 8:
            raise ValueError(f"size must be at least 8, got {self.size}")
        lo, hi = self.length
        if not 2 <= lo <= hi:
            raise ValueError(f"length must be (min, max) with 2 <= min <= max, got {self.length}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")
        _check_noise(self.noise)

    def paths(self, label: int, gen: torch.Generator) -> list[list[tuple[int, int]]]:
        """The pixel paths of one image: path 0 carries both dots (label 1) or the first dot, path 1 the second
        dot (label 0); the rest are distractors. Both classes draw ``2 + distractors`` paths, so the amount of ink
        does not give the label away. Retries until every path fits."""
        want = 2 + self.distractors
        for _ in range(200):
            taken = torch.zeros(self.size, self.size, dtype=torch.bool)  # pixels within 2 of a drawn path
            out: list[list[tuple[int, int]]] = []
            for _ in range(want):
                p = self._walk(taken, gen)
                if p is None:
                    break
                out.append(p)
                for r, c in p:
                    taken[max(0, r - 2):r + 3, max(0, c - 2):c + 3] = True
            if len(out) == want:
                return out
        raise ValueError(f"cannot fit {want} paths of length {self.length} on a {self.size} x {self.size} grid")

    def _walk(self, taken: Tensor, gen: torch.Generator) -> list[tuple[int, int]] | None:
        S = self.size
        target = _randint(*self.length, gen)
        for _ in range(50):
            r, c = _randint(0, S - 1, gen), _randint(0, S - 1, gen)
            if taken[r, c]:
                continue
            path, seen = [(r, c)], {(r, c)}
            heading = _randint(0, 3, gen)
            while len(path) < target:
                # keep the heading with probability 1/2, else turn; a walk that touches itself is still one path
                turn = (0, 0, 1, 3)[_randint(0, 3, gen)]
                options = [(heading + turn) % 4] + [(heading + t) % 4 for t in (1, 3, 0)]
                for h in options:
                    nr, nc = path[-1][0] + STEPS[h][0], path[-1][1] + STEPS[h][1]
                    if 0 <= nr < S and 0 <= nc < S and not taken[nr, nc] and (nr, nc) not in seen:
                        break
                else:
                    break
                heading = h
                path.append((nr, nc))
                seen.add((nr, nc))
            if len(path) == target:
                return path
        return None

    def _draw(self, img: Tensor, label: int, gen: torch.Generator) -> None:
        paths = self.paths(label, gen)
        for p in paths:
            for i, (r, c) in enumerate(p):
                if not self.dashed or i % 3 != 2 or i == len(p) - 1:
                    img[r, c] = 0.5
        a = paths[0][0]
        b = paths[0][-1] if label == 1 else paths[1][-1]
        img[a] = img[b] = 1.0


@dataclass(frozen=True)
class SameDifferent(_Drawn):
    """size: image side (>= 12); noise: background noise std. Label 1: the left and right shapes are equal."""

    size: int = 16
    noise: float = 0.05

    def __post_init__(self) -> None:
        positive_int("size", self.size)
        if self.size < 12:
            raise ValueError(f"size must be at least 12, got {self.size}")
        _check_noise(self.noise)

    def _draw(self, img: Tensor, label: int, gen: torch.Generator) -> None:
        kinds, sides = 3, (3, 5)
        k1, s1 = _randint(0, kinds - 1, gen), sides[_randint(0, 1, gen)]
        if label == 1:
            k2, s2 = k1, s1
        else:  # a different (kind, side): draw among the other five
            pick = _randint(0, 2 * kinds - 2, gen)
            others = [(k, s) for k in range(kinds) for s in sides if (k, s) != (k1, s1)]
            k2, s2 = others[pick]
        half = self.size // 2
        for (k, s), c0 in (((k1, s1), 0), ((k2, s2), half)):
            r, c = _randint(0, self.size - s, gen), c0 + _randint(0, half - s, gen)
            img[r:r + s, c:c + s] = shape_template(k, s)


def shape_template(kind: int, side: int) -> Tensor:
    """(side, side) ink of shape ``kind``: 0 square outline, 1 plus, 2 X (both diagonals); side odd."""
    t = torch.zeros(side, side)
    m = side // 2
    if kind == 0:
        t[0, :] = t[-1, :] = t[:, 0] = t[:, -1] = 1.0
    elif kind == 1:
        t[m, :] = t[:, m] = 1.0
    else:
        idx = torch.arange(side)
        t[idx, idx] = t[idx, side - 1 - idx] = 1.0
    return t


@lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    return x, torch.tensor(d.target, dtype=torch.long)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's 8 x 8 digits; ``seed`` fixes which ``test_size`` images are held out."""

    test_size: int = 500
    seed: int = 0
    size: int = 8
    classes: int = 10

    def _parts(self) -> tuple[Tensor, Tensor]:
        x, _ = _digits()
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))
        if not 0 < self.test_size < x.shape[0]:
            raise ValueError(f"test_size must be in (0, {x.shape[0]}), got {self.test_size}")
        return perm[self.test_size:], perm[:self.test_size]

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        positive_int("n", n)
        x, y = _digits()
        train, _ = self._parts()
        idx = train[torch.randint(len(train), (n,), generator=gen)]
        return x[idx], y[idx]

    def split(self, n: int, split_seed: int) -> tuple[Tensor, Tensor]:
        """The held-out images (the first ``n`` of them; the split does not depend on ``split_seed``)."""
        x, y = _digits()
        _, test = self._parts()
        return x[test[:n]], y[test[:n]]


def image_task(name: str, size: int = 16) -> ImageTask | Pathfinder | SameDifferent | Digits:
    """The image task ``name`` (see :data:`IMAGE_TASKS`) at image side ``size`` (digits are always 8 x 8)."""
    if name == "pathfinder":
        return Pathfinder(size=size)
    if name == "connect":
        return Pathfinder(size=size, length=(size, 2 * size), distractors=0, dashed=False)
    if name == "same":
        return SameDifferent(size=size)
    if name == "count":
        return ImageTask("count", size)
    if name == "digits":
        return Digits()
    raise ValueError(f"unknown image task {name!r}; one of {IMAGE_TASKS}")


IMAGE_TASKS = ("pathfinder", "count", "same", "connect", "digits")

__all__ = ["IMAGE_TASKS", "Digits", "Pathfinder", "SameDifferent", "image_task", "shape_template"]
