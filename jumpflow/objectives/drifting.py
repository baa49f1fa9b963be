"""Drifting Models: Deng, Li, Zhang, He et al., "Generative Modeling via Drifting"
(arXiv 2602.04770, 2026)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from jumpflow.drift import drift_field
from jumpflow.objectives.base import LossOutput, Objective, require


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

    Shapes: ``x: (B, *shape)``, ``cond: (B, C)``; the loss is per generated sample,
    ``(groups * G,)``.

    Args:
        gen_per_group: ``G`` generated samples per group (``None``: as many as positives, for
            unconditional data).
        temperatures: kernel temperatures on mean-normalised distances.
        group_by: ``"sample"`` or ``"cond"``.
        n_uncond_neg, uncond_weight: unconditional real samples added as negatives per
            group and their kernel weight (guidance; 0 turns it off).
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
                 kernel: str = "auto", feature_map: Callable[[], nn.Module] | None = None):
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
        b = x.shape[0]
        if cond is None:
            return x[None], torch.ones(1, b, dtype=torch.bool, device=x.device), None
        if self.group_by == "sample":
            return x[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device), cond
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
        return pos, mask, cond[first]

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        pos, mask, group_cond = self._groups(x, cond)                           # (Gr, P, *shape), (Gr, P)
        n_groups, p = mask.shape
        g = self.gen_per_group or p
        noise = torch.randn((n_groups * g, *x.shape[1:]), device=x.device, dtype=x.dtype)
        gen_cond = None if group_cond is None else group_cond.repeat_interleave(g, 0)   # (Gr*G, C)
        ones = torch.ones(noise.shape[0], device=x.device, dtype=x.dtype)
        x_gen = net(noise, ones, ones, gen_cond)                                # (Gr*G, *shape)

        gen_blocks = self._features(net, x_gen)                                 # [(Gr*G, d_i)]
        with torch.no_grad():
            pos_blocks = self._features(net, pos.flatten(0, 1))                 # [(Gr*P, d_i)]
            neg_blocks = [None] * len(gen_blocks)
            if self.n_uncond_neg > 0 and self.uncond_weight > 0:
                idx = torch.randint(0, x.shape[0], (n_groups, self.n_uncond_neg), device=x.device)
                neg_blocks = self._features(net, x[idx.flatten()])              # [(Gr*U, d_i)]
        loss, drift_sq = 0.0, 0.0
        for f_gen, f_pos, f_neg in zip(gen_blocks, pos_blocks, neg_blocks):
            with torch.no_grad():
                neg = None if f_neg is None else f_neg.reshape(n_groups, self.n_uncond_neg, -1)
                v = drift_field(f_gen.detach().reshape(n_groups, g, -1), f_pos.reshape(n_groups, p, -1), mask, neg,
                                self.uncond_weight, self.temperatures, attraction_only=self.attraction_only,
                                impl=self.kernel)                               # (Gr, G, d_i)
                target = f_gen.detach() + v.reshape(f_gen.shape)                # (Gr*G, d_i)
            loss = loss + (f_gen - target).pow(2).mean(1)                       # (Gr*G,)
            drift_sq += v.pow(2).mean().item()
        return LossOutput(loss, {"drift_norm": (drift_sq / len(gen_blocks)) ** 0.5})

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, steps: int = 1) -> Tensor:
        require(steps == 1, "steps", f"a drifting generator is one-step; got steps={steps}")
        ones = torch.ones(noise.shape[0], device=noise.device, dtype=noise.dtype)
        return net(noise, ones, ones, cond)
