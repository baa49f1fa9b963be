"""Distillation of a multi-step teacher into a one-step student: consistency distillation, Song,
Dhariwal, Chen, Sutskever, "Consistency Models" (ICML 2023, arXiv:2303.01469, Alg. 2), and Align
Your Flow's Eulerian map distillation, Sabour, Fidler, Kreis, "Align Your Flow: Scaling
Continuous-Time Flow Map Distillation" (arXiv:2506.14603, 2025). The Consistency Policy route
(Prasad et al., RSS 2024) for a user who already has a Flow Matching or Diffusion Policy checkpoint.

The teacher is a frozen Flow Matching or DDPM checkpoint (``teacher: <run_dir or checkpoint>``),
read with ``jumpflow.checkpoint.load_model`` into a :class:`~jumpflow.objectives.teacher.FrozenCheckpoint`
in ``net.aux["distill_teacher"]``: outside the student's state dict, so a student's checkpoint holds
the student only and loads and samples without the teacher file. Its probability-flow ODE in
jumpflow's time is :meth:`~jumpflow.objectives.teacher.FrozenCheckpoint.velocity`.

``teacher: null`` (the shipped default, so the config instantiates without a checkpoint) puts the
single-sample velocity ``v = eps - x`` in the teacher's place: the unbiased estimate of the
marginal velocity that turns consistency distillation into consistency training (Song et al. 2023,
Thm. 2) and Eulerian map distillation into MeanFlow's loss (the flow-map view of Boffi et al.,
"How to build a consistency model: learning flow maps via self-distillation", 2025).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError
from jumpflow.objectives.base import (
    Inference,
    LossOutput,
    Objective,
    jump_sample,
    jvp,
    per_sample_mse,
    require,
)
from jumpflow.objectives.consistency import consistency_function, consistency_sample, pseudo_huber
from jumpflow.objectives.curriculum import TangentWarmup
from jumpflow.objectives.ddpm import trailing_timesteps
from jumpflow.objectives.meanflow import AverageVelocityObjective
from jumpflow.objectives.teacher import FrozenCheckpoint, flow_grid, teacher_step
from jumpflow.timeconv import expand_like, interpolate, velocity


class Distillation:
    """What the distillation objectives share: the ``teacher`` value, its slot in ``net.aux``, and
    the teacher's velocity (or its single-sample stand-in when there is no teacher)."""

    teacher_key = "distill_teacher"

    def init_teacher(self, teacher: str | None, teacher_ema: bool, init_student: bool) -> None:
        require(teacher is None or (isinstance(teacher, str) and teacher.strip() != ""), "teacher",
                f"must be a run directory or checkpoint path, or null (no teacher), got {teacher!r}")
        require(isinstance(teacher_ema, bool), "teacher_ema", f"must be true or false, got {teacher_ema!r}")
        require(isinstance(init_student, bool), "init_student", f"must be true or false, got {init_student!r}")
        self.teacher, self.teacher_ema, self.init_student = teacher, teacher_ema, init_student

    def check_teacher(self, model: nn.Module) -> None:
        """The objective's own check of a loaded teacher (raises ``ConfigError``); none by default."""

    def teacher_modules(self, backbone: nn.Module, also: tuple[nn.Module, ...] = ()) -> dict[str, nn.Module]:
        """``{"distill_teacher": FrozenCheckpoint}`` when a teacher is configured; it initialises
        ``backbone`` (and ``also``, e.g. an EMA target) from the teacher's backbone when read."""
        if self.teacher is None:
            return {}
        students = (backbone, *also) if self.init_student else ()
        return {self.teacher_key: FrozenCheckpoint(self.teacher, "objective.teacher", self.teacher_ema, students,
                                                   keep=True, shape=getattr(backbone, "shape", None),
                                                   validate=self.check_teacher)}

    def teacher_of(self, net) -> FrozenCheckpoint | None:
        """The net's teacher slot; ``None`` without a teacher (``teacher: null`` and none given)."""
        aux = getattr(net, "aux", None)
        slot = aux[self.teacher_key] if aux is not None and self.teacher_key in aux else None
        if slot is None and self.teacher is not None:
            raise ValueError(f"{self.name} needs net.aux[{self.teacher_key!r}] (the Generator builds it from "
                             "objective.extra_modules)")
        if slot is not None:
            slot.prepare()                   # a student built but never moved: read (and init) now
        return slot


class ConsistencyDistillation(Distillation, Objective):
    """Consistency distillation (CD) along the teacher's probability-flow ODE.

    **Consistency function** (boundary condition built in): ``f(z_t, t) = z_t - t u(z_t, t, h=t)``
    (:func:`~jumpflow.objectives.consistency.consistency_function`; ``f(z, 0) = z`` for any weights).

    **Grid.** ``0 = t_0 < t_1 < ... < t_N = 1``: ``t_n = (n / N)^rho`` for a Flow Matching teacher;
    ``{0} + `` the teacher's levels for a DDPM teacher (``N = K``, or ``N = teacher_levels`` of them
    with DDIM's trailing spacing, so one teacher step is a DDIM jump over ``K / N`` levels: the
    paper's ``N = 18`` rather than a 100-interval chain the target must bootstrap through). Paper
    eq. (7) in flow time::

        n ~ U{0 .. N-1},   z_{t_{n+1}} = (1 - t_{n+1}) x + t_{n+1} eps
        z^_{t_n} = Phi(z_{t_{n+1}}, t_{n+1} -> t_n; teacher)          (one Euler / Heun step, no grad)
        L = lambda(t_n) d( f_theta(z_{t_{n+1}}, t_{n+1}),  f_theta-(z^_{t_n}, t_n) )

    ``theta-`` is the online student under stop-grad (``target_decay: null``) or an EMA copy of its
    backbone (``net.aux["distill_target"]``, the paper's ``mu``); ``d`` is the squared error (mean
    over dims) or the pseudo-Huber ``sqrt(||a - b||^2 + c^2) - c``; ``lambda`` is 1 or
    ``1 / (t_{n+1} - t_n)``. At the minimum ``f(z_1, 1)`` is the teacher's N-step ODE solution from
    ``z_1``: the 1-step student reproduces the teacher's ODE map (exactly on its grid).

    Sampling: ``x = f(eps, 1)`` (1 NFE; the policy's 1-NFE path); more steps re-noise
    (:func:`~jumpflow.objectives.consistency.consistency_sample`, ``t_max = 1``).

    Shapes: ``x, eps, z, f: (B, *shape)``; ``t, r: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        teacher: run directory or checkpoint of a Flow Matching or DDPM model; ``null``: the
            single-sample velocity ``eps - x`` (then CD is consistency training).
        teacher_ema: read the teacher's EMA weights when it has them.
        init_student: initialise the student's backbone (and EMA target) from the teacher's
            (same backbone architecture; the paper initialises the student from the teacher).
        num_steps, rho: the grid ``t_n = (n / N)^rho`` of a Flow Matching teacher (CD: N = 18).
        teacher_levels: a DDPM teacher's grid: ``null`` all ``K`` of its levels, else this many
            (trailing spacing, always including the noisiest level; at most ``K``).
        solver: ``heun`` (the paper's) or ``euler`` (DDIM for a DDPM teacher).
        target_decay: EMA decay of the target network in ``[0, 1)``; ``null``: online, stop-grad.
        distance: ``l2`` or ``pseudo_huber``; huber_c: its ``c`` (``null``: ``0.00054 sqrt(D)``).
        weighting: ``uniform`` or ``inverse_dt``.
        prediction, data_t_min: ``"data"``: the backbone estimates clean data (then ``f = x_hat``).
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "distill_consistency"
    target_key = "distill_target"
    SOLVERS = ("heun", "euler")
    DISTANCES = ("l2", "pseudo_huber")
    WEIGHTINGS = ("uniform", "inverse_dt")

    def __init__(self, teacher: str | None = None, teacher_ema: bool = True, init_student: bool = True,
                 num_steps: int = 18, rho: float = 1.0, teacher_levels: int | None = None, solver: str = "heun",
                 target_decay: float | None = None,
                 distance: str = "l2", huber_c: float | None = None, weighting: str = "uniform",
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        self.init_teacher(teacher, teacher_ema, init_student)
        require(isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1, "num_steps",
                f"must be an integer >= 1, got {num_steps!r}")
        require(math.isfinite(rho) and rho > 0, "rho", f"must be > 0, got {rho}")
        require(teacher_levels is None or (isinstance(teacher_levels, int) and not isinstance(teacher_levels, bool)
                                           and teacher_levels >= 1), "teacher_levels",
                f"must be an integer >= 1 or null (all of a DDPM teacher's levels), got {teacher_levels!r}")
        require(solver in self.SOLVERS, "solver", f"must be one of {self.SOLVERS}, got {solver!r}")
        require(target_decay is None or 0.0 <= target_decay < 1.0, "target_decay",
                f"must be in [0, 1) or null (online net), got {target_decay}")
        require(distance in self.DISTANCES, "distance", f"must be one of {self.DISTANCES}, got {distance!r}")
        require(huber_c is None or huber_c > 0, "huber_c", f"must be > 0 or null (auto), got {huber_c}")
        require(weighting in self.WEIGHTINGS, "weighting", f"must be one of {self.WEIGHTINGS}, got {weighting!r}")
        self.num_steps, self.rho, self.solver = num_steps, float(rho), solver
        self.teacher_levels = teacher_levels
        self.target_decay, self.distance, self.huber_c, self.weighting = target_decay, distance, huber_c, weighting

    # -- modules: teacher, EMA target ------------------------------------------------------
    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {}
        if self.target_decay is not None:
            mods[self.target_key] = copy.deepcopy(backbone).requires_grad_(False)
        mods.update(self.teacher_modules(backbone, tuple(mods.values())))
        return mods

    @torch.no_grad()
    def on_step_end(self, net) -> None:
        if self.target_decay is None:
            return
        for p_t, p in zip(net.aux[self.target_key].parameters(), net.backbone.parameters()):
            p_t.lerp_(p.detach(), 1.0 - self.target_decay)

    def check_teacher(self, model: nn.Module) -> None:
        levels = getattr(getattr(model, "objective", None), "num_train_steps", None)
        if self.teacher_levels is not None and levels is not None and self.teacher_levels > levels:
            raise ConfigError("objective.teacher_levels", f"the DDPM teacher has {levels} levels, got "
                                                          f"{self.teacher_levels}")

    def grid(self, slot: FrozenCheckpoint | None) -> Tensor:
        """``(N + 1,)`` float64 times ``0 = t_0 < ... < t_N = 1``."""
        levels = slot.grid if slot is not None else None
        if levels is None:
            return flow_grid(self.num_steps, self.rho)
        if self.teacher_levels is not None:
            require(self.teacher_levels <= levels.numel(), "teacher_levels",
                    f"the DDPM teacher has {levels.numel()} levels, got {self.teacher_levels}")
            levels = levels[sorted(trailing_timesteps(levels.numel(), self.teacher_levels))]
        return torch.cat([levels.new_zeros(1), levels])

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        slot = self.teacher_of(net)
        grid = self.grid(slot)                                                # (N + 1,) float64
        n = torch.randint(0, grid.numel() - 1, (b,))                          # (B,)
        t = grid[n + 1].to(x.device, x.dtype)                                 # (B,) t_{n+1}
        r = grid[n].to(x.device, x.dtype)                                     # (B,) t_n
        eps = torch.randn_like(x)                                             # (B, *shape)
        z = interpolate(x, eps, t)                                            # (B, *shape)
        with torch.no_grad():
            if slot is None:
                z_r = interpolate(x, eps, r)                                  # exact step of v = eps - x
            else:
                slot.check_student(net, z, cond)
                z_r = teacher_step(slot, z, t, r, cond, self.solver)          # (B, *shape)
            target_net = net if self.target_decay is None else net.aux[self.target_key]
            f_r = consistency_function(target_net, z_r, r, cond)              # (B, *shape)
            f_r = torch.where(expand_like(r > 0, z_r), f_r, z_r)              # f(z, 0) = z
        f_t = consistency_function(net, z, t, cond)                           # (B, *shape)
        diff = f_t - f_r
        if self.distance == "l2":
            dist = per_sample_mse(f_t, f_r)                                   # (B,)
        else:
            c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x[0].numel())
            dist = pseudo_huber(diff, c)
        weight = 1.0 / (t - r) if self.weighting == "inverse_dt" else torch.ones_like(t)
        return LossOutput(weight * dist, {"mse": per_sample_mse(f_t.detach(), f_r).mean().item(),
                                          "intervals": float(grid.numel() - 1)})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        return consistency_sample(net, noise, cond, self.resolve(inference).steps, 1.0)


class AlignYourFlow(Distillation, TangentWarmup, AverageVelocityObjective):
    """Align Your Flow, Eulerian map distillation (AYF-EMD), continuous time.

    **Flow map.** ``f(z_t, t, r) = z_t - (t - r) u(z_t, t, h=t-r)`` jumps from ``t`` to ``r <= t``
    (AYF's ``f_theta(x_t, t, s) = x_t + (s - t) F_theta`` with ``s = r``, ``F = u``; ``f(z, t, t) = z``
    for any weights). The exact flow map of the teacher is constant along the teacher's ODE in its
    start time (Eulerian condition)::

        df/dt = d_z f . v_phi(z_t, t) + d_t f = v_phi - u - (t - r) du/dt = 0
        du/dt = d_z u . v_phi + d_t u + d_h u          (one JVP, tangent (v_phi, 1), h = t - r)

    The EMD gradient (AYF Thm. 3.1, the ``dt -> 0`` limit of
    ``||f_theta(z_t, t, r) - sg f_theta(z_{t-dt}, t - dt, r)||^2 / dt`` along the teacher's ODE,
    weighted by ``1 / (t - r)``) is ``-E[(df-/dt)^T d u_theta]``; its surrogate::

        g = v_phi - u- - r_warm (t - r) du-/dt       (= df-/dt, stop-grad; r_warm: tangent warm-up)
        g <- g / (||g|| + c)                         (optional tangent normalisation, sCM)
        L = w * mean_D || u_theta - sg(u- + g) ||^2,   w = 1 / sg(||g||^2 + c_w)^p   (MeanFlow's weight)

    ``L`` is ``||g||^2`` (zero exactly at the teacher's flow map). At ``r = t`` it is flow matching on
    the teacher's velocity (``u -> v_phi``); at ``r = 0`` it is continuous consistency distillation
    (sCD). With the single-sample velocity ``v = eps - x`` in place of ``v_phi`` (``teacher: null``) it
    is MeanFlow's loss, term for term (with the same adaptive weight). A DDPM teacher is evaluated on its levels: ``t`` is moved to
    the nearest one. ``(t, r)`` are drawn as MeanFlow's (two draws of ``time_sampler``, sorted; a
    ``1 - ratio_r_neq_t`` share has ``r = t``).

    Sampling: chained jumps, ``x = eps - u(eps, 1, h=1)`` at 1 NFE (the policy's 1-NFE path).

    Shapes: ``x, eps, z, u, v_phi, g: (B, *shape)``; ``t, r: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        teacher, teacher_ema, init_student: as for :class:`ConsistencyDistillation`.
        time_sampler: ``TimeSampler`` kwargs for ``(t, r)`` (default logit-normal(-0.4, 1)).
        ratio_r_neq_t: share of rows with ``r < t`` (the rest distil the teacher's velocity).
        adaptive_p, adaptive_c, adaptive_reduce: MeanFlow's adaptive weight (``p = 0``, the default: none).
        tangent_c: ``c`` of the tangent normalisation; ``null``: none.
        tangent_warmup_steps: steps of the linear ramp of ``r_warm`` from 0 to 1 (0: none).
        prediction, data_t_min: ``"data"``: the backbone estimates clean data.
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "distill_ayf"
    uses_jvp = True
    counter_key = "ayf_step"

    def __init__(self, teacher: str | None = None, teacher_ema: bool = True, init_student: bool = True,
                 time_sampler: dict | None = None, ratio_r_neq_t: float = 0.75, adaptive_p: float = 0.0,
                 adaptive_c: float = 1e-2, adaptive_reduce: str = "sum", tangent_c: float | None = None,
                 tangent_warmup_steps: int = 0, prediction: str = "native", data_t_min: float = 0.05,
                 inference: dict | None = None):
        self.init_average_velocity(time_sampler, ratio_r_neq_t, adaptive_p, adaptive_c, adaptive_reduce, 0.0,
                                   prediction, data_t_min, inference)
        self.init_teacher(teacher, teacher_ema, init_student)
        self.init_tangent(tangent_c, tangent_warmup_steps)

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {**self.teacher_modules(backbone), **self.warmup_modules()}

    def flow_map_tangent(self, net, z: Tensor, t: Tensor, r: Tensor, v: Tensor, cond: Tensor | None):
        """``u(z, t, h=t-r)`` (with grad) and ``du/dt`` along ``(v, 1)`` with ``r`` fixed."""
        def u_fn(z_, t_):
            return net(z_, t_, t_ - r, cond)
        return jvp(u_fn, (z, t), (v, torch.ones_like(t)))                     # (B, *shape) each

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        slot = self.teacher_of(net)
        eps = torch.randn_like(x)                                              # (B, *shape)
        t, r = self.sample_times(b, x.device, x.dtype)                         # (B,) each, t >= r
        if slot is not None and slot.grid is not None:                         # a DDPM teacher: its levels
            same = r == t
            t = slot.snap(t)
            r = torch.where(same, t, torch.minimum(r, t))
        z = interpolate(x, eps, t)                                             # (B, *shape)
        if slot is None:
            v = velocity(x, eps)                                               # (B, *shape)
        else:
            slot.check_student(net, z, cond)
            v = slot.velocity(z, t, cond)                                      # (B, *shape), no grad
        u, dudt = self.flow_map_tangent(net, z, t, r, v, cond)
        with torch.no_grad():
            g = v - u - self.warmup(net) * expand_like(t - r, u) * dudt        # df/dt, (B, *shape)
            g_norm = g.flatten(1).norm(dim=1)                                  # (B,)
            if self.tangent_c is not None:
                g = g / expand_like(g_norm + self.tangent_c, g)
        err = u - (u.detach() + g)                                             # (B, *shape)
        sq = err.pow(2).flatten(1).mean(1)                                     # (B,)
        loss = self.adaptive_weight(err) * sq
        return LossOutput(loss, {"mse": sq.mean().item(), "tangent_norm": g_norm.mean().item(),
                                 "frac_r_neq_t": (r != t).float().mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        steps = self.resolve(inference).steps
        return jump_sample(lambda z, t, h: net(z, t, h, cond), noise, steps, average=True)
