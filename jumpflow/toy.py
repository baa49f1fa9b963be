"""The toy workload: 2-D distributions (checkerboard, 8 gaussians, ...) for objective
ablations that train in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from jumpflow.errors import ConfigError
from jumpflow.tasks import Task


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
            raise ConfigError("dataset", f"unknown 2-D toy {dataset!r}; valid: {', '.join(TOY2D)}")
        if n < 1:
            raise ConfigError("n", f"must be >= 1, got {n}")
        if conditional and cond_dim < 1:
            raise ConfigError("cond_dim", f"must be >= 1 for a conditional task, got {cond_dim}")
        if eval_samples < 2:
            raise ConfigError("eval_samples", f"must be >= 2, got {eval_samples}")
        eval_steps = [int(s) for s in eval_steps]
        if not eval_steps or min(eval_steps) < 1:
            raise ConfigError("eval_steps", f"need a non-empty list of integers >= 1, got {eval_steps}")
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
