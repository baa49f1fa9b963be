"""Regression / behaviour cloning: Pomerleau, "ALVINN: An Autonomous Land Vehicle in a Neural
Network" (NeurIPS 1988, no arXiv id); the control that "Much Ado About Noising" (ICLR 2026)
asks of every generative policy (regression matches flow policies on most benchmarks that
are not multimodal)."""

from __future__ import annotations

import torch
from torch import Tensor

from jumpflow.objectives.base import Inference, LossOutput, Objective, per_sample_mse, require


class Regression(Objective):
    """Regress the data on the condition with one call of the backbone.

    The backbone is called at a fixed input: zeros for ``x`` at ``t = 1``, ``h = 1`` (the
    slot of a one-step jump from noise, so a backbone shared with the generative objectives
    sees a familiar time embedding), and everything it knows comes from ``cond``::

        x_hat(c) = net(0, t=1, h=1 | c)
        L        = || x_hat(c) - x ||^2                 (mean over the data dims)

    Its minimiser is the conditional mean ``E[x | c]``: exact on unimodal data, the average
    of the modes on multimodal data (which is what a generative policy must beat).
    ``sample`` returns ``x_hat(c)`` and ignores the noise (1 NFE, deterministic).

    Shapes: ``x, x_hat, noise: (B, *shape)``; ``cond: (B, C)`` or ``None``.

    Args:
        prediction: ``"native"`` or ``"data"``; the native output already *is* the data, so
            both mean the same here (kept so that a sweep may set it for every objective).
        data_t_min: unused (accepted for the same reason).
        inference: defaults of ``sample``; ``steps`` must be 1.
    """

    name = "regression"

    def __init__(self, prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)

    def resolve(self, inference, defaults: bool = True) -> Inference:
        inf = super().resolve(inference, defaults)
        require(inf.steps in (None, 1), "inference.steps",
                f"regression is one deterministic network call; steps must be 1, got {inf.steps}")
        return inf

    def from_data_prediction(self, z: Tensor, t: Tensor, x_hat: Tensor) -> Tensor:
        return x_hat

    @staticmethod
    def _predict(net, like: Tensor, cond: Tensor | None) -> Tensor:
        one = torch.ones(like.shape[0], device=like.device, dtype=like.dtype)
        return net(torch.zeros_like(like), one, one, cond)                  # (B, *shape)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        loss = per_sample_mse(self._predict(net, x, cond), x)              # (B,)
        return LossOutput(loss, {"mse": loss.mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        self.resolve(inference)
        return self._predict(net, noise, cond)
