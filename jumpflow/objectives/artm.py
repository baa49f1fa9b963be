"""Transition Matching, autoregressive variant (ARTM): Shaul, Singer, Gat, Lipman, "Transition
Matching: Scalable and Flexible Generative Modeling" (arXiv:2506.23589, 2025), Sec. 3 (ARTM) on the
*independent linear process*; the difference variant (DTM) is
:class:`~jumpflow.objectives.transition_matching.TransitionMatching`, whose pieces this one reuses."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from jumpflow.objectives.transition_matching import TransitionHead, TransitionMatching
from jumpflow.timeconv import expand_like, interpolate


class CausalContext(nn.Module):
    """``c_i``, a summary of the tokens before ``i``: one causal self-attention layer over the
    embedded sequence ``[start, Y^1, ..., Y^{N-1}]`` (shifted right by one), with sinusoidal
    positions. Row ``i`` depends on ``Y^{<i}`` only. ``(B, N, P) -> (B, N, W)``."""

    def __init__(self, token_dim: int, width: int):
        super().__init__()
        self.width = width
        self.start = nn.Parameter(torch.zeros(token_dim))
        self.embed = nn.Linear(token_dim, width)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def positions(self, n: int, device, dtype) -> Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=device, dtype=dtype) / max(half, 1))
        ang = torch.arange(n, device=device, dtype=dtype)[:, None] * freqs[None]      # (N, W/2)
        pos = torch.cat([ang.sin(), ang.cos()], dim=1)                                 # (N, 2 * (W/2))
        return nn.functional.pad(pos, (0, self.width - pos.shape[1]))                  # (N, W)

    def forward(self, y: Tensor) -> Tensor:
        b, n, p = y.shape
        prev = torch.cat([self.start.to(y.dtype).expand(b, 1, p), y[:, :-1]], dim=1)   # (B, N, P)
        hid = self.embed(prev) + self.positions(n, y.device, y.dtype)                  # (B, N, W)
        q, k, v = self.qkv(self.norm(hid)).chunk(3, dim=-1)                            # (B, N, W) each
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)      # (B, N, W)
        return hid + self.proj(att)                                                    # (B, N, W)


class CausalTransitionHead(nn.Module):
    """ARTM's per-token head ``g(phi_i, o_i, c_i, Y_sigma^i, sigma) -> (B, N, P)``: DTM's
    :class:`TransitionHead` reading the backbone's features ``phi_i``, its output token ``o_i`` and
    the causal context ``c_i = context(Y^{<i})``."""

    def __init__(self, feature_dim: int, token_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.context = CausalContext(token_dim, width)
        self.head = TransitionHead(feature_dim + token_dim + width, token_dim, width, depth)

    def forward(self, feats: Tensor, proposal: Tensor, ctx: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        # feats: (B, N, F); proposal: (B, N, P); ctx: (B, N, W); y: (B, N, P); sigma: (B, N)
        return self.head(torch.cat([feats, proposal, ctx], dim=-1), y, sigma)          # (B, N, P)


class AutoregressiveTransitionMatching(TransitionMatching):
    """Autoregressive Transition Matching on the independent linear process.

    **Supervising process** (paper Sec. 3, "independent linear process"; jumpflow's time, ``t = 1``
    noise): each time has its own noise, ``X_t = (1 - t) X_0 + t eps_t`` with ``eps_t`` independent
    across ``t``, so the transition ``X_t -> X_{t - 1/T}`` is stochastic: ``X_{t-1/T}`` is
    independent of ``X_t`` given the data ``X_0``. The latent is the *difference* of the draw at
    ``t``, ``Y = X_0 - eps_t`` (the paper's ``X_T - X_0``, DTM's ``Y``), so ``X_0 = X_t + t Y`` and::

        X_{t - 1/T} = (1 - (t - 1/T)) (X_t + t Y) + (t - 1/T) eps',    eps' ~ N(0, I) fresh

    which is the paper's ARTM transition (it models ``Y = X_{t+1}``) written through the bijection
    ``Y <-> X_0`` given ``X_t``: the same kernel, with the fresh noise added in closed form.
    ``(X_t, Y)`` has the same law under both processes, so training pairs are DTM's; only the
    head and the transition differ.

    **Kernel** (autoregressive over the ``N`` tokens of ``Y``, ``net.tokenize``)::

        p(Y | X_t) = prod_i p(Y^i | X_t, Y^{<i})
        Y^i_sigma = (1 - sigma) Y^i + sigma eta^i,   eta ~ N(0, I),  sigma ~ U(0, 1)
        L = || g(phi_theta(X_t, t)_i, o_i, c_i(Y^{<i}), Y^i_sigma, sigma) - (eta^i - Y^i) ||^2   (teacher forcing)

    with the backbone's features ``phi_i`` and output token ``o_i`` of ``X_t`` (one pass, non-causal
    over ``X_t``'s tokens, as in the paper) and a causal context ``c_i`` of the clean previous tokens
    (:class:`CausalContext`; the paper feeds ``Y^{<i}`` to a causal backbone, here the causality
    lives in the head: one backbone pass per transition). Sampling draws ``Y^1, ..., Y^N`` in turn
    (``inner_steps`` Euler steps of the head each) and re-noises; backbone NFE = ``steps``.
    Guidance as DTM's (the head's inner velocity, ``class_drop_prob`` in training).

    Shapes: ``x: (B, *shape)``; tokens ``(B, N, P)``; features ``(B, N, F)``; context ``(B, N, W)``.

    Args: as :class:`~jumpflow.objectives.transition_matching.TransitionMatching` (``head_width`` is
    also the context width).
    """

    name = "transition_matching_ar"
    head_key = "artm_head"

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        token_dim = self.token_dim(backbone)
        return {self.head_key: CausalTransitionHead(backbone.feature_dim, token_dim, self.head_width, self.head_depth)}

    def head_inputs(self, net, out: Tensor, feats: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """``(phi, o, c(Y^{<i}))``: features, the backbone's output tokens, the causal context of ``Y``."""
        return feats, net.tokenize(out), net.aux[self.head_key].context(y)

    def transition(self, net, z: Tensor, out: Tensor, feats: Tensor, guidance: float | None) -> Tensor:
        """``Y`` token by token, each token's inner flow given the tokens before it. -> ``(B, N, P)``."""
        head = net.aux[self.head_key]
        guided = guidance is not None
        proposal = net.tokenize(out)                                                # (B or 2B, N, P)
        y = torch.zeros_like(net.tokenize(z))                                       # (B, N, P), filled in turn
        for n in range(y.shape[1]):
            ctx = head.context(torch.cat([y, y]) if guided else y)[:, n:n + 1]      # (B', 1, W): Y^{<n} only
            f_n, o_n = feats[:, n:n + 1], proposal[:, n:n + 1]                      # (B', 1, F), (B', 1, P)
            y_n = torch.randn_like(y[:, n:n + 1])                                   # (B, 1, P) at sigma = 1
            y[:, n:n + 1] = self.inner_sample(partial(head, f_n, o_n, ctx), y_n, guidance)
        return y

    def outer_step(self, net, z: Tensor, y: Tensor, t: Tensor, i: int, steps: int) -> Tensor:
        """``X_0 = X_t + t Y``, re-noised to ``t_next = 1 - (i + 1) / steps`` (unless it is the last step)."""
        t_next = 1.0 - (i + 1) / steps
        x_hat = z + expand_like(t, z) * net.untokenize(y)                           # (B, *shape)
        return x_hat if t_next <= 0 else interpolate(x_hat, torch.randn_like(z), torch.full_like(t, t_next))
