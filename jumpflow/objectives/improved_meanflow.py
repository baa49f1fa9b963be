"""Improved MeanFlow (iMF): Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models" (2025, arXiv:2512.02012)."""

from __future__ import annotations

import torch
from torch import Tensor

from jumpflow.objectives.base import (
    Inference,
    LossOutput,
    drop_condition,
    jump_sample,
    jvp,
    require,
)
from jumpflow.objectives.meanflow import AverageVelocityObjective
from jumpflow.timeconv import expand_like, interpolate, velocity


class ImprovedMeanFlow(AverageVelocityObjective):
    """MeanFlow reformulated as a loss on the instantaneous velocity.

    The net is MeanFlow's average velocity ``u(z_t, r, t) = net(z_t, t, h=t-r)``. The MeanFlow
    identity ``v = u + (t - r) du/dt`` defines a *compound* velocity from it, and the loss
    regresses that onto the (conditional) velocity, whose target no longer contains the
    network::

        v_hat  = sg(u(z_t, t, t))                          the model's own velocity (h = 0)
        du/dt  = d_z u . v_hat + d_t u                     one JVP, tangent (v_hat, 0, 1) for (z, r, t)
        V      = u(z_t, r, t) + (t - r) sg(du/dt)
        L      = w mean_d (V - v)^2,   v = eps - x,   w = 1 / sg(||V - v||^2 + c)^p
               (+ v_loss_weight * w' || u(z_t, t, t) - v ||^2)

    Unlike MeanFlow, the JVP tangent is the *predicted* ``v_hat`` (not ``eps - x``), so ``du/dt``
    is the derivative along the model's own flow; gradient flows through ``u`` only. Rows
    with ``r = t`` (a ``1 - ratio_r_neq_t`` share; the paper: half) give ``V = u(z_t, t, t)``,
    plain flow matching, which is what trains ``v_hat``. The authors give ``v_hat`` its own
    auxiliary head trained on every row; without a second head the optional
    ``v_loss_weight`` term (same adaptive weight) plays that role on ``u(z_t, t, t)`` at the
    price of one more backward pass (0: off).

    **Guidance hook (not wired).** iMF conditions the network on the guidance scale
    ``omega`` and interval (``t_min, t_max``) and trains with
    ``v_target = v + (1 - 1/omega) (v_c - v_u)``, tangent ``v_c``. That needs a backbone input
    the lead will add; the one place to plug it is :meth:`velocity_target_and_tangent`, which
    returns ``(v_target, tangent, v_hat)``; here ``(eps - x, sg(u(z_t, t, t | c)), u(z_t, t, t | c))``
    (a guided version would return ``v + (1 - 1/omega)(v_c - v_u)``, ``sg(v_c)``, ``v_c``).
    ``class_drop_prob`` already trains the null condition.

    One-step sample: ``x = eps - u(eps, 0, 1)``; ``steps > 1`` chains exact jumps.

    Shapes: ``x, eps, z_t, u, V: (B, *shape)``; ``t, r: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        time_sampler: kwargs of ``TimeSampler`` for ``(t, r)`` (logit-normal(-0.4, 1)).
        ratio_r_neq_t: share of the batch with ``r != t`` (iMF: 0.5).
        adaptive_p, adaptive_c: adaptive weight power and constant (1, 0.01).
        adaptive_reduce: ``||err||^2`` in the weight summed (``"sum"``, the authors' code) or
            averaged (``"mean"``) over the dims; the loss itself is mean-scale, as MeanFlow's.
        v_loss_weight: weight of the extra flow-matching term on ``u(z_t, t, t)`` (0: off).
        class_drop_prob: probability of training with the null condition.
        prediction, data_t_min: ``"data"``: the backbone estimates clean data,
            ``u = (z - x_hat) / max(t, data_t_min)``.
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "improved_meanflow"
    uses_jvp = True

    def __init__(self, time_sampler: dict | None = None, ratio_r_neq_t: float = 0.5, adaptive_p: float = 1.0,
                 adaptive_c: float = 1e-2, adaptive_reduce: str = "sum", v_loss_weight: float = 0.0,
                 class_drop_prob: float = 0.0,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.init_average_velocity(time_sampler, ratio_r_neq_t, adaptive_p, adaptive_c, adaptive_reduce,
                                   class_drop_prob, prediction, data_t_min, inference)
        require(v_loss_weight >= 0, "v_loss_weight", f"must be >= 0, got {v_loss_weight}")
        self.v_loss_weight = v_loss_weight

    def velocity_target_and_tangent(self, net, z: Tensor, t: Tensor, v: Tensor, cond: Tensor | None):
        """The guidance hook: ``(v_target, tangent, v_hat)``: the loss target, the JVP tangent in
        ``z`` and the model's ``u(z_t, t, t)`` (with grad when ``v_loss_weight > 0``, for the
        extra term). All ``(B, *shape)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.v_loss_weight > 0):
            v_hat = net(z, t, torch.zeros_like(t), cond)                      # (B, *shape)
        return v, v_hat.detach(), v_hat

    def compound_velocity(self, net, z: Tensor, r: Tensor, t: Tensor, tangent: Tensor, cond: Tensor | None):
        """``V = u(z, r, t) + (t - r) sg(du/dt)`` with ``du/dt`` along ``(tangent, 0, 1)``."""
        def u_fn(z_, r_, t_):
            return net(z_, t_, t_ - r_, cond)
        u, dudt = jvp(u_fn, (z, r, t), (tangent, torch.zeros_like(r), torch.ones_like(t)))
        return u + expand_like(t - r, u) * dudt.detach()

    def _weighted(self, err: Tensor) -> Tensor:
        """``w * mean_d err^2``, ``w = 1 / sg(||err||^2 + c)^p`` (``||err||^2`` summed over the
        dims, as the authors' code; ``"mean"`` with ``adaptive_reduce``): ``(B, *shape) -> (B,)``."""
        return self.adaptive_weight(err) * err.pow(2).flatten(1).mean(1)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        eps = torch.randn_like(x)                                            # (B, *shape)
        t, r = self.sample_times(x.shape[0], x.device, x.dtype)              # (B,), (B,)
        z = interpolate(x, eps, t)                                           # (B, *shape)
        cond = drop_condition(net, cond, self.class_drop_prob)
        v_target, tangent, v_hat = self.velocity_target_and_tangent(net, z, t, velocity(x, eps), cond)
        V = self.compound_velocity(net, z, r, t, tangent, cond)              # (B, *shape)
        err = V - v_target.detach()                                          # (B, *shape)
        loss = self._weighted(err)                                           # (B,)
        metrics = {"mse": err.detach().pow(2).mean().item(), "frac_r_neq_t": (r != t).float().mean().item()}
        if self.v_loss_weight > 0:
            err_v = v_hat - v_target.detach()
            loss = loss + self.v_loss_weight * self._weighted(err_v)
            metrics["mse_v"] = err_v.detach().pow(2).mean().item()
        return LossOutput(loss, metrics)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        steps = self.resolve(inference).steps
        return jump_sample(lambda z, t, h: net(z, t, h, cond), noise, steps, average=True)
