"""Transition Matching, difference variant (DTM): Shaul, Havasi, Lipman et al., "Transition
Matching: Scalable and Flexible Generative Modeling" (arXiv 2506.23589, 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jumpflow.backbones.embeddings import ScalarEmbedder
from jumpflow.objectives.base import Inference, LossOutput, Objective, TimeSampler, drop_condition, require
from jumpflow.timeconv import interpolate


class TransitionHead(nn.Module):
    """Per-token velocity head ``g(features, y_sigma, sigma) -> (B, N, P)`` of the inner flow."""

    def __init__(self, feature_dim: int, token_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.sigma_embed = ScalarEmbedder(width)
        self.inp = nn.Linear(feature_dim + token_dim, width)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Linear(width, token_dim)

    def forward(self, features: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        # features: (B, N, F); y: (B, N, P); sigma: (B, N)
        b, n, _ = y.shape
        emb = self.sigma_embed(sigma.reshape(-1)).reshape(b, n, -1)       # (B, N, W)
        hid = self.inp(torch.cat([features, y], dim=-1)) + emb             # (B, N, W)
        for layer in self.layers:
            hid = hid + layer(hid)                                         # (B, N, W)
        return self.out(hid)                                               # (B, N, P)


class TransitionMatching(Objective):
    """Difference Transition Matching.

    ``T`` transitions take noise to data. At time ``t`` the state is
    ``z_t = (1 - t) x + t eps`` and the *difference* ``Y = x - eps`` moves it one step:
    ``z_{t - 1/T} = z_t + Y / T``. The backbone gives features of ``z_t``; a small per-token
    head learns the posterior ``p(Y | z_t)`` by an inner flow matching (paper eq. 12)::

        Y_sigma = (1 - sigma) Y + sigma eta,    eta ~ N(0, I),  sigma ~ U(0, 1)
        L = || g(phi_theta(z_t, t), Y_sigma, sigma) - (eta - Y) ||^2

    per token. Sampling draws ``Y`` by ``inner_steps`` Euler steps of the head from ``eta``
    and chains ``steps`` stochastic transitions (backbone NFE = ``steps``).

    Classifier-free guidance: ``class_drop_prob`` of the training rows see the null condition
    (``net.null_cond``); at sampling, ``inference.guidance = w != 1`` runs the backbone on
    ``c`` and on the null condition (one batched pass per transition, 2x backbone work) and
    guides the head's inner velocity, ``g_w = g(phi(z_t | null)) + w (g(phi(z_t | c)) -
    g(phi(z_t | null)))``, at every inner step (same ``Y_sigma`` and ``sigma`` in both).

    Shapes: ``x: (B, *shape)``; tokens ``(B, N, P)`` from ``net.tokenize``; features
    ``(B, N, F)`` from ``net(..., return_features=True)``.

    Args:
        transition_steps: ``T`` (training grid ``t in {1/T, ..., 1}`` when ``train_times="discrete"``).
        inner_steps: Euler steps of the head when sampling.
        head_width, head_depth: head size.
        head_samples: ``Y`` draws per backbone pass (amortises the backbone).
        train_times: ``"discrete"`` (the T-grid) or ``"continuous"`` (``t ~ U(0, 1]``).
        class_drop_prob: probability of training a row with the null condition (for guidance).
        inference: defaults of ``sample``: ``steps`` (T), ``guidance`` (1.0: none).
    """

    name = "transition_matching"
    guidance_at_sampling = True
    head_key = "transition_head"

    def __init__(self, transition_steps: int = 4, inner_steps: int = 8, head_width: int = 256, head_depth: int = 3,
                 head_samples: int = 4, train_times: str = "discrete", class_drop_prob: float = 0.0,
                 inference: dict | None = None):
        require(transition_steps >= 1, "transition_steps", f"must be >= 1, got {transition_steps}")
        require(inner_steps >= 1, "inner_steps", f"must be >= 1, got {inner_steps}")
        require(head_width >= 1 and head_depth >= 1, "head_width/head_depth", "must be >= 1")
        require(head_samples >= 1, "head_samples", f"must be >= 1, got {head_samples}")
        require(train_times in ("discrete", "continuous"), "train_times",
                f"must be 'discrete' or 'continuous', got {train_times!r}")
        self.transition_steps, self.inner_steps = transition_steps, inner_steps
        self.head_width, self.head_depth, self.head_samples = head_width, head_depth, head_samples
        self.train_times = train_times
        require(0.0 <= class_drop_prob < 1.0, "class_drop_prob", f"must be in [0, 1), got {class_drop_prob}")
        self.class_drop_prob = class_drop_prob
        self.set_inference_defaults(inference, steps=transition_steps)
        self.inner_sampler = TimeSampler("uniform", name="inner_sampler")

    def token_dim(self, backbone: nn.Module) -> int:
        """``P``, the width of the backbone's tokens (``tokenize: (B, *shape) -> (B, N, P)``)."""
        shape = getattr(backbone, "shape", None)
        if shape is None or not hasattr(backbone, "tokenize") or not hasattr(backbone, "feature_dim"):
            raise ValueError(f"{self.name} needs a backbone with shape, tokenize() and feature_dim")
        return backbone.tokenize(torch.zeros(1, *shape)).shape[-1]

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        token_dim = self.token_dim(backbone)
        return {self.head_key: TransitionHead(backbone.feature_dim, token_dim, self.head_width, self.head_depth)}

    def draw_times(self, b: int, x: Tensor) -> Tensor:
        """``t: (B,)`` of a training batch: the T-grid ``{1/T, ..., 1}`` or ``U(0, 1]``."""
        if self.train_times == "discrete":
            k = torch.randint(1, self.transition_steps + 1, (b,), device=x.device)
            return k.to(x.dtype) / self.transition_steps                       # (B,)
        return 1.0 - torch.rand(b, device=x.device, dtype=x.dtype)             # (B,) in (0, 1]

    def head_inputs(self, net, out: Tensor, feats: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """What the head is conditioned on besides ``(Y_sigma, sigma)``: DTM's head reads the
        backbone's features ``(B, N, F)`` only."""
        return (feats,)

    def inner_flow_loss(self, head, inputs: tuple[Tensor, ...], y: Tensor) -> Tensor:
        """Per-sample inner flow matching loss of ``p(Y | inputs)`` with ``head_samples`` draws of
        ``(eta, sigma)`` per row: ``y: (B, N, P)``, each input ``(B, N, *)`` -> ``(B,)``."""
        b, s = y.shape[0], self.head_samples
        inputs = tuple(a.repeat(s, 1, 1) for a in inputs)                      # (S*B, N, *) each
        y = y.repeat(s, 1, 1)                                                  # (S*B, N, P)
        eta = torch.randn_like(y)                                              # (S*B, N, P)
        sigma = self.inner_sampler(y.shape[0] * y.shape[1], y.device, y.dtype).reshape(y.shape[:2])  # (S*B, N)
        y_sigma = (1 - sigma[..., None]) * y + sigma[..., None] * eta          # (S*B, N, P)
        pred = head(*inputs, y_sigma, sigma)                                   # (S*B, N, P)
        return (pred - (eta - y)).pow(2).mean((1, 2)).reshape(s, b).mean(0)    # (B,)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        eps = torch.randn_like(x)                                              # (B, *shape)
        t = self.draw_times(b, x)                                              # (B,)
        z_t = interpolate(x, eps, t)                                           # (B, *shape)
        cond = drop_condition(net, cond, self.class_drop_prob)                 # (B, C) or None
        out, feats = net(z_t, t, torch.zeros_like(t), cond, return_features=True)  # (B, *shape), (B, N, F)
        y = net.tokenize(x - eps)                                              # (B, N, P)
        per = self.inner_flow_loss(net.aux[self.head_key], self.head_inputs(net, out, feats, y), y)
        return LossOutput(per, {"inner_mse": per.mean().item()})

    def features(self, net, z: Tensor, t: Tensor, cond: Tensor | None, null: Tensor | None):
        """``(out, feats)`` of the backbone at ``(z, t)``; with guidance (``null`` given) one batched
        pass on ``[c; null]``: ``(2B, ...)``."""
        if null is not None:
            b = z.shape[0]
            return net(torch.cat([z, z]), torch.cat([t, t]), torch.zeros(2 * b, device=z.device, dtype=z.dtype),
                       torch.cat([cond, null]), return_features=True)          # (2B, ...): [c; null]
        return net(z, t, torch.zeros_like(t), cond, return_features=True)      # (B, ...)

    def inner_sample(self, head_fn, y: Tensor, guidance: float | None) -> Tensor:
        """``Y`` from ``y = eta`` (sigma = 1) by ``inner_steps`` Euler steps of ``head_fn(y_sigma, sigma)``
        to sigma = 0; with ``guidance = w`` the head runs on ``[y; y]`` against ``[c; null]`` inputs and
        ``g_w = g_null + w (g_c - g_null)``. ``y: (B, N', P)``."""
        for j in range(self.inner_steps):
            sig = 1.0 - j / self.inner_steps
            sigma = torch.full(y.shape[:2], sig, device=y.device, dtype=y.dtype)
            if guidance is not None:
                g_c, g_n = head_fn(torch.cat([y, y]), torch.cat([sigma, sigma])).chunk(2)
                g = g_n + guidance * (g_c - g_n)                                # (B, N', P)
            else:
                g = head_fn(y, sigma)                                           # (B, N', P)
            y = y - (1.0 / self.inner_steps) * g                                # (B, N', P)
        return y

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        inf = self.resolve(inference)
        steps, w = inf.steps, float(inf.guidance)
        guided = cond is not None and w != 1.0
        z = noise
        null = net.null_cond(cond) if guided else None                              # (B, C)
        for i in range(steps):
            t = torch.full((z.shape[0],), 1.0 - i / steps, device=z.device, dtype=z.dtype)
            out, feats = self.features(net, z, t, cond, null)                       # (B or 2B, ...)
            y = self.transition(net, z, out, feats, w if guided else None)          # (B, N, P)
            z = self.outer_step(net, z, y, t, i, steps)                             # (B, *shape)
        return z

    def transition(self, net, z: Tensor, out: Tensor, feats: Tensor, guidance: float | None) -> Tensor:
        """One outer step's transition ``Y`` drawn by the head from ``(B or 2B, N, F)`` features. -> ``(B, N, P)``."""
        head = net.aux[self.head_key]
        y = torch.randn_like(net.tokenize(z))                                       # (B, N, P) at sigma = 1
        return self.inner_sample(lambda y_, s_: head(feats, y_, s_), y, guidance)

    def outer_step(self, net, z: Tensor, y: Tensor, t: Tensor, i: int, steps: int) -> Tensor:
        """Step ``i`` of ``steps`` uniform outer steps from ``X_t`` with transition ``Y``: DTM's
        ``X_{t - 1/steps} = X_t + Y / steps``."""
        return z + net.untokenize(y) / steps                                        # (B, *shape)
