"""alpha-Flow: Zhang, Siarohin, Menapace, Vasilkovsky, Tulyakov, Qu, Skorokhodov, "AlphaFlow:
Understanding and Improving MeanFlow Models" (ICLR 2026, arXiv:2510.20771)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import LossOutput, require
from jumpflow.objectives.curriculum import StepCounter, check_ramp, counter_of, ramp
from jumpflow.objectives.meanflow import MeanFlow
from jumpflow.timeconv import expand_like


class AlphaFlow(MeanFlow):
    """The alpha-Flow family: trajectory flow matching (``alpha = 1``) to MeanFlow (``alpha -> 0``).

    With the consistency step ratio ``alpha`` in ``(0, 1]`` and the intermediate time
    ``s = alpha r + (1 - alpha) t`` (a step ``alpha (t - r)`` from ``t`` towards ``r``; the paper's
    time runs the same way as jumpflow's, ``t = 1`` noise)::

        z_s    = z_t - alpha (t - r) v                        (on the conditional path, v = eps - x)
        u_tgt  = alpha v + (1 - alpha) sg(u(z_s, r, s))       (the paper's target)
        L      = w_alpha * || u(z_t, r, t) - u_tgt ||^2,      w_alpha = alpha for r != t, 1 for r = t

    then MeanFlow's adaptive weight ``1 / sg(||err||^2 + c)^p`` (``MeanFlow.adaptive_weight``).
    ``alpha = 1`` is trajectory flow matching (``u_tgt = v``, no extra call). As ``alpha -> 0``,
    ``(u - u_tgt) / alpha -> u - (v - (t - r) du/dt)``: the residual over ``alpha`` tends to
    MeanFlow's. At ``alpha = 0`` exactly the JVP branch runs and the loss *is* MeanFlow's (same
    times, noise and weight, hence equal on the same seed). The paper writes the weight as
    ``alpha^-1`` on the unweighted loss (its eq. for ``L_alpha``, which makes the gradient
    tend to MeanFlow's); the authors' released code (snap-research/alphaflow) instead multiplies
    the adaptively weighted loss of the ``r != t`` rows by ``alpha``, which is what this class
    does. Samples with ``r = t`` are flow matching (target ``v``, weight 1).

    **Curriculum.** ``alpha`` follows ``alpha_schedule`` of the training step (a buffer in
    ``net.aux["alpha_flow_step"]``, advanced by ``on_step_end``, checkpointed): the paper's
    sigmoid from 1 to 0 between ``alpha_steps = [begin, end]`` with sharpness ``alpha_gamma``
    (25); values below ``alpha_clamp`` (5e-3) become 0 (MeanFlow) and above
    ``1 - alpha_clamp`` become 1.

    Everything else (time sampler, ``ratio_r_neq_t``, tangent, embeddings, adaptive weight,
    training-time guidance ``omega, kappa``, class dropout, data prediction, sampling) is
    :class:`~jumpflow.objectives.meanflow.MeanFlow`'s; only the default ``ratio_r_neq_t`` is
    0.5, as in the authors' B/2 and XL/2 recipes (their ``ratio_fm = 0.5``). Guidance, when on,
    replaces ``v`` by ``v_g`` in both branches (as the authors' code does).

    Shapes: ``x, eps, z_t, z_s, u: (B, *shape)``; ``t, r, s: (B,)``.

    Args:
        alpha_schedule: ``sigmoid`` | ``linear`` | ``constant`` (``alpha = alpha_start``).
        alpha_start, alpha_end: values before ``begin`` and after ``end`` (1 and 0).
        alpha_steps: ``[begin, end]`` training steps of the transition.
        alpha_gamma: sigmoid sharpness.
        alpha_clamp: floor below which ``alpha`` is 0 (and ceiling ``1 - alpha_clamp`` -> 1).
        target_clip: clamp ``u_tgt`` of the ``0 < alpha < 1`` branch to ``[-c, c]`` (``null``: off;
            the authors use 4 with guidance on ImageNet latents).
        time_sampler, ratio_r_neq_t, tangent, time_embedding, adaptive_p, adaptive_c, adaptive_reduce,
        omega, kappa, guidance_interval, class_drop_prob, prediction, data_t_min, inference: as for
            :class:`MeanFlow` (``ratio_r_neq_t`` defaults to 0.5 here; the authors' code reduces
            ``||err||^2`` in the adaptive weight with the mean over dims, ``adaptive_reduce="mean"``).
    """

    name = "alpha_flow"
    uses_jvp = True
    counter_key = "alpha_flow_step"

    def __init__(self, alpha_schedule: str = "sigmoid", alpha_start: float = 1.0, alpha_end: float = 0.0,
                 alpha_steps: tuple[int, int] | list[int] = (0, 400_000), alpha_gamma: float = 25.0,
                 alpha_clamp: float = 5e-3, target_clip: float | None = None, time_sampler: dict | None = None,
                 ratio_r_neq_t: float = 0.5, tangent: str = "v_0_1", time_embedding: str = "t_h",
                 adaptive_p: float = 1.0, adaptive_c: float = 1e-2, adaptive_reduce: str = "sum",
                 omega: float = 1.0, kappa: float = 0.0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), class_drop_prob: float = 0.0,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        super().__init__(time_sampler=time_sampler, ratio_r_neq_t=ratio_r_neq_t, tangent=tangent,
                         time_embedding=time_embedding, adaptive_p=adaptive_p, adaptive_c=adaptive_c,
                         adaptive_reduce=adaptive_reduce, omega=omega, kappa=kappa,
                         guidance_interval=guidance_interval, class_drop_prob=class_drop_prob,
                         prediction=prediction, data_t_min=data_t_min, inference=inference)
        self.alpha_begin, self.alpha_end_step = check_ramp(alpha_schedule, alpha_steps, alpha_gamma, "alpha")
        require(0.0 <= alpha_start <= 1.0, "alpha_start", f"must be in [0, 1], got {alpha_start}")
        require(0.0 <= alpha_end <= 1.0, "alpha_end", f"must be in [0, 1], got {alpha_end}")
        require(0.0 <= alpha_clamp < 0.5, "alpha_clamp", f"must be in [0, 0.5), got {alpha_clamp}")
        require(target_clip is None or target_clip > 0, "target_clip", f"must be > 0 or null, got {target_clip}")
        self.alpha_schedule, self.alpha_start, self.alpha_end = alpha_schedule, float(alpha_start), float(alpha_end)
        self.alpha_gamma, self.alpha_clamp, self.target_clip = float(alpha_gamma), float(alpha_clamp), target_clip

    # -- curriculum ------------------------------------------------------------------------
    def schedule_lengths(self) -> dict[str, int]:
        return {} if self.alpha_schedule == "constant" else {"alpha_steps": self.alpha_end_step}

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {**super().extra_modules(backbone), self.counter_key: StepCounter()}

    def on_step_end(self, net) -> None:
        super().on_step_end(net)
        counter_of(net, self.counter_key, self.name).advance()

    def alpha_at(self, step: int) -> float:
        """``alpha`` at training step ``step`` (clamped: exactly 0 or 1 near the ends)."""
        a = ramp(step, self.alpha_schedule, self.alpha_start, self.alpha_end, self.alpha_begin,
                 self.alpha_end_step, self.alpha_gamma)
        if a < self.alpha_clamp:
            return 0.0
        if a > 1.0 - self.alpha_clamp:
            return 1.0
        return a

    def current_alpha(self, net) -> float:
        if self.alpha_schedule == "constant":
            return self.alpha_at(0)
        return self.alpha_at(int(counter_of(net, self.counter_key, self.name).step))

    # -- loss --------------------------------------------------------------------------------
    @torch.no_grad()
    def alpha_target(self, net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor | None,
                     alpha: float) -> Tensor:
        """``alpha v + (1 - alpha) sg(u(z_t - alpha (t - r) v, r, s))`` for ``r != t`` rows, ``v``
        where ``r = t``; ``alpha`` in ``(0, 1]``. ``(B, *shape)``."""
        if alpha == 1.0:
            return v
        s = t - alpha * (t - r)                                              # (B,)
        z_s = z - expand_like(alpha * (t - r), z) * v                        # (B, *shape)
        u_s = net(z_s, s, self._second_time(s, r), cond)
        target = alpha * v + (1.0 - alpha) * u_s
        if self.target_clip is not None:
            target = target.clamp(-self.target_clip, self.target_clip)
        return torch.where(expand_like(r == t, v), v, target)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        alpha = self.current_alpha(net)
        t, r, z, v, cond = self.training_draw(net, x, cond)

        if alpha == 0.0:
            u, u_tgt = self.prediction_and_target(net, z, r, t, v, cond)    # MeanFlow's JVP branch
            w_alpha = torch.ones_like(t)
        else:
            u = net(z, t, self._second_time(t, r), cond)                     # (B, *shape)
            u_tgt = self.alpha_target(net, z, r, t, v, cond, alpha)
            w_alpha = torch.where(r == t, torch.ones_like(t), torch.full_like(t, alpha))
        err = u - u_tgt                                                      # (B, *shape)
        sq = err.pow(2).flatten(1).mean(1)                                   # (B,)
        loss = w_alpha * self.adaptive_weight(err) * sq
        return LossOutput(loss, {"mse": sq.mean().item(), "alpha": alpha,
                                 "frac_r_neq_t": (r != t).float().mean().item()})
