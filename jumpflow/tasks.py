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

from pathlib import Path

import torch
from torch import nn
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
        from jumpflow.eval.toy_metrics import mmd_rbf, sliced_w2

        metrics = {"sliced_w2": sliced_w2, "mmd": mmd_rbf}
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
