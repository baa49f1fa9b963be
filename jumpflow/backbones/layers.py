"""Layers shared by the DiT and UNet backbones whose JVPs are correct, differentiable and cheap.

Objectives such as MeanFlow and TVM push a forward-mode tangent through the whole backbone
(``jumpflow.objectives.base.jvp``: forward-mode dual tensors, or ``torch.func.jvp``); TVM also backpropagates
through that tangent. Three facts about torch 2.14 on CPU shape this file:

* fused attention kernels (flash / memory-efficient SDPA) have no forward-mode AD, so
  ``attention`` switches to an explicit ``softmax(q k^T / sqrt(d)) v`` when a tangent is present,
  with the softmax's tangent written out (torch's formula saves an ``exp`` it later modifies in
  place, which breaks a backward through the tangent under plain forward-mode dual tensors);
* the fused ``layer_norm``'s forward-AD formula has wrong second derivatives (backward of a
  JVP; pytorch/pytorch#196700), so ``LayerNorm`` runs a composite formula under a JVP;
* the forward-AD formulas of ``mm`` / ``addmm`` / ``convolution`` materialise a zero tangent
  for a weight that has none and multiply by it: one wasted full matmul per layer. ``Linear``
  and the convolutions below split the dual input into primal and tangent and compute the
  tangent as ``layer(tangent)`` without bias (the layers are linear in their input), which
  makes the JVP ~2x a forward instead of ~3x. ``make_dual`` is differentiable in both
  arguments, so backward through the JVP stays exact (tests hold it to finite differences).

Without a tangent every layer is its ``torch.nn`` parent, fused kernels included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

ATTENTION_MODES = ("auto", "fused", "math")


def has_forward_grad(*tensors: Tensor) -> bool:
    """True when any tensor carries a forward-mode tangent (a JVP is passing through)."""
    return any(forward_ad.unpack_dual(x).tangent is not None for x in tensors)


def add_plain(x: Tensor, c: Tensor) -> Tensor:
    """``x + c`` where at most ``x`` carries a forward-mode tangent: the tangent passes through as
    it is (torch would add ``c``'s zero tangent through its Python fallback; see
    ``bench/results/jvp_ops.json``)."""
    primal, tangent = forward_ad.unpack_dual(x)
    if tangent is None or forward_ad.unpack_dual(c).tangent is not None:
        return x + c
    return forward_ad.make_dual(primal + c, tangent.expand(torch.broadcast_shapes(x.shape, c.shape)))


def scale_plain(x: Tensor, s: float) -> Tensor:
    """``x * s`` for a Python number ``s``, the tangent scaled without torch's zero-tangent path."""
    primal, tangent = forward_ad.unpack_dual(x)
    if tangent is None:
        return x * s
    return forward_ad.make_dual(primal * s, tangent * s)


def modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """FiLM / adaLN ``x * (1 + scale) + shift`` (``scale, shift`` broadcast against ``x``).

    Written as ``x + x * scale + shift``: under forward-mode AD an op between a dual tensor and a
    constant (the ``1``) builds the constant's zero tangent through a Python fallback, a fixed cost
    per op that is a large share of a JVP step on a small backbone (``python -m bench.jvp_ops``)."""
    return x + x * scale + shift


def attention(q: Tensor, k: Tensor, v: Tensor, mode: str = "auto") -> Tensor:
    """Multi-head attention ``(B, heads, N, d) x3 -> (B, heads, N, d)``.

    ``mode``: ``"fused"`` (``F.scaled_dot_product_attention``; inside ``jvp_context`` torch
    restricts it to the math backend, which has forward AD), ``"math"`` (explicit softmax,
    always forward-AD safe) or ``"auto"`` (math when a tangent is present, else fused).
    """
    if mode == "fused" or (mode == "auto" and not has_forward_grad(q, k, v)):
        return F.scaled_dot_product_attention(q, k, v)                    # (B, heads, N, d)
    scale = q.shape[-1] ** -0.5
    weights = softmax_last(scale_plain(q, scale) @ k.transpose(-2, -1))  # (B, heads, N, N)
    return weights @ v                                                    # (B, heads, N, d)


def softmax_last(logits: Tensor) -> Tensor:
    """``softmax`` over the last dim with an explicit tangent ``w * (dl - sum(w * dl))`` under a JVP.

    torch's own forward-AD formula for softmax modifies a saved ``exp`` output in place, so a
    backward through the tangent (TVM on a DiT) fails outside ``torch.func.jvp``; the explicit
    tangent is differentiable and its primal is ``torch.softmax``'s, bit for bit."""
    primal, tangent = forward_ad.unpack_dual(logits)
    if tangent is None:
        return torch.softmax(logits, dim=-1)
    weights = torch.softmax(primal, dim=-1)                               # (..., N)
    d_weights = weights * (tangent - (weights * tangent).sum(-1, keepdim=True))  # (..., N)
    return forward_ad.make_dual(weights, d_weights)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim (optionally affine); under a JVP the composite
    ``x_hat = (x - mean) r``, ``r = 1 / sqrt(var + eps)``, with the explicit tangent
    ``d x_hat = r (dx - mean(dx) - x_hat mean(x_hat dx))`` (see module docstring), the fused
    kernel otherwise. A drop-in for ``nn.LayerNorm(dim)`` in any backbone that TVM
    differentiates through."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (..., D), same or None
        if tangent is None:
            return F.layer_norm(x, (self.dim,), self.weight, self.bias, eps=self.eps)  # (..., D)
        if self.weight is not None and has_forward_grad(self.weight, self.bias):
            xc = x - x.mean(-1, keepdim=True)                             # (..., D)
            y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
            return y * self.weight + self.bias                            # (..., D)
        # explicit tangent on plain tensors (as GroupNorm below): cheaper than the composite
        # formula on dual tensors, and differentiable, so a backward through the JVP is exact
        xc = primal - primal.mean(-1, keepdim=True)                       # (..., D)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)      # (..., 1)
        x_hat = xc * r                                                    # (..., D)
        t_hat = r * (tangent - tangent.mean(-1, keepdim=True) - x_hat * (x_hat * tangent).mean(-1, keepdim=True))
        if self.weight is None:
            return forward_ad.make_dual(x_hat, t_hat)                     # (..., D)
        return forward_ad.make_dual(x_hat * self.weight + self.bias, t_hat * self.weight)  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with an explicit tangent under a JVP (torch's formula costs ~10 ops on
    functorch-wrapped tensors, a large share of a small UNet's JVP)::

        x_hat = (x - mean) r,   r = 1 / sqrt(var + eps)        (per sample and group)
        d x_hat = r (dx - mean(dx) - x_hat mean(x_hat dx)),    dy = gamma d x_hat

    The primal runs the fused kernel (its plain backward is exact); the tangent is built
    from differentiable ops, so a backward through the JVP (TVM) is exact too.
    """

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (B, C, *S), same or None
        if tangent is None or not self.affine or has_forward_grad(self.weight, self.bias):
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)  # (B, C, *S)
        groups = (primal.shape[0], self.num_groups, -1)
        xg, tg = primal.reshape(groups), tangent.reshape(groups)          # (B, G, C/G * S) each
        xc = xg - xg.mean(-1, keepdim=True)                               # (B, G, C/G * S)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)      # (B, G, 1)
        x_hat = xc * r                                                    # (B, G, C/G * S)
        t_hat = r * (tg - tg.mean(-1, keepdim=True) - x_hat * (x_hat * tg).mean(-1, keepdim=True))  # (B, G, C/G * S)
        gamma = self.weight.reshape((1, -1) + (1,) * (x.dim() - 2))      # (1, C, 1...)
        out = F.group_norm(primal, self.num_groups, self.weight, self.bias, self.eps)  # (B, C, *S)
        return forward_ad.make_dual(out, t_hat.reshape(primal.shape) * gamma)  # (B, C, *S)


class Linear(nn.Linear):
    """``nn.Linear`` whose JVP is ``W @ tangent`` (no multiplication by a zero weight tangent)."""

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (..., in), (..., in) or None
        if tangent is None or has_forward_grad(self.weight):
            return F.linear(x, self.weight, self.bias)                    # (..., out)
        out = F.linear(primal, self.weight, self.bias)                    # (..., out)
        return forward_ad.make_dual(out, F.linear(tangent, self.weight))  # (..., out)


class Conv1d(nn.Conv1d):
    """``nn.Conv1d`` with the cheap JVP of ``Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (B, C_in, T), same or None
        if tangent is None or has_forward_grad(self.weight):
            return self._conv_forward(x, self.weight, self.bias)          # (B, C_out, T)
        out = self._conv_forward(primal, self.weight, self.bias)          # (B, C_out, T)
        return forward_ad.make_dual(out, self._conv_forward(tangent, self.weight, None))  # (B, C_out, T)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with the cheap JVP of ``Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (B, C_in, H, W), same or None
        if tangent is None or has_forward_grad(self.weight):
            return self._conv_forward(x, self.weight, self.bias)          # (B, C_out, H, W)
        out = self._conv_forward(primal, self.weight, self.bias)          # (B, C_out, H, W)
        return forward_ad.make_dual(out, self._conv_forward(tangent, self.weight, None))  # (B, C_out, H, W)


class ConvTranspose1d(nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` (no ``output_size`` argument) with the cheap JVP of ``Linear``."""

    def _apply_conv(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv_transpose1d(x, self.weight, bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        primal, tangent = forward_ad.unpack_dual(x)                       # (B, C_in, T), same or None
        if tangent is None or has_forward_grad(self.weight):
            return self._apply_conv(x, self.bias)                         # (B, C_out, 2T)
        out = self._apply_conv(primal, self.bias)                         # (B, C_out, 2T)
        return forward_ad.make_dual(out, self._apply_conv(tangent, None))  # (B, C_out, 2T)


def check_input_shape(net: nn.Module, x: Tensor, t: Tensor | None = None, h: Tensor | None = None,
                      cond: Tensor | None = None) -> None:
    """A one-line error when ``x`` is not ``(B, *net.shape)`` or when ``t``, ``h``, ``cond`` do not
    have one row count ``Bc`` dividing ``B`` (a single row broadcasts; every backbone checks its
    input; see :func:`per_row`)."""
    if tuple(x.shape[1:]) != net.shape:
        raise ValueError(f"{type(net).__name__} expects inputs of shape (B, {net.shape}), got {tuple(x.shape)}")
    rows = {name: int(v.shape[0]) if v.dim() else 1 for name, v in (("t", t), ("h", h), ("cond", cond))
            if v is not None}
    counts = set(rows.values()) - {1}
    if len(counts) > 1 or any(x.shape[0] % n for n in counts):
        raise ValueError(f"{type(net).__name__}: t, h and cond must have one row count dividing the batch "
                         f"{x.shape[0]} (grouped conditioning), got {rows}")


def per_row(modulation: Tensor, rows: int) -> Tensor:
    """Grouped conditioning: a modulation computed once per condition row ``(Bc, ...)`` spread to
    the ``rows = k Bc`` data rows it conditions, each condition row serving ``k`` consecutive
    rows (``repeat_interleave``; a no-op when ``Bc == rows``).

    A generator that draws many samples per condition (Drifting's ``G`` per group) passes
    ``t, h, cond`` once per group, so the time / condition embedder and every block's FiLM or adaLN
    regression run on ``Bc`` rows instead of ``B`` (Drifting's Block Push step 1.76x faster,
    ``bench/results/code_ab.json``)."""
    n = modulation.shape[0]
    return modulation if n == rows else modulation.repeat_interleave(rows // n, dim=0)
