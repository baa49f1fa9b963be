"""DDPM / DDIM: Ho, Jain, Abbeel, "Denoising Diffusion Probabilistic Models" (2020);
Song, Meng, Ermon, "Denoising Diffusion Implicit Models" (2021); squared-cosine schedule of
Nichol & Dhariwal (2021). The Diffusion Policy baseline (Chi et al., 2023) the one-step
objectives replace."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jumpflow.objectives.base import Inference, LossOutput, Objective, drop_condition, per_sample_mse, require
from jumpflow.timeconv import expand_like


def squared_cosine_alphas_cumprod(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """``alpha_bar_k`` for ``k = 0..K-1`` (float64), betas clipped at ``max_beta``."""
    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f((k + 1) / num_steps) / f(k / num_steps), max_beta) for k in range(num_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)



def trailing_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """``steps`` descending indices of ``0 .. num_train_steps - 1`` with trailing spacing (Lin et
    al. 2024): evenly spread and always starting at the noisiest index ``num_train_steps - 1``."""
    k = num_train_steps
    return sorted({round(k - i * k / steps) - 1 for i in range(steps)}, reverse=True)

class DDPM(Objective):
    """Epsilon-prediction diffusion with a discrete squared-cosine schedule.

    Training (Ho et al. eq. 14)::

        x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps,   L = || eps_theta(x_k, t_k) - eps ||^2

    with ``k ~ U{0..K-1}`` and the net called at ``t_k = (k + 1) / K`` (``t = 1`` is the
    noisiest step, matching jumpflow's convention) and ``h = 0``.

    Sampling at ``steps = S`` uses the ``S`` timesteps ``k_i = round(K - i K / S) - 1``
    ("trailing" spacing, Lin et al. 2024: the first step always starts from the noisiest
    step ``K - 1``; Diffusion Policy's "leading" spacing would start DDIM-10 at ``k = 90``
    and DDPM-1 at ``k = 0``) and, between consecutive ``k -> k'``:
    ``inference.sampler="ddpm"``: the posterior ``q(x_k' | x_k, x0_hat)`` (ancestral);
    ``inference.sampler="ddim"``: the deterministic DDIM update (eta = 0)
    ``x_k' = sqrt(abar_k') x0_hat + sqrt(1 - abar_k') eps_hat``.

    ``dp_exact=True`` switches to Diffusion Policy's exact choices (diffusers' ``DDPMScheduler``
    / ``DDIMScheduler`` as DP configures them), for a like-for-like baseline:

    - *leading* timestep spacing, ``k_i = (S - 1 - i) * (K // S)`` (diffusers' ``set_timesteps``,
      ``steps_offset = 0``): sampling starts at ``(S - 1) * (K // S)``, not at ``K - 1``
      (DDIM-10 at ``k = 90``; DDPM-1 / DDIM-1 at ``k = 0``, i.e. one denoising step from pure
      noise evaluated as if it were almost clean), and always ends at ``k = 0``;
    - DDIM moves along the *unclipped* ``eps_hat`` (the net's output): clipping changes
      ``x0_hat`` only, where the default re-derives ``eps_hat`` from the clipped ``x0_hat`` so
      that the update stays on the line through ``x_k`` and ``x0_hat``;
    - the net's time input is the integer timestep ``k`` itself (``0..K-1``, as DP's
      ``SinusoidalPosEmb`` sees it), not ``(k + 1) / K``; a checkpoint trained one way must be
      sampled the same way.

    The ancestral DDPM update is the same in both (its ``x0_hat`` is clipped in both, and it
    uses no ``eps_hat`` after clipping).

    Shapes: ``x, eps: (B, *shape)``; ``cond: (B, C)`` or ``None``.

    Args:
        num_train_steps: K (Diffusion Policy: 100).
        clip_sample: clamp ``x0_hat`` to ``[-clip_sample, clip_sample]`` (DP: 1.0; None: off).
        class_drop_prob: classifier-free guidance training.
        prediction: ``"native"`` (the backbone outputs the noise eps; Diffusion Policy's prediction_type) or ``"data"`` (it outputs a
            clean-data estimate, converted by ``from_data_prediction``; the loss is unchanged).
        dp_exact: Diffusion Policy's exact spacing, DDIM update and time input (above).
    """

    name = "ddpm"
    samplers = ("ddpm", "ddim")
    guidance_at_sampling = True

    def __init__(self, num_train_steps: int = 100, clip_sample: float | None = 1.0,
                 class_drop_prob: float = 0.0, prediction: str = "native", dp_exact: bool = False,
                 inference: dict | None = None):
        self.set_prediction(prediction)
        require(num_train_steps >= 1, "num_train_steps", f"must be >= 1, got {num_train_steps}")
        require(clip_sample is None or clip_sample > 0, "clip_sample", f"must be > 0 or None, got {clip_sample}")
        require(0.0 <= class_drop_prob < 1.0, "class_drop_prob", f"must be in [0, 1), got {class_drop_prob}")
        self.num_train_steps, self.clip_sample = num_train_steps, clip_sample
        self.class_drop_prob = class_drop_prob
        require(isinstance(dp_exact, bool), "dp_exact", f"must be true or false, got {dp_exact!r}")
        self.dp_exact = dp_exact
        self.alphas_cumprod = squared_cosine_alphas_cumprod(num_train_steps)   # (K,) float64
        self.set_inference_defaults(inference, steps=num_train_steps, sampler="ddpm")

    def net_time(self, k: Tensor) -> Tensor:
        """The net's time input at training index ``k``: ``(k + 1) / K``, or ``k`` with ``dp_exact``."""
        if self.dp_exact:
            return k.double()
        return (k.double() + 1) / self.num_train_steps

    def train_index(self, t: Tensor) -> Tensor:
        """Inverse of ``net_time``: the training index ``k`` of a net time ``t`` (long, ``(B,)``)."""
        if self.dp_exact:
            return t.double().round().long().clamp(0, self.num_train_steps - 1)
        return (t.double() * self.num_train_steps).round().long().clamp(1, self.num_train_steps) - 1

    def from_data_prediction(self, z: Tensor, t: Tensor, x_hat: Tensor) -> Tensor:
        """``eps = (x_k - sqrt(abar_k) x_hat) / sqrt(1 - abar_k)`` at the ``k`` of ``t = (k + 1) / K``
        (Diffusion Policy's ``prediction_type="sample"``, converted so the loss stays on eps)."""
        k = self.train_index(t)                                                   # (B,)
        abar = self.alphas_cumprod.to(z.device)[k].to(z.dtype)                    # (B,)
        sigma = (1 - abar).sqrt().clamp_min(self.data_t_min)                       # (B,)
        return (z - expand_like(abar.sqrt(), z) * x_hat) / expand_like(sigma, z)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        k = torch.randint(0, self.num_train_steps, (b,), device=x.device)          # (B,)
        abar = self.alphas_cumprod.to(x.device)[k].to(x.dtype)                     # (B,)
        eps = torch.randn_like(x)                                                   # (B, *shape)
        x_k = expand_like(abar.sqrt(), x) * x + expand_like((1 - abar).sqrt(), x) * eps
        t = self.net_time(k).to(x.dtype)
        cond = drop_condition(net, cond, self.class_drop_prob)
        pred = net(x_k, t, torch.zeros_like(t), cond)                               # (B, *shape)
        loss = per_sample_mse(pred, eps)
        return LossOutput(loss, {"mse": loss.mean().item()})

    def timesteps(self, steps: int) -> list[int]:
        """Descending training indices used by an ``steps``-step sampler: trailing spacing, or
        with ``dp_exact`` diffusers' leading spacing ``(arange(S) * (K // S))[::-1]``."""
        require(1 <= steps <= self.num_train_steps, "steps",
                f"must be in [1, {self.num_train_steps}], got {steps}")
        k = self.num_train_steps
        if self.dp_exact:
            return [i * (k // steps) for i in range(steps)][::-1]
        return trailing_timesteps(k, steps)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        inf = self.resolve(inference)
        steps, sampler = inf.steps, inf.sampler
        fn = self.guided(net, cond, inf.guidance)
        abars = self.alphas_cumprod.to(noise.device)
        ks = self.timesteps(steps)
        x = noise
        b = x.shape[0]
        for i, k in enumerate(ks):
            k_prev = ks[i + 1] if i + 1 < len(ks) else -1
            abar = abars[k].to(x.dtype)
            abar_prev = abars[k_prev].to(x.dtype) if k_prev >= 0 else torch.ones((), dtype=x.dtype, device=x.device)
            t = self.net_time(torch.full((b,), k, device=x.device)).to(x.dtype)
            eps_hat = fn(x, t, torch.zeros_like(t))                                 # (B, *shape)
            x0 = (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()                    # (B, *shape)
            if self.clip_sample is not None:
                x0 = x0.clamp(-self.clip_sample, self.clip_sample)
                if not self.dp_exact:                                               # DP: DDIM keeps the net's eps
                    eps_hat = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            if sampler == "ddim":
                x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_hat
            else:
                beta = 1 - abar / abar_prev                                         # effective beta of k -> k'
                mean = (abar_prev.sqrt() * beta / (1 - abar)) * x0 + \
                       ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar)) * x
                if k_prev >= 0:
                    var = beta * (1 - abar_prev) / (1 - abar)
                    x = mean + var.sqrt() * torch.randn_like(x)
                else:
                    x = mean
        return x
