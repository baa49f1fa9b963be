"""2-D toy distributions for the objective benchmark and tests.

Each sampler returns ``(x (n, 2) float32, labels (n,) int64)``; labels name the mode (or
arm / ring) so that the same data also serves class-conditional checks."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

TOY2D = ("gaussian_mixture", "two_moons", "checkerboard", "spiral", "rings")


def _gaussian_mixture(n, rng):
    k = 8
    labels = rng.integers(0, k, n)
    angle = 2 * math.pi * labels / k
    centres = np.stack([np.cos(angle), np.sin(angle)], 1) * 2.0
    return centres + 0.15 * rng.standard_normal((n, 2)), labels


def _two_moons(n, rng):
    labels = rng.integers(0, 2, n)
    theta = rng.uniform(0, math.pi, n)
    x = np.where(labels == 0, np.cos(theta), 1 - np.cos(theta))
    y = np.where(labels == 0, np.sin(theta), 0.5 - np.sin(theta))
    pts = np.stack([x - 0.5, y - 0.25], 1) * 1.5
    return pts + 0.05 * rng.standard_normal((n, 2)), labels


def _checkerboard(n, rng):
    # 8 unit cells of a 4x4 board on [-2, 2]^2, the dark ones
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    labels = rng.integers(0, len(cells), n)
    pts = cells[labels] + rng.uniform(0, 1, (n, 2)) - 2.0
    return pts, labels


def _spiral(n, rng):
    labels = rng.integers(0, 2, n)
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    angle = r + math.pi * labels
    pts = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) / (1.5 * math.pi)
    return pts + 0.05 * rng.standard_normal((n, 2)), labels


def _rings(n, rng):
    labels = rng.integers(0, 3, n)
    radius = 0.75 * (labels + 1)
    angle = rng.uniform(0, 2 * math.pi, n)
    pts = np.stack([np.cos(angle), np.sin(angle)], 1) * radius[:, None]
    return pts + 0.04 * rng.standard_normal((n, 2)), labels


_SAMPLERS = {"gaussian_mixture": _gaussian_mixture, "two_moons": _two_moons, "checkerboard": _checkerboard,
             "spiral": _spiral, "rings": _rings}


def num_classes(name: str) -> int:
    return {"gaussian_mixture": 8, "two_moons": 2, "checkerboard": 8, "spiral": 2, "rings": 3}[_check(name)]


def _check(name: str) -> str:
    if name not in _SAMPLERS:
        raise ValueError(f"dataset: unknown 2-D toy {name!r}; choose one of {TOY2D}")
    return name


def sample_toy2d(name: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of toy ``name``: ``(x (n, 2) float32, labels (n,) int64)``, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    x, labels = _SAMPLERS[_check(name)](n, rng)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)


class Toy2D(Dataset):
    """A fixed sample of a toy distribution as a map-style dataset of ``{"x": (2,), "cond": ()}``."""

    def __init__(self, name: str = "checkerboard", n: int = 50_000, seed: int = 0, conditional: bool = False):
        self.x, self.labels = sample_toy2d(name, n, seed)
        self.name, self.conditional = name, conditional

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i]}
        if self.conditional:
            item["cond"] = self.labels[i]
        return item
