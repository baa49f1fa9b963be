"""Drifting Models: Deng, Li, Zhang, He et al., "Generative Modeling via Drifting"
(arXiv 2602.04770, 2026).

Under ``torchrun`` (or with ``grad_accum > 1``) the field is computed over the *global* batch:
each shard's generated, positive and unconditional-negative features are gathered without
gradient (``jumpflow.distributed.gather_shards``), and each shard's loss is on its own
generated samples, so the field of N processes is the field of one process holding every
shard (:func:`merge_shards`, :func:`global_drift_field`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jumpflow.distributed import current_shards, gather_shards
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


def _pad_by_group(group: Tensor, n_groups: int) -> tuple[Tensor, Tensor, int]:
    """Slots of rows in a padded ``(n_groups, width)`` layout: ``(group (N,), slot (N,), width)``
    with rows kept in their order within each group (stable)."""
    counts = torch.bincount(group, minlength=n_groups)                       # (Gr,)
    width = int(counts.max()) if group.numel() else 0
    order = torch.argsort(group, stable=True)
    start = torch.cumsum(counts, 0) - counts                                 # (Gr,)
    slot = torch.empty_like(group)
    slot[order] = torch.arange(group.numel(), device=group.device) - start[group[order]]
    return group, slot, width


def _scatter_pad(values: Tensor, group: Tensor, slot: Tensor, n_groups: int, width: int) -> tuple[Tensor, Tensor]:
    """``values (N, *f)`` placed at ``[group, slot]`` of ``(n_groups, width, *f)``, and the mask."""
    out = values.new_zeros((n_groups, width, *values.shape[1:]))
    mask = torch.zeros(n_groups, width, dtype=torch.bool, device=values.device)
    out[group, slot] = values
    mask[group, slot] = True
    return out, mask


@dataclass
class ShardLayout:
    """Where the rows of every shard go in the global groups (:func:`merge_shards`).

    Attributes:
        n_groups: global groups ``Gr``.
        gen: ``(group, slot)`` of every generated row, all shards concatenated in shard order;
            ``gen_width`` the padded group size, ``gen_mask (Gr, G)``.
        pos_group, pos: positives of each global group: ``pos`` indexes the concatenated data
            rows, ``(Gr, P)`` (``pos_mask``); a condition split into several groups (different
            guidance scales) lends its data to each.
        neg: ``(group, slot)`` of every unconditional negative, ``neg_width``, ``neg_mask``.
        group_alpha: ``(Gr,)`` guidance scale of each group (``None`` without guidance).
        gen_count, neg_count: ``(Gr,)`` real generated samples and negatives per group.
        own: ``slice`` of the caller's generated rows in the concatenation.
    """

    n_groups: int
    gen: tuple[Tensor, Tensor]
    gen_width: int
    gen_mask: Tensor
    pos: Tensor
    pos_mask: Tensor
    neg: tuple[Tensor, Tensor]
    neg_width: int
    neg_mask: Tensor
    group_alpha: Tensor | None
    gen_count: Tensor
    neg_count: Tensor
    own: slice


def merge_shards(parts: list[dict[str, Tensor]], own: int, group_by: str, conditional: bool) -> ShardLayout:
    """The global groups of the shards ``parts`` (each from ``Drifting.shard_payload``).

    A global group is, for ``group_by="cond"``, one condition (and one guidance scale, when
    scales are drawn: generated samples made at different scales are different distributions)
    over every shard; for ``"sample"``, one data row; for unconditional data, the whole batch.
    Its generated samples are those of every shard's local group that maps to it (shard order,
    then local order), its positives every data row with its condition (shard order, then row
    order), its unconditional negatives those its local groups drew. Deterministic in ``parts``:
    every process (and one process holding every shard) builds the same layout."""
    dev = parts[0]["row_group"].device
    n_local = [int(p["cond"].shape[0]) for p in parts]                         # local groups per shard
    offsets = torch.tensor([0, *n_local], device=dev).cumsum(0)[:-1].tolist()
    total = sum(n_local)
    cond = torch.cat([p["cond"] for p in parts])                             # (L, C) float64
    alpha = torch.cat([p["alpha"] for p in parts]) if "alpha" in parts[0] else None   # (L,)
    if not conditional:
        cond_id = torch.zeros(total, dtype=torch.long, device=dev)
        key_id = cond_id
    elif group_by == "sample":
        cond_id = key_id = torch.arange(total, device=dev)
    else:
        cond_id = torch.unique(cond, dim=0, return_inverse=True)[1]          # (L,)
        key_id = cond_id if alpha is None else torch.unique(torch.cat([cond, alpha[:, None]], 1), dim=0,
                                                            return_inverse=True)[1]
    n_groups = int(key_id.max()) + 1
    group_cond = torch.zeros(n_groups, dtype=torch.long, device=dev)
    group_cond[key_id] = cond_id                                             # (Gr,) condition of each group
    group_alpha = None
    if alpha is not None:
        group_alpha = torch.zeros(n_groups, dtype=alpha.dtype, device=dev)
        group_alpha[key_id] = alpha                                          # equal within a group
    # generated rows
    gen_group = torch.cat([key_id[off + p["gen_group"]] for off, p in zip(offsets, parts)])
    gen_group, gen_slot, gen_width = _pad_by_group(gen_group, n_groups)
    gen_mask = torch.zeros(n_groups, gen_width, dtype=torch.bool, device=dev)
    gen_mask[gen_group, gen_slot] = True
    # positives: the data rows of each condition, then lent to each group of that condition
    row_cond = torch.cat([cond_id[off + p["row_group"]] for off, p in zip(offsets, parts)])   # (N,)
    n_cond = int(cond_id.max()) + 1
    row_cond, row_slot, p_width = _pad_by_group(row_cond, n_cond)
    by_cond = torch.full((n_cond, p_width), -1, dtype=torch.long, device=dev)
    by_cond[row_cond, row_slot] = torch.arange(row_cond.numel(), device=dev)
    pos = by_cond[group_cond]                                                # (Gr, P) row index or -1
    pos_mask = pos >= 0
    # unconditional negatives
    neg_group = torch.cat([key_id[off + p["neg_group"]] for off, p in zip(offsets, parts)])
    neg_group, neg_slot, neg_width = _pad_by_group(neg_group, n_groups)
    neg_mask = torch.zeros(n_groups, neg_width, dtype=torch.bool, device=dev)
    neg_mask[neg_group, neg_slot] = True
    n_gen = [int(p["gen_group"].shape[0]) for p in parts]
    start = sum(n_gen[:own])
    return ShardLayout(n_groups, (gen_group, gen_slot), gen_width, gen_mask, pos, pos_mask, (neg_group, neg_slot),
                       neg_width, neg_mask, group_alpha, gen_mask.sum(1), neg_mask.sum(1),
                       slice(start, start + n_gen[own]))


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
            field and the losses add up. A block ``(N, T, d_i)`` holds ``T`` locations (or
            patches) of a feature map, each its own drift field (the official feature sets,
            ``jumpflow.images.encoders.location_feature_sets``); its loss is the mean over them.
    """

    name = "drifting"
    #: the field couples every sample of the batch: under torchrun / grad_accum it is taken over
    #: the global batch (the trainer's shards, ``jumpflow.distributed.gather_shards``)
    couples_shards = True

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
        """Feature blocks ``[(N, d_i)]`` or ``[(N, T_i, d_i)]`` (per location): one block (the
        sample itself, flattened, or ``phi(x)``) unless the feature map returns several, which
        then get one drift field each."""
        phi = net.aux["feature_map"] if "feature_map" in getattr(net, "aux", {}) else None
        if phi is None:
            return [x.flatten(1)]                                               # [(N, D)]
        out = phi(x)
        return [f if f.dim() == 3 else f.flatten(1) for f in (out if isinstance(out, (list, tuple)) else [out])]

    def _field(self, gen: Tensor, pos: Tensor, pos_mask: Tensor, neg: Tensor | None, neg_weight,
               gen_mask: Tensor | None = None, neg_mask: Tensor | None = None) -> Tensor:
        """``drift_field`` of groups ``gen (Gr, G, d)``, or per location of ``gen (Gr, G, T, d)``
        (``pos (Gr, P, ...)``, ``neg (Gr, U, ...)`` alike): location ``t`` of group ``r`` is a
        group of its own, ordered group-major as the official ``'(b f) x d'``, so the batch
        distance scale and each temperature's rms run over every group and location together."""
        opts = {"attraction_only": self.attraction_only, "impl": self.kernel, "scale": self.scale,
                "floor": self.affinity_floor, "gen_mask": gen_mask, "neg_mask": neg_mask}
        if gen.dim() == 3:
            return drift_field(gen, pos, pos_mask, neg, neg_weight, self.temperatures, **opts)   # (Gr, G, d)
        n_groups, locations = gen.shape[0], gen.shape[2]

        def fold(a):                                                            # (Gr, K, T, d) -> (Gr*T, K, d)
            return None if a is None else a.transpose(1, 2).flatten(0, 1)

        def per_location(m):                                                    # (Gr, K) -> (Gr*T, K)
            return None if m is None else m.repeat_interleave(locations, 0)

        if isinstance(neg_weight, Tensor) and neg_weight.dim() == 1:
            neg_weight = neg_weight.repeat_interleave(locations)                # (Gr*T,)
        opts.update(gen_mask=per_location(gen_mask), neg_mask=per_location(neg_mask))
        v = drift_field(fold(gen), fold(pos), per_location(pos_mask), fold(neg), neg_weight, self.temperatures,
                        **opts)                                                 # (Gr*T, G, d)
        return v.unflatten(0, (n_groups, locations)).transpose(1, 2)            # (Gr, G, T, d)

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
        # a net with grouped conditioning takes (t, h, cond) once per group and spreads it over the
        # group's G consecutive samples (layers.per_row): the embedder and FiLM / adaLN run Gr times,
        # not Gr * G; any other net gets every row repeated
        repeat = 1 if getattr(net, "grouped_condition", False) else g
        gen_cond = None if group_cond is None else group_cond.repeat_interleave(repeat, 0)   # (Gr*repeat, C)
        if alpha is not None:
            metrics["alpha_mean"] = alpha.mean().item()
            hook = getattr(net, "guidance_condition", None)
            if hook is not None and gen_cond is not None:                       # alpha as the generator's input
                gen_cond = hook(gen_cond, alpha.to(x.dtype).repeat_interleave(repeat, 0))
        ones = torch.ones(n_groups * repeat, device=x.device, dtype=x.dtype)
        x_gen = net(noise, ones, ones, gen_cond)                                # (Gr*G, *shape)

        gen_blocks = self._features(net, x_gen)                                 # [(Gr*G, d_i)]
        if current_shards() is not None:                                        # a global batch of several shards
            return self._global_loss(net, x, gen_blocks, group_cond, row_group, alpha, g, metrics)
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
                neg = None if f_neg is None else f_neg.unflatten(0, (n_groups, self.n_uncond_neg))   # (Gr, U, ...)
                v = self._field(f_gen.detach().unflatten(0, (n_groups, g)), f_pos.unflatten(0, (n_groups, p)), mask,
                                neg, neg_weight)                                # (Gr, G, [T,] d_i)
                target = f_gen.detach() + v.reshape(f_gen.shape)                # (Gr*G, [T,] d_i)
            loss = loss + (f_gen - target).pow(2).flatten(1).mean(1)            # (Gr*G,)
            drift_sq += v.pow(2).mean().item()
        metrics["drift_norm"] = (drift_sq / len(gen_blocks)) ** 0.5
        return LossOutput(loss, metrics)

    def _uncond_rows(self, row_group: Tensor, n_groups: int, alpha) -> Tensor | None:
        if self.n_uncond_neg > 0 and (self.uncond_weight > 0 or alpha is not None):
            return self.uncond_negative_rows(row_group, n_groups, self.n_uncond_neg)   # (Gr, U) or None
        return None

    def shard_payload(self, net, x: Tensor, gen_blocks: list[Tensor], group_cond: Tensor | None, row_group: Tensor,
                      alpha: Tensor | None, g: int) -> dict[str, Tensor]:
        """What this shard lends to the global field (detached): ``cond (Gr, C)`` of each local
        group (float64; ``(Gr, 0)`` unconditional), ``alpha (Gr,)`` (with guidance),
        ``row_group (B,)`` and ``gen_group (Gr*G,)`` / ``neg_group (Gr*U,)`` (local group of each
        data row, generated sample, unconditional negative), and per feature block ``i``:
        ``gen.i (Gr*G, [T,] d_i)``, ``pos.i (B, [T,] d_i)`` (every data row), ``neg.i (Gr*U, [T,] d_i)``."""
        n_groups = 1 if group_cond is None else group_cond.shape[0]
        with torch.no_grad():
            pos_blocks = self._features(net, x)                                 # [(B, [T,] d_i)]
            rows = self._uncond_rows(row_group, n_groups, alpha)                # (Gr, U) or None
            if rows is not None:
                neg_blocks = self._features(net, x[rows.flatten()])             # [(Gr*U, [T,] d_i)]
                neg_group = torch.arange(n_groups, device=x.device).repeat_interleave(rows.shape[1])
            else:
                neg_blocks = [f.new_zeros((0, *f.shape[1:])) for f in pos_blocks]
                neg_group = torch.zeros(0, dtype=torch.long, device=x.device)
        cond = (group_cond.detach().double() if group_cond is not None
                else torch.zeros(n_groups, 0, dtype=torch.float64, device=x.device))
        out = {"cond": cond, "row_group": row_group, "neg_group": neg_group,
               "gen_group": torch.arange(n_groups, device=x.device).repeat_interleave(g)}
        if self.alpha_sampler is not None:
            out["alpha"] = alpha.double()
        for i, (f_gen, f_pos, f_neg) in enumerate(zip(gen_blocks, pos_blocks, neg_blocks)):
            out[f"gen.{i}"], out[f"pos.{i}"], out[f"neg.{i}"] = f_gen.detach(), f_pos, f_neg
        return out

    def global_drift_field(self, parts: list[dict[str, Tensor]], own: int) -> list[Tensor]:
        """The drift field of shard ``own``'s generated samples over the global batch ``parts``
        (``shard_payload`` of every shard): one ``(G_own, [T,] d_i)`` per feature block. Every global
        group's field is computed (the column softmax and the rms couple the rows), then the
        caller's rows are taken."""
        layout = merge_shards(parts, own, self.group_by, conditional=parts[0]["cond"].shape[1] > 0)
        neg_weight = self.uncond_weight
        if layout.group_alpha is not None:
            neg_weight = (layout.group_alpha - 1.0) * (layout.gen_count - 1) / layout.neg_count.clamp_min(1)   # (Gr,)
        fields = []
        n_blocks = sum(1 for k in parts[0] if k.startswith("gen."))
        for i in range(n_blocks):
            f_gen = torch.cat([p[f"gen.{i}"] for p in parts])                   # (sum G_s, d)
            f_pos = torch.cat([p[f"pos.{i}"] for p in parts])                   # (N, d)
            f_neg = torch.cat([p[f"neg.{i}"] for p in parts])                   # (sum U_s, d)
            gen, gen_mask = _scatter_pad(f_gen, *layout.gen, layout.n_groups, layout.gen_width)   # (Gr, G, [T,] d)
            real = layout.pos_mask.reshape(*layout.pos_mask.shape, *[1] * (f_pos.dim() - 1))
            pos = f_pos[layout.pos.clamp_min(0)] * real                         # (Gr, P, [T,] d)
            neg, neg_mask = None, None
            if f_neg.shape[0] > 0:
                neg, neg_mask = _scatter_pad(f_neg, *layout.neg, layout.n_groups, layout.neg_width)   # (Gr, U, d)
            w = neg_weight.to(f_gen.dtype) if isinstance(neg_weight, Tensor) else neg_weight
            v = self._field(gen, pos, layout.pos_mask, neg, w, gen_mask, neg_mask)   # (Gr, G, [T,] d)
            fields.append(v[layout.gen[0][layout.own], layout.gen[1][layout.own]])   # (G_own, [T,] d)
        return fields

    def _global_loss(self, net, x, gen_blocks, group_cond, row_group, alpha, g, metrics) -> LossOutput:
        """The loss of this shard's generated samples under the field of the global batch."""
        payload = self.shard_payload(net, x, gen_blocks, group_cond, row_group, alpha, g)
        parts, own = gather_shards(payload)
        fields = self.global_drift_field(parts, own)
        loss, drift_sq = 0.0, 0.0
        for f_gen, v in zip(gen_blocks, fields):
            target = f_gen.detach() + v                                         # (G_own, [T,] d_i)
            loss = loss + (f_gen - target).pow(2).flatten(1).mean(1)            # (G_own,)
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
