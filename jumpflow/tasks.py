"""Workloads for the one training loop.

A *task* is what differs between toy data, images and robot policies; everything else
(objective, backbone, optimiser, EMA, checkpoints) is shared. The trainer builds the task
from ``configs/task/<name>.yaml`` (``_target_``) first, because the backbone needs the
task's data shape and condition width::

    task = instantiate(cfg.task)                                  # a Task
    backbone = instantiate(cfg.backbone)(shape=task.shape, cond_dim=task.cond_dim)
    objective = instantiate(cfg.objective)
    model = task.build_model(backbone, objective)                 # has compute_loss(batch)
    data = task.train_dataset()                                   # dict items
    metrics = task.evaluate(ema_model, run_dir, step)             # {name: float}

This module holds the :class:`Task` contract and :class:`Toy2DTask` (2-D toy
distributions). The policy and image workloads subclass ``Task`` in their own packages.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


class Task:
    """The contract between a workload and the trainer.

    Attributes:
        shape: per-sample data shape, e.g. ``(2,)`` for 2-D toys, ``(horizon, action_dim)``
            for action chunks, ``(C, H, W)`` for images. Passed to the backbone.
        cond_dim: width of the encoded condition the backbone receives (0: unconditional).
            Passed to the backbone.
    """

    shape: tuple[int, ...] = ()
    cond_dim: int = 0

    def build_model(self, backbone: nn.Module, objective) -> nn.Module:
        """Wrap ``backbone`` and ``objective`` into the trained module.

        The returned module must offer ``compute_loss(batch) -> LossOutput`` (per-sample
        ``loss (N,)`` and scalar ``metrics``), and may carry a ``normalizer`` submodule (its
        buffers are then checkpointed with the model). Usually a
        :class:`jumpflow.generator.Generator` (or a policy wrapping one) with the task's
        condition encoder. Called once, under the run's seed, so initialisation is
        reproducible.
        """
        raise NotImplementedError

    def train_dataset(self) -> Dataset:
        """A map-style dataset of dict items (tensors, or nested dicts of tensors) that the
        default ``collate`` batches; the model's ``compute_loss`` receives the batch.

        Random augmentation inside ``__getitem__`` may use the global ``torch`` / ``numpy`` /
        ``random`` generators: the trainer seeds them per item from (seed, epoch, index),
        so it is reproducible, independent of ``num_workers`` and exact under resume."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, run_dir: str | Path, step: int) -> dict[str, float]:
        """Evaluate ``model`` (the EMA copy when EMA is on, in ``eval()`` mode) after
        ``step`` optimiser steps; may write artefacts (plots, videos) under ``run_dir``.
        Returns scalar metrics; the trainer logs them as ``eval/<name>``. Runs on rank 0
        only, inside a forked RNG, so it never changes the training run."""
        return {}


# ------------------------------------------------------------------------ metrics
def sliced_w2(a: Tensor, b: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets ``a: (N, D)`` and ``b: (M, D)``.

    ``SW2 = sqrt(E_theta W2^2(<a, theta>, <b, theta>))`` over ``n_projections`` random unit
    directions ``theta``; each 1-D W2 compares quantiles (sorted projections; when N != M,
    both are interpolated on a common grid). Computed in float64."""
    a, b = a.detach().double().flatten(1).cpu(), b.detach().double().flatten(1).cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced_w2: dimension mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)                           # (D, K)
    pa, _ = torch.sort(a @ theta, dim=0)                                       # (N, K)
    pb, _ = torch.sort(b @ theta, dim=0)                                       # (M, K)
    if pa.shape[0] != pb.shape[0]:
        n = max(pa.shape[0], pb.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa, pb = _quantiles(pa, q), _quantiles(pb, q)
    return math.sqrt(float((pa - pb).pow(2).mean()))


def _quantiles(sorted_x: Tensor, q: Tensor) -> Tensor:
    n = sorted_x.shape[0]
    pos = (q * n - 0.5).clamp(0, n - 1)                                        # (Q,)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo.double())[:, None]
    return sorted_x[lo] * (1 - w) + sorted_x[hi] * w                           # (Q, K)


def _toy_metrics() -> dict:
    """``jumpflow.eval.toy_metrics`` (sliced W2, MMD) when present, else this module's sliced W2."""
    try:
        from jumpflow.eval.toy_metrics import mmd_rbf  # type: ignore
        from jumpflow.eval.toy_metrics import sliced_w2 as shared
        return {"sliced_w2": shared, "mmd": mmd_rbf}
    except ImportError:
        return {"sliced_w2": sliced_w2}


# ------------------------------------------------------------------------ toy task
class Toy2DTask(Task):
    """2-D toy distributions (``jumpflow.datasets.toy2d``), unconditional or conditioned on
    the mode label through a :class:`~jumpflow.generator.ClassEmbedding` (with a null class
    for guidance).

    Args:
        dataset: one of ``jumpflow.datasets.toy2d.TOY2D``.
        n: training points (a fixed sample drawn with ``data_seed``).
        data_seed: seed of the training sample (the evaluation sample uses ``data_seed + 1``).
        conditional: condition on the mode label.
        cond_dim: width of the class embedding (ignored when unconditional).
        eval_samples: generated and reference points per evaluation.
        eval_steps: numbers of sampling steps (NFE) to evaluate, e.g. ``[1, 2, 4]``.
        eval_projections: directions of the sliced W2.
    """

    def __init__(self, dataset: str = "checkerboard", n: int = 50_000, data_seed: int = 0,
                 conditional: bool = False, cond_dim: int = 64, eval_samples: int = 2000,
                 eval_steps=(1,), eval_projections: int = 256):
        from jumpflow.datasets.toy2d import TOY2D

        if dataset not in TOY2D:
            raise ValueError(f"dataset: unknown 2-D toy {dataset!r}; valid: {', '.join(TOY2D)}")
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        if conditional and cond_dim < 1:
            raise ValueError(f"cond_dim: must be >= 1 for a conditional task, got {cond_dim}")
        if eval_samples < 2:
            raise ValueError(f"eval_samples: must be >= 2, got {eval_samples}")
        eval_steps = [int(s) for s in eval_steps]
        if not eval_steps or min(eval_steps) < 1:
            raise ValueError(f"eval_steps: need a non-empty list of integers >= 1, got {eval_steps}")
        self.dataset, self.n, self.data_seed, self.conditional = dataset, int(n), int(data_seed), bool(conditional)
        self.shape = (2,)
        self.cond_dim = int(cond_dim) if conditional else 0
        self.eval_samples, self.eval_steps, self.eval_projections = int(eval_samples), eval_steps, int(eval_projections)

    def build_model(self, backbone: nn.Module, objective) -> nn.Module:
        from jumpflow.datasets.toy2d import num_classes
        from jumpflow.generator import ClassEmbedding, Generator

        encoder = ClassEmbedding(num_classes(self.dataset), self.cond_dim) if self.conditional else None
        return Generator(backbone, objective, encoder, shape=self.shape)

    def train_dataset(self) -> Dataset:
        from jumpflow.datasets.toy2d import Toy2D

        return Toy2D(self.dataset, self.n, self.data_seed, conditional=self.conditional)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, run_dir, step: int) -> dict[str, float]:
        from jumpflow.datasets.toy2d import sample_toy2d

        metrics = _toy_metrics()
        ref, labels = sample_toy2d(self.dataset, self.eval_samples, seed=self.data_seed + 1)
        p = next(model.parameters())
        out = {}
        for steps in self.eval_steps:
            gen = torch.Generator(device=p.device).manual_seed(1234 + steps)
            noise = torch.randn((self.eval_samples, *self.shape), generator=gen, device=p.device, dtype=p.dtype)
            cond = labels.to(p.device) if self.conditional else None
            x = model.generate(cond, noise=noise, steps=steps)
            for name, fn in metrics.items():
                out[f"{name}_nfe{steps}"] = float(fn(x.float().cpu(), ref))
        return out
