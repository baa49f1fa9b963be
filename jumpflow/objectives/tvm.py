"""Terminal Velocity Matching: Zhou, Ermon, Song et al., "Terminal Velocity Matching"
(arXiv 2511.19797, 2025)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import (
    Inference,
    LossOutput,
    Objective,
    TimeSampler,
    jump_sample,
    jvp_context,
    per_sample_mse,
    require,
)
from jumpflow.timeconv import expand_like, interpolate, velocity

S_SAMPLERS = ("truncated", "scaled")


def truncated_logit_normal(mean: float, std: float, upper: Tensor) -> Tensor:
    """``s ~ sigmoid(N(mean, std^2))`` conditioned on ``s < upper`` (elementwise), exactly.

    Inverse CDF on the logit scale, in float64: ``c = Phi((logit(upper) - mean) / std)``,
    ``s = sigmoid(mean + std * Phi^-1(U(0, c)))``. Its CDF on ``(0, upper)`` is
    ``Phi((logit(s) - mean) / std) / c``. Shapes: ``upper: (n,)`` in ``(0, 1]`` -> ``(n,)`` of
    ``upper``'s dtype, in ``(0, upper]`` (the caller keeps it strictly below)."""
    up = upper.double()
    c = torch.special.ndtr((torch.logit(up) - mean) / std)                  # (n,) Phi at the cut
    u = torch.rand_like(up) * c                                             # (n,) in [0, c)
    s = torch.sigmoid(mean + std * torch.special.ndtri(u))                  # (n,)
    return s.to(upper.dtype).clamp_min(torch.finfo(upper.dtype).tiny)


class TerminalVelocityMatching(Objective):
    """Match the derivative of a jump at its *terminal* time.

    The net ``F_theta(z_t, t, h)`` is the average velocity of the jump ``t -> s = t - h``, so
    the jump's end point is ``f(s) = z_t + (s - t) F_theta(z_t, t, t - s)``. Its derivative in
    the terminal time must be the instantaneous velocity at the end point (paper eq. 9)::

        df/ds = F + (s - t) dF/ds                 (dF/ds: one JVP along s, gradient flows through it)
        L_TV  = || df/ds - sg(F_ema(f(s), s, 0)) ||^2
        L_FM  = || F_theta(z_u, u, 0) - (eps - x) ||^2,   u ~ fm_sampler, independent of (t, s)
        L     = L_TV + lambda_fm * L_FM

    Times, as the official code (lumalabs/tvm ``TVMLoss.sample_ts``) draws them: the gap
    ``t - s ~ gap_sampler`` (logit-normal(-0.8, 1)); ``s`` from the terminal sampler's
    logit-normal(-0.4, 1) *truncated* to ``(0, 1 - gap)`` exactly, by the inverse CDF on the
    logit scale (``s_sampler="truncated"``)::

        c = Phi((logit(1 - gap) - mean) / std),   s = sigmoid(mean + std * Phi^-1(U(0, c)))

    (``s_sampler="scaled"``: the earlier ``s = terminal_sampler * (1 - gap)``, which has another
    law; kept for comparison); ``t = min(s + gap, 1)``; the flow-matching term at its own
    time ``u ~ fm_sampler`` (logit-normal(-0.4, 1)) on ``z_u = (1 - u) x + u eps`` (same
    ``eps``), not at ``t``.
    ``F_ema`` is an EMA copy of the backbone (decay ``target_decay``), kept in
    ``net.aux["tvm_target"]`` and updated by ``on_step_end``. Sampling chains exact jumps
    (1 step: ``x = eps - F(eps, 1, 1)``). With ``prediction="data"`` the backbone (and its EMA
    copy) estimates clean data and ``F = (z_t - x_hat) / t`` (``Objective.from_data_prediction``).

    Shapes: ``x, z_t, F, f: (B, *shape)``; ``t, s, u: (B,)``.

    Args:
        gap_sampler, terminal_sampler, fm_sampler: ``TimeSampler`` kwargs of the gap ``t - s``,
            the terminal time ``s`` (before truncation) and the flow-matching time ``u``.
        s_sampler: ``"truncated"`` (exact truncation of a logit-normal ``terminal_sampler`` to
            ``(0, 1 - gap)``; a uniform one is scaled, which is its exact truncation) or
            ``"scaled"`` (``terminal_sampler * (1 - gap)``).
        lambda_fm: weight of the flow-matching term.
        target_decay: EMA decay of the terminal-velocity target.
        adaptive_c: adaptive weight constant of the terminal term (``None``: off).
    """

    name = "tvm"
    uses_jvp = True

    def __init__(self, gap_sampler: dict | None = None, terminal_sampler: dict | None = None,
                 fm_sampler: dict | None = None, s_sampler: str = "truncated", lambda_fm: float = 1.0,
                 target_decay: float = 0.99, adaptive_c: float | None = None,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        self.gap_sampler = TimeSampler(**(gap_sampler or {"kind": "logit_normal", "mean": -0.8, "std": 1.0}),
                                       name="gap_sampler")
        self.terminal_sampler = TimeSampler(**(terminal_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                            name="terminal_sampler")
        self.fm_sampler = TimeSampler(**(fm_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                      name="fm_sampler")
        require(s_sampler in S_SAMPLERS, "s_sampler", f"must be one of {S_SAMPLERS}, got {s_sampler!r}")
        self.s_sampler = s_sampler
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

    def sample_times(self, n: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, s, t_fm)``, each ``(n,)``: the jump ``t -> s`` of the terminal term and the
        flow-matching time (drawn independently of both)."""
        gap = self.gap_sampler(n, device, dtype)                             # (n,)
        upper = 1.0 - gap                                                    # (n,)
        ts = self.terminal_sampler
        if self.s_sampler == "truncated" and ts.kind == "logit_normal":
            s = truncated_logit_normal(ts.mean, ts.std, upper).clamp(ts.low, ts.high)
            s = torch.minimum(s, torch.nextafter(upper, torch.zeros_like(upper)))   # s < 1 - gap in dtype
        else:
            s = ts(n, device, dtype) * upper
        t = (s + gap).clamp(max=1.0)
        return t, s, self.fm_sampler(n, device, dtype)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        eps = torch.randn_like(x)                                            # (B, *shape)
        t, s, t_fm = self.sample_times(b, x.device, x.dtype)                 # (B,) each
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
        z_fm = interpolate(x, eps, t_fm)                                     # (B, *shape)
        l_fm = per_sample_mse(net(z_fm, t_fm, torch.zeros_like(t_fm), cond), velocity(x, eps))   # (B,)
        loss = l_tv + self.lambda_fm * l_fm
        return LossOutput(loss, {"terminal": l_tv.mean().item(), "fm": l_fm.mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        steps = self.resolve(inference).steps
        return jump_sample(lambda z, t, h: net(z, t, h, cond), noise, steps, average=True)
