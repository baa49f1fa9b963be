"""Pieces every objective shares, each written once: the loss record, time samplers,
the jump (Euler / Heun) sampler, hyper-parameter checks, the JVP context and the one JVP every objective calls."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError
from jumpflow.timeconv import expand_like, time_grid


@dataclass
class LossOutput:
    """Result of ``Objective.loss``.

    Attributes:
        loss: per-sample loss, shape ``(N,)`` (``N`` is the batch, or the number of
            generated samples for Drifting); the trainer takes its mean.
        metrics: scalar diagnostics (floats) for logging.
    """

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class ConditionalNet(Protocol):
    """What objectives call: ``net(x, t, h, cond) -> (B, *shape)``.

    A net may also offer ``null_cond(cond) -> cond`` (the null condition for
    classifier-free guidance), ``aux`` (an ``nn.ModuleDict`` of objective-owned modules,
    e.g. TVM's EMA target or DTM's head) and, for Transition Matching,
    ``forward(..., return_features=True) -> (out, features (B, N, F))`` with
    ``tokenize(x) -> (B, N, P)`` / ``untokenize(tokens, shape)``.
    """

    def __call__(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None, **kw): ...


PREDICTIONS = ("native", "data")


class DataPrediction(nn.Module):
    """Wraps a backbone that estimates clean data so that it returns the objective's native
    output (``Objective.from_data_prediction``); ``Generator`` inserts it when
    ``objective.prediction == "data"``. Shapes: as the wrapped backbone."""

    def __init__(self, backbone: nn.Module, convert: Callable[[Tensor, Tensor, Tensor], Tensor]):
        super().__init__()
        self.inner = backbone
        self.convert = convert
        for name in ("shape", "feature_dim"):
            if hasattr(backbone, name):
                setattr(self, name, getattr(backbone, name))

    def tokenize(self, x: Tensor) -> Tensor:
        return self.inner.tokenize(x)

    def untokenize(self, tokens: Tensor, shape=None) -> Tensor:
        return self.inner.untokenize(tokens)

    def forward(self, x: Tensor, t: Tensor, h: Tensor, cond: Tensor | None = None, **kw):
        out = self.inner(x, t, h, cond, **kw)
        if isinstance(out, tuple):                      # (x_hat, features) for Transition Matching
            return (self.convert(x, t, out[0]), *out[1:])
        return self.convert(x, t, out)                  # (B, *shape)


def require(ok: bool, name: str, message: str) -> None:
    """Raise :class:`~jumpflow.errors.ConfigError` (a ``ValueError``) naming the hyper-parameter
    ``name`` when ``ok`` is false."""
    if not ok:
        raise ConfigError(name, message)


@dataclass(frozen=True)
class Inference:
    """How to sample, passed to ``Objective.sample`` as a value (an objective is never changed
    to sample differently). ``None`` fields take the objective's defaults (its config's
    ``inference`` entry).

    Attributes:
        steps: network evaluations (NFE) of one sample, or transitions / jumps where a method
            counts them so.
        sampler: a method-specific solver name (Flow Matching: ``euler`` | ``heun``; DDPM:
            ``ddpm`` | ``ddim``), ``None`` for methods with one sampler.
        guidance: guidance scale (classifier-free by two evaluations, or the scale given to a
            generator trained with a sampled scale); 1.0 is none.
    """

    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None

    def __post_init__(self):
        if self.steps is not None:
            require(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
                    "inference.steps", f"must be an integer >= 1, got {self.steps!r}")
        if self.guidance is not None:
            require(math.isfinite(float(self.guidance)) and float(self.guidance) >= 0.0, "inference.guidance",
                    f"must be a finite number >= 0, got {self.guidance!r}")

    @staticmethod
    def of(value: Inference | int | dict | None) -> Inference:
        """An ``Inference`` from itself, an NFE (``int``), a dict of its fields, or ``None``."""
        if value is None:
            return Inference()
        if isinstance(value, Inference):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"steps", "sampler", "guidance"})
            require(not unknown, "inference", f"unknown keys {unknown}; valid: steps, sampler, guidance")
            return Inference(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return Inference(steps=value)
        raise ConfigError("inference", f"must be an Inference, an int (steps) or a dict, got {value!r}")

    def over(self, default: Inference) -> Inference:
        """``self`` with its ``None`` fields filled from ``default``."""
        return Inference(*(getattr(default, f) if getattr(self, f) is None else getattr(self, f)
                           for f in ("steps", "sampler", "guidance")))


class TimeSampler:
    """Samples times in (0, 1): ``uniform`` or ``logit_normal`` (``sigmoid(N(mean, std))``).

    Args:
        kind: ``"uniform"`` or ``"logit_normal"``.
        mean, std: of the normal before the sigmoid (logit-normal only).
        low, high: clamp range, keeps ``t`` away from exactly 0 / 1 where a method needs it.
    """

    KINDS = ("uniform", "logit_normal")

    def __init__(self, kind: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
                 low: float = 0.0, high: float = 1.0, name: str = "time_sampler"):
        require(kind in self.KINDS, f"{name}.kind", f"must be one of {self.KINDS}, got {kind!r}")
        require(std > 0, f"{name}.std", f"must be > 0, got {std}")
        require(0.0 <= low < high <= 1.0, f"{name}.low/high", f"need 0 <= low < high <= 1, got {low}, {high}")
        self.kind, self.mean, self.std, self.low, self.high = kind, float(mean), float(std), low, high

    def __call__(self, n: int, device=None, dtype=torch.float32) -> Tensor:
        if self.kind == "uniform":
            t = torch.rand(n, device=device, dtype=dtype)
        else:
            t = torch.sigmoid(torch.randn(n, device=device, dtype=dtype) * self.std + self.mean)
        return t.clamp(self.low, self.high)

    def __repr__(self) -> str:
        return f"TimeSampler({self.kind}, mean={self.mean}, std={self.std})"


def jump_sample(
    velocity_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    noise: Tensor,
    steps: int,
    average: bool,
    solver: str = "euler",
    t_start: float = 1.0,
) -> Tensor:
    """Integrate from noise (``t = t_start``) to data (``t = 0``) on a uniform grid.

    ``velocity_fn(z, t, h) -> (B, *shape)``. For an *average*-velocity model (MeanFlow,
    TVM) each step is the exact jump ``z_r = z_t - (t - r) u(z_t, r, t)`` with ``h = t - r``;
    for an instantaneous-velocity model (Flow Matching) ``h = 0`` and the step is Euler,
    or Heun (2 NFE per step, the last step Euler) with ``solver="heun"``.
    """
    require(steps >= 1, "steps", f"must be >= 1, got {steps}")
    require(solver in ("euler", "heun"), "solver", f"must be 'euler' or 'heun', got {solver!r}")
    require(not (average and solver == "heun"), "solver", "Heun applies to instantaneous velocities only")
    z = noise
    grid = time_grid(steps, t_start, 0.0, device=noise.device, dtype=noise.dtype)
    batch = noise.shape[0]
    for i in range(steps):
        t = grid[i].expand(batch)
        r = grid[i + 1].expand(batch)
        h = (t - r) if average else torch.zeros_like(t)
        u = velocity_fn(z, t, h)
        if solver == "heun" and i < steps - 1:
            z_euler = z - expand_like(t - r, z) * u
            u_next = velocity_fn(z_euler, r, torch.zeros_like(r))
            u = 0.5 * (u + u_next)
        z = z - expand_like(t - r, z) * u
    return z


# set by autocast_through_jvps (the trainer's ``jvp_bf16``): whether jvp_context keeps autocast
_AUTOCAST_THROUGH_JVPS: contextvars.ContextVar[bool] = contextvars.ContextVar("autocast_through_jvps", default=False)


@contextlib.contextmanager
def autocast_through_jvps(enabled: bool = True):
    """Inside this context :func:`jvp_context` leaves an enclosing bf16 autocast on, so the
    JVPs (primal and tangent) run in bf16 like the rest of the step. Their error against a
    float64 JVP is then of bf16's order (about 1e-2 relative, tested) instead of fp32's."""
    token = _AUTOCAST_THROUGH_JVPS.set(bool(enabled))
    try:
        yield
    finally:
        _AUTOCAST_THROUGH_JVPS.reset(token)


@contextlib.contextmanager
def jvp_context():
    """Forward-mode AD needs the math attention path (fused SDPA kernels have no forward
    AD); autocast is switched off around it (fp32 JVPs) unless :func:`autocast_through_jvps`
    is active."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if not _AUTOCAST_THROUGH_JVPS.get():
            # both device types: a model on the CPU of a machine with a GPU autocasts as "cpu"
            stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


JVP_BACKENDS = ("forward_ad", "functorch")
_JVP_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("jvp_backend", default="forward_ad")


@contextlib.contextmanager
def jvp_backend(name: str):
    """Inside this context :func:`jvp` uses ``name``: ``"forward_ad"`` (the default: dual
    tensors of ``torch.autograd.forward_ad`` through the module as it is) or ``"functorch"``
    (``torch.func.jvp``, which wraps every tensor in a functorch level). Both compute the same
    numbers (tested bit for bit in float64); the backend exists so a benchmark can time both in
    one run."""
    if name not in JVP_BACKENDS:
        raise ConfigError("jvp_backend", f"must be one of {JVP_BACKENDS}, got {name!r}")
    token = _JVP_BACKEND.set(name)
    try:
        yield
    finally:
        _JVP_BACKEND.reset(token)


def jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J_fn(primals) . tangents)`` in one forward pass, inside :func:`jvp_context`.

    The default backend runs ``fn`` on forward-mode dual tensors directly. On a small backbone a
    training step is dispatch-bound and ``torch.func.jvp``'s per-op wrapping is a visible cost
    (UNet1D-S at batch 8: a MeanFlow step 1.41x a Flow Matching step this way against 1.58x through
    ``torch.func.jvp``; ``bench.backbones``). Reverse mode composes with it as with ``torch.func.jvp``:
    gradients flow through the primal output and through the tangent output (TVM needs the latter).
    Shapes: every tangent has its primal's shape; the outputs have ``fn``'s."""
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    with jvp_context():
        if _JVP_BACKEND.get() == "functorch":
            return torch.func.jvp(fn, tuple(primals), tuple(tangents))
        from torch.autograd import forward_ad

        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, tg) for p, tg in zip(primals, tangents)]
            out, tangent_out = forward_ad.unpack_dual(fn(*duals))
        if tangent_out is None:            # fn does not depend on the tangents' inputs
            tangent_out = torch.zeros_like(out)
        return out, tangent_out


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over all non-batch dims: ``(B, *shape) -> (B,)``."""
    return (pred - target).pow(2).flatten(1).mean(1)


ADAPTIVE_REDUCTIONS = ("sum", "mean")


def adaptive_loss_weight(err: Tensor, p: float, c: float, reduce: str = "sum") -> Tensor:
    """MeanFlow's adaptive loss weight (Geng et al. 2025; the pseudo-Huber idea of Song &
    Dhariwal's improved consistency training), ``w = 1 / sg(||err||^2 + c)^p`` per sample: ``||err||^2`` is the ``"sum"``
    over the non-batch dims (both official MeanFlow codes) or their ``"mean"``. The gradient of
    ``w * ||err||^2`` is ``2 w err``: with ``p = 1/2`` its norm tends to 2 for large errors (the
    pseudo-Huber loss, L1-like: every sample pushes with unit strength, as sCT's normalised tangent
    ``g / (||g|| + c)`` does); with ``p = 1`` (MeanFlow's default) it falls as ``2 / ||err||``, so
    the samples with the largest errors are pushed least; for small errors the loss is
    ``||err||^2 / c^p``. Written once for every objective that weights this way. ``err: (B, *shape)
    -> (B,)``, no gradient."""
    sq = err.detach().pow(2).flatten(1)
    sq = sq.sum(1) if reduce == "sum" else sq.mean(1)
    return (sq + c).pow(-p)


def drop_condition(net, cond: Tensor | None, p_drop: float) -> Tensor | None:
    """Replace each row of ``cond`` by the net's null condition with probability ``p_drop``."""
    if cond is None or p_drop <= 0:
        return cond
    null_cond = getattr(net, "null_cond", None)
    if null_cond is None:
        raise ValueError("class_drop_prob > 0 needs a net with a null condition (null_cond)")
    drop = torch.rand(cond.shape[0], device=cond.device) < p_drop
    return torch.where(expand_like(drop, cond), null_cond(cond), cond)


class Objective:
    """Base of every objective. Holds hyper-parameters, never the network.

    Subclasses implement ``loss(net, x, cond) -> LossOutput`` and
    ``sample(net, noise, cond, inference=None) -> Tensor`` (``inference``: an
    :class:`Inference`, or an ``int`` NFE; ``None`` fields take ``self.inference``, the defaults
    set once at construction from the config's ``inference`` entry); they may offer
    ``extra_modules(backbone)`` (modules the objective needs inside the generator: a
    head, an EMA target, a frozen feature map) and ``on_step_end(net)`` (called by the
    trainer after each optimiser step).
    """

    name: str = "objective"
    #: the objective differentiates through the net with forward-mode AD
    uses_jvp: bool = False
    #: the method can apply a guidance scale chosen at sampling (two-evaluation CFG or an input)
    guidance_at_sampling: bool = False
    #: the method trains with a sampled guidance scale that the generator takes as an input
    #: (``Generator.guidance_condition``: one shared embedding added to the condition)
    guidance_input: bool = False
    #: valid ``Inference.sampler`` names (empty: one sampler, ``sampler`` must be ``None``)
    samplers: tuple[str, ...] = ()
    #: inference defaults; set by ``set_inference_defaults`` in the constructor, never after
    inference: Inference = Inference(steps=1, guidance=1.0)

    def loss(self, net, x: Tensor, cond: Tensor | None) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule_lengths(self) -> dict[str, int]:
        """The training steps each of the objective's step-driven curricula needs to run its
        course, by config field (``{"tangent_warmup_steps": 10000}``): the trainer warns when the
        run is shorter, since the objective then trains as something between its start and its
        end. None here."""
        return {}

    def sample(self, net, noise: Tensor, cond: Tensor | None,
               inference: Inference | int | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_inference_defaults(self, given: dict | Inference | None, steps: int = 1,
                               sampler: str | None = None, guidance: float = 1.0) -> None:
        """Constructor helper: the config's ``inference`` entry over the method's own defaults."""
        self.inference = self.resolve(Inference.of(given).over(Inference(steps, sampler, guidance)), defaults=False)

    def resolve(self, inference: Inference | int | dict | None, defaults: bool = True) -> Inference:
        """Complete ``inference`` from the defaults and check it against this method."""
        inf = Inference.of(inference)
        if defaults:
            inf = inf.over(self.inference)
        if self.samplers:
            require(inf.sampler in self.samplers, "inference.sampler",
                    f"must be one of {', '.join(self.samplers)} for {self.name}, got {inf.sampler!r}")
        else:
            require(inf.sampler is None, "inference.sampler", f"{self.name} has one sampler; got {inf.sampler!r}")
        if not self.guidance_at_sampling:
            require(inf.guidance in (None, 1.0), "inference.guidance",
                    f"{self.name} takes no guidance scale at sampling; got {inf.guidance!r}")
        return inf

    #: what the backbone outputs: ``"native"`` (the objective's own target: a velocity, an
    #: average velocity, DDPM's noise, Drifting's sample) or ``"data"`` (a clean-data estimate
    #: ``x_hat`` that ``from_data_prediction`` turns into the native output)
    prediction: str = "native"
    #: floor on ``t`` in ``(z - x_hat) / t`` (Li & He 2025 use 0.05)
    data_t_min: float = 0.05

    def set_prediction(self, prediction: str, data_t_min: float = 0.05) -> None:
        require(prediction in PREDICTIONS, "prediction", f"must be one of {PREDICTIONS}, got {prediction!r}")
        require(0.0 < data_t_min < 1.0, "data_t_min", f"must be in (0, 1), got {data_t_min}")
        self.prediction, self.data_t_min = prediction, float(data_t_min)

    def from_data_prediction(self, z: Tensor, t: Tensor, x_hat: Tensor) -> Tensor:
        """Native output from a data estimate; flow convention: any (average) velocity that ends
        at ``x_hat`` from ``z_t`` is ``u = (z_t - x_hat) / t`` (exact for the jump to ``r = 0``).

        Why: a network narrower than the data cannot copy the noise it is given through to
        the output, which velocity and noise targets ask of it; a data estimate is
        low-dimensional (Li & He, "Back to Basics: Let Denoising Generative Models Denoise",
        2025). The loss stays on the native output (their "x-prediction, v-loss").
        Shapes: ``z, x_hat: (B, *shape)``, ``t: (B,)``."""
        return (z - x_hat) / expand_like(t.clamp_min(self.data_t_min), z)

    def extra_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {}

    def on_step_end(self, net) -> None:
        return None

    def guided(self, net, cond: Tensor | None, guidance: float):
        """A velocity function with classifier-free guidance ``w``: ``u_null + w (u_c - u_null)``."""
        if cond is None or guidance == 1.0:
            return lambda z, t, h: net(z, t, h, cond)

        def fn(z, t, h):
            null = net.null_cond(cond)
            both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h, h]), torch.cat([cond, null]))
            u_c, u_n = both.chunk(2)
            return u_n + guidance * (u_c - u_n)

        return fn
