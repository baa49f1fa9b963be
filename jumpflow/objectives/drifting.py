"""Drifting Models: Deng, Li, Zhang, He et al., "Generative Modeling via Drifting"
(arXiv 2602.04770, 2026)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from jumpflow.drift import SCALES, drift_field
from jumpflow.objectives.base import Inference, LossOutput, Objective, require


def uncond_negative_weight(alpha: Tensor | float, gen_per_group: int, n_uncond: int) -> Tensor | float:
    """Kernel weight of each unconditional negative of a group trained at guidance scale
    ``alpha`` (official code, lambertae/drifting ``train_step``)::

        w_uncond = (alpha - 1) (G - 1) / U

    ``G`` generated samples (``G - 1`` of them are each one's negatives), ``U`` unconditional
    negatives: the unconditional negatives weigh ``alpha - 1`` times the generated ones in
    total, so the field's negative distribution is ``q = (q_gen + (alpha - 1) p_uncond) /
    alpha``, which extrapolates the conditional positives by ``alpha`` (``alpha = 1``: no
    guidance, weight 0). ``alpha: (Gr,)`` or a number -> same."""
    return (alpha - 1.0) * (gen_per_group - 1) / max(int(n_uncond), 1)


class AlphaSampler:
    """Guidance scales ``alpha`` on ``[low, high]`` with density ``~ alpha^-power`` (power law,
    inverse CDF; ``power = 1``: log-uniform), and ``alpha = 1`` with probability
    ``no_guidance_frac`` (official: ``cfg_min``, ``cfg_max``, ``neg_cfg_pw``, ``no_cfg_frac``;
    their configs use 1, 4, power 3 (latent ablation, latent L) or 5 (latent B, pixel B / L),
    frac 0 (0.5 for latent L))."""

    def __init__(self, low: float = 1.0, high: float = 4.0, power: float = 3.0, no_guidance_frac: float = 0.0):
        require(1.0 <= low <= high and math.isfinite(high), "guidance_alpha.low/high",
                f"need 1 <= low <= high < inf, got {low}, {high}")
        require(math.isfinite(power), "guidance_alpha.power", f"must be a finite number, got {power}")
        require(0.0 <= no_guidance_frac <= 1.0, "guidance_alpha.no_guidance_frac",
                f"must be in [0, 1], got {no_guidance_frac}")
        self.low, self.high, self.power, self.no_guidance_frac = float(low), float(high), float(power), no_guidance_frac

    def inverse_cdf(self, u: Tensor) -> Tensor:
        """``u in [0, 1] -> alpha`` (float64)."""
        u = u.double()
        lo, hi, e = self.low, self.high, 1.0 - self.power
        if abs(e) < 1e-6:
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)

    def __call__(self, n: int, device=None) -> Tensor:
        """``(n,)`` float64 scales."""
        alpha = self.inverse_cdf(torch.rand(n, device=device, dtype=torch.float64))
        if self.no_guidance_frac > 0:
            alpha = torch.where(torch.rand(n, device=device) < self.no_guidance_frac, torch.ones_like(alpha), alpha)
        return alpha


class Drifting(Objective):
    """One-step generator trained so that its samples drift toward the data.

    The generator is ``f(eps, c) = net(eps, t=1, h=1, c)``. For each condition group the
    drift field ``V_{p,q}`` (``jumpflow.drift``) attracts generated samples to positives
    (data with that condition) and repels them from negatives (the other generated
    samples, and optional unconditional data for guidance). The loss (paper eq. 7)::

        L = || phi(f(eps)) - sg(phi(f(eps)) + V(phi(f(eps)))) ||^2

    moves ``phi(f(eps))`` along ``V``; ``V = 0`` when ``q = p`` (anti-symmetry).

    Groups: ``group_by="sample"`` makes each data row its own group with one positive (the
    policy regime: ``G`` generated chunks per observation, the expert chunk as the
    positive); ``"cond"`` groups rows whose encoded condition is identical (class labels)
    with all of them as positives; unconditional data is one group.

    Guidance: each group gets ``n_uncond_neg`` extra negatives, rows of the batch drawn from
    the *other* groups (never the group's own positives; a batch of one group gets none),
    with kernel weight ``uncond_weight``, or with ``guidance_alpha`` set the official
    alpha-conditioned weight ``(alpha - 1)(G - 1) / U`` (``uncond_negative_weight``) with
    ``alpha`` drawn per group (``AlphaSampler``). The generator must then be told its group's
    ``alpha``: the loss calls ``net.guidance_condition(cond_rows, alpha_rows) -> cond_rows``
    on the generated rows' conditions when the net has it (the hook for the shared
    guidance-as-input piece; without it alpha is drawn and weighted but not an input), and
    reports ``alpha_mean`` in the metrics.

    Shapes: ``x: (B, *shape)``, ``cond: (B, C)``; the loss is per generated sample,
    ``(groups * G,)``.

    Args:
        gen_per_group: ``G`` generated samples per group (``None``: as many as positives, for
            unconditional data).
        temperatures: kernel temperatures on mean-normalised distances.
        group_by: ``"sample"`` or ``"cond"``.
        n_uncond_neg, uncond_weight: unconditional real samples (from other groups) added as
            negatives per group and their kernel weight (guidance; 0 turns it off).
        guidance_alpha: ``None`` (off) or ``AlphaSampler`` kwargs ``{low, high, power,
            no_guidance_frac}`` (defaults 1, 4, 3, 0): per-group alpha and the weight
            ``(alpha - 1)(G - 1) / U`` instead of ``uncond_weight``; needs ``n_uncond_neg > 0``.
        scale: distance scale of the kernel, ``"batch"`` (one over all groups, the official
            code's) or ``"group"`` (each group's own mean; the earlier behaviour).
        affinity_floor: ``A = sqrt(max(softmax_row * softmax_col, floor))`` (official 1e-6; 0: off).
        attraction_only: ablation: drop the repulsion (not anti-symmetric).
        kernel: ``"auto"`` (numba on CPU, torch on GPU), ``"numba"`` or ``"torch"``.
        feature_map: factory of a frozen feature encoder ``phi`` (images); ``None``: identity.
            When ``phi`` returns a list of blocks ``[(N, d_i)]``, each block gets its own drift
            field and the losses add up.
    """

    name = "drifting"

    def from_data_prediction(self, z: Tensor, t: Tensor, x_hat: Tensor) -> Tensor:
        return x_hat                                    # the generator's output is a sample already

    def __init__(self, gen_per_group: int | None = 8, temperatures=(0.02, 0.05, 0.2), group_by: str = "cond",
                 n_uncond_neg: int = 0, uncond_weight: float = 1.0, attraction_only: bool = False,
                 kernel: str = "auto", feature_map: Callable[[], nn.Module] | None = None,
                 scale: str = "batch", affinity_floor: float = 1e-6, guidance_alpha: dict | None = None,
                 inference: dict | None = None):
        self.set_inference_defaults(inference, steps=1)
        require(scale in SCALES, "scale", f"must be one of {SCALES}, got {scale!r}")
        require(math.isfinite(affinity_floor) and 0.0 <= affinity_floor < 1.0, "affinity_floor",
                f"must be in [0, 1), got {affinity_floor}")
        self.scale, self.affinity_floor = scale, float(affinity_floor)
        require(guidance_alpha is None or isinstance(guidance_alpha, dict), "guidance_alpha",
                f"must be null or a dict of low, high, power, no_guidance_frac; got {guidance_alpha!r}")
        if guidance_alpha is not None:
            unknown = sorted(set(guidance_alpha) - {"low", "high", "power", "no_guidance_frac"})
            require(not unknown, "guidance_alpha", f"unknown keys {unknown}; valid: low, high, power, no_guidance_frac")
            require(n_uncond_neg > 0, "guidance_alpha", "needs n_uncond_neg > 0 (the unconditional negatives it weighs)")
        self.alpha_sampler = None if guidance_alpha is None else AlphaSampler(**guidance_alpha)
        # trained with a sampled alpha: the generator takes it as an input, chosen at sampling
        self.guidance_input = self.guidance_at_sampling = guidance_alpha is not None
        require(gen_per_group is None or gen_per_group >= 1, "gen_per_group", f"must be >= 1, got {gen_per_group}")
        temperatures = tuple(float(t) for t in temperatures)
        require(len(temperatures) > 0 and all(t > 0 for t in temperatures), "temperatures",
                f"need a non-empty list of positive values, got {list(temperatures)}")
        require(group_by in ("sample", "cond"), "group_by", f"must be 'sample' or 'cond', got {group_by!r}")
        require(n_uncond_neg >= 0, "n_uncond_neg", f"must be >= 0, got {n_uncond_neg}")
        require(uncond_weight >= 0, "uncond_weight", f"must be >= 0, got {uncond_weight}")
        require(kernel in ("auto", "numba", "torch"), "kernel", f"must be auto, numba or torch, got {kernel!r}")
        self.gen_per_group, self.temperatures, self.group_by = gen_per_group, temperatures, group_by
        self.n_uncond_neg, self.uncond_weight = n_uncond_neg, uncond_weight
        self.attraction_only, self.kernel, self.feature_map = attraction_only, kernel, feature_map

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        if self.feature_map is None:
            return {}
        phi = self.feature_map()
        phi.requires_grad_(False)
        phi.eval()
        return {"feature_map": phi}

    def _features(self, net, x: Tensor) -> list[Tensor]:
        """Feature blocks ``[(N, d_i)]``: one block (the sample itself, or ``phi(x)``) unless
        the feature map returns several, which then get one drift field each."""
        phi = net.aux["feature_map"] if "feature_map" in getattr(net, "aux", {}) else None
        out = x if phi is None else phi(x)
        return [f.flatten(1) for f in (out if isinstance(out, (list, tuple)) else [out])]

    def _groups(self, x: Tensor, cond: Tensor | None):
        """Positives ``(Gr, P, *shape)``, their mask ``(Gr, P)`` and one condition row per group."""
        return self._grouping(x, cond)[:3]

    def _grouping(self, x: Tensor, cond: Tensor | None):
        """``_groups`` and the group of each row ``(B,)`` (long)."""
        b = x.shape[0]
        if cond is None:
            return (x[None], torch.ones(1, b, dtype=torch.bool, device=x.device), None,
                    torch.zeros(b, dtype=torch.long, device=x.device))
        if self.group_by == "sample":
            return (x[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device), cond,
                    torch.arange(b, device=x.device))
        uniq, inverse = torch.unique(cond.detach(), dim=0, return_inverse=True)   # (Gr, C), (B,)
        n_groups = uniq.shape[0]
        counts = torch.bincount(inverse, minlength=n_groups)
        p = int(counts.max())
        order = torch.argsort(inverse, stable=True)
        slot = torch.arange(b, device=x.device) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pos = x.new_zeros((n_groups, p, *x.shape[1:]))
        mask = torch.zeros(n_groups, p, dtype=torch.bool, device=x.device)
        pos[inverse[order], slot] = x[order]
        mask[inverse[order], slot] = True
        first = torch.zeros(n_groups, dtype=torch.long, device=x.device)
        first[inverse[order].flip(0)] = order.flip(0)                             # one row of each group
        return pos, mask, cond[first], inverse

    @staticmethod
    def uncond_negative_rows(row_group: Tensor, n_groups: int, n: int) -> Tensor | None:
        """``(Gr, n)`` batch rows, each group's drawn uniformly (with replacement) from the rows
        of the *other* groups; ``None`` when the batch has one group (no other condition)."""
        if n_groups < 2 or n <= 0:
            return None
        other = row_group[None, :] != torch.arange(n_groups, device=row_group.device)[:, None]   # (Gr, B)
        return torch.multinomial(other.double(), n, replacement=True)                          # (Gr, n)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        pos, mask, group_cond, row_group = self._grouping(x, cond)              # (Gr, P, *shape), (Gr, P), .., (B,)
        n_groups, p = mask.shape
        g = self.gen_per_group or p
        metrics = {}
        alpha = None if self.alpha_sampler is None else self.alpha_sampler(n_groups, x.device)   # (Gr,) float64
        noise = torch.randn((n_groups * g, *x.shape[1:]), device=x.device, dtype=x.dtype)
        gen_cond = None if group_cond is None else group_cond.repeat_interleave(g, 0)   # (Gr*G, C)
        if alpha is not None:
            metrics["alpha_mean"] = alpha.mean().item()
            hook = getattr(net, "guidance_condition", None)
            if hook is not None and gen_cond is not None:                       # alpha as the generator's input
                gen_cond = hook(gen_cond, alpha.to(x.dtype).repeat_interleave(g, 0))
        ones = torch.ones(noise.shape[0], device=x.device, dtype=x.dtype)
        x_gen = net(noise, ones, ones, gen_cond)                                # (Gr*G, *shape)

        gen_blocks = self._features(net, x_gen)                                 # [(Gr*G, d_i)]
        with torch.no_grad():
            pos_blocks = self._features(net, pos.flatten(0, 1))                 # [(Gr*P, d_i)]
            neg_blocks, neg_weight = [None] * len(gen_blocks), self.uncond_weight
            rows = None
            if self.n_uncond_neg > 0 and (self.uncond_weight > 0 or alpha is not None):
                rows = self.uncond_negative_rows(row_group, n_groups, self.n_uncond_neg)   # (Gr, U) or None
            if rows is not None:
                neg_blocks = self._features(net, x[rows.flatten()])             # [(Gr*U, d_i)]
                if alpha is not None:
                    neg_weight = uncond_negative_weight(alpha, g, self.n_uncond_neg).to(x.dtype)   # (Gr,)
        loss, drift_sq = 0.0, 0.0
        for f_gen, f_pos, f_neg in zip(gen_blocks, pos_blocks, neg_blocks):
            with torch.no_grad():
                neg = None if f_neg is None else f_neg.reshape(n_groups, self.n_uncond_neg, -1)
                v = drift_field(f_gen.detach().reshape(n_groups, g, -1), f_pos.reshape(n_groups, p, -1), mask, neg,
                                neg_weight, self.temperatures, attraction_only=self.attraction_only,
                                impl=self.kernel, scale=self.scale, floor=self.affinity_floor)   # (Gr, G, d_i)
                target = f_gen.detach() + v.reshape(f_gen.shape)                # (Gr*G, d_i)
            loss = loss + (f_gen - target).pow(2).mean(1)                       # (Gr*G,)
            drift_sq += v.pow(2).mean().item()
        metrics["drift_norm"] = (drift_sq / len(gen_blocks)) ** 0.5
        return LossOutput(loss, metrics)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        steps = self.resolve(inference).steps
        require(steps == 1, "inference.steps", f"a drifting generator is one-step; got steps={steps}")
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        if self.guidance_input and cond is not None:                            # alpha chosen at sampling
            alpha = float(self.resolve(inference).guidance)
            cond = net.guidance_condition(cond, torch.full_like(ones, alpha))
        return net(noise, ones, ones, cond)
