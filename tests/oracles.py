"""Exact networks for closed-form objective tests (shared by test_core and test_family).

- :class:`PointOracle`: data is the single point ``x0``; every average velocity along the
  straight path is ``u(z, r, t) = (z - x0) / t`` (also offered as TVM's target in ``aux``).
- :class:`GaussianOracle`: data ``N(m, s^2 I)``; the flow keeps ``n = (z - (1 - t) m) / sigma_t``,
  ``sigma_t = sqrt((1 - t)^2 s^2 + t^2)``; ``forward`` is the exact average velocity of the jump
  ``t -> t - h`` and the marginal velocity at ``h = 0``.
"""

from __future__ import annotations

import torch
from torch import nn


def col(t, z):
    """``t: (B,)`` broadcast against ``z: (B, ...)``."""
    return t.reshape(-1, *([1] * (z.dim() - 1)))


class PointOracle(nn.Module):
    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", x0)
        self.aux = {"tvm_target": lambda z, t, h, c: (z - self.x0) / col(t, z)}

    def forward(self, z, t, h, cond=None):
        return (z - self.x0) / col(t, z)


class GaussianOracle(nn.Module):
    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)

    def flow(self, z, t, r):
        n = (z - col(1 - t, z) * self.m) / col(self.sigma(t), z)
        return col(1 - r, z) * self.m + col(self.sigma(r), z) * n

    def velocity(self, z, t):
        """The marginal velocity ``v(z, t) = d flow / dt``."""
        ds = (t - (1 - t) * self.s ** 2) / self.sigma(t)                      # d sigma_t / dt
        return -self.m + col(ds, z) * (z - col(1 - t, z) * self.m) / col(self.sigma(t), z)

    marginal_velocity = velocity

    def forward(self, z, t, h, cond=None):
        small = h.abs() < 1e-9
        h_safe = torch.where(small, torch.ones_like(h), h)
        avg = (z - self.flow(z, t, t - h)) / col(h_safe, z)
        return torch.where(col(small, z), self.velocity(z, t), avg)


def registered_objective_from_config(name: str, max_steps: int = 1234):
    """The objective ``name`` as the trainer builds it (``objective=<name>`` composed, validated,
    instantiated), after checking that the registry and the package export the same class."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from jumpflow import objectives
    from jumpflow.config import validate_config

    cls = objectives.OBJECTIVES[name]
    assert getattr(objectives, cls.__name__) is cls
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"objective={name}", "run_dir=/nonexistent", f"trainer.max_steps={max_steps}"])
    validate_config(cfg)
    obj = instantiate(cfg.objective)
    assert isinstance(obj, cls) and obj.name == name
    return obj
