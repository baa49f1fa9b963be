"""Terminal Velocity Matching: Zhou, Ermon, Song et al., "Terminal Velocity Matching"
(arXiv 2511.19797, 2025)."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from jumpflow.objectives.base import (
    ADAPTIVE_REDUCTIONS,
    Inference,
    LossOutput,
    Objective,
    TimeSampler,
    adaptive_loss_weight,
    jump_sample,
    jvp,
    per_sample_mse,
    require,
)
from jumpflow.timeconv import expand_like, interpolate, velocity

S_SAMPLERS = ("truncated", "scaled")
FM_TIMES = ("independent", "jump_start")


def truncated_logit_normal(mean: float, std: float, upper: Tensor) -> Tensor:
    """``s ~ sigmoid(N(mean, std^2))`` conditioned on ``s < upper`` (elementwise), exactly.

    Inverse CDF on the logit scale, in float64: ``c = Phi((logit(upper) - mean) / std)``,
    ``s = sigmoid(mean + std * Phi^-1(U(0, c)))``. Its CDF on ``(0, upper)`` is
    ``Phi((logit(s) - mean) / std) / c``. Shapes: ``upper: (n,)`` in ``(0, 1]`` -> ``(n,)`` of
    ``upper``'s dtype, in ``(0, upper]`` (the caller keeps it strictly below)."""
    up = upper.double()
    c = torch.special.ndtr((torch.logit(up) - mean) / std)                  # (n,) Phi at the cut
    u = torch.rand_like(up) * c                                             # (n,) in [0, c)
    s = torch.sigmoid(mean + std * torch.special.ndtri(u))                  # (n,)
    return s.to(upper.dtype).clamp_min(torch.finfo(upper.dtype).tiny)


GUIDANCE_KEYS = ("w_min", "w_max", "dist", "class_drop", "scale_output")
GUIDANCE_DISTS = ("uniform_w", "uniform_beta")


class GuidanceSampler:
    """TVM's training guidance (lumalabs/tvm ``TVMLoss.__call__``): a scale ``w`` per sample, given
    to the network as ``beta = 1 / w``, and label dropout.

    ``dist="uniform_w"``: ``w ~ U[w_min, w_max]`` (official ``min_cfg`` / ``max_cfg``; ``w_min ==
    w_max`` is the official fixed ``cfg``); ``"uniform_beta"``: ``beta ~ U(1 / w_max, 1 / w_min]``
    (the official fallback, ``beta ~ U(0, 1)``, is ``w_min = 1`` and a large ``w_max``). A row
    whose label is dropped (probability ``class_drop``, official ``label_dropout``) has
    ``beta = 1``. ``scale_output`` (official ``do_scale_param``): the network's output is
    multiplied by ``w``, so it predicts ``velocity / w``.
    """

    def __init__(self, w_min: float = 1.0, w_max: float = 4.0, dist: str = "uniform_w", class_drop: float = 0.1,
                 scale_output: bool = True):
        require(dist in GUIDANCE_DISTS, "guidance.dist", f"must be one of {GUIDANCE_DISTS}, got {dist!r}")
        for name, v in (("w_min", w_min), ("w_max", w_max)):
            require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                    f"guidance.{name}", f"must be a finite number, got {v!r}")
        require(0.0 < w_min <= w_max, "guidance.w_min/w_max", f"need 0 < w_min <= w_max, got {w_min}, {w_max}")
        require(1.0 / w_max >= 1e-3, "guidance.w_max", f"must be <= 1000 (beta = 1 / w >= 1e-3), got {w_max}")
        require(isinstance(class_drop, (int, float)) and 0.0 <= class_drop < 1.0, "guidance.class_drop",
                f"must be in [0, 1), got {class_drop!r}")
        require(isinstance(scale_output, bool), "guidance.scale_output", f"must be true or false, got {scale_output!r}")
        self.w_min, self.w_max, self.dist = float(w_min), float(w_max), dist
        self.class_drop, self.scale_output = float(class_drop), scale_output

    def __call__(self, n: int, device=None) -> tuple[Tensor, Tensor]:
        """``(beta (n,) float64, dropped (n,) bool)``; ``beta = 1`` on dropped rows."""
        u = torch.rand(n, device=device, dtype=torch.float64)
        if self.dist == "uniform_w":
            beta = 1.0 / (self.w_min + u * (self.w_max - self.w_min))
        else:
            lo, hi = 1.0 / self.w_max, 1.0 / self.w_min
            beta = hi - u * (hi - lo)                                         # (lo, hi], never 0
        dropped = torch.rand(n, device=device) < self.class_drop
        return torch.where(dropped, torch.ones_like(beta), beta), dropped


class TerminalVelocityMatching(Objective):
    """Match the derivative of a jump at its *terminal* time.

    The net ``F_theta(z_t, t, h)`` is the average velocity of the jump ``t -> s = t - h``, so
    the jump's end point is ``f(s) = z_t + (s - t) F_theta(z_t, t, t - s)``. Its derivative in
    the terminal time must be the instantaneous velocity at the end point (paper eq. 9)::

        df/ds = F + (s - t) dF/ds                 (dF/ds: one JVP along s, gradient flows through it)
        L_TV  = || df/ds - sg(F_ema(f(s), s, 0)) ||^2
        L_FM  = || F_theta(z_u, u, 0) - (eps - x) ||^2,   u ~ fm_sampler, independent of (t, s)
        L     = L_TV + lambda_fm * L_FM

    Times, as the official code (lumalabs/tvm ``TVMLoss.sample_ts``) draws them: the gap
    ``t - s ~ gap_sampler`` (logit-normal(-0.8, 1)); ``s`` from the terminal sampler's
    logit-normal(-0.4, 1) *truncated* to ``(0, 1 - gap)`` exactly, by the inverse CDF on the
    logit scale (``s_sampler="truncated"``)::

        c = Phi((logit(1 - gap) - mean) / std),   s = sigmoid(mean + std * Phi^-1(U(0, c)))

    (``s_sampler="scaled"``: the earlier ``s = terminal_sampler * (1 - gap)``, which has another
    law; kept for comparison); ``t = min(s + gap, 1)``; the flow-matching term at its own
    time ``u ~ fm_sampler`` (logit-normal(-0.4, 1)) on ``z_u = (1 - u) x + u eps`` (same
    ``eps``), not at ``t`` (``fm_time="jump_start"``: at ``u = t`` on ``z_t``, the earlier form,
    kept for comparison).

    ``F_ema`` is an EMA copy (decay ``target_decay``, updated by ``on_step_end``) of the backbone
    (``net.aux["tvm_target"]``) and, with ``target_encoder`` (default), of the condition path
    too: the condition encoder (``aux["tvm_target_encoder"]``; the raw condition is encoded again
    by it, ``Generator.reencode_condition``, with the same random crops) and the guidance
    embedding (``aux["tvm_target_guidance"]``), so an image policy's target sees its own
    features, as the official EMA of the whole model does. Sampling chains exact jumps
    (1 step: ``x = eps - F(eps, 1, 1)``). With ``prediction="data"`` the backbone (and its EMA
    copy) estimates clean data and ``F = (z_t - x_hat) / t`` (``Objective.from_data_prediction``).

    **Guidance** (``guidance``: a dict, official ``TVMWrapper.forward``): per sample a scale
    ``w`` and ``beta = 1 / w`` (``self.guidance_sampler``, a ``GuidanceSampler``), labels dropped
    to the null class with probability ``class_drop`` (those rows: ``beta = 1``); the network takes ``beta`` as an input
    (``Generator.guidance_condition``) and, with ``scale_output``, its output is multiplied by
    ``w``: ``F = w F_theta(.., c, beta)``. The flow-matching target is guided by the EMA model's
    unconditional velocity, and both terms are scaled by ``beta``::

        L_TV = mean_d ((df/ds - w F_ema(f(s), s, 0 | c, beta)) beta)^2
        v_g  = w (eps - x) + (1 - w) F_ema(z_u, u, 0 | null, 1)
        L_FM = mean_d ((w F_theta(z_u, u, 0 | c, beta) - v_g) beta)^2

    (``v_g`` is ``u_null + w (v - u_null)`` with the sample's conditional velocity ``v = eps - x``
    in place of ``u_c``, as the official code writes it.) At sampling ``inference.guidance``
    chooses ``w``: the net gets ``beta = 1 / w`` and its output is multiplied by ``w``. With
    ``guidance=None`` (default) none of this happens and no random number is drawn for it.

    Shapes: ``x, z_t, F, f: (B, *shape)``; ``t, s, u, beta: (B,)``; ``cond: (B, C)`` or ``None``.

    Args:
        gap_sampler, terminal_sampler, fm_sampler: ``TimeSampler`` kwargs of the gap ``t - s``,
            the terminal time ``s`` (before truncation) and the flow-matching time ``u``.
        s_sampler: ``"truncated"`` (exact truncation of a logit-normal ``terminal_sampler`` to
            ``(0, 1 - gap)``; a uniform one is scaled, which is its exact truncation) or
            ``"scaled"`` (``terminal_sampler * (1 - gap)``).
        fm_time: ``"independent"`` (the flow-matching term at ``u ~ fm_sampler``, official) or
            ``"jump_start"`` (at the jump's start ``t``, on ``z_t``; no draw of ``u``).
        lambda_fm: weight of the flow-matching term.
        target_decay: EMA decay of the terminal-velocity target.
        target_encoder: the EMA target has its own copy of the condition encoder (``False``: it
            uses the live encoder's features, as before).
        adaptive_c: constant of an adaptive weight on the terminal term, MeanFlow's
            ``1 / sg(||err||^2 + c)^p`` (``None``, the official code's choice: off).
        adaptive_p, adaptive_reduce: that weight's power and the reduction of ``||err||^2`` over
            dimensions (``"mean"``: the first form here; ``"sum"``: MeanFlow's, where ``c`` acts
            per sample rather than per dimension).
        guidance: ``None`` (off) or ``GuidanceSampler`` kwargs ``{w_min, w_max, dist, class_drop,
            scale_output}`` (defaults 1, 4, ``"uniform_w"``, 0.1, true); needs a condition
            encoder with a null class.
    """

    name = "tvm"
    uses_jvp = True

    def __init__(self, gap_sampler: dict | None = None, terminal_sampler: dict | None = None,
                 fm_sampler: dict | None = None, s_sampler: str = "truncated", fm_time: str = "independent",
                 lambda_fm: float = 1.0,
                 target_decay: float = 0.99, target_encoder: bool = True, adaptive_c: float | None = None,
                 adaptive_p: float = 1.0, adaptive_reduce: str = "mean", guidance: dict | None = None,
                 prediction: str = "native", data_t_min: float = 0.05, inference: dict | None = None):
        self.set_prediction(prediction, data_t_min)
        require(guidance is None or isinstance(guidance, dict), "guidance",
                f"must be null or a dict of {', '.join(GUIDANCE_KEYS)}; got {guidance!r}")
        if guidance is not None:
            unknown = sorted(set(guidance) - set(GUIDANCE_KEYS))
            require(not unknown, "guidance", f"unknown keys {unknown}; valid: {', '.join(GUIDANCE_KEYS)}")
        self.guidance_sampler = None if guidance is None else GuidanceSampler(**guidance)
        # trained with a sampled beta = 1 / w: the network takes it as an input, w is chosen at sampling
        self.guidance_input = self.guidance_at_sampling = self.guidance_sampler is not None
        self.set_inference_defaults(inference, steps=1)
        require(self.inference.guidance is None or self.inference.guidance > 0, "inference.guidance",
                f"must be > 0 (beta = 1 / w), got {self.inference.guidance}")
        self.gap_sampler = TimeSampler(**(gap_sampler or {"kind": "logit_normal", "mean": -0.8, "std": 1.0}),
                                       name="gap_sampler")
        self.terminal_sampler = TimeSampler(**(terminal_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                            name="terminal_sampler")
        self.fm_sampler = TimeSampler(**(fm_sampler or {"kind": "logit_normal", "mean": -0.4, "std": 1.0}),
                                      name="fm_sampler")
        require(s_sampler in S_SAMPLERS, "s_sampler", f"must be one of {S_SAMPLERS}, got {s_sampler!r}")
        self.s_sampler = s_sampler
        require(fm_time in FM_TIMES, "fm_time", f"must be one of {FM_TIMES}, got {fm_time!r}")
        self.fm_time = fm_time
        require(lambda_fm >= 0, "lambda_fm", f"must be >= 0, got {lambda_fm}")
        require(0.0 <= target_decay < 1.0, "target_decay", f"must be in [0, 1), got {target_decay}")
        require(isinstance(target_encoder, bool), "target_encoder", f"must be true or false, got {target_encoder!r}")
        require(adaptive_c is None or adaptive_c > 0, "adaptive_c", f"must be > 0 or None, got {adaptive_c}")
        require(adaptive_p >= 0, "adaptive_p", f"must be >= 0, got {adaptive_p}")
        require(adaptive_reduce in ADAPTIVE_REDUCTIONS, "adaptive_reduce",
                f"must be one of {ADAPTIVE_REDUCTIONS}, got {adaptive_reduce!r}")
        self.lambda_fm, self.target_decay, self.adaptive_c = lambda_fm, target_decay, adaptive_c
        self.adaptive_p, self.adaptive_reduce = adaptive_p, adaptive_reduce
        self.target_encoder = target_encoder
        #: the generator keeps the raw condition of its last encode() so the target can encode it again
        self.reencodes_condition = target_encoder

    # -- the EMA target ----------------------------------------------------------------------
    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {"tvm_target": _frozen_copy(backbone)}

    def extra_condition_modules(self, cond_encoder: nn.Module | None,
                                guidance_embed: nn.Module | None) -> dict[str, nn.Module]:
        """EMA copies of the condition path (``Generator`` calls this once): the encoder (with
        ``target_encoder``) and the guidance embedding (with ``guidance``)."""
        out = {}
        if self.target_encoder and cond_encoder is not None:
            out["tvm_target_encoder"] = _frozen_copy(cond_encoder)
        if guidance_embed is not None:
            out["tvm_target_guidance"] = _frozen_copy(guidance_embed)
        return out

    @torch.no_grad()
    def on_step_end(self, net) -> None:
        pairs = [("tvm_target", net.backbone), ("tvm_target_encoder", getattr(net, "cond_encoder", None)),
                 ("tvm_target_guidance", getattr(net, "guidance_embed", None))]
        for key, live in pairs:
            if live is None or key not in net.aux:
                continue
            for p_t, p in zip(net.aux[key].parameters(), live.parameters()):
                p_t.lerp_(p.detach(), 1.0 - self.target_decay)

    def target_condition(self, net, cond: Tensor | None) -> Tensor | None:
        """The target's condition: ``cond`` encoded again by the EMA encoder when the net has one
        (``aux["tvm_target_encoder"]``), else ``cond`` (detached). ``(B, C)`` or ``None``."""
        if cond is None:
            return None
        encoder = _aux_module(net, "tvm_target_encoder")
        return cond.detach() if encoder is None else net.reencode_condition(cond, encoder).detach()

    def _target_null(self, net, cond_tgt: Tensor) -> Tensor:
        null = getattr(_aux_module(net, "tvm_target_encoder"), "null", None)
        return null(cond_tgt) if null is not None else net.null_cond(cond_tgt)

    # -- times ---------------------------------------------------------------------------------
    def sample_times(self, n: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, s, t_fm)``, each ``(n,)``: the jump ``t -> s`` of the terminal term and the
        flow-matching time (drawn independently of both; ``t`` itself with ``fm_time="jump_start"``)."""
        gap = self.gap_sampler(n, device, dtype)                             # (n,)
        upper = 1.0 - gap                                                    # (n,)
        ts = self.terminal_sampler
        if self.s_sampler == "truncated" and ts.kind == "logit_normal":
            s = truncated_logit_normal(ts.mean, ts.std, upper).clamp(ts.low, ts.high)
            s = torch.minimum(s, torch.nextafter(upper, torch.zeros_like(upper)))   # s < 1 - gap in dtype
        else:
            s = ts(n, device, dtype) * upper
        t = (s + gap).clamp(max=1.0)
        return t, s, (t if self.fm_time == "jump_start" else self.fm_sampler(n, device, dtype))

    # -- loss and sampling ---------------------------------------------------------------------
    def guided_conditions(self, net, cond: Tensor, cond_tgt: Tensor, n: int):
        """Training guidance: ``(beta (B,) float64, cond, cond_tgt, cond_null_tgt)``: ``beta``
        per row (1 where the label was dropped), the net's and the target's conditions with the
        dropped rows nulled and ``beta`` embedded, and the target's null condition at ``beta = 1``
        (for the unconditional velocity of the guided flow-matching target)."""
        if not hasattr(net, "null_cond"):
            raise ValueError("guidance needs a net with a null condition (a class embedding)")
        beta, dropped = self.guidance_sampler(n, cond.device)                # (B,) float64, (B,) bool
        drop = dropped[:, None]
        cond = torch.where(drop, net.null_cond(cond), cond)                  # (B, C)
        null_tgt = self._target_null(net, cond_tgt)                          # (B, C)
        cond_tgt = torch.where(drop, null_tgt, cond_tgt)                     # (B, C)
        embed = _aux_module(net, "tvm_target_guidance")
        cond = net.guidance_condition(cond, beta)
        cond_tgt = net.guidance_condition(cond_tgt, beta, embed=embed)
        cond_null_tgt = net.guidance_condition(null_tgt, torch.ones_like(beta), embed=embed)
        return beta, cond, cond_tgt, cond_null_tgt

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:
        b = x.shape[0]
        eps = torch.randn_like(x)                                            # (B, *shape)
        t, s, t_fm = self.sample_times(b, x.device, x.dtype)                 # (B,) each
        z_t = interpolate(x, eps, t)                                         # (B, *shape)
        cond_tgt = self.target_condition(net, cond)                          # (B, C) or None
        beta = w = None
        if self.guidance_sampler is not None:
            if cond is None:
                raise ValueError("tvm guidance needs a conditional generator (a class condition)")
            beta, cond, cond_tgt, cond_null_tgt = self.guided_conditions(net, cond, cond_tgt, b)
            beta = beta.to(x.dtype)
            w = 1.0 / beta                                                   # (B,)
        out_scale = w if (w is not None and self.guidance_sampler.scale_output) else None

        def scaled(v: Tensor) -> Tensor:                                     # w * output (scale_output)
            return v if out_scale is None else expand_like(out_scale, v) * v

        def jump_velocity(s_):
            return net(z_t, t, t - s_, cond)
        F, dF_ds = jvp(jump_velocity, (s,), (torch.ones_like(s),))           # (B, *shape) each
        F, dF_ds = scaled(F), scaled(dF_ds)
        f = z_t + expand_like(s - t, z_t) * F                                # (B, *shape)
        df_ds = F + expand_like(s - t, z_t) * dF_ds                          # (B, *shape)
        z_fm = interpolate(x, eps, t_fm)                                     # (B, *shape)
        v = velocity(x, eps)                                                 # (B, *shape)
        with torch.no_grad():
            if beta is None:
                target = net.aux["tvm_target"](f.detach(), s, torch.zeros_like(s), cond_tgt)
            else:                                      # one call: the terminal target and u_null
                both = net.aux["tvm_target"](torch.cat([f.detach(), z_fm]), torch.cat([s, t_fm]),
                                             torch.zeros(2 * b, device=x.device, dtype=x.dtype),
                                             torch.cat([cond_tgt, cond_null_tgt]))
                target, u_null = both.chunk(2)                               # (B, *shape) each
                target = scaled(target)                # u_null is at beta = 1: its w is 1
                wv = expand_like(w, v)
                v = wv * v + (1.0 - wv) * u_null       # v_g = w (eps - x) + (1 - w) u_null
        err_tv = _beta_scaled(df_ds - target, beta)                          # (B, *shape)
        l_tv = err_tv.pow(2).flatten(1).mean(1)                              # (B,)
        if self.adaptive_c is not None:
            l_tv = adaptive_loss_weight(err_tv, self.adaptive_p, self.adaptive_c, self.adaptive_reduce) * l_tv
        l_fm = _beta_mse(scaled(net(z_fm, t_fm, torch.zeros_like(t_fm), cond)), v, beta)   # (B,)
        loss = l_tv + self.lambda_fm * l_fm
        metrics = {"terminal": l_tv.mean().item(), "fm": l_fm.mean().item()}
        if beta is not None:
            metrics["w_mean"] = w.mean().item()
        return LossOutput(loss, metrics)

    @torch.no_grad()
    def sample(self, net, noise: Tensor, cond: Tensor | None, inference: Inference | int | None = None) -> Tensor:
        inf = self.resolve(inference)
        if self.guidance_sampler is None or cond is None:
            return jump_sample(lambda z, t, h: net(z, t, h, cond), noise, inf.steps, average=True)
        w = float(inf.guidance)
        require(w > 0, "inference.guidance", f"must be > 0 (beta = 1 / w), got {w}")
        beta = torch.full((noise.shape[0],), 1.0 / w, device=noise.device, dtype=torch.float64)
        cond_g = net.guidance_condition(cond, beta)
        scale = w if self.guidance_sampler.scale_output else 1.0
        return jump_sample(lambda z, t, h: scale * net(z, t, h, cond_g), noise, inf.steps, average=True)


def _aux_module(net, key: str) -> nn.Module | None:
    """``net.aux[key]``, ``None`` where the net has no such module (``nn.ModuleDict`` has no ``get``)."""
    aux = getattr(net, "aux", {})
    return aux[key] if key in aux else None  # noqa: SIM401


def _frozen_copy(module: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(module)
    copy_.requires_grad_(False)
    return copy_


def _beta_scaled(err: Tensor, beta: Tensor | None) -> Tensor:
    """``err * beta`` per row (the official scaling of both terms), ``err`` when ``beta`` is
    ``None``: ``(B, *shape)``."""
    return err if beta is None else err * expand_like(beta, err)


def _beta_mse(pred: Tensor, target: Tensor, beta: Tensor | None) -> Tensor:
    """``mean_d ((pred - target) beta)^2``, plain MSE when ``beta`` is ``None``: ``(B, *shape) -> (B,)``."""
    return per_sample_mse(pred, target) if beta is None else _beta_scaled(pred - target, beta).pow(2).flatten(1).mean(1)
