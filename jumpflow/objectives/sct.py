"""Continuous-time consistency training (sCT): Lu & Song, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models" (ICLR 2025, arXiv:2410.11081), written in
jumpflow's linear flow time instead of TrigFlow."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import Inference, LossOutput, Objective, TimeSampler, jvp, require
from jumpflow.objectives.consistency import consistency_sample
from jumpflow.objectives.curriculum import TangentWarmup
from jumpflow.timeconv import expand_like, interpolate, velocity

WEIGHTINGS = ("learned", "fixed")


class TimeWeight(nn.Module):
    """sCM's adaptive weight ``w_phi(t)``: Fourier features of ``t`` and a linear layer,
    zero-initialised (weight ``e^0 = 1`` at the start). ``(B,) -> (B,)``."""

    def __init__(self, n_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freqs, dtype=torch.float32), persistent=False)
        self.linear = nn.Linear(2 * n_freqs + 1, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        t = t.to(self.linear.weight.dtype)
        angles = t[:, None] * self.freqs.to(t.dtype)                           # (B, F)
        return self.linear(torch.cat([t[:, None], angles.sin(), angles.cos()], dim=1))[:, 0]


class ContinuousConsistency(TangentWarmup, Objective):
    """sCT in the linear (TrigFlow-free) parameterisation.

    **Consistency function.** ``f(z_t, t) = z_t - t u(z_t, t)`` with ``u(z, t) = net(z, t, h=t)``
    (the jump from ``t`` to data, as in :class:`~jumpflow.objectives.consistency.ConsistencyTraining`;
    ``f(z, 0) = z`` for any weights). TrigFlow's ``f = cos(t) x_t - sin(t) sigma_d F`` becomes
    ``c_skip = 1``, ``c_out = -t`` on the flow-scaled input.

    **Tangent.** Continuous-time CT follows ``df/dt`` along the path ``dz/dt = v = eps - x``::

        du/dt = d_z u . v + d_t u + d_h u            (one JVP, tangent (v, 1), h = t)
        df/dt = v - u - t du/dt                      (= u_tgt - u, MeanFlow's target at r = 0)

    and the loss gradient is ``E[w (d f_theta)^T df-/dt]`` (sCM's continuous CT). With ``d f = -t d u`` it
    is the gradient of the surrogate on the raw output::

        g  = -t df-/dt = t (u- - v) + r_warm t^2 du-/dt           (u-, du-/dt: stop-grad)
        g <- g / (||g|| + c)                                      (tangent normalisation, c = 0.1)
        L  = e^{w_phi(t)} * mean_D || u - sg(u- - g) ||^2 - w_phi(t)    (learned, sCM's adaptive weight)
        L  =                mean_D || u - sg(u- - g) ||^2                (fixed weight)

    ``||g||`` is the per-sample L2 norm over all data dims. ``r_warm`` ramps linearly from 0 to
    1 over ``tangent_warmup_steps`` (sCM's tangent warm-up scales the term that carries the
    network's time derivative; here that is ``t^2 du/dt``; step counter in ``net.aux["sct_step"]``). ``w_phi`` is a small learned module in ``net.aux["sct_weight"]``,
    trained with the backbone; with ``adaptive_weight="fixed"`` the weight is 1, which the
    tangent normalisation keeps on a sane scale (sCM's prior weight ``1 / (sigma_d tan t)`` is
    a TrigFlow quantity with no direct analogue here; we do not try to imitate it).

    Times: ``t ~ time_sampler``; sCM's proposal ``tan(t') = e^tau / sigma_d``,
    ``tau ~ N(P_mean, P_std)`` is EDM's ``sigma = e^tau``, which in flow time is
    ``t = sigma / (1 + sigma)``, i.e. logit-normal ``(P_mean, P_std)``: sCT's CIFAR values
    (-1.0, 1.4) are the default. The value of ``L`` is ``||g||^2``-sized, not an error: judge
    training by ``metrics["tangent_norm"]`` (``||g||`` before normalisation) or by samples.
    Sampling: ``x = f(eps, 1)`` (1 NFE, the same jump as MeanFlow's); more steps re-noise
    (:func:`~jumpflow.objectives.consistency.consistency_sample`, ``t_max = 1``).

    Shapes: ``x, eps, z, u, g: (B, *shape)``; ``t: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        time_sampler: ``TimeSampler`` kwargs (default logit-normal(-1.0, 1.4)).
        tangent_c: normalisation constant ``c`` (sCM: 0.1); ``null``: no normalisation.
        adaptive_weight: ``"learned"`` (``w_phi(t)``) or ``"fixed"`` (weight 1).
        tangent_warmup_steps: steps of the linear warm-up of the ``du/dt`` term (0: none).
        prediction, data_t_min: ``"data"``: the backbone estimates clean data,
            ``u = (z - x_hat) / max(t, data_t_min)``.
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "sct"
    uses_jvp = True
    counter_key = "sct_step"
    weight_key = "sct_weight"

    def __init__(self, time_sampler: dict | None = None, tangent_c: float | None = 0.1,
                 adaptive_weight: str = "learned", tangent_warmup_steps: int = 10_000,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        self.time_sampler = TimeSampler(**(time_sampler or {"kind": "logit_normal", "mean": -1.0, "std": 1.4}),
                                        name="time_sampler")
        self.init_tangent(tangent_c, tangent_warmup_steps)
        require(adaptive_weight in WEIGHTINGS, "adaptive_weight",
                f"must be one of {WEIGHTINGS}, got {adaptive_weight!r}")
        self.adaptive_weight = adaptive_weight

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        mods = self.warmup_modules()
        if self.adaptive_weight == "learned":
            mods[self.weight_key] = TimeWeight()
        return mods

    def tangent(self, net, z: Tensor, t: Tensor, v: Tensor, cond: Tensor | None):
        """``u(z, t, h=t)`` (with grad) and ``du/dt`` along ``(v, 1)`` (total derivative, ``h = t``)."""
        def u_fn(z_, t_):
            return net(z_, t_, t_, cond)
        return jvp(u_fn, (z, t), (v, torch.ones_like(t)))                    # (B, *shape) each

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        eps = torch.randn_like(x)                                            # (B, *shape)
        t = self.time_sampler(x.shape[0], x.device, x.dtype)                 # (B,)
        z, v = interpolate(x, eps, t), velocity(x, eps)
        u, dudt = self.tangent(net, z, t, v, cond)
        tt = expand_like(t, u)
        with torch.no_grad():
            g = tt * (u - v) + self.warmup(net) * tt * tt * dudt             # -t df/dt, (B, *shape)
            g_norm = g.flatten(1).norm(dim=1)                                # (B,)
            if self.tangent_c is not None:
                g = g / expand_like(g_norm + self.tangent_c, g)
        sq = (u - (u.detach() - g)).pow(2).flatten(1).mean(1)                # (B,)
        if self.adaptive_weight == "learned":
            w = net.aux[self.weight_key](t).to(sq.dtype)                     # (B,)
            loss = torch.exp(w) * sq - w
        else:
            loss = sq
        return LossOutput(loss, {"tangent_norm": g_norm.mean().item(), "mse": sq.mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        return consistency_sample(net, noise, cond, self.resolve(inference).steps, 1.0)
