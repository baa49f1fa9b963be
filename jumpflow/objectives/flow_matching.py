"""Flow Matching (Lipman et al., 2023, "Flow Matching for Generative Modeling"; rectified
flow of Liu et al., 2023): the multi-step baseline every one-step objective is measured
against."""

from __future__ import annotations

import torch
from torch import Tensor

from jumpflow.objectives.base import (
    Inference,
    LossOutput,
    Objective,
    TimeSampler,
    drop_condition,
    jump_sample,
    per_sample_mse,
    require,
)
from jumpflow.timeconv import interpolate, velocity


class FlowMatching(Objective):
    """Conditional flow matching on the linear path.

    Loss (per sample)::

        L(theta) = || v_theta(z_t, t, h=0 | c) - (eps - x) ||^2,   z_t = (1 - t) x + t eps

    with ``x: (B, *shape)`` data, ``eps ~ N(0, I)`` of the same shape, ``t ~ time_sampler``.
    Sampling integrates ``dz/dt = v`` from ``t = 1`` to ``0`` with ``steps`` Euler or Heun
    steps (``h = 0`` at every call: the net is an instantaneous-velocity model).

    Args:
        time_sampler: ``TimeSampler`` kwargs (kind, mean, std).
        class_drop_prob: probability of training with the null condition (for CFG).
        prediction: ``"native"`` (the backbone outputs the velocity) or ``"data"`` (it outputs a
            clean-data estimate, converted by ``from_data_prediction``; the loss is unchanged).
        data_t_min: floor on ``t`` in ``(z - x_hat) / t``.
        inference: defaults of ``sample``: ``steps`` (100), ``sampler`` (``euler`` | ``heun``),
            ``guidance`` (classifier-free scale, 1.0: none).
    """

    name = "flow_matching"
    samplers = ("euler", "heun")
    guidance_at_sampling = True

    def __init__(self, time_sampler: dict | None = None, class_drop_prob: float = 0.0,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.time_sampler = TimeSampler(**(time_sampler or {"kind": "logit_normal"}), name="time_sampler")
        require(0.0 <= class_drop_prob < 1.0, "class_drop_prob", f"must be in [0, 1), got {class_drop_prob}")
        self.class_drop_prob = class_drop_prob
        self.set_inference_defaults(inference, steps=100, sampler="euler")

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        eps = torch.randn_like(x)                                   # (B, *shape)
        t = self.time_sampler(x.shape[0], x.device, x.dtype)        # (B,)
        z_t = interpolate(x, eps, t)                                # (B, *shape)
        cond = drop_condition(net, cond, self.class_drop_prob)
        pred = net(z_t, t, torch.zeros_like(t), cond)               # (B, *shape)
        loss = per_sample_mse(pred, velocity(x, eps))               # (B,)
        return LossOutput(loss, {"mse": loss.mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        inf = self.resolve(inference)
        fn = self.guided(net, cond, inf.guidance)
        return jump_sample(fn, noise, inf.steps, average=False, solver=inf.sampler)
