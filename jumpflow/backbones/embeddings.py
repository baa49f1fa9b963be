"""Time embeddings, written once and used by every backbone.

Sinusoidal features of a scalar (Vaswani et al. 2017; DiT's ``TimestepEmbedder``) followed
by a two-layer MLP. Every backbone embeds both ``t`` and the jump length ``h`` (MeanFlow's
best ablation embeds ``(t, t - r)``) and sums them with the condition embedding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """``t: (B,)`` in [0, 1] -> ``(B, dim)``; ``t`` is scaled by ``scale`` so that the
    frequencies resolve differences of order 1e-3 as integer diffusion timesteps do."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = (t * scale)[:, None] * freqs[None]                        # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class ScalarEmbedder(nn.Module):
    """One scalar per sample -> ``(B, dim)``: sinusoidal features then MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, dim)


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
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim > 0 else None

    def forward(self, t: Tensor, h: Tensor, cond: Tensor | None) -> Tensor:
        emb = self.t_embed(t) + self.h_embed(h)                      # (B, dim)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError(f"this backbone is conditional (cond_dim={self.cond_dim}) but cond is None")
            if cond.shape[-1] != self.cond_dim:
                raise ValueError(f"cond has width {cond.shape[-1]}, backbone expects cond_dim={self.cond_dim}")
            emb = emb + self.cond_proj(cond)                          # (B, dim)
        return emb
