"""Terminal Velocity Matching: Zhou, Ermon, Song et al., "Terminal Velocity Matching"
(arXiv 2511.19797, 2025)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import (
    LossOutput,
    Objective,
    TimeSampler,
    jump_sample,
    jvp_context,
    per_sample_mse,
    require,
)
from jumpflow.timeconv import expand_like, interpolate, velocity


class TerminalVelocityMatching(Objective):
    """Match the derivative of a jump at its *terminal* time.

    The net ``F_theta(z_t, t, h)`` is the average velocity of the jump ``t -> s = t - h``, so
    the jump's end point is ``f(s) = z_t + (s - t) F_theta(z_t, t, t - s)``. Its derivative in
    the terminal time must be the instantaneous velocity at the end point (paper eq. 9)::

        df/ds = F + (s - t) dF/ds                 (dF/ds: one JVP along s, gradient flows through it)
        L_TV  = || df/ds - sg(F_ema(f(s), s, 0)) ||^2
        L_FM  = || F_theta(z_t, t, 0) - (eps - x) ||^2
        L     = L_TV + lambda_fm * L_FM

    with the gap ``t - s ~ gap_sampler`` and ``s ~ terminal_sampler * (1 - gap)``.
    ``F_ema`` is an EMA copy of the backbone (decay ``target_decay``), kept in
    ``net.aux["tvm_target"]`` and updated by ``on_step_end``. Sampling chains exact jumps
    (1 step: ``x = eps - F(eps, 1, 1)``). With ``prediction="data"`` the backbone (and its EMA
    copy) estimates clean data and ``F = (z_t - x_hat) / t`` (``Objective.from_data_prediction``).

    Shapes: ``x, z_t, F, f: (B, *shape)``; ``t, s: (B,)``.
    """

    name = "tvm"
    uses_jvp = True

    def __init__(self, gap_sampler: dict | None = None, terminal_sampler: dict | None = None,
                 lambda_fm: float = 1.0, target_decay: float = 0.99, adaptive_c: float | None = None,
                 prediction: str = "native", data_t_min: float = 0.05):
        self.set_prediction(prediction, data_t_min)
        self.gap_sampler = TimeSampler(**(gap_sampler or {"kind": "logit_normal", "mean": -0.8, "std": 1.0}),
                                       name="gap_sampler")
        self.terminal_sampler = TimeSampler(**(terminal_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                            name="terminal_sampler")
        require(lambda_fm >= 0, "lambda_fm", f"must be >= 0, got {lambda_fm}")
        require(0.0 <= target_decay < 1.0, "target_decay", f"must be in [0, 1), got {target_decay}")
        require(adaptive_c is None or adaptive_c > 0, "adaptive_c", f"must be > 0 or None, got {adaptive_c}")
        self.lambda_fm, self.target_decay, self.adaptive_c = lambda_fm, target_decay, adaptive_c

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        target = copy.deepcopy(backbone)
        target.requires_grad_(False)
        return {"tvm_target": target}

    @torch.no_grad()
    def on_step_end(self, net) -> None:
        target = net.aux["tvm_target"]
        for p_t, p in zip(target.parameters(), net.backbone.parameters()):
            p_t.lerp_(p.detach(), 1.0 - self.target_decay)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        eps = torch.randn_like(x)                                            # (B, *shape)
        gap = self.gap_sampler(b, x.device, x.dtype)                         # (B,)
        s = self.terminal_sampler(b, x.device, x.dtype) * (1.0 - gap)        # (B,)
        t = s + gap                                                          # (B,)
        z_t = interpolate(x, eps, t)                                         # (B, *shape)

        def jump_velocity(s_):
            return net(z_t, t, t - s_, cond)
        with jvp_context():
            F, dF_ds = torch.func.jvp(jump_velocity, (s,), (torch.ones_like(s),))  # (B, *shape) each
        f = z_t + expand_like(s - t, z_t) * F                                # (B, *shape)
        df_ds = F + expand_like(s - t, z_t) * dF_ds                          # (B, *shape)
        with torch.no_grad():
            target = net.aux["tvm_target"](f.detach(), s, torch.zeros_like(s),
                                           None if cond is None else cond.detach())
        l_tv = per_sample_mse(df_ds, target)                                 # (B,)
        if self.adaptive_c is not None:
            l_tv = l_tv / (l_tv.detach() + self.adaptive_c)
        l_fm = per_sample_mse(net(z_t, t, torch.zeros_like(t), cond), velocity(x, eps))   # (B,)
        loss = l_tv + self.lambda_fm * l_fm
        return LossOutput(loss, {"terminal": l_tv.mean().item(), "fm": l_fm.mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, steps: int = 1) -> Tensor:
        return jump_sample(lambda z, t, h: net(z, t, h, cond), noise, steps, average=True)
