"""Shortcut models: Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut Models"
(ICLR 2025, arXiv:2410.12557)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from jumpflow.objectives import base
from jumpflow.objectives.base import Inference, LossOutput, Objective, TimeSampler, require
from jumpflow.timeconv import expand_like, interpolate, velocity


class Shortcut(Objective):
    """A velocity model conditioned on the step size, trained to be self-consistent.

    The paper runs time the other way (``t' = 0`` noise, ``t' = 1`` data,
    ``x_{t'} = (1 - t') x_0 + t' x_1``) and predicts the direction ``s(x_{t'}, t', d)`` with
    ``x_{t'+d} = x_{t'} + d s``. In jumpflow's time ``t = 1 - t'`` the same jump is
    ``z_{t-d} = z_t - d u(z_t, t, h=d)``, so ``u = -s`` and the step size ``d`` is the
    backbone's ``h``. The paper's two targets become::

        flow matching (h = 0):   u(z_t, t, 0)   ~  v = eps - x
        self-consistency:        u(z_t, t, 2d)  ~  sg( (u1 + u2) / 2 )
                                 u1 = u-(z_t, t, d),  z' = z_t - d u1,  u2 = u-(z', t - d, d)

    ``u-`` is the online net under stop-grad (``target_decay: null``, the default) or an EMA
    copy of the backbone (``target_decay`` a number). A share ``self_consistency_fraction`` of each batch (the first rows) is
    trained for self-consistency: full jumps ``2d`` in ``{1, 1/2, ..., 2 min_step}``
    (uniform over the levels), start times on the grid of that jump
    (``t = 1 - k 2d``, so the jump ends at ``t - 2d >= 0``); the rest is flow matching at
    ``t ~ time_sampler``. As in the paper's code the smallest step ``min_step`` is the flow
    itself: a teacher half-step of ``min_step`` is evaluated at ``h = 0`` (an Euler step of the
    instantaneous velocity), and sampling with ``1 / steps <= min_step`` uses ``h = 0``.

    Sampling: ``steps`` jumps of ``h = 1 / steps`` (1, 2, 4, ... are the trained sizes), with
    optional classifier-free guidance (``class_drop_prob > 0`` in training).

    Shapes: ``x, eps, z_t, u: (B, *shape)``; ``t, d: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        self_consistency_fraction: share of the batch with self-consistency targets, in
            ``[0, 1)`` (paper: 1/4; the authors' code uses 1/8).
        min_step: the smallest step, ``2^-n`` with ``n >= 1`` (paper: 1/128).
        target_decay: EMA decay of a teacher copy ``net.aux["shortcut_target"]`` in ``[0, 1)``;
            ``null`` (default) uses the online net under stop-grad. An EMA teacher of 0.999 suits
            runs of 10^5 steps and more; at this repository's scales (10^3-10^4 steps) it lags the
            student: on the 2-point toy after 1,000 steps the 1-NFE error
            is 1.99 with 0.999, 0.13 with 0.99 and 0.15 with the online net.
        target_clip: clamp the self-consistency target to ``[-c, c]`` (``null``: off; the
            authors' code clips at 4 on image latents).
        time_sampler: ``TimeSampler`` kwargs of the flow-matching share (default uniform).
        class_drop_prob: probability of training with the null condition (for guidance).
        prediction, data_t_min: as for Flow Matching (``"data"``: the backbone estimates clean
            data, ``u = (z - x_hat) / max(t, data_t_min)``).
        inference: defaults of ``sample`` (``steps``: 1; ``guidance``: 1.0).
    """

    name = "shortcut"
    guidance_at_sampling = True

    def __init__(self, self_consistency_fraction: float = 0.25, min_step: float = 1.0 / 128,
                 target_decay: float | None = None, target_clip: float | None = None,
                 time_sampler: dict | None = None, class_drop_prob: float = 0.0,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        require(0.0 <= self_consistency_fraction < 1.0, "self_consistency_fraction",
                f"must be in [0, 1) (the rest is flow matching, which anchors h = 0), got {self_consistency_fraction}")
        levels = -math.log2(min_step) if 0 < min_step < 1 else 0.0
        require(0 < min_step <= 0.5 and abs(levels - round(levels)) < 1e-9, "min_step",
                f"must be a power of two 2^-n with n >= 1 (e.g. 0.0078125 = 1/128), got {min_step}")
        require(target_decay is None or 0.0 <= target_decay < 1.0, "target_decay",
                f"must be in [0, 1) or null (online net), got {target_decay}")
        require(target_clip is None or target_clip > 0, "target_clip", f"must be > 0 or null, got {target_clip}")
        require(0.0 <= class_drop_prob < 1.0, "class_drop_prob", f"must be in [0, 1), got {class_drop_prob}")
        self.self_consistency_fraction, self.min_step = float(self_consistency_fraction), float(min_step)
        self.levels = round(levels)                       # full jumps 2d = 2^-k, k = 0 .. levels - 1
        self.target_decay, self.target_clip, self.class_drop_prob = target_decay, target_clip, class_drop_prob
        self.time_sampler = TimeSampler(**(time_sampler or {"kind": "uniform"}), name="time_sampler")

    # -- teacher ---------------------------------------------------------------------------
    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        if self.target_decay is None:
            return {}
        target = copy.deepcopy(backbone)
        target.requires_grad_(False)
        return {"shortcut_target": target}

    @torch.no_grad()
    def on_step_end(self, net) -> None:
        if self.target_decay is None:
            return
        for p_t, p in zip(net.aux["shortcut_target"].parameters(), net.backbone.parameters()):
            p_t.lerp_(p.detach(), 1.0 - self.target_decay)

    def _teacher(self, net):
        return net if self.target_decay is None else net.aux["shortcut_target"]

    def _h(self, d: Tensor) -> Tensor:
        """The backbone's ``h`` for a jump of ``d``: ``0`` at (or below) the smallest step."""
        return torch.where(d <= self.min_step * (1 + 1e-4), torch.zeros_like(d), d)

    @torch.no_grad()
    def self_consistency_target(self, teacher, z: Tensor, t: Tensor, d: Tensor, cond: Tensor | None) -> Tensor:
        """``(u1 + u2) / 2``: the average velocity of two half-jumps of ``d`` from ``(z, t)``."""
        h = self._h(d)
        u1 = teacher(z, t, h, cond)                                        # (B, *shape)
        z_mid = z - expand_like(d, z) * u1
        u2 = teacher(z_mid, t - d, h, cond)                                # (B, *shape)
        target = 0.5 * (u1 + u2)
        if self.target_clip is not None:
            target = target.clamp(-self.target_clip, self.target_clip)
        return target

    def sample_jumps(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        """``(t, d)`` of ``n`` self-consistency rows: half-jump ``d`` with ``2d = 2^-k``,
        ``k ~ U{0..levels-1}``, and ``t = 1 - j 2d``, ``j ~ U{0 .. 1/(2d) - 1}``."""
        k = torch.randint(0, self.levels, (n,), device=device)
        full = torch.pow(2.0, -k.to(torch.float64))                        # (n,) in {1, 1/2, ...}
        j = torch.floor(torch.rand(n, device=device, dtype=torch.float64) / full)
        t = 1.0 - j * full
        return t.to(dtype), (0.5 * full).to(dtype)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        n_sc = int(b * self.self_consistency_fraction)
        eps = torch.randn_like(x)                                          # (B, *shape)
        cond = base.drop_condition(net, cond, self.class_drop_prob)
        t_fm = self.time_sampler(b - n_sc, x.device, x.dtype)              # (B - n_sc,)
        t_sc, d_sc = self.sample_jumps(n_sc, x.device, x.dtype)            # (n_sc,) each
        t = torch.cat([t_sc, t_fm])                                        # (B,)
        h = torch.cat([2.0 * d_sc, torch.zeros_like(t_fm)])                # (B,)
        z = interpolate(x, eps, t)                                         # (B, *shape)
        target = velocity(x, eps)                                          # (B, *shape)
        if n_sc > 0:
            sc = self.self_consistency_target(self._teacher(net), z[:n_sc], t_sc, d_sc,
                                              None if cond is None else cond[:n_sc])
            target = torch.cat([sc, target[n_sc:]])
        loss = base.per_sample_mse(net(z, t, h, cond), target)             # (B,)
        metrics = {"mse": loss.mean().item(), "fm": loss[n_sc:].mean().item()}
        if n_sc > 0:
            metrics["self_consistency"] = loss[:n_sc].mean().item()
        return LossOutput(loss, metrics)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        inf = self.resolve(inference)
        fn = self.guided(net, cond, inf.guidance)
        return base.jump_sample(lambda z, t, h: fn(z, t, self._h(h)), noise, inf.steps, average=True)
