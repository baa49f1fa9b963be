"""A generator = condition encoder + backbone + objective (+ normalizer).

The objective never owns the network: the generator passes *itself* as ``net`` to
``objective.loss(net, x, cond)`` / ``objective.sample(net, noise, cond, steps)``, so it is the
one object that knows how to encode a condition, where the null condition for guidance
lives and which modules the objective asked for (``aux``: DTM's head, TVM's EMA target,
Drifting's frozen feature map)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import DataPrediction, LossOutput, Objective


class ClassEmbedding(nn.Module):
    """Class labels ``(B,)`` int64 -> ``(B, dim)``; row ``num_classes`` is the null class
    used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.dim = num_classes, dim
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class labels must be integers, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}], got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return self.table(labels.long())                                  # (B, dim)

    def null(self, cond: Tensor) -> Tensor:
        return self.table.weight[self.num_classes].expand_as(cond)        # (B, dim)


class Generator(nn.Module):
    """``forward(x, t, h, cond)`` is the backbone's; ``compute_loss(batch)`` and
    ``generate(raw_cond, ...)`` are what the trainer and the workloads call.

    Args:
        backbone: any ``(x, t, h, cond)`` module.
        objective: an ``Objective`` (held, not registered as a module).
        cond_encoder: maps the raw condition to ``(B, C)``; ``None`` for unconditional data.
        shape: per-sample data shape (for ``generate``).
    """

    def __init__(self, backbone: nn.Module, objective: Objective, cond_encoder: nn.Module | None = None,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        if getattr(objective, "prediction", "native") == "data":
            backbone = DataPrediction(backbone, objective.from_data_prediction)
        self.backbone = backbone
        self.cond_encoder = cond_encoder
        self.objective = objective
        self.shape = tuple(shape) if shape is not None else getattr(backbone, "shape", None)
        self.aux = nn.ModuleDict(objective.extra_modules(backbone))

    # -- the net interface objectives call ------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None, **kw):
        return self.backbone(x, t, h, cond, **kw)

    def null_cond(self, cond: Tensor) -> Tensor:
        null = getattr(self.cond_encoder, "null", None)
        if null is None:
            raise ValueError("this generator's condition encoder has no null condition (needed for guidance)")
        return null(cond)

    def tokenize(self, x: Tensor) -> Tensor:
        return self.backbone.tokenize(x)

    def untokenize(self, tokens: Tensor) -> Tensor:
        return self.backbone.untokenize(tokens)

    # -- what the trainer and workloads call ----------------------------------------------
    def encode(self, raw_cond) -> Tensor | None:
        if raw_cond is None or self.cond_encoder is None:
            return None
        return self.cond_encoder(raw_cond)

    def compute_loss(self, batch: dict) -> LossOutput:
        """``batch["x"]: (B, *shape)``, optional ``batch["cond"]`` (raw condition)."""
        x = batch["x"]
        if not torch.isfinite(x).all():
            raise ValueError("batch['x'] contains NaN or inf")
        return self.objective.loss(self, x, self.encode(batch.get("cond")))

    @torch.no_grad()
    def generate(self, raw_cond=None, n: int | None = None, steps: int | None = None,
                 noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Samples ``(B, *shape)``; ``B`` from ``raw_cond`` or ``n``."""
        cond = self.encode(raw_cond)
        if noise is None:
            b = cond.shape[0] if cond is not None else n
            if b is None or self.shape is None:
                raise ValueError("generate needs raw_cond or n, and a known sample shape")
            p = next(self.parameters())
            noise = torch.randn((b, *self.shape), generator=generator, device=p.device, dtype=p.dtype)
        return self.objective.sample(self, noise, cond, self.objective.default_steps if steps is None else steps)
