"""Backbones shared by every objective and both workloads: ``forward(x, t, h, cond)``.

``BACKBONES`` maps a registered size name to a constructor ``(shape, cond_dim, **kw) -> nn.Module``:

* ``DiT-S/2``, ``DiT-S/4``, ``DiT-B/2``, ``DiT-B/4``, ``DiT-L/2``, ``DiT-XL/2`` (images,
  ``(C, H, W)``) and ``DiT1D-S``, ``DiT1D-B``, ``DiT1D-L`` (action chunks ``(T, A)``, one
  token per step): ``jumpflow.backbones.dit.DiT``;
* ``UNet1D-S``, ``UNet1D-M`` (Diffusion Policy low-dim), ``UNet1D-L`` (DP image),
  ``UNet2D-XS``, ``UNet2D-S``, ``UNet2D-B``: ``jumpflow.backbones.unet``;
* ``MLP``: ``jumpflow.backbones.mlp.MLP`` (toys, tests).

``build_backbone(name, shape, cond_dim=0, **overrides)`` builds one; any constructor
argument can be overridden (``build_backbone("DiT-S/2", (4, 32, 32), 0, qk_norm=True)``).
``count_params(name, shape, cond_dim=0, **overrides)`` counts parameters on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from jumpflow.backbones.dit import DiT, DiT_models
from jumpflow.backbones.embeddings import TimeCondEmbedder
from jumpflow.backbones.mlp import MLP
from jumpflow.backbones.unet import UNet, UNet1D, UNet2D, UNet_models
from jumpflow.errors import ConfigError

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **DiT_models,
    **UNet_models,
    "MLP": partial(MLP, width=256, depth=4),
}


def _as_shape(shape) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ConfigError("shape", f"must be a sequence of ints, got {shape!r}") from err
    if not out or any(s < 1 for s in out):
        raise ConfigError("shape", f"must be non-empty positive ints, got {shape!r}")
    return out


def build_backbone(name: str, shape, cond_dim: int = 0, **overrides) -> nn.Module:
    """Build the registered backbone ``name`` for per-sample ``shape`` and ``cond: (B, cond_dim)``.

    Args:
        name: a key of ``BACKBONES`` (e.g. ``"DiT-B/2"``, ``"UNet1D-M"``, ``"MLP"``).
        shape: per-sample data shape, e.g. ``(4, 32, 32)`` or ``(16, 7)`` (lists, hydra
            ``ListConfig`` accepted).
        cond_dim: width of the condition vector (0: unconditional).
        **overrides: constructor arguments replacing the registered ones.
    """
    if name not in BACKBONES:
        raise ConfigError("name", f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
    return BACKBONES[name](shape=_as_shape(shape), cond_dim=int(cond_dim), **overrides)


def build_family(family: str, size: str | None, shape, cond_dim: int = 0, **overrides) -> nn.Module:
    """``build_backbone(f"{family}-{size}", ...)`` (``size=None``: the family has one size, e.g.
    ``MLP``): one config file per family, the size a value (``backbone=dit backbone.size=XL/2``)."""
    name = family if size in (None, "") else f"{family}-{size}"
    if name not in BACKBONES:
        sizes = sorted(n[len(family) + 1:] for n in BACKBONES if n.startswith(f"{family}-"))
        if sizes or family in BACKBONES:
            raise ConfigError("size", f"{family} has no size {size!r}; valid: {', '.join(sizes) or 'null'}")
        families = sorted({n.split("-")[0] for n in BACKBONES})
        raise ConfigError("family", f"unknown backbone family {family!r}; valid: {', '.join(families)}")
    return build_backbone(name, shape, cond_dim, **overrides)


def count_params(name: str, shape, cond_dim: int = 0, **overrides) -> int:
    """Number of parameters of ``build_backbone(name, shape, cond_dim, **overrides)``,
    built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        net = build_backbone(name, shape, cond_dim, **overrides)
    return sum(p.numel() for p in net.parameters())


__all__ = [
    "BACKBONES",
    "MLP",
    "DiT",
    "TimeCondEmbedder",
    "UNet",
    "UNet1D",
    "UNet2D",
    "build_backbone",
    "build_family",
    "count_params",
]
