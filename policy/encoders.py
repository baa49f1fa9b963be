"""Observation encoders: the condition of an action-chunk generator.

Low-dim: the selected keys over ``n_obs_steps``, normalised and concatenated (Diffusion
Policy's ``global_cond``), optionally through an MLP. Image: per camera a ResNet-18 trained
from scratch with GroupNorm in place of BatchNorm and a spatial-softmax head (Levine et al.
2016; as in robomimic and Diffusion Policy, Chi et al. 2023), random crop in training and
centre crop at evaluation, fused with the low-dim keys. A small 4-layer CNN is the CPU-budget
option (documented as such: it is not what the papers use).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError


class SpatialSoftmax(nn.Module):
    """Feature map ``(B, C, H, W)`` -> expected image coordinates of ``num_kp`` keypoints ``(B, 2 K)``."""

    def __init__(self, in_channels: int, num_kp: int = 32):
        super().__init__()
        self.kp = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.num_kp = num_kp

    def forward(self, feat: Tensor) -> Tensor:
        h, w = feat.shape[-2:]
        logits = self.kp(feat).flatten(2)                                     # (B, K, H*W)
        attn = torch.softmax(logits, dim=-1)                                  # (B, K, H*W)
        ys = torch.linspace(-1, 1, h, device=feat.device, dtype=feat.dtype)
        xs = torch.linspace(-1, 1, w, device=feat.device, dtype=feat.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")               # (H, W) each
        ex = (attn * grid_x.reshape(1, 1, -1)).sum(-1)                        # (B, K)
        ey = (attn * grid_y.reshape(1, 1, -1)).sum(-1)                        # (B, K)
        return torch.cat([ex, ey], dim=-1)                                    # (B, 2K)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 16), channels)


def resnet18_groupnorm() -> tuple[nn.Module, int]:
    """torchvision ResNet-18 from scratch, GroupNorm instead of BatchNorm, without pool / fc."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, norm_layer=_group_norm)
    trunk = nn.Sequential(*list(net.children())[:-2])                         # (B, 512, H/32, W/32)
    return trunk, 512


def small_cnn(width: int = 32) -> tuple[nn.Module, int]:
    """Four 3x3 conv layers (two with stride 2) with GroupNorm: the CPU-budget image trunk."""
    layers, c_in = [], 3
    for i, c_out in enumerate([width, width, 2 * width, 2 * width]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i in (0, 2) else 1, padding=1),
                   nn.GroupNorm(max(1, c_out // 16), c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers), c_in


def crop(images: Tensor, size: int, random: bool) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, size, size)``: a random crop per sample, or the centre."""
    b, _, h, w = images.shape
    if size >= h and size >= w:
        return images
    if not random:
        top, left = (h - size) // 2, (w - size) // 2
        return images[:, :, top:top + size, left:left + size]
    top = torch.randint(0, h - size + 1, (b,), device=images.device)
    left = torch.randint(0, w - size + 1, (b,), device=images.device)
    rows = (top[:, None] + torch.arange(size, device=images.device))         # (B, S)
    cols = (left[:, None] + torch.arange(size, device=images.device))        # (B, S)
    idx_b = torch.arange(b, device=images.device)[:, None, None]
    out = images.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]   # (B, S, S, C)
    return out.permute(0, 3, 1, 2)                                             # (B, C, S, S)


class ObsEncoder(nn.Module):
    """Normalised observation dict -> condition vector ``(B, out_dim)``.

    Args:
        obs_shapes: ``{key: per-step shape}``; keys ending in ``_image`` are ``(C, H, W)``
            cameras, the rest low-dim ``(D,)``.
        n_obs_steps: length of the observation history.
        image_trunk: ``"resnet18"`` (paper default) or ``"small_cnn"`` (CPU budget).
        crop_size: random-crop size in training, centre crop at evaluation (DP: 76 of 84).
        num_kp: spatial-softmax keypoints per camera; image_feature_dim: per-camera output.
        lowdim_mlp: hidden width of an MLP on the low-dim features (0: plain concatenation).

    ``forward(obs)`` takes ``obs[key]: (B, n_obs_steps, *shape)`` already normalised
    (images as floats in [0, 1]).
    """

    def __init__(self, obs_shapes: dict, n_obs_steps: int = 2, image_trunk: str = "resnet18", crop_size: int = 76,
                 num_kp: int = 32, image_feature_dim: int = 64, lowdim_mlp: int = 0):
        super().__init__()
        if image_trunk not in ("resnet18", "small_cnn"):
            raise ConfigError("encoder.image_trunk", f"must be 'resnet18' or 'small_cnn', got {image_trunk!r}")
        if n_obs_steps < 1:
            raise ConfigError("n_obs_steps", f"must be >= 1, got {n_obs_steps}")
        self.n_obs_steps, self.crop_size = n_obs_steps, crop_size
        self.image_keys = sorted(k for k, s in obs_shapes.items() if len(tuple(s)) == 3)
        self.lowdim_keys = sorted(k for k, s in obs_shapes.items() if len(tuple(s)) != 3)
        self.lowdim_dim = sum(math.prod(tuple(obs_shapes[k])) for k in self.lowdim_keys)
        self.cameras = nn.ModuleDict()
        for k in self.image_keys:
            trunk, channels = resnet18_groupnorm() if image_trunk == "resnet18" else small_cnn()
            self.cameras[k] = nn.Sequential(trunk, SpatialSoftmax(channels, num_kp), nn.Linear(2 * num_kp, image_feature_dim),
                                            nn.ReLU())
        per_step = self.lowdim_dim + len(self.image_keys) * image_feature_dim
        self.lowdim_mlp = None
        if lowdim_mlp > 0:
            self.lowdim_mlp = nn.Sequential(nn.Linear(n_obs_steps * per_step, lowdim_mlp), nn.Mish(),
                                            nn.Linear(lowdim_mlp, lowdim_mlp))
        self.out_dim = lowdim_mlp if lowdim_mlp > 0 else n_obs_steps * per_step

    def forward(self, obs: dict) -> Tensor:
        missing = [k for k in (*self.lowdim_keys, *self.image_keys) if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; it has {sorted(obs)}")
        feats = []
        b = obs[(self.lowdim_keys + self.image_keys)[0]].shape[0]
        for k in self.image_keys:
            img = obs[k].flatten(0, 1)                                         # (B*T, C, H, W)
            img = crop(img, self.crop_size, random=self.training)             # (B*T, C, S, S)
            feats.append(self.cameras[k](img).reshape(b, self.n_obs_steps, -1))   # (B, T, F)
        for k in self.lowdim_keys:
            feats.append(obs[k].reshape(b, self.n_obs_steps, -1))              # (B, T, D_k)
        cond = torch.cat(feats, dim=-1).flatten(1)                             # (B, T * per_step)
        return self.lowdim_mlp(cond) if self.lowdim_mlp is not None else cond
