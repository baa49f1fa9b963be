"""Diffusion Transformer backbone: Peebles & Xie, "Scalable Diffusion Models with
Transformers" (DiT, ICCV 2023), adaLN-Zero blocks; Lipschitz options of Zhou et al.,
"Terminal Velocity Matching" (2025): RMSNorm without affine, QK-norm, normalised modulation.

One class serves both workloads:

* 2-D inputs ``x: (B, C, H, W)`` (image latents) are cut into ``p x p`` patches, one token
  each, with fixed 2-D sin-cos positions (or learned ones);
* 1-D inputs ``x: (B, T, A)`` (action chunks) give one token per ``p`` time steps
  (``p = 1`` in the ``DiT1D-*`` sizes: one token per step), 1-D sin-cos positions.

The conditioning vector is ``c = emb(t) + emb(h) + proj(cond)`` from ``TimeCondEmbedder``
(written once in ``embeddings.py``); every block regresses shift / scale / gate from ``c``
(adaLN-Zero: gates and the output layer start at zero, so the net starts as the zero map).

Attention runs on one of three paths (``attn`` argument):

* ``"fused"``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels). Inside
  ``jumpflow.objectives.base.jvp_context`` the kernel choice is restricted to the math
  backend, which has forward-mode AD, so this path is safe there too.
* ``"math"``: an explicit ``softmax(q k^T / sqrt(d)) v``; forward-mode AD and backward
  through a JVP (TVM) pass through it with no special kernel.
* ``"auto"`` (default): ``"math"`` when a forward-mode tangent is attached to the queries,
  keys or values (``torch.func.jvp`` or ``torch.autograd.forward_ad`` dual tensors), else
  ``"fused"``. ``DiT.set_attention(mode)`` switches an existing model.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from jumpflow.backbones import layers
from jumpflow.backbones.embeddings import TimeCondEmbedder
from jumpflow.backbones.layers import (  # noqa: F401
    ATTENTION_MODES,
    LayerNorm,
    Linear,
    attention,
    has_forward_grad,
    modulate,
)
from jumpflow.errors import ConfigError

NORMS = ("layernorm", "rmsnorm")


# --------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``positions: (N,)`` -> ``(N, dim)`` of ``[sin, cos]`` at geometric frequencies."""
    if dim % 2:
        raise ConfigError("hidden_size", f"sin-cos position embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = positions.reshape(-1).astype(np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """``(grid_h * grid_w, dim)``: half the width encodes rows, half columns (row-major)."""
    if dim % 4:
        raise ConfigError("hidden_size", f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------
def make_norm(kind: str, dim: int) -> nn.Module:
    """Pre-norm of a block: never affine (adaLN supplies scale and shift). ``LayerNorm`` is the
    JVP-safe one of ``layers.py`` (torch's fused layer_norm has wrong 2nd-order JVPs)."""
    if kind == "layernorm":
        return LayerNorm(dim, eps=1e-6)
    return nn.RMSNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate_tokens(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x: (B, N, D)`` modulated by per-sample ``shift, scale: (B, D)``."""
    return modulate(x, scale[:, None], shift[:, None])                    # (B, N, D)


class Attention(nn.Module):
    """Self-attention with optional QK-RMSNorm (per head, learnable gain)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, attn: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ConfigError("num_heads", f"hidden_size {dim} must be divisible by num_heads {heads}")
        self.heads, self.attn = heads, attn
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # (B, h, N, d) x3
        q, k = self.q_norm(q), self.k_norm(k)                             # (B, h, N, d)
        out = attention(q, k, v, self.attn)                               # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))          # (B, N, D)


class Mlp(nn.Module):
    """GELU(tanh) MLP as in DiT, or SwiGLU (hidden width 2/3 of the ratio, multiple of 8)."""

    def __init__(self, dim: int, mlp_ratio: float, swiglu: bool = False):
        super().__init__()
        self.swiglu = swiglu
        hidden = int(dim * mlp_ratio)
        if swiglu:
            hidden = 8 * math.ceil(2 * hidden / 3 / 8)
            self.fc1 = Linear(dim, 2 * hidden)
        else:
            self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x)                                                   # (B, N, F) or (B, N, 2F)
        if self.swiglu:
            a, b = y.chunk(2, dim=-1)                                     # (B, N, F) x2
            y = F.silu(a) * b                                             # (B, N, F)
        else:
            y = F.gelu(y, approximate="tanh")                             # (B, N, F)
        return self.fc2(y)                                                # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x + gate * f(modulate_tokens(norm(x), shift, scale))`` for attention and MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 qk_norm: bool = False, swiglu: bool = False, attn: str = "auto"):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm, attn=attn)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, mlp_ratio, swiglu=swiglu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = layers.per_row(self.adaLN_modulation(c), x.shape[0])       # (B, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)   # (B, D) x6
        x = x + gate_a[:, None] * self.attn(modulate_tokens(self.norm1(x), shift_a, scale_a))  # (B, N, D)
        x = x + gate_m[:, None] * self.mlp(modulate_tokens(self.norm2(x), shift_m, scale_m))   # (B, N, D)
        return x                                                          # (B, N, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm, dim)
        self.linear = Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale = layers.per_row(self.adaLN_modulation(c), x.shape[0]).chunk(2, dim=-1)   # (B, D) x2
        feats = modulate_tokens(self.norm(x), shift, scale)               # (B, N, D)
        return self.linear(feats), feats                                  # (B, N, P), (B, N, D)


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------
class DiT(nn.Module):
    """``forward(x, t, h, cond) -> (B, *shape)`` for ``x: (B, C, H, W)`` or ``(B, T, A)``.

    Args:
        shape: per-sample shape, ``(C, H, W)`` (2-D, patchified) or ``(T, A)`` (1-D chunk).
        cond_dim: width of ``cond`` (0: unconditional).
        patch_size: ``p``; 2-D: ``p x p`` patches (H, W divisible by p); 1-D: ``p`` steps per
            token (T divisible by p).
        hidden_size, depth, num_heads, mlp_ratio: transformer size.
        norm: ``"layernorm"`` (DiT) or ``"rmsnorm"``; never affine.
        qk_norm: RMSNorm on queries and keys per head.
        normalized_modulation: RMS-normalise the conditioning vector ``c`` (no affine)
            before it enters any adaLN regression, so the modulation does not scale with
            the embedding's magnitude (TVM's Lipschitz-friendly conditioning).
        swiglu: SwiGLU MLP instead of GELU.
        attn: ``"auto"`` | ``"fused"`` | ``"math"`` (see module docstring).
        pos_embed: ``"sincos"`` (fixed, DiT) or ``"learned"``.

    ``tokenize(x) -> (B, N, P)`` (patches / steps), ``untokenize(tokens) -> x``;
    ``forward(..., return_features=True) -> (out, features (B, N, hidden_size))``, the
    modulated final-norm tokens the output layer reads.
    """

    grouped_condition = True     # t, h, cond may come once per group of consecutive rows (layers.per_row)

    def __init__(self, shape, cond_dim: int = 0, patch_size: int = 2, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, norm: str = "layernorm",
                 qk_norm: bool = False, normalized_modulation: bool = False, swiglu: bool = False,
                 attn: str = "auto", pos_embed: str = "sincos"):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) not in (2, 3):
            raise ConfigError("shape", f"DiT takes (C, H, W) or (T, A) shapes, got {self.shape}")
        if norm not in NORMS:
            raise ConfigError("norm", f"must be one of {NORMS}, got {norm!r}")
        if attn not in ATTENTION_MODES:
            raise ConfigError("attn", f"must be one of {ATTENTION_MODES}, got {attn!r}")
        if pos_embed not in ("sincos", "learned"):
            raise ConfigError("pos_embed", f"must be 'sincos' or 'learned', got {pos_embed!r}")
        p = self.patch_size = int(patch_size)
        self.dims = len(self.shape) - 1
        if self.dims == 2:
            c, hh, ww = self.shape
            if hh % p or ww % p:
                raise ConfigError("patch_size", f"{p} must divide the image size {hh}x{ww} (shape={self.shape})")
            self.grid = (hh // p, ww // p)
            self.token_dim = c * p * p
        else:
            steps, a = self.shape
            if steps % p:
                raise ConfigError("patch_size", f"{p} must divide the horizon {steps} (shape={self.shape})")
            self.grid = (steps // p,)
            self.token_dim = a * p
        self.num_tokens = math.prod(self.grid)
        self.hidden_size, self.feature_dim = hidden_size, hidden_size
        self.normalized_modulation = normalized_modulation

        self.x_embed = Linear(self.token_dim, hidden_size)
        self.embed = TimeCondEmbedder(hidden_size, cond_dim)
        pos = sincos_2d(hidden_size, *self.grid) if self.dims == 2 else sincos_1d(hidden_size, np.arange(self.grid[0]))
        pos_t = torch.from_numpy(pos).float()[None]                       # (1, N, D)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(pos_t.clone())
        else:
            self.register_buffer("pos_embed", pos_t, persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, norm=norm, qk_norm=qk_norm, swiglu=swiglu, attn=attn)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, self.token_dim, norm=norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) time MLPs, zero adaLN regressions and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for emb in (self.embed.t_embed, self.embed.h_embed):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attention(self, mode: str) -> DiT:
        """Switch every block to attention path ``mode`` (``auto`` / ``fused`` / ``math``)."""
        if mode not in ATTENTION_MODES:
            raise ConfigError("attn", f"must be one of {ATTENTION_MODES}, got {mode!r}")
        for block in self.blocks:
            block.attn.attn = mode
        return self

    # -- tokens -----------------------------------------------------------------------------
    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, *shape) -> (B, N, P)``: ``p x p x C`` patches (2-D) or ``p x A`` steps (1-D)."""
        if self.dims == 2:
            return rearrange(x, "b c (gh p) (gw q) -> b (gh gw) (p q c)", p=self.patch_size, q=self.patch_size)
        return rearrange(x, "b (n p) a -> b n (p a)", p=self.patch_size)

    def untokenize(self, tokens: Tensor, shape=None) -> Tensor:
        """``(B, N, P) -> (B, *shape)``, the inverse of ``tokenize``."""
        if self.dims == 2:
            gh, gw = self.grid
            return rearrange(tokens, "b (gh gw) (p q c) -> b c (gh p) (gw q)", gh=gh, gw=gw,
                             p=self.patch_size, q=self.patch_size)
        return rearrange(tokens, "b n (p a) -> b (n p) a", p=self.patch_size)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None = None,
                return_features: bool = False):
        layers.check_input_shape(self, x, t, h, cond)
        c = self.embed(t, h, cond)                                        # (Bc, D): Bc divides B (per_row)
        if self.normalized_modulation:
            c = F.rms_norm(c, (c.shape[-1],), eps=1e-6)                   # (Bc, D)
        tokens = layers.add_plain(self.x_embed(self.tokenize(x)), self.pos_embed.to(x.dtype))  # (B, N, D)
        for block in self.blocks:
            tokens = block(tokens, c)                                     # (B, N, D)
        out_tokens, feats = self.final_layer(tokens, c)                   # (B, N, P), (B, N, D)
        out = self.untokenize(out_tokens)                                 # (B, *shape)
        if return_features:
            return out, feats                                             # (B, *shape), (B, N, D)
        return out


# --------------------------------------------------------------------------------------
# Registry (DiT paper Table 1; the 1-D sizes are for action chunks: one token per step)
# --------------------------------------------------------------------------------------
def _dit(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    return partial(DiT, depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)


DiT_models = {
    "DiT-S/2": _dit(12, 384, 6, 2),
    "DiT-S/4": _dit(12, 384, 6, 4),
    "DiT-B/2": _dit(12, 768, 12, 2),
    "DiT-B/4": _dit(12, 768, 12, 4),
    "DiT-L/2": _dit(24, 1024, 16, 2),
    "DiT-XL/2": _dit(28, 1152, 16, 2),
    # action chunks (T, A): one token per time step; S is Diffusion Policy's transformer size
    "DiT1D-S": _dit(8, 256, 4, 1),
    "DiT1D-B": _dit(12, 384, 6, 1),
    "DiT1D-L": _dit(12, 768, 12, 1),
}
