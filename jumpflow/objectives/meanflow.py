"""MeanFlow: Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling"
(arXiv:2505.13447, 2025). Every knob of the paper's ablation (Table 1) is an argument."""

from __future__ import annotations

import torch
from torch import Tensor

from jumpflow.objectives import base
from jumpflow.objectives.base import (
    ADAPTIVE_REDUCTIONS,
    Inference,
    LossOutput,
    Objective,
    TimeSampler,
    adaptive_loss_weight,
    require,
)
from jumpflow.timeconv import expand_like, interpolate, velocity

TANGENTS = ("v_0_1", "v_0_0", "v_1_0", "v_1_1")
JVP_ROWS = ("auto", "jump", "all")
# jvp_rows="auto": a batch of at most this many numbers takes one JVP over every row. Below it a
# step is dispatch-bound and the split's second network call costs more than the JVP rows it saves
# (bench.backbones, one CPU thread: UNet1D-S / -M at 8 x 16 x 7 = 896 numbers, 1.43 / 1.26x a Flow
# Matching step whole against 1.77 / 1.48x split); above it the split pays (UNet1D-S at 64 rows,
# 7,168 numbers: 1.44x split against 1.48x; DiT-S/2 at 8 x 4 x 32 x 32: 1.13x against 1.54x).
JVP_ALL_MAX_ELEMENTS = 2048


class AverageVelocityObjective(Objective):
    """What the MeanFlow family shares, written once: the ``(t, r)`` sampler, the adaptive
    weight and the validation of their knobs (MeanFlow, improved MeanFlow, alpha-Flow)."""

    def init_average_velocity(self, time_sampler: dict | None, ratio_r_neq_t: float, adaptive_p: float,
                              adaptive_c: float, adaptive_reduce: str, class_drop_prob: float, prediction: str,
                              data_t_min: float, inference: dict | None) -> None:
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        self.time_sampler = TimeSampler(**(time_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                        name="time_sampler")
        require(0.0 <= ratio_r_neq_t <= 1.0, "ratio_r_neq_t", f"must be in [0, 1], got {ratio_r_neq_t}")
        require(adaptive_p >= 0, "adaptive_p", f"must be >= 0, got {adaptive_p}")
        require(adaptive_c > 0, "adaptive_c", f"must be > 0, got {adaptive_c}")
        require(adaptive_reduce in ADAPTIVE_REDUCTIONS, "adaptive_reduce",
                f"must be one of {ADAPTIVE_REDUCTIONS}, got {adaptive_reduce!r}")
        require(0.0 <= class_drop_prob < 1.0, "class_drop_prob", f"must be in [0, 1), got {class_drop_prob}")
        self.ratio_r_neq_t, self.adaptive_p, self.adaptive_c = ratio_r_neq_t, adaptive_p, adaptive_c
        self.adaptive_reduce, self.class_drop_prob = adaptive_reduce, class_drop_prob

    def sample_times(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        """``(t, r)``: two draws sorted so ``t >= r``; a ``1 - ratio_r_neq_t`` share gets ``r = t``."""
        a, b = self.time_sampler(n, device, dtype), self.time_sampler(n, device, dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.rand(n, device=device) < self.ratio_r_neq_t
        return t, torch.where(keep, r, t)

    def adaptive_weight(self, err: Tensor) -> Tensor:
        """``w = 1 / sg(||err||^2 + c)^p`` per sample, ``||err||^2`` summed (or averaged, with
        ``adaptive_reduce="mean"``) over the non-batch dims. ``err: (B, *shape) -> (B,)``."""
        return adaptive_loss_weight(err, self.adaptive_p, self.adaptive_c, self.adaptive_reduce)


class MeanFlow(AverageVelocityObjective):
    """Average-velocity objective.

    The net models ``u_theta(z_t, r, t) ~ u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau``
    (called as ``net(z, t, h, c)`` with ``h = t - r``, or ``h = r`` when
    ``time_embedding="t_r"``). The MeanFlow identity (paper eq. 6) gives the target::

        u_tgt = v - (t - r) * du/dt,    du/dt = v * d_z u + d_t u          (eq. 8)
        L = w * mean_d (u_theta(z_t, r, t) - sg(u_tgt))^2,  w = 1 / sg(||err||^2 + c)^p

    ``du/dt`` is one forward-mode JVP (``base.jvp``) of ``u_theta`` along the tangent ``(v, 0, 1)`` for
    ``(z, r, t)``. With guidance folded into training (paper eq. 13-19)::

        v_g = omega * v + kappa * u(z_t, t, t | c) + (1 - omega - kappa) * u(z_t, t, t | null)

    replaces ``v`` (target and tangent) for conditional samples with ``t`` inside the
    guidance interval; ``class_drop_prob`` of samples train the null condition on ``v``.
    One-step sample: ``x = eps - u(eps, 0, 1)``; ``steps > 1`` chains exact jumps.

    Shapes: ``x, eps, z_t, u: (B, *shape)``; ``t, r: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        time_sampler: kwargs of ``TimeSampler`` for ``(t, r)`` (paper: logit-normal(-0.4, 1)).
        ratio_r_neq_t: fraction of the batch with ``r != t`` (paper best: 0.25).
        tangent: JVP tangent for ``(z, r, t)``: ``"v_0_1"`` (correct), others for ablation.
        time_embedding: ``"t_h"`` embeds ``(t, t - r)``, ``"t_r"`` embeds ``(t, r)``.
        adaptive_p, adaptive_c: adaptive loss weight power and constant.
        adaptive_reduce: ``||err||^2`` inside the weight is the ``"sum"`` over dimensions (as both
            official codes compute it; Gsunshine/meanflow sums over pixels) or the
            ``"mean"`` (the earlier behaviour; with ``D`` dimensions it acts as ``c * D`` on the
            sum). The per-sample loss stays mean-scale: ``w * mean_d err^2`` (the official
            ``w * sum_d err^2`` divided by ``D``, a constant factor).
        omega, kappa: guidance mixing (``omega = 1, kappa = 0``: no guidance).
        guidance_interval: ``(t_lo, t_hi)`` in which guidance applies.
        class_drop_prob: probability of training with the null condition.
        prediction: ``"native"`` (the backbone outputs the average velocity; pixel MeanFlow's choice is data) or ``"data"`` (it outputs a
            clean-data estimate, converted by ``from_data_prediction``; the loss is unchanged).
        data_t_min: floor on ``t`` in ``(z - x_hat) / t``.
        jvp_rows: ``"jump"`` (the JVP on the ``r != t`` rows, a plain forward on the rest),
            ``"all"`` (one JVP over the batch) or ``"auto"`` (``"all"`` for a batch of at most
            ``JVP_ALL_MAX_ELEMENTS`` numbers, where a second network call costs more than the rows
            it saves, else ``"jump"``); the same values and gradients, different cost.
        inference: defaults of ``sample`` (``steps``: 1; guidance is folded into training, so
            ``guidance`` must stay 1.0).
    """

    name = "meanflow"
    uses_jvp = True
    jvp_rows = "jump"

    def __init__(self, time_sampler: dict | None = None, ratio_r_neq_t: float = 0.25,
                 tangent: str = "v_0_1", time_embedding: str = "t_h", adaptive_p: float = 1.0,
                 adaptive_c: float = 1e-2, adaptive_reduce: str = "sum", omega: float = 1.0, kappa: float = 0.0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), class_drop_prob: float = 0.0,
                 prediction: str = "native", data_t_min: float = 0.05, jvp_rows: str = "auto",
                 inference: dict | None = None):
        self.init_average_velocity(time_sampler, ratio_r_neq_t, adaptive_p, adaptive_c, adaptive_reduce,
                                   class_drop_prob, prediction, data_t_min, inference)
        require(tangent in TANGENTS, "tangent", f"must be one of {TANGENTS}, got {tangent!r}")
        require(time_embedding in ("t_h", "t_r"), "time_embedding", f"must be 't_h' or 't_r', got {time_embedding!r}")
        require(omega > 0, "omega", f"must be > 0, got {omega}")
        # 1 - omega - kappa may be negative: that is the extrapolation of classifier-free
        # guidance (effective scale omega / (1 - kappa); the paper's B/2 uses 1 and 0.5)
        require(0.0 <= kappa < 1.0, "kappa", f"need 0 <= kappa < 1, got {kappa}")
        lo, hi = guidance_interval
        require(0.0 <= lo < hi <= 1.0, "guidance_interval", f"need 0 <= lo < hi <= 1, got {guidance_interval}")
        require(jvp_rows in JVP_ROWS, "jvp_rows", f"must be one of {JVP_ROWS}, got {jvp_rows!r}")
        self.tangent, self.time_embedding, self.jvp_rows = tangent, time_embedding, jvp_rows
        self.omega, self.kappa, self.guidance_interval = omega, kappa, (float(lo), float(hi))

    @property
    def uses_guidance(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0

    def _second_time(self, t: Tensor, r: Tensor) -> Tensor:
        return t - r if self.time_embedding == "t_h" else r

    def training_draw(self, net, x: Tensor, cond: Tensor | None):
        """``(t, r, z_t, v, cond)`` of one training batch: times, the noisy point, the (guided)
        velocity and the condition after label dropout (shared with the MeanFlow family)."""
        b = x.shape[0]
        eps = torch.randn_like(x)                                   # (B, *shape)
        t, r = self.sample_times(b, x.device, x.dtype)              # (B,), (B,)
        z = interpolate(x, eps, t)                                  # (B, *shape)
        v = velocity(x, eps)                                        # (B, *shape)

        dropped = torch.zeros(b, dtype=torch.bool, device=x.device)
        if cond is not None and self.class_drop_prob > 0:
            dropped = torch.rand(b, device=x.device) < self.class_drop_prob
            cond = torch.where(expand_like(dropped, cond), net.null_cond(cond), cond)
        if cond is not None and self.uses_guidance:
            v = self._guided_velocity(net, z, t, v, cond, dropped)
        return t, r, z, v, cond

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        t, r, z, v, cond = self.training_draw(net, x, cond)

        u, u_tgt = self.prediction_and_target(net, z, r, t, v, cond)   # (B, *shape) each
        err = u - u_tgt                                             # (B, *shape)
        sq = err.pow(2).flatten(1).mean(1)                          # (B,)
        loss = self.adaptive_weight(err) * sq                       # (B,)
        return LossOutput(loss, {"mse": sq.mean().item(), "frac_r_neq_t": (r != t).float().mean().item()})

    def prediction_and_target(self, net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor | None):
        """``u_theta(z, r, t)`` and ``sg(u_tgt) = sg(v - (t - r) du/dt)`` (paper eq. 10).

        The JVP runs on the rows with ``r != t`` only: on the others ``t - r = 0``, the target is
        ``v`` whatever ``du/dt`` is, and a plain forward pass gives the same ``u`` (the paper's
        ``ratio_r_neq_t = 0.25`` leaves three quarters of the batch without a JVP). With
        ``jvp_rows = "all"`` one JVP covers every row instead (one network call: cheaper where a
        batch is a few rows of a small net and per-call overhead dominates). Shapes:
        ``z, v, u, u_tgt: (B, *shape)``; ``r, t: (B,)``; ``cond: (B, ...)`` or ``None``."""
        jump = r != t                                                   # (B,)
        if self.whole_batch_jvp(z.numel()) or bool(jump.all()):
            return self._jvp_prediction_and_target(net, z, r, t, v, cond)
        if not bool(jump.any()):
            return net(z, t, self._second_time(t, r), cond), v.detach()
        flow_rows, jump_rows = (~jump).nonzero(as_tuple=True)[0], jump.nonzero(as_tuple=True)[0]

        def rows(x: Tensor | None, idx: Tensor):
            return None if x is None else x[idx]
        t_f, r_f = t[flow_rows], r[flow_rows]
        u_flow = net(z[flow_rows], t_f, self._second_time(t_f, r_f), rows(cond, flow_rows))    # (B_f, *shape)
        u_jump, tgt_jump = self._jvp_prediction_and_target(net, z[jump_rows], r[jump_rows], t[jump_rows],
                                                           v[jump_rows], rows(cond, jump_rows))  # (B_j, *shape)
        back = torch.argsort(torch.cat([flow_rows, jump_rows]))                                # (B,)
        return torch.cat([u_flow, u_jump])[back], torch.cat([v[flow_rows], tgt_jump])[back].detach()

    def whole_batch_jvp(self, numel: int) -> bool:
        """Whether a batch of ``numel`` numbers takes one JVP over every row (``jvp_rows`` ``all``, or
        ``auto`` at most ``JVP_ALL_MAX_ELEMENTS``) rather than the split."""
        return self.jvp_rows == "all" or (self.jvp_rows == "auto" and numel <= JVP_ALL_MAX_ELEMENTS)

    def _jvp_prediction_and_target(self, net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Tensor | None):
        """``u`` and its target for every row by one JVP along ``(v, 0, 1)`` (or the
        configured tangent)."""
        tz, tr, tt = self._tangents(v)

        def u_fn(z_, r_, t_):
            return net(z_, t_, self._second_time(t_, r_), cond)
        u, dudt = base.jvp(u_fn, (z, r, t), (tz, tr, tt))      # (B, *shape) each
        return u, (v - expand_like(t - r, u) * dudt).detach()

    def _tangents(self, v: Tensor):
        b = v.shape[0]
        one, zero = torch.ones(b, device=v.device, dtype=v.dtype), torch.zeros(b, device=v.device, dtype=v.dtype)
        tz = v if self.tangent[0] == "v" else torch.zeros_like(v)
        tr = one if self.tangent.split("_")[1] == "1" else zero
        tt = one if self.tangent.split("_")[2] == "1" else zero
        return tz, tr, tt

    @torch.no_grad()
    def _guided_velocity(self, net, z, t, v, cond, dropped):
        """Paper eq. 19: mix ``v`` with the model's own conditional / unconditional ``u(z,t,t)``."""
        h0 = torch.zeros_like(t)
        null = net.null_cond(cond)
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h0, h0]) if self.time_embedding == "t_h"
                   else torch.cat([t, t]), torch.cat([cond, null]))
        u_c, u_n = both.chunk(2)
        v_g = self.omega * v + self.kappa * u_c + (1.0 - self.omega - self.kappa) * u_n
        lo, hi = self.guidance_interval
        apply = (~dropped) & (t >= lo) & (t <= hi)
        return torch.where(expand_like(apply, v), v_g, v)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        steps = self.resolve(inference).steps
        if self.time_embedding == "t_h":
            fn = lambda z, t, h: net(z, t, h, cond)
        else:
            fn = lambda z, t, h: net(z, t, t - h, cond)
        return base.jump_sample(fn, noise, steps, average=True)
