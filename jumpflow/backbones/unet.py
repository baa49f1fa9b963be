"""UNet backbones: Chi et al., "Diffusion Policy" (RSS 2023), ``ConditionalUnet1D`` for action
chunks (``dims=1``); Ho et al., "Denoising Diffusion Probabilistic Models" (2020) and
Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (ADM, 2021) for images
(``dims=2``).

Both condition on ``c = emb(t) + emb(h) + proj(cond)`` from ``TimeCondEmbedder`` (the jump
length ``h`` is embedded in every backbone):

* ``dims=1``: ``x: (B, T, A)``; residual blocks of two ``Conv1d(k=5) -> GroupNorm(8) -> Mish``
  with FiLM (per-channel scale and bias regressed from ``Mish(c)``) after the first; strided
  convolutions down, transposed convolutions up, skip connections; ``T`` must be divisible
  by ``2 ** (len(down_dims) - 1)``, or ``pad_horizon=True`` pads it there and crops the output.
* ``dims=2``: ``x: (B, C, H, W)``; ADM residual blocks with scale-shift GroupNorm, attention
  blocks at the downsampling factors in ``attention_ds``, zero-initialised output layers.

Tokens for Transition Matching are time steps (1-D) or pixels (2-D); ``forward(...,
return_features=True)`` returns the last decoder block's output, one feature vector per token.
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from jumpflow.backbones.embeddings import TimeCondEmbedder, require_cond
from jumpflow.backbones.layers import (
    ATTENTION_MODES,
    Conv1d,
    Conv2d,
    ConvTranspose1d,
    GroupNorm,
    Linear,
    attention,
    check_input_shape,
    modulate,
    per_row,
)
from jumpflow.errors import ConfigError


def _groups(channels: int, max_groups: int) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


# --------------------------------------------------------------------------------------
# dims = 1: Diffusion Policy's conditional 1-D UNet
# --------------------------------------------------------------------------------------
class Conv1dBlock(nn.Module):
    """``Conv1d -> GroupNorm -> Mish``, length preserved."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.conv = Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.norm = GroupNorm(_groups(c_out, n_groups), c_out)
        self.act = nn.Mish()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))                          # (B, C_out, T)


class FiLMResBlock1D(nn.Module):
    """Two conv blocks; FiLM ``scale * y + bias`` from the conditioning vector in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), Linear(emb_dim, 2 * c_out))
        self.skip = Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        y = self.block1(x)                                                # (B, C_out, T)
        scale, bias = per_row(self.film(emb), x.shape[0])[:, :, None].chunk(2, dim=1)   # (B, C_out, 1) x2
        y = self.block2(scale * y + bias)                                 # (B, C_out, T)
        return y + self.skip(x)                                           # (B, C_out, T)


COND_MODES = ("sum", "concat")


class UNet1D(nn.Module):
    """Diffusion Policy's ``ConditionalUnet1D`` on ``x: (B, T, A)``.

    Args:
        shape: ``(T, A)``: horizon and action dimension.
        cond_dim: width of ``cond`` (the observation features; 0: unconditional).
        down_dims: channel widths per resolution (DP low-dim: 256/512/1024).
        kernel_size: convolution width (DP: 5); n_groups: GroupNorm groups (DP: 8).
        emb_dim: width of the ``(t, h)`` embedding (DP: 256).
        cond_mode: how ``cond`` reaches every block's FiLM. ``"sum"`` (default): jumpflow's shared
            :class:`TimeCondEmbedder`, ``emb(t) + emb(h) + Linear(cond)``, so FiLM sees
            ``Mish`` of a learned projection of the observation (a one-hidden-layer encoder).
            ``"concat"``: Diffusion Policy's (and LeRobot's) ``[emb(t) + emb(h), cond]``, so FiLM
            sees ``Mish`` of the raw condition (``bench/results/policy.json`` variants ``unet1d_s``
            and ``unet1d_s_concat`` compare them).
        pad_horizon: a horizon that the ``2 ** (len(down_dims) - 1)`` downsampling does not divide
            (Block Push's one-action ``h2`` chunks under UNet1D-S's three levels) is padded on
            the time axis by repeating its last step, and the output (and features) cropped back
            to ``T``: the network stays a function of the real steps alone. Off (DP's UNet has no
            padding): such a horizon is refused.
    """

    grouped_condition = True     # t, h, cond may come once per group of consecutive rows (layers.per_row)

    def __init__(self, shape, cond_dim: int = 0, down_dims=(256, 512, 1024), kernel_size: int = 5,
                 n_groups: int = 8, emb_dim: int = 256, cond_mode: str = "sum", pad_horizon: bool = False):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 2:
            raise ConfigError("shape", f"UNet1D takes (horizon, action_dim) shapes, got {self.shape}")
        down_dims = tuple(int(d) for d in down_dims)
        if not down_dims:
            raise ConfigError("down_dims", "must name at least one width")
        horizon, action_dim = self.shape
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor and not pad_horizon:
            raise ConfigError("horizon", f"the horizon {horizon} must be divisible by 2**(len(down_dims)-1) = {factor} "
                             f"(down_dims={down_dims}); set backbone.pad_horizon=true or use fewer levels")
        self.padded_horizon = -(-horizon // factor) * factor             # T rounded up to the factor
        if cond_mode not in COND_MODES:
            raise ConfigError("cond_mode", f"must be one of {', '.join(COND_MODES)}, got {cond_mode!r}")
        self.down_dims, self.feature_dim = down_dims, down_dims[0]
        self.cond_mode = cond_mode
        concat = cond_mode == "concat"
        self.embed = TimeCondEmbedder(emb_dim, 0 if concat else cond_dim)
        self.cond_dim = int(cond_dim)
        film_dim = emb_dim + (self.cond_dim if concat else 0)
        block = partial(FiLMResBlock1D, emb_dim=film_dim, kernel_size=kernel_size, n_groups=n_groups)

        widths = (action_dim, *down_dims)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                block(c_in, c_out), block(c_out, c_out),
                Conv1d(c_out, c_out, 3, stride=2, padding=1) if not last else nn.Identity()]))
        self.mid = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up = nn.ModuleList()
        for c_out, c_in in reversed(list(itertools.pairwise(down_dims))):
            self.up.append(nn.ModuleList([
                block(2 * c_in, c_out), block(c_out, c_out),
                ConvTranspose1d(c_out, c_out, 4, stride=2, padding=1)]))
        self.final_block = Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups)
        self.final_conv = Conv1d(down_dims[0], action_dim, 1)

    def condition(self, t: Tensor, h: Tensor, cond: Tensor | None) -> Tensor:
        """The vector every block's FiLM reads: ``(Bc, emb_dim)`` for ``cond_mode="sum"``,
        ``(Bc, emb_dim + cond_dim)`` for ``"concat"``."""
        if self.cond_mode == "sum" or self.cond_dim == 0:
            return self.embed(t, h, cond)                                 # (Bc, E)
        require_cond(cond, self.cond_dim)
        emb = self.embed(t, h, None)                                      # (Bt, E), Bt 1 or Bc
        rows = max(emb.shape[0], cond.shape[0])
        return torch.cat([per_row(emb, rows), per_row(cond, rows)], dim=-1)   # (Bc, E + cond_dim)

    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, T, A) -> (B, T, A)``: one token per time step."""
        return x

    def untokenize(self, tokens: Tensor, shape=None) -> Tensor:
        return tokens

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None = None,
                return_features: bool = False):
        check_input_shape(self, x, t, h, cond)
        emb = self.condition(t, h, cond)                                  # (Bc, E'): Bc divides B (per_row)
        horizon = x.shape[1]
        y = rearrange(x, "b t a -> b a t")                                # (B, A, T)
        if self.padded_horizon > horizon:
            y = F.pad(y, (0, self.padded_horizon - horizon), mode="replicate")   # (B, A, T_pad)
        skips = []
        for res1, res2, down in self.down:
            y = res2(res1(y, emb), emb)                                   # (B, C_i, T_i)
            skips.append(y)
            y = down(y)                                                   # (B, C_i, T_{i+1})
        for res in self.mid:
            y = res(y, emb)                                               # (B, C_L, T_L)
        for res1, res2, up in self.up:
            y = torch.cat([y, skips.pop()], dim=1)                        # (B, 2 C_i, T_i)
            y = up(res2(res1(y, emb), emb))                               # (B, C_{i-1}, T_{i-1})
        feats = rearrange(y[..., :horizon], "b c t -> b t c")             # (B, T, C_0)
        out = self.final_conv(self.final_block(y))[..., :horizon]         # (B, A, T)
        out = rearrange(out, "b a t -> b t a")                            # (B, T, A)
        if return_features:
            return out, feats                                             # (B, T, A), (B, T, C_0)
        return out


# --------------------------------------------------------------------------------------
# dims = 2: ADM-style image UNet
# --------------------------------------------------------------------------------------
def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock2D(nn.Module):
    """ADM residual block: GN-SiLU-conv, scale-shift GN from the embedding, SiLU-dropout-zero conv."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = GroupNorm(_groups(c_in, 32), c_in)
        self.conv1 = Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), Linear(emb_dim, 2 * c_out))
        self.norm2 = GroupNorm(_groups(c_out, 32), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(Conv2d(c_out, c_out, 3, padding=1))
        self.skip = Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        y = self.conv1(F.silu(self.norm1(x)))                             # (B, C_out, H, W)
        scale, shift = per_row(self.emb(emb), x.shape[0])[:, :, None, None].chunk(2, dim=1)   # (B, C_out, 1, 1) x2
        y = modulate(self.norm2(y), scale, shift)                         # (B, C_out, H, W)
        y = self.conv2(self.dropout(F.silu(y)))                           # (B, C_out, H, W)
        return y + self.skip(x)                                           # (B, C_out, H, W)


class AttnBlock2D(nn.Module):
    """Self-attention over pixels; heads of ``head_channels`` channels; zero-init projection."""

    def __init__(self, channels: int, head_channels: int = 64, attn: str = "auto"):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.attn = attn
        self.norm = GroupNorm(_groups(channels, 32), channels)
        self.qkv = Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        hh, ww = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d",
                            three=3, h=self.heads)                        # (B, heads, HW, d) x3
        out = attention(q, k, v, self.attn)                               # (B, heads, HW, d)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=hh, y=ww)    # (B, C, H, W)
        return x + self.proj(out)                                         # (B, C, H, W)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)                                               # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet2D(nn.Module):
    """ADM-style UNet on ``x: (B, C, H, W)``.

    Args:
        shape: ``(C, H, W)``; H and W divisible by ``2 ** (len(channel_mult) - 1)``.
        cond_dim: width of ``cond`` (e.g. a class embedding; 0: unconditional).
        model_channels: base width; channel_mult: width multiplier per resolution.
        num_res_blocks: residual blocks per resolution (the decoder has one more).
        attention_ds: downsampling factors at which attention blocks sit (1 = input size).
        head_channels: channels per attention head; dropout: in residual blocks.
        attn: attention path, ``"auto"`` | ``"fused"`` | ``"math"`` (as in ``DiT``).
    """

    grouped_condition = True     # t, h, cond may come once per group of consecutive rows (layers.per_row)

    def __init__(self, shape, cond_dim: int = 0, model_channels: int = 128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attention_ds=(2, 4), head_channels: int = 64,
                 dropout: float = 0.0, attn: str = "auto"):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ConfigError("shape", f"UNet2D takes (C, H, W) shapes, got {self.shape}")
        if attn not in ATTENTION_MODES:
            raise ConfigError("attn", f"must be one of {ATTENTION_MODES}, got {attn!r}")
        c, hh, ww = self.shape
        channel_mult = tuple(int(m) for m in channel_mult)
        factor = 2 ** (len(channel_mult) - 1)
        if hh % factor or ww % factor:
            raise ConfigError("shape", f"image size {hh}x{ww} must be divisible by 2**(len(channel_mult)-1) = {factor}")
        attention_ds = {int(d) for d in attention_ds}
        emb_dim = 4 * model_channels
        self.feature_dim = model_channels
        self.embed = TimeCondEmbedder(emb_dim, cond_dim)
        self.inp = Conv2d(c, model_channels, 3, padding=1)
        res = partial(ResBlock2D, emb_dim=emb_dim, dropout=dropout)
        att = partial(AttnBlock2D, head_channels=head_channels, attn=attn)

        self.down = nn.ModuleList()
        skip_ch, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(att(ch))
                self.down.append(nn.ModuleList(layers))
                skip_ch.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample2D(ch)]))
                skip_ch.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([res(ch, ch), att(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_ch.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(att(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample2D(ch))
                    ds //= 2
                self.up.append(nn.ModuleList(layers))
        self.out_norm = GroupNorm(_groups(ch, 32), ch)
        self.out = _zero(Conv2d(ch, c, 3, padding=1))

    def set_attention(self, mode: str) -> UNet2D:
        if mode not in ATTENTION_MODES:
            raise ConfigError("attn", f"must be one of {ATTENTION_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, AttnBlock2D):
                m.attn = mode
        return self

    def tokenize(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, H*W, C)``: one token per pixel."""
        return rearrange(x, "b c x y -> b (x y) c")

    def untokenize(self, tokens: Tensor, shape=None) -> Tensor:
        return rearrange(tokens, "b (x y) c -> b c x y", x=self.shape[1], y=self.shape[2])

    @staticmethod
    def _run(layers: nn.ModuleList, y: Tensor, emb: Tensor) -> Tensor:
        for layer in layers:
            y = layer(y, emb)                                             # (B, C', H', W')
        return y

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None = None,
                return_features: bool = False):
        check_input_shape(self, x, t, h, cond)
        emb = self.embed(t, h, cond)                                      # (Bc, E): Bc divides B (per_row)
        y = self.inp(x)                                                   # (B, M, H, W)
        skips = [y]
        for layers in self.down:
            y = self._run(layers, y, emb)                                 # (B, C_i, H_i, W_i)
            skips.append(y)
        y = self._run(self.mid, y, emb)                                   # (B, C_L, H_L, W_L)
        for layers in self.up:
            y = self._run(layers, torch.cat([y, skips.pop()], dim=1), emb)  # (B, C_i, H_i, W_i)
        out = self.out(F.silu(self.out_norm(y)))                          # (B, C, H, W)
        if return_features:
            return out, rearrange(y, "b c x y -> b (x y) c")              # (B, C, H, W), (B, HW, M)
        return out


def UNet(shape, dims: int | None = None, **kwargs) -> nn.Module:
    """The UNet family: ``dims=1`` -> ``UNet1D`` (action chunks), ``dims=2`` -> ``UNet2D``
    (images); ``dims`` defaults to ``len(shape) - 1``."""
    dims = len(tuple(shape)) - 1 if dims is None else int(dims)
    if dims == 1:
        return UNet1D(shape, **kwargs)
    if dims == 2:
        return UNet2D(shape, **kwargs)
    raise ConfigError("dims", f"must be 1 or 2, got {dims}")


UNet_models = {
    "UNet1D-S": partial(UNet, dims=1, down_dims=(64, 128, 256), emb_dim=128),
    "UNet1D-M": partial(UNet, dims=1, down_dims=(256, 512, 1024), emb_dim=256),   # DP low-dim
    "UNet1D-L": partial(UNet, dims=1, down_dims=(512, 1024, 2048), emb_dim=256),  # DP image
    # XS: the size a 2-core CPU trains on 32x32 MNIST (one res block a level, attention at 8x8 only)
    "UNet2D-XS": partial(UNet, dims=2, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                         attention_ds=(4,)),
    "UNet2D-S": partial(UNet, dims=2, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_ds=(2, 4)),
    "UNet2D-B": partial(UNet, dims=2, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attention_ds=(2, 4)),
}
