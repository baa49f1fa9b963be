"""Diversity of generated samples in a feature space, the half of sample quality that FID blurs.

Improved precision and recall: Kynkaenniemi et al., "Improved Precision and Recall Metric for
Assessing Generative Models" (NeurIPS 2019), eq. (1)-(3). A set ``Phi`` spans a manifold, the
union of balls around its members whose radius is each member's distance to its k-th nearest
neighbour in ``Phi``::

    f(phi, Phi) = 1  if  ||phi - phi'|| <= NN_k(phi', Phi)  for some phi' in Phi,  else 0
    precision = mean_{fake}  f(fake, Phi_real)     (generated samples that look real)
    recall    = mean_{real}  f(real, Phi_fake)     (real samples the generator can produce)

A class-conditional generator that draws almost the same digit for every noise keeps a high
precision and a low FID on a small classifier's features, but its fake manifold covers few of
the real digits of each class: its recall falls. ``class_spread_ratio`` says the same in one
closed-form number per class: the total variance of a class's generated features over the total
variance of its real ones (1: as varied as the data; 0: one sample per class).

Features are ``(N, D)`` arrays (any extractor: ``jumpflow.eval.fid.features_of``); everything is
computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_features(name: str, x) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: needs (N >= 2, D) features, got shape {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


def _kth_neighbour_radii(f: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """``f: (N, D)`` -> ``(N,)``: each member's distance to its k-th nearest other member."""
    out = []
    for i in range(0, f.shape[0], block):
        d = torch.cdist(f[i:i + block], f)                                 # (b, N)
        out.append(d.kthvalue(k + 1, dim=1).values)                        # index 0 is the member itself
    return torch.cat(out)


def _inside(query: torch.Tensor, members: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """``query: (M, D)`` -> ``(M,)`` bool: within some member's radius."""
    out = []
    for i in range(0, query.shape[0], block):
        d = torch.cdist(query[i:i + block], members)                       # (b, N)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (eq. 1-3 above) of ``fake: (M, D)`` against ``real: (N, D)``.

    ``k``: the neighbourhood size (the paper's default 3); both sets need more than ``k`` members.
    Distances are Euclidean, ``block`` rows at a time (memory ``block x max(N, M)``).
    """
    r, f = _as_features("precision_recall real", real), _as_features("precision_recall fake", fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall: feature sizes differ, real {r.shape[1]} vs fake {f.shape[1]}")
    if k < 1 or min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision_recall: k = {k} needs 1 <= k < the size of each set "
                         f"(real {r.shape[0]}, fake {f.shape[0]})")
    precision = _inside(f, r, _kth_neighbour_radii(r, k, block), block).double().mean()
    recall = _inside(r, f, _kth_neighbour_radii(f, k, block), block).double().mean()
    return float(precision), float(recall)


def class_spread_ratio(fake, fake_labels, real, real_labels) -> float:
    """Mean over the classes of ``tr Cov(fake_c) / tr Cov(real_c)`` (unbiased covariances).

    ``fake: (M, D)`` with ``fake_labels: (M,)``, ``real: (N, D)`` with ``real_labels: (N,)``;
    every class of ``fake_labels`` needs two or more members in each set. ``tr Cov`` is half the
    mean squared distance between two members of the class, so the ratio is how far apart a
    class's generated samples lie relative to its real ones.
    """
    f, r = _as_features("class_spread_ratio fake", fake), _as_features("class_spread_ratio real", real)
    fl, rl = np.asarray(fake_labels).reshape(-1), np.asarray(real_labels).reshape(-1)
    if fl.shape[0] != f.shape[0] or rl.shape[0] != r.shape[0]:
        raise ValueError(f"class_spread_ratio: {fl.shape[0]} / {rl.shape[0]} labels for {f.shape[0]} fake / "
                         f"{r.shape[0]} real features")
    ratios = []
    for c in np.unique(fl):
        fc, rc = f[torch.as_tensor(fl == c)], r[torch.as_tensor(rl == c)]
        if fc.shape[0] < 2 or rc.shape[0] < 2:
            raise ValueError(f"class_spread_ratio: class {c} has {fc.shape[0]} fake and {rc.shape[0]} real "
                             "members; needs two or more of each")
        ratios.append(float(fc.var(dim=0).sum() / rc.var(dim=0).sum()))
    return float(np.mean(ratios))
