"""The drift field of Drifting Models: Deng et al., "Generative Modeling via Drifting"
(arXiv 2602.04770, 2026), with a torch kernel (batched over groups; GPU) and a fused numba
kernel (CPU; parallel over groups).

A *group* is one condition: ``G`` generated samples ``x``, ``P`` positives ``y+`` (data with
that condition; padded, with a mask) and negatives ``y-``: the generated samples themselves
(stop-grad, self-pairs masked) and optional extra negatives (unconditional data, for
guidance) with a column weight ``w_j`` (``neg_weight``: one number, or one per group; 1 for
positives and generated negatives). For each temperature ``tau``::

    d_ij   = ||x_i - y_j|| / S
    S      = sum w_j ||x_i - y_j|| / sum w_j            (scale="batch": one scale over every
                                                         valid pair of every group, the official
                                                         code's; scale="group": the unweighted
                                                         mean of each group's valid pairs)
    A_ij   = w_j sqrt(max(softmax_j(-d_ij / tau) * softmax_i(-d_ij / tau), floor))
    V_tau,i = (sum_{j-} A_ij) sum_{j+} A_ij y_j  -  (sum_{j+} A_ij) sum_{j-} A_ij y_j
    V      = sum_tau V_tau / rms(V_tau)                 (rms over the whole batch)

Valid pairs exclude padded positives and self-pairs: these get ``A = 0`` and stay out of
``S``. Groups of unequal sizes (Drifting's field over a global batch gathered from several
processes) are padded, with ``gen_mask`` / ``neg_mask`` marking the real generated samples and
extra negatives: a padded generated sample is neither a row nor a negative column, its field
is 0 and it is left out of the rms. (The official code masks self-pairs by adding 100 to their normalised distance instead:
they keep the floor ``sqrt(1e-6)`` in the negative sum, and their ~0 distance counts in the
mean, making ``S`` smaller by a factor ``1 - 1/M`` for ``M`` targets per row, 11% when
``G = 8, P = 1``; not copied here.) ``floor = 1e-6`` is the official affinity floor
(``jnp.clip(.., a_min=1e-6)``), 0 turns it off.

Swapping positives and negatives negates ``V`` (anti-symmetry), so ``V = 0`` when ``p = q``.
``attraction_only`` (ablation) keeps only the kernel-weighted pull
``sum_{j+} A_ij (y_j - x_i) / sum_{j+} A_ij``.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
import torch
from torch import Tensor

# numba's default threading layer on Linux is its own OpenMP pool, a second runtime beside
# torch's: its workers spin between kernel launches and take a core from torch, so a Drifting
# training step (kernel + torch forward / backward) ran 1.5x slower and used twice the CPU
# (bench/results/numba_layer.json). The workqueue layer's workers sleep. It must be chosen
# before the first parallel launch; a layer the user names in NUMBA_THREADING_LAYER wins.
# (workqueue does not allow two Python threads to launch kernels at once; the drift field is
# computed in the training thread only.)
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_NEG_INF = -math.inf


def _check(gen: Tensor, pos: Tensor, pos_mask, neg, temperatures, gen_mask=None, neg_mask=None) -> None:
    if gen.dim() != 3 or pos.dim() != 3:
        raise ValueError(f"drift_field: gen and pos must be (groups, n, d), got {tuple(gen.shape)}, {tuple(pos.shape)}")
    if gen.shape[0] != pos.shape[0] or gen.shape[2] != pos.shape[2]:
        raise ValueError(f"drift_field: gen {tuple(gen.shape)} and pos {tuple(pos.shape)} disagree on groups or d")
    if pos_mask is not None and tuple(pos_mask.shape) != tuple(pos.shape[:2]):
        raise ValueError(f"drift_field: pos_mask must be {tuple(pos.shape[:2])}, got {tuple(pos_mask.shape)}")
    if neg is not None and (neg.dim() != 3 or neg.shape[0] != gen.shape[0] or neg.shape[2] != gen.shape[2]):
        raise ValueError(f"drift_field: neg must be (groups, U, d={gen.shape[2]}), got {tuple(neg.shape)}")
    if gen_mask is not None and tuple(gen_mask.shape) != tuple(gen.shape[:2]):
        raise ValueError(f"drift_field: gen_mask must be {tuple(gen.shape[:2])}, got {tuple(gen_mask.shape)}")
    if neg_mask is not None and (neg is None or tuple(neg_mask.shape) != tuple(neg.shape[:2])):
        raise ValueError(f"drift_field: neg_mask must be the shape of neg[:, :, 0], got {tuple(neg_mask.shape)}")
    if len(temperatures) == 0 or any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures: need a non-empty list of positive values, got {list(temperatures)}")


SCALES = ("batch", "group")


def _check_options(gen: Tensor, neg_weight, scale: str, floor: float) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale: must be one of {SCALES}, got {scale!r}")
    if not (floor >= 0.0 and math.isfinite(floor)):
        raise ValueError(f"floor: must be a finite number >= 0, got {floor!r}")
    if isinstance(neg_weight, Tensor) and neg_weight.dim() > 0 and tuple(neg_weight.shape) != (gen.shape[0],):
        raise ValueError(f"neg_weight: must be a number or ({gen.shape[0]},) (one per group), "
                         f"got {tuple(neg_weight.shape)}")


def _group_neg_weight(neg_weight, n_groups: int, dtype, device) -> Tensor:
    """``neg_weight`` (a number or ``(groups,)``) as a ``(groups,)`` tensor."""
    w = torch.as_tensor(neg_weight, dtype=dtype, device=device)
    return w.expand(n_groups) if w.dim() == 0 else w


def _kernel_pairs(gen: Tensor, pos: Tensor, pos_mask, neg, neg_weight, gen_as_neg: bool, scale: str,
                  gen_mask, neg_mask) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The targets ``y (Gr, M, d)`` (positives, then generated, then extra negatives), the valid
    pairs ``(Gr, G, M)`` (bool), the column weights ``(Gr, 1, M)`` and the scale-normalised
    distances ``(Gr, G, M)`` of the torch kernel."""
    n_groups, g, _ = gen.shape
    p = pos.shape[1]
    negs = [gen] if gen_as_neg else []
    if neg is not None:
        negs.append(neg)
    y = torch.cat([pos, *negs], dim=1)                                   # (Gr, M, d)
    m = y.shape[1]
    valid = torch.ones(n_groups, g, m, dtype=torch.bool, device=gen.device)
    if pos_mask is not None:
        valid[:, :, :p] &= pos_mask[:, None, :]
    if gen_as_neg:
        valid[:, :, p:p + g] &= ~torch.eye(g, dtype=torch.bool, device=gen.device)
    if gen_mask is not None:                                            # padded generated samples
        valid &= gen_mask[:, :, None]
        if gen_as_neg:
            valid[:, :, p:p + g] &= gen_mask[:, None, :]
    if neg_mask is not None and neg is not None:                        # padded extra negatives
        valid[:, :, m - neg.shape[1]:] &= neg_mask[:, None, :]
    weight = torch.ones(n_groups, m, dtype=gen.dtype, device=gen.device)   # (Gr, M)
    if neg is not None:
        weight[:, m - neg.shape[1]:] = _group_neg_weight(neg_weight, n_groups, gen.dtype, gen.device)[:, None]
    weight = weight[:, None, :]                                         # (Gr, 1, M)
    dist = torch.cdist(gen, y)                                          # (Gr, G, M)
    if scale == "batch":
        vw = valid * weight                                             # (Gr, G, M)
        mean = ((dist * vw).sum() / vw.sum().clamp_min(1e-30)).expand(n_groups)   # (Gr,) one value
    else:
        count = valid.sum((1, 2)).clamp_min(1)
        mean = (dist * valid).sum((1, 2)) / count                       # (Gr,)
    dist = dist / mean.clamp_min(1e-12)[:, None, None]
    return y, valid, weight, dist


def _kernel_logits(dist: Tensor, valid: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """``-d / tau`` on valid pairs (``-inf`` elsewhere) ``(Gr, G, M)`` and its log-normalisers over
    the columns ``(Gr, G, 1)`` and over the rows ``(Gr, 1, M)``."""
    logits = torch.where(valid, -dist / tau, torch.full_like(dist, _NEG_INF))
    return logits, torch.logsumexp(logits, dim=2, keepdim=True), torch.logsumexp(logits, dim=1, keepdim=True)


def log_pair_products(gen: Tensor, pos: Tensor, temperature: float, pos_mask: Tensor | None = None,
                      scale: str = "batch") -> tuple[Tensor, Tensor]:
    """``log(softmax_row * softmax_col)`` of every (generated, target) pair ``(Gr, G, M)`` at one
    temperature, the quantity the affinity floor clips (targets: positives, then the generated
    samples as negatives), and the valid pairs ``(Gr, G, M)`` (bool; self-pairs and padded
    positives are not). Same masks and distance scale as the torch kernel."""
    _check(gen, pos, pos_mask, None, (temperature,))
    _check_options(gen, 1.0, scale, 0.0)
    _, valid, _, dist = _kernel_pairs(gen, pos, pos_mask, None, 1.0, True, scale, None, None)
    logits, row, col = _kernel_logits(dist, valid, temperature)
    return 2 * logits - row - col, valid


def drift_field_torch(gen: Tensor, pos: Tensor, pos_mask: Tensor | None = None, neg: Tensor | None = None,
                      neg_weight: float | Tensor = 1.0, temperatures=(0.02, 0.05, 0.2), gen_as_neg: bool = True,
                      attraction_only: bool = False, scale: str = "batch", floor: float = 1e-6,
                      gen_mask: Tensor | None = None, neg_mask: Tensor | None = None) -> Tensor:
    """Per-temperature raw fields ``(K, groups, G, d)`` (before rms normalisation), in torch."""
    p = pos.shape[1]
    y, valid, weight, dist = _kernel_pairs(gen, pos, pos_mask, neg, neg_weight, gen_as_neg, scale, gen_mask, neg_mask)
    out = []
    for tau in temperatures:
        logits, row, col = _kernel_logits(dist, valid, tau)              # (Gr, G, M), (Gr, G, 1), (Gr, 1, M)
        a = torch.exp(logits - 0.5 * (row + col))                       # (Gr, G, M)
        if floor > 0:
            a = a.clamp_min(math.sqrt(floor))                           # sqrt(max(p, f)) = max(sqrt p, sqrt f)
        a = torch.where(valid, a, torch.zeros_like(a)) * weight
        a_pos, a_neg = a[:, :, :p], a[:, :, p:]
        s_pos = a_pos.sum(-1, keepdim=True)                             # (Gr, G, 1)
        s_neg = a_neg.sum(-1, keepdim=True)                             # (Gr, G, 1)
        if attraction_only:
            v = (a_pos @ pos) / s_pos.clamp_min(1e-30) - gen * (s_pos > 0)
        else:
            v = s_neg * (a_pos @ pos) - s_pos * (a_neg @ y[:, p:])        # (Gr, G, d)
        out.append(v)
    return torch.stack(out)                                             # (K, Gr, G, d)


@numba.njit(parallel=True, fastmath={"nsz", "arcp", "contract", "reassoc"}, cache=True)
def _drift_scale_numba(gen, pos, pos_mask, neg, neg_w, gen_as_neg, gen_mask, neg_mask):  # pragma: no cover - jit
    # Per group: sum_valid w_j d_ij and sum_valid w_j (float64); the caller adds them up.
    n_groups, g, d = gen.shape
    p = pos.shape[1]
    u = neg.shape[1]
    n_gen_neg = g if gen_as_neg else 0
    m = p + n_gen_neg + u
    wd = np.zeros(n_groups, dtype=np.float64)
    ww = np.zeros(n_groups, dtype=np.float64)
    for grp in numba.prange(n_groups):
        total = 0.0
        wsum = 0.0
        for i in range(g):
            if not gen_mask[grp, i]:
                continue
            for j in range(m):
                if j < p:
                    if not pos_mask[grp, j]:
                        continue
                    w = 1.0
                elif j < p + n_gen_neg:
                    if j - p == i or not gen_mask[grp, j - p]:
                        continue
                    w = 1.0
                else:
                    if not neg_mask[grp, j - p - n_gen_neg]:
                        continue
                    w = neg_w[grp]
                acc = 0.0
                for c in range(d):
                    if j < p:
                        diff = gen[grp, i, c] - pos[grp, j, c]
                    elif j < p + n_gen_neg:
                        diff = gen[grp, i, c] - gen[grp, j - p, c]
                    else:
                        diff = gen[grp, i, c] - neg[grp, j - p - n_gen_neg, c]
                    acc += diff * diff
                total += w * math.sqrt(acc)
                wsum += w
        wd[grp] = total
        ww[grp] = wsum
    return wd, ww


@numba.njit(parallel=True, fastmath={"nsz", "arcp", "contract", "reassoc"}, cache=True)
def _drift_numba(gen, pos, pos_mask, neg, neg_w, taus, gen_as_neg, attraction_only, batch_scale,
                 floor, gen_mask, neg_mask):  # pragma: no cover - jit
    # One pass per group: gather the targets once, distances once, then per temperature
    # E_r = exp(L - row max), E_c = exp(L - column max) (two exps per pair, each stable) and
    # A = sqrt(E_r / S_row * E_c / S_col): the log-sum-exps without a third exp.
    # batch_scale > 0: the one distance scale of every group; else each group's own mean.
    n_groups, g, d = gen.shape
    p = pos.shape[1]
    u = neg.shape[1]
    n_gen_neg = g if gen_as_neg else 0
    m = p + n_gen_neg + u
    k_taus = taus.shape[0]
    out = np.zeros((k_taus, n_groups, g, d), dtype=gen.dtype)
    for grp in numba.prange(n_groups):
        y = np.empty((m, d), dtype=gen.dtype)
        y[:p] = pos[grp]
        if gen_as_neg:
            y[p:p + g] = gen[grp]
        y[p + n_gen_neg:] = neg[grp]
        wcol = np.ones(m, dtype=gen.dtype)
        wcol[p + n_gen_neg:] = neg_w[grp]
        x = gen[grp]
        dist = np.empty((g, m), dtype=np.float64)
        valid = np.ones((g, m), dtype=np.bool_)
        total = 0.0
        count = 0
        for i in range(g):
            for j in range(m):
                ok = pos_mask[grp, j] if j < p else not (gen_as_neg and j - p == i and j < p + g)
                if not gen_mask[grp, i]:
                    ok = False
                elif j >= p + n_gen_neg:
                    ok = ok and neg_mask[grp, j - p - n_gen_neg]
                elif j >= p:
                    ok = ok and gen_mask[grp, j - p]
                valid[i, j] = ok
                acc = 0.0
                for c in range(d):
                    diff = x[i, c] - y[j, c]
                    acc += diff * diff
                dist[i, j] = math.sqrt(acc)
                if ok:
                    total += dist[i, j]
                    count += 1
        mean = max(batch_scale if batch_scale > 0.0 else total / max(count, 1), 1e-12)
        e_row = np.zeros((g, m), dtype=np.float64)
        e_col = np.zeros((g, m), dtype=np.float64)
        row_min = np.empty(g, dtype=np.float64)
        col_min = np.empty(m, dtype=np.float64)
        row_sum = np.zeros(g, dtype=np.float64)
        col_sum = np.zeros(m, dtype=np.float64)
        e = np.zeros((g, m), dtype=np.float64)
        row_min[:] = np.inf
        col_min[:] = np.inf
        for i in range(g):
            for j in range(m):
                if valid[i, j]:
                    row_min[i] = min(row_min[i], dist[i, j])
                    col_min[j] = min(col_min[j], dist[i, j])
        for kt in range(k_taus):
            inv_tau = 1.0 / (taus[kt] * mean)
            row_sum[:] = 0.0
            col_sum[:] = 0.0
            for i in range(g):
                for j in range(m):
                    if valid[i, j]:
                        er = math.exp((row_min[i] - dist[i, j]) * inv_tau)
                        ec = math.exp((col_min[j] - dist[i, j]) * inv_tau)
                    else:
                        er = 0.0
                        ec = 0.0
                    e_row[i, j] = er
                    e_col[i, j] = ec
                    row_sum[i] += er
                    col_sum[j] += ec
            for i in range(g):
                for j in range(m):
                    if valid[i, j]:
                        e[i, j] = math.sqrt(max(e_row[i, j] / row_sum[i] * e_col[i, j] / col_sum[j], floor)) * wcol[j]
                    else:
                        e[i, j] = 0.0
            for i in range(g):
                s_pos = 0.0
                s_neg = 0.0
                for j in range(m):
                    a = e[i, j]
                    if j < p:
                        s_pos += a
                    else:
                        s_neg += a
                for j in range(m):
                    a = e[i, j]
                    if a == 0.0:
                        continue
                    if j < p:
                        coef = (a / s_pos) if attraction_only else s_neg * a
                    elif attraction_only:
                        break
                    else:
                        coef = -s_pos * a
                    for c in range(d):
                        out[kt, grp, i, c] += coef * y[j, c]
                if attraction_only and s_pos > 0:
                    for c in range(d):
                        out[kt, grp, i, c] -= x[i, c]
    return out


def drift_field_numba(gen: Tensor, pos: Tensor, pos_mask: Tensor | None = None, neg: Tensor | None = None,
                      neg_weight: float | Tensor = 1.0, temperatures=(0.02, 0.05, 0.2), gen_as_neg: bool = True,
                      attraction_only: bool = False, scale: str = "batch", floor: float = 1e-6,
                      gen_mask: Tensor | None = None, neg_mask: Tensor | None = None) -> Tensor:
    """Per-temperature raw fields ``(K, groups, G, d)``, fused numba kernel on the CPU."""
    dtype = np.float64 if gen.dtype == torch.float64 else np.float32
    g_np = gen.detach().cpu().numpy().astype(dtype, copy=False)
    p_np = pos.detach().cpu().numpy().astype(dtype, copy=False)
    mask = (np.ones(p_np.shape[:2], dtype=np.bool_) if pos_mask is None
            else pos_mask.detach().cpu().numpy().astype(np.bool_))
    n_np = (np.zeros((g_np.shape[0], 0, g_np.shape[2]), dtype=dtype) if neg is None
            else neg.detach().cpu().numpy().astype(dtype, copy=False))
    taus = np.asarray(list(temperatures), dtype=dtype)
    neg_w = np.ascontiguousarray(_group_neg_weight(neg_weight, g_np.shape[0], torch.float64, "cpu").numpy()
                                 .astype(dtype))
    g_np, p_np, n_np = np.ascontiguousarray(g_np), np.ascontiguousarray(p_np), np.ascontiguousarray(n_np)
    g_mask = (np.ones(g_np.shape[:2], dtype=np.bool_) if gen_mask is None
              else np.ascontiguousarray(gen_mask.detach().cpu().numpy().astype(np.bool_)))
    n_mask = (np.ones(n_np.shape[:2], dtype=np.bool_) if neg_mask is None
              else np.ascontiguousarray(neg_mask.detach().cpu().numpy().astype(np.bool_)))
    batch_scale = 0.0
    if scale == "batch":
        wd, ww = _drift_scale_numba(g_np, p_np, mask, n_np, neg_w, bool(gen_as_neg), g_mask, n_mask)
        batch_scale = max(float(wd.sum()) / max(float(ww.sum()), 1e-30), 1e-12)
    out = _drift_numba(g_np, p_np, mask, n_np, neg_w, taus, bool(gen_as_neg), bool(attraction_only),
                       float(batch_scale), float(floor), g_mask, n_mask)
    return torch.from_numpy(out).to(device=gen.device, dtype=gen.dtype)


def drift_field(gen: Tensor, pos: Tensor, pos_mask: Tensor | None = None, neg: Tensor | None = None,
                neg_weight: float | Tensor = 1.0, temperatures=(0.02, 0.05, 0.2), gen_as_neg: bool = True,
                attraction_only: bool = False, impl: str = "auto", normalize: bool = True,
                scale: str = "batch", floor: float = 1e-6, gen_mask: Tensor | None = None,
                neg_mask: Tensor | None = None) -> Tensor:
    """The drift field ``V: (groups, G, d)`` for generated ``gen: (groups, G, d)``.

    Args:
        pos: positives ``(groups, P, d)``; ``pos_mask: (groups, P)`` marks real ones.
        neg: extra negatives ``(groups, U, d)`` weighted by ``neg_weight`` (a number, or
            ``(groups,)``: one weight per group).
        temperatures: kernel temperatures on mean-normalised distances.
        gen_as_neg: use the generated samples (self masked) as negatives.
        impl: ``"torch"``, ``"numba"`` or ``"auto"`` (numba on CPU, torch on GPU).
        normalize: divide each temperature's field by its rms over the batch.
        scale: ``"batch"`` (one distance scale, the weighted mean over every valid pair of
            every group: the official code's) or ``"group"`` (each group's own mean).
        floor: affinity floor, ``A = sqrt(max(softmax_row * softmax_col, floor))`` on valid
            pairs (official: 1e-6; 0: none).
        gen_mask: ``(groups, G)`` bool, the real generated samples of padded groups (``None``:
            all); padded ones get a field of 0 and stay out of the rms.
        neg_mask: ``(groups, U)`` bool, the real extra negatives (``None``: all).
    """
    _check(gen, pos, pos_mask, neg, temperatures, gen_mask, neg_mask)
    _check_options(gen, neg_weight, scale, floor)
    if impl not in ("auto", "torch", "numba"):
        raise ValueError(f"impl: must be 'auto', 'torch' or 'numba', got {impl!r}")
    if impl == "auto":
        impl = "torch" if gen.is_cuda else "numba"
    fn = drift_field_numba if impl == "numba" else drift_field_torch
    with torch.no_grad():
        if isinstance(neg_weight, Tensor):
            neg_weight = neg_weight.detach()
        masks = {} if gen_mask is None and neg_mask is None else {"gen_mask": gen_mask, "neg_mask": neg_mask}
        per_tau = fn(gen.detach(), pos.detach(), pos_mask, None if neg is None else neg.detach(), neg_weight,
                     tuple(temperatures), gen_as_neg, attraction_only, scale, float(floor), **masks)   # (K, Gr, G, d)
        if normalize and gen_mask is not None:                                # rms over the real rows only
            count = gen_mask.sum().clamp_min(1) * per_tau.shape[-1]
            rms = (per_tau.pow(2).flatten(1).sum(1) / count).sqrt()           # (K,)
            per_tau = per_tau / rms.clamp_min(1e-12)[:, None, None, None]
        elif normalize:
            rms = per_tau.pow(2).flatten(1).mean(1).sqrt()                    # (K,)
            per_tau = per_tau / rms.clamp_min(1e-12)[:, None, None, None]
        return per_tau.sum(0)                                                  # (Gr, G, d)
