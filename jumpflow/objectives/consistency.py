"""Consistency training, discrete time: Song, Dhariwal, Chen, Sutskever, "Consistency Models"
(ICML 2023, arXiv:2303.01469), with the recipe of Song & Dhariwal, "Improved Techniques for
Training Consistency Models" (iCT, ICLR 2024, arXiv:2310.14189)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import Inference, LossOutput, Objective, per_sample_mse, require
from jumpflow.objectives.curriculum import StepCounter, counter_of
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
