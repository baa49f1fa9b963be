"""Time embeddings, written once and used by every backbone.

Sinusoidal features of a scalar (Vaswani et al. 2017; DiT's ``TimestepEmbedder``) followed
by a two-layer MLP. Every backbone embeds both ``t`` and the jump length ``h`` (MeanFlow's
best ablation embeds ``(t, t - r)``) and sums them with the condition embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jumpflow.backbones.layers import Linear, add_plain


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> Tensor:
    """``t: (B,)`` in [0, 1] -> ``(B, dim)`` with frequencies ``scale * max_period^(-k/half)``.

    ``scale = 1`` (times in [0, 1] as they are), not the ``1000 t`` of integer diffusion
    timesteps: objectives that differentiate the net in time (MeanFlow's ``du/dt``, TVM's
    ``dF/ds``) see the embedding's frequencies directly, and with ``1000 t`` MeanFlow's
    target variance grew without bound on Lift action chunks (raw error 2.8 -> 120 in 300
    steps) while ``scale = 1`` trained smoothly (2.8 -> 0.12)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    # a product written as F.linear: under forward-mode AD an elementwise product of the dual ``t``
    # with a constant builds a zero tangent through a Python fallback (see layers.modulate)
    args = F.linear(t[:, None], (freqs * scale)[:, None])               # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class ScalarEmbedder(nn.Module):
    """One scalar per sample -> ``(B, dim)``: sinusoidal features then MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, dim)


def require_cond(cond: Tensor | None, cond_dim: int) -> None:
    """One-line error unless ``cond`` is ``(Bc, cond_dim)`` for a conditional backbone."""
    if cond is None:
        raise ValueError(f"this backbone is conditional (cond_dim={cond_dim}) but cond is None")
    if cond.shape[-1] != cond_dim:
        raise ValueError(f"cond has width {cond.shape[-1]}, backbone expects cond_dim={cond_dim}")


class TimeCondEmbedder(nn.Module):
    """The conditioning vector of every backbone: ``emb(t) + emb(h) + proj(cond)``.

    Args:
        dim: output width.
        cond_dim: width of ``cond`` (0 for unconditional nets).
    """

    def __init__(self, dim: int, cond_dim: int = 0, freq_dim: int = 256):
        super().__init__()
        self.t_embed = ScalarEmbedder(dim, freq_dim)
        self.h_embed = ScalarEmbedder(dim, freq_dim)
        self.cond_dim = cond_dim
        self.cond_proj = Linear(cond_dim, dim) if cond_dim > 0 else None

    def forward(self, t: Tensor, h: Tensor, cond: Tensor | None) -> Tensor:
        emb = self.t_embed(t) + self.h_embed(h)                      # (B, dim)
        if self.cond_proj is not None:
            require_cond(cond, self.cond_dim)
            emb = add_plain(emb, self.cond_proj(cond))                # (B, dim)
        return emb
