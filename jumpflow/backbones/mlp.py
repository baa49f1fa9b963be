"""A residual MLP backbone for vector data (2-D toys, tests, small action chunks).

FiLM conditioning on ``emb(t) + emb(h) + proj(cond)`` (Perez et al. 2018, as in
Diffusion Policy's UNet blocks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from jumpflow.backbones.embeddings import TimeCondEmbedder
from jumpflow.backbones.layers import LayerNorm, Linear, check_input_shape, modulate, per_row
from jumpflow.errors import ConfigError


class ResidualFiLMBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = LayerNorm(width, eps=1e-5, elementwise_affine=True)   # JVP-safe (TVM backprops through it)
        self.film = Linear(emb_dim, 2 * width)
        self.fc1 = Linear(width, width)
        self.fc2 = Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        scale, shift = per_row(self.film(emb), x.shape[0]).chunk(2, dim=-1)   # (B, W) each
        y = modulate(self.norm(x), scale, shift)                   # (B, W)
        y = self.fc2(torch.nn.functional.silu(self.fc1(torch.nn.functional.silu(y))))  # (B, W)
        return x + y                                               # (B, W)


class MLP(nn.Module):
    """``forward(x, t, h, cond) -> (B, *shape)`` for ``x: (B, *shape)`` (flattened inside);
    ``t, h: (Bc,)``, ``cond: (Bc, cond_dim)`` with ``Bc`` dividing ``B`` (``Bc = B``, or one row per
    group of ``B / Bc`` consecutive samples: ``layers.per_row``).

    Args:
        shape: per-sample data shape, e.g. ``(2,)`` or ``(16, 7)``.
        width: hidden width; depth: number of residual blocks.
        cond_dim: width of the condition vector (0: unconditional).
        tokens: how many tokens ``tokenize`` splits a sample into (row-major, equal sizes; it
            must divide the sample's size). The network itself always sees the whole vector;
            tokens matter only to the per-token heads of Transition Matching: with ``1`` ARTM's
            causal context is empty and it reduces to DTM's head on the independent linear
            process, with ``shape[0]`` (one token per action step of a chunk) ARTM draws the
            chunk step by step. With ``tokens > 1`` every token gets the network's last features
            plus a learned embedding of its position and a linear map of its own input values, as
            a DiT's per-patch features carry their patch: a per-token head can tell the tokens
            apart and see the noise in them, which a bottleneck narrower than the sample drops.
    """

    grouped_condition = True     # t, h, cond may come once per group of consecutive rows (layers.per_row)

    def __init__(self, shape, width: int = 256, depth: int = 4, cond_dim: int = 0, tokens: int = 1):
        super().__init__()
        if int(width) < 1:
            raise ConfigError("width", f"must be >= 1, got {width}")
        if int(depth) < 0:
            raise ConfigError("depth", f"must be >= 0, got {depth}")
        if int(cond_dim) < 0:
            raise ConfigError("cond_dim", f"must be >= 0, got {cond_dim}")
        self.shape = tuple(int(s) for s in shape)
        self.in_dim = math.prod(self.shape)
        if int(tokens) < 1 or self.in_dim % int(tokens):
            raise ConfigError("tokens", f"must be a positive divisor of the sample size {self.in_dim}, got {tokens}")
        self.tokens = int(tokens)
        self.feature_dim = width
        self.embed = TimeCondEmbedder(width, cond_dim)
        self.inp = Linear(self.in_dim, width)
        self.blocks = nn.ModuleList(ResidualFiLMBlock(width, width) for _ in range(depth))
        self.out_norm = LayerNorm(width, eps=1e-5, elementwise_affine=True)
        self.out = Linear(width, self.in_dim)
        # created last, so the other weights draw the same numbers whatever ``tokens`` is
        self.token_embed = nn.Parameter(0.02 * torch.randn(self.tokens, width)) if self.tokens > 1 else None
        self.token_in = Linear(self.in_dim // self.tokens, width) if self.tokens > 1 else None

    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, N, D / N)`` with ``N = tokens``, row-major."""
        return x.reshape(x.shape[0], self.tokens, self.in_dim // self.tokens)

    def untokenize(self, tokens: Tensor) -> Tensor:
        return tokens.reshape(tokens.shape[0], *self.shape)

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None = None, return_features: bool = False):
        check_input_shape(self, x, t, h, cond)
        emb = self.embed(t, h, cond)                               # (Bc, W)
        y = self.inp(x.reshape(x.shape[0], -1))                   # (B, W)
        for block in self.blocks:
            y = block(y, emb)                                      # (B, W)
        feats = self.out_norm(y)                                   # (B, W)
        out = self.out(feats).reshape(x.shape)                     # (B, *shape)
        if return_features:
            token_feats = feats[:, None, :].expand(-1, self.tokens, -1)    # (B, N, W)
            if self.token_embed is not None:                               # + position, + own input
                token_feats = token_feats + self.token_embed + self.token_in(self.tokenize(x))   # (B, N, W)
            return out, token_feats
        return out
