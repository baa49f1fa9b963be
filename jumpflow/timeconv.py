"""The one time convention of jumpflow, written once.

``t = 0`` is data, ``t = 1`` is noise::

    z_t = (1 - t) * x + t * eps        v = dz_t/dt = eps - x

A jump from ``t`` to ``r <= t`` has length ``h = t - r``; one-step sampling is the jump
``t = 1 -> r = 0`` (``h = 1``). Papers that run time the other way (SiT, Shortcut,
facebookresearch/flow_matching) are translated where they enter, never here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time ``t: (B,)`` to broadcast against ``x: (B, *shape)``."""
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``z_t = (1 - t) x + t eps``: (B, *shape) for ``t: (B,)``."""
    tt = expand_like(t, x)
    return (1.0 - tt) * x + tt * eps


def velocity(x: Tensor, eps: Tensor) -> Tensor:
    """Conditional velocity ``v = dz_t/dt = eps - x``: (B, *shape)."""
    return eps - x


def jump(z: Tensor, t: Tensor, r: Tensor, u: Tensor) -> Tensor:
    """Move ``z_t`` to ``z_r`` with average velocity ``u``: ``z_r = z_t - (t - r) u``."""
    return z - expand_like(t - r, z) * u


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0, device=None, dtype=None) -> Tensor:
    """Uniform grid from noise to data: ``(steps + 1,)`` with ``grid[0] = t_start``, ``grid[-1] = t_end``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(t_start, t_end, steps + 1, device=device, dtype=dtype)
