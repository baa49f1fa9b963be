"""Consistency training, discrete time: Song, Dhariwal, Chen, Sutskever, "Consistency Models"
(ICML 2023, arXiv:2303.01469), with the recipe of Song & Dhariwal, "Improved Techniques for
Training Consistency Models" (iCT, ICLR 2024, arXiv:2310.14189)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import Inference, LossOutput, Objective, per_sample_mse, require
from jumpflow.objectives.curriculum import StepCounter, counter_of, halvings
from jumpflow.timeconv import expand_like, interpolate


def consistency_function(net, z: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    """``f(z_t, t) = z_t - t u(z_t, t, h=t)``: the jump from ``t`` to data with the backbone's
    average velocity; ``f(z, 0) = z`` for any network (the boundary condition is built in).
    Shapes: ``z, f: (B, *shape)``, ``t: (B,)``."""
    return z - expand_like(t, z) * net(z, t, t, cond)


@torch.no_grad()
def consistency_sample(net, noise: Tensor, cond: Tensor | None, steps: int, t_max: float = 1.0) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) in flow time: ``x = f(t_max eps,
    t_max)``; then for ``k = 1 .. steps - 1`` re-noise to ``t_k = t_max (1 - k / steps)`` with
    fresh noise, ``z = (1 - t_k) x + t_k eps_k``, and jump again, ``x = f(z, t_k)``."""
    b = noise.shape[0]
    t = torch.full((b,), float(t_max), device=noise.device, dtype=noise.dtype)
    x = consistency_function(net, t_max * noise, t, cond)
    for k in range(1, steps):
        t = torch.full_like(t, t_max * (1.0 - k / steps))
        x = consistency_function(net, interpolate(x, torch.randn_like(x), t), t, cond)
    return x


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """``sqrt(||diff||^2 + c^2) - c`` per sample (norm over all non-batch dims): ``(B, ...) -> (B,)``."""
    return torch.sqrt(diff.pow(2).flatten(1).sum(1) + c * c) - c


class ConsistencyTraining(Objective):
    """Discrete-time consistency training (iCT), no teacher and no EMA.

    **Parameterisation (flow time).** The backbone's average velocity of the jump to data
    defines the consistency function ``f(z_t, t) = z_t - t u(z_t, t, h=t)``. In EDM's
    ``c_skip / c_out`` form that is ``c_skip = 1``, ``c_out = -t`` on the flow-scaled input,
    and ``f(z, 0) = z`` holds for any weights (iCT imposes it at ``sigma_min`` instead; here
    ``f(z, t_min) = z - t_min u`` differs from ``z`` by ``t_min u``, ``t_min ~ 0.002``). One-step
    samples are the same jump as MeanFlow's, so a backbone serves either objective.

    **Noise levels.** iCT works with ``x_sigma = x + sigma eps``; jumpflow's
    ``z_t = (1 - t) x + t eps`` is the same point scaled by ``1 - t`` with
    ``t = sigma / (1 + sigma)`` (translated here, at the edge). The curriculum has
    ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` Karras levels at training step ``k``,
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))``, ``K = curriculum_steps``::

        sigma_i = (sigma_min^(1/rho) + (i - 1)/(N - 1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho

    and the pair index ``i`` is drawn from iCT's discretised lognormal
    ``p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))``,
    which in flow time is the logit-normal ``logit t ~ N(P_mean, P_std)`` on the grid.

    **Loss** (iCT eq. 7 with the stop-grad online net as the teacher)::

        L = 1 / (sigma_{i+1} - sigma_i) * d( f(z_{t_{i+1}}, t_{i+1}),  sg f(z_{t_i}, t_i) )
        d(a, b) = sqrt(||a - b||^2 + c^2) - c,   c = 0.00054 sqrt(D)   (pseudo-Huber)

    with one ``eps`` for both points. The step counter (``net.aux["consistency_step"]``,
    checkpointed) is advanced by ``on_step_end``. Sampling: ``x = f(t_max eps, t_max)``,
    ``t_max = sigma_max / (1 + sigma_max)`` (EDM's ``x_T = sigma_max eps`` in flow scale); more
    steps re-noise to a uniform grid of intermediate times (:func:`consistency_sample`).

    Shapes: ``x, eps, z, f: (B, *shape)``; ``t, sigma: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        sigma_min, sigma_max, rho: Karras grid (iCT: 0.002, 80, 7).
        s0, s1: initial and final number of discretisation intervals (iCT: 10, 1280).
        curriculum_steps: ``K``, the training length the doubling is spread over.
        noise_mean, noise_std: ``P_mean, P_std`` of the lognormal level sampler (iCT: -1.1, 2.0).
        huber_c: pseudo-Huber ``c``; ``null``: ``0.00054 sqrt(D)`` for ``D`` data dims.
        prediction, data_t_min: ``"data"``: the backbone estimates clean data and
            ``u = (z - x_hat) / max(t, data_t_min)`` (then ``f = x_hat`` for ``t >= data_t_min``).
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "consistency"
    counter_key = "consistency_step"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, s0: int = 10,
                 s1: int = 1280, curriculum_steps: int = 400_000, noise_mean: float = -1.1,
                 noise_std: float = 2.0, huber_c: float | None = None, prediction: str = "native",
                 data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        require(sigma_min > 0, "sigma_min", f"must be > 0, got {sigma_min}")
        require(sigma_max > sigma_min, "sigma_max", f"must be > sigma_min = {sigma_min}, got {sigma_max}")
        require(rho > 0, "rho", f"must be > 0, got {rho}")
        require(isinstance(s0, int) and s0 >= 1, "s0", f"must be an integer >= 1, got {s0!r}")
        require(isinstance(s1, int) and s1 >= s0, "s1", f"must be an integer >= s0 = {s0}, got {s1!r}")
        require(isinstance(curriculum_steps, int) and curriculum_steps >= 1, "curriculum_steps",
                f"must be an integer >= 1, got {curriculum_steps!r}")
        require(noise_std > 0, "noise_std", f"must be > 0, got {noise_std}")
        require(huber_c is None or huber_c > 0, "huber_c", f"must be > 0 or null (auto), got {huber_c}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.s0, self.s1, self.curriculum_steps = s0, s1, curriculum_steps
        self.noise_mean, self.noise_std, self.huber_c = float(noise_mean), float(noise_std), huber_c
        self.t_max = self.sigma_max / (1.0 + self.sigma_max)

    # -- curriculum ------------------------------------------------------------------------
    def schedule_lengths(self) -> dict[str, int]:
        return {"curriculum_steps": self.curriculum_steps}

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {self.counter_key: StepCounter()}

    def on_step_end(self, net) -> None:
        counter_of(net, self.counter_key, self.name).advance()

    def num_levels(self, step: int) -> int:
        """``N(k)``: discretisation points at training step ``k`` (iCT's step doubling)."""
        stages = math.floor(math.log2(math.floor(self.s1 / self.s0))) + 1
        per_stage = max(1, self.curriculum_steps // stages)
        return min(self.s0 * 2 ** (step // per_stage), self.s1) + 1

    def sigmas(self, n: int) -> Tensor:
        """Karras grid of ``n`` levels, increasing, float64: ``(n,)``."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + torch.linspace(0, 1, n, dtype=torch.float64) * (hi - lo)) ** self.rho

    def level_probs(self, sigmas: Tensor) -> Tensor:
        """iCT's discretised lognormal over pairs ``(sigma_i, sigma_{i+1})``: ``(n - 1,)``."""
        cdf = torch.erf((sigmas.log() - self.noise_mean) / (math.sqrt(2.0) * self.noise_std))
        p = (cdf[1:] - cdf[:-1]).clamp_min(0)
        return p / p.sum()

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        n = self.num_levels(int(counter_of(net, self.counter_key, self.name).step))
        sig = self.sigmas(n)                                                  # (n,) float64
        i = torch.multinomial(self.level_probs(sig), b, replacement=True)    # (B,)
        s_lo, s_hi = sig[i], sig[i + 1]
        t_lo = (s_lo / (1 + s_lo)).to(x.device, x.dtype)                     # (B,)
        t_hi = (s_hi / (1 + s_hi)).to(x.device, x.dtype)
        weight = (1.0 / (s_hi - s_lo)).to(x.device, x.dtype)                  # (B,)
        eps = torch.randn_like(x)                                             # (B, *shape)
        f_hi = consistency_function(net, interpolate(x, eps, t_hi), t_hi, cond)
        with torch.no_grad():
            f_lo = consistency_function(net, interpolate(x, eps, t_lo), t_lo, cond)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x[0].numel())
        loss = weight * pseudo_huber(f_hi - f_lo, c)                          # (B,)
        return LossOutput(loss, {"mse": per_sample_mse(f_hi.detach(), f_lo).mean().item(), "levels": float(n)})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        return consistency_sample(net, noise, cond, self.resolve(inference).steps, self.t_max)


class EasyConsistencyTraining(Objective):
    """Easy Consistency Tuning / Training (ECT): Geng, Pokle, Luo, Lin, Kolter, "Consistency Models
    Made Easy" (ICLR 2025, arXiv:2406.14548). Continuous time, with the gap ``t - r`` shrinking over
    training; optionally started from a Flow Matching (or any same-backbone) checkpoint.

    **Pairs** (in EDM's ``sigma``; jumpflow's flow time ``t = sigma / (1 + sigma)`` at the edge, as
    for :class:`ConsistencyTraining`)::

        sigma_t = exp(N(P_mean, P_std)),  clamped to [sigma_min, sigma_max]
        sigma_r = max(sigma_t - sigma_t n(sigma_t) / q^a, 0),   n(sigma) = 1 + k sigmoid(-b sigma)
        a = min(floor(k_step / d), stages - 1),   d = curriculum_steps // stages
        L = w(sigma_t, sigma_r) * d( f(z_t, t),  sg f(z_r, r) ),   w = 1 / (sigma_t - sigma_r)   (inverse_dt)

    with one ``eps`` for both points, ``f(z_t, t) = z_t - t u(z_t, t, h=t)`` (boundary condition
    built in: :func:`consistency_function`) and the pseudo-Huber ``d``. In the first stage
    ``n >= 1`` gives ``r = 0`` and ``f(z_0, 0) = x``: the loss is denoising regression (ECT's
    "diffusion pretraining is consistency training at ``dt = t``"); each stage divides ``dt`` by
    ``q``, towards the continuous-time limit. The stage index comes from the step counter in
    ``net.aux["ect_step"]`` (checkpointed, advanced by ``on_step_end``;
    :func:`~jumpflow.objectives.curriculum.halvings`).

    **Initialisation** (``init_from``): the student's backbone starts from a checkpoint's (read when
    the student is first moved or trained, like a distillation teacher, never when a trained ECT
    student is loaded): from a Flow Matching velocity ``v``, ``f = z_t - t v(z_t, t)`` is its
    one-step denoiser ``E[x | z_t]`` up to the ``h`` input, ECT's starting point.

    Sampling as iCT: ``x = f(t_max eps, t_max)``, ``t_max = sigma_max / (1 + sigma_max)``; more steps re-noise.

    Shapes: ``x, eps, z, f: (B, *shape)``; ``t, r, sigma: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        sigma_min, sigma_max: clamp of the sampled ``sigma_t`` (and ``t_max`` of sampling).
        noise_mean, noise_std: ``P_mean, P_std`` of the lognormal (ECT: -1.1, 2.0).
        q: shrink factor of ``dt`` per stage (> 1; ECT: 2); k, b: ``n(sigma) = 1 + k sigmoid(-b sigma)``
            (ECT: 8, 1).
        stages: number of stages ``a = 0 .. stages - 1``; curriculum_steps: the training length they span.
        huber_c: pseudo-Huber ``c``; ``null``: ``0.00054 sqrt(D)``.
        weighting: ``inverse_dt`` (ECT) or ``uniform``.
        init_from: run directory or checkpoint to initialise the backbone from; ``null``: none.
        prediction, data_t_min: ``"data"``: the backbone estimates clean data.
        inference: defaults of ``sample`` (``steps``: 1).
    """

    name = "ect"
    counter_key = "ect_step"
    init_key = "ect_init"
    WEIGHTINGS = ("inverse_dt", "uniform")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, noise_mean: float = -1.1,
                 noise_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0, stages: int = 8,
                 curriculum_steps: int = 400_000, huber_c: float | None = None, weighting: str = "inverse_dt",
                 init_from: str | None = None, prediction: str = "native", data_t_min: float = 0.05,
                 inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        self.set_inference_defaults(inference, steps=1)
        require(sigma_min > 0, "sigma_min", f"must be > 0, got {sigma_min}")
        require(sigma_max > sigma_min, "sigma_max", f"must be > sigma_min = {sigma_min}, got {sigma_max}")
        require(noise_std > 0, "noise_std", f"must be > 0, got {noise_std}")
        require(q > 1, "q", f"must be > 1 (dt shrinks by q per stage), got {q}")
        require(k >= 0, "k", f"must be >= 0, got {k}")
        require(b > 0, "b", f"must be > 0, got {b}")
        require(isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1, "stages",
                f"must be an integer >= 1, got {stages!r}")
        require(isinstance(curriculum_steps, int) and curriculum_steps >= 1, "curriculum_steps",
                f"must be an integer >= 1, got {curriculum_steps!r}")
        require(huber_c is None or huber_c > 0, "huber_c", f"must be > 0 or null (auto), got {huber_c}")
        require(weighting in self.WEIGHTINGS, "weighting", f"must be one of {self.WEIGHTINGS}, got {weighting!r}")
        require(init_from is None or (isinstance(init_from, str) and init_from.strip() != ""), "init_from",
                f"must be a run directory or checkpoint path, or null, got {init_from!r}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.noise_mean, self.noise_std = float(noise_mean), float(noise_std)
        self.q, self.k, self.b, self.stages, self.curriculum_steps = float(q), float(k), float(b), stages, curriculum_steps
        self.huber_c, self.weighting, self.init_from = huber_c, weighting, init_from
        self.t_max = self.sigma_max / (1.0 + self.sigma_max)

    def schedule_lengths(self) -> dict[str, int]:
        return {"curriculum_steps": self.curriculum_steps}

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {self.counter_key: StepCounter()}
        if self.init_from is not None:
            from jumpflow.objectives.teacher import FrozenCheckpoint

            mods[self.init_key] = FrozenCheckpoint(self.init_from, "objective.init_from", students=(backbone,),
                                                   keep=False, shape=getattr(backbone, "shape", None), kinds=None)
        return mods

    def on_step_end(self, net) -> None:
        counter_of(net, self.counter_key, self.name).advance()

    def gap(self, sigma: Tensor, stage: int) -> Tensor:
        """``sigma_r`` of ``sigma_t`` at stage ``a``: ``max(sigma - sigma n(sigma) / q^a, 0)``."""
        n = 1.0 + self.k * torch.sigmoid(-self.b * sigma)
        return (sigma - sigma * n / self.q ** stage).clamp_min(0.0)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        if self.init_from is not None and self.init_key in getattr(net, "aux", {}):
            net.aux[self.init_key].prepare()                                 # a student built, never moved
        stage = halvings(int(counter_of(net, self.counter_key, self.name).step), self.curriculum_steps, self.stages)
        b = x.shape[0]
        s_t = torch.exp(torch.randn(b, dtype=torch.float64) * self.noise_std + self.noise_mean)
        s_t = s_t.clamp(self.sigma_min, self.sigma_max)                       # (B,) float64
        s_r = self.gap(s_t, stage)                                            # (B,)
        t = (s_t / (1 + s_t)).to(x.device, x.dtype)                           # (B,)
        r = (s_r / (1 + s_r)).to(x.device, x.dtype)
        eps = torch.randn_like(x)                                             # (B, *shape)
        f_t = consistency_function(net, interpolate(x, eps, t), t, cond)
        with torch.no_grad():
            z_r = interpolate(x, eps, r)                                      # (B, *shape)
            f_r = torch.where(expand_like(r > 0, z_r), consistency_function(net, z_r, r, cond), z_r)  # f(z, 0) = z
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x[0].numel())
        weight = (1.0 / (s_t - s_r)).to(x.device, x.dtype) if self.weighting == "inverse_dt" else torch.ones_like(t)
        loss = weight * pseudo_huber(f_t - f_r, c)                            # (B,)
        return LossOutput(loss, {"mse": per_sample_mse(f_t.detach(), f_r).mean().item(), "stage": float(stage),
                                 "frac_r0": (s_r == 0).double().mean().item()})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        return consistency_sample(net, noise, cond, self.resolve(inference).steps, self.t_max)
