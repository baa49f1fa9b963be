"""Sample-quality metrics for 2-D (or any low-dimensional) distributions, in float64."""

from __future__ import annotations

import torch
from torch import Tensor


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples ``x, y: (N, d)``.

    ``SW2 = sqrt(E_theta W2^2(theta^T x, theta^T y))`` with 1-D W2 from sorted projections.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"sliced_w2 needs two (N, d) samples of equal size, got {tuple(x.shape)}, {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)                          # (d, K)
    # projections as rows: torch sorts along the contiguous last dim much faster than along dim 0
    px = (theta.T @ x.double().cpu().T).sort(dim=1).values                    # (K, N)
    py = (theta.T @ y.double().cpu().T).sort(dim=1).values                    # (K, N)
    return float((px - py).pow(2).mean().sqrt())


def mmd_rbf(x: Tensor, y: Tensor, bandwidths=(0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels ``exp(-||a-b||^2 / (2 s^2))``."""
    x, y = x.double().cpu(), y.double().cpu()
    n, m = x.shape[0], y.shape[0]

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    mmd = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) \
        - 2 * kxy.mean()
    return float(mmd)
