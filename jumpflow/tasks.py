"""Workloads for the one training loop.

A *task* is what differs between toy data, images and robot policies; everything else
(objective, backbone, optimiser, EMA, checkpoints) is shared. The trainer builds the task
from ``configs/task/<name>.yaml`` (``_target_``) first, because the backbone needs the
task's data shape and condition width::

    task = instantiate(cfg.task)                                  # a Task (values checked)
    task.prepare()                                                # data read / generated
    backbone = instantiate(cfg.backbone)(shape=task.shape, cond_dim=task.cond_dim)
    objective = instantiate(cfg.objective)
    model = task.build_model(backbone, objective)                 # has compute_loss(batch)
    data = task.train_dataset()                                   # dict items
    metrics = task.evaluate(ema_model, run_dir, step)             # {name: float}

This module holds only the :class:`Task` contract (the core imports no workload). The
workloads subclass it in their own packages: ``jumpflow.toy`` (2-D toy distributions),
``jumpflow.images`` (class-conditional images), ``jumpflow.policy`` (robot policies).
"""

from __future__ import annotations

from pathlib import Path

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

    # -- before any data: the constructor only validates values --------------------------------
    @property
    def probe_shape(self) -> tuple[int, ...]:
        """A provisional data shape for checking the backbone config before :meth:`prepare`
        (a task whose shape depends on its data returns a stand-in of the right rank)."""
        return tuple(self.shape)

    @property
    def probe_cond_dim(self) -> int:
        return int(self.cond_dim or 0)

    def prepare(self) -> None:
        """Read (or generate) the data; afterwards ``shape`` and ``cond_dim`` are final. The
        first step of a run that touches data or disk; called after every config check."""
        return

    def artifact(self) -> dict:
        """What acting needs without the data (JSON-able): saved in every checkpoint."""
        return {"shape": [int(s) for s in self.shape], "cond_dim": int(self.cond_dim)}

    def restore(self, artifact: dict) -> None:
        """Take a checkpoint's :meth:`artifact` instead of :meth:`prepare` (no data is opened)."""
        self.shape, self.cond_dim = tuple(int(s) for s in artifact["shape"]), int(artifact["cond_dim"])

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
