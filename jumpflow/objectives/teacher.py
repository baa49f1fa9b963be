"""A frozen model read from a jumpflow checkpoint, for the objectives that learn from one: the
distillation teachers of :mod:`jumpflow.objectives.distill` (consistency distillation, Align Your
Flow) and ECT's optional initialisation (:class:`~jumpflow.objectives.consistency.EasyConsistencyTraining`).

The teacher's probability-flow ODE is written in jumpflow's time (``t = 1`` noise, ``t = 0`` data,
``z_t = (1 - t) x + t eps``):

* a **Flow Matching** teacher is its velocity, ``v(z_t, t) = net(z_t, t, h=0 | c)``;
* a **DDPM** teacher (epsilon prediction, ``x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps``) is the
  same point scaled: ``z_t = x_k / (sqrt(abar_k) + sqrt(1 - abar_k))`` at
  ``t_k = sqrt(1 - abar_k) / (sqrt(abar_k) + sqrt(1 - abar_k))``, and its probability-flow ODE
  (DDIM) is the Euler step of ``v(z_t, t_k) = (z_t - x0_hat) / t_k`` with
  ``x0_hat = (x_k - sqrt(1 - abar_k) eps_hat) / sqrt(abar_k)`` (clipped as its own sampler clips it).
  The teacher exists only on its ``K`` levels: :attr:`FrozenCheckpoint.grid`. Its noisiest level is
  identified with ``t = 1`` (the DDPM sampler starts there from pure noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from jumpflow.errors import ConfigError
from jumpflow.objectives.base import DataPrediction
from jumpflow.timeconv import expand_like

#: objectives whose checkpoints can teach: a multi-step velocity or noise model
TEACHERS = ("flow_matching", "ddpm")


def _bare(module: nn.Module) -> nn.Module:
    """The backbone inside a :class:`~jumpflow.objectives.base.DataPrediction` wrapper."""
    return module.inner if isinstance(module, DataPrediction) else module


def _same_state(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k]), sb[k])
                                          for k in sa)


class FrozenCheckpoint(nn.Module):
    """A read-only model from a checkpoint, kept in the student generator's ``aux`` but *outside*
    its module tree: the loaded model has no entry in the student's parameters, buffers or state
    dict, so the student's checkpoint never contains it, its optimiser never sees it,
    ``student.train()`` never takes it out of ``eval()`` mode, and the trainer's EMA copy shares it.
    ``.to()`` / ``.double()`` on the student move it along.

    **When the checkpoint is read.** A student *built* for training reads it when the student is
    first moved or cast (the trainer's ``model.to(device)``, before it writes anything) or at the
    first loss, whichever comes first: a missing or wrong checkpoint then fails with one line
    naming ``key``. A student *restored* from its own checkpoint (``load_model``: the weights are
    loaded before the move) reads it only if a loss asks for the teacher: sampling a distilled
    student needs no teacher file.

    Args:
        source: a run directory or a checkpoint path (``jumpflow.checkpoint.resolve_checkpoint``).
        key: the config key named by errors (``objective.teacher``, ``objective.init_from``).
        use_ema: load the checkpoint's EMA weights when it has them.
        students: modules to initialise from the loaded model's backbone when it is read
            (same architecture; ``[]``: none). Not registered here (they belong to the generator).
        keep: keep the loaded model (a teacher) or drop it once the students are initialised.
        shape: the student's data shape, checked against the checkpoint's (``None``: at first use).
        kinds: objective names the checkpoint may have been trained with (``None``: any).
        validate: ``(model) -> None``, the reader's own check of the loaded model (raises
            ``ConfigError``), run when it is read, before anything is trained or written.
    """

    def __init__(self, source: str, key: str, use_ema: bool = True, students: Sequence[nn.Module] = (),
                 keep: bool = True, shape: Sequence[int] | None = None, kinds: Sequence[str] | None = TEACHERS,
                 validate: Callable[[nn.Module], None] | None = None):
        super().__init__()
        self.source, self.key, self.use_ema, self.keep = source, key, bool(use_ema), bool(keep)
        self.kinds = None if kinds is None else tuple(kinds)
        self.shape = None if shape is None else tuple(int(s) for s in shape)
        self.__dict__["_students"] = list(students)
        self.__dict__["_condition_students"] = []
        self.__dict__["_model"] = None
        self.__dict__["_validate"] = validate
        self.prepared = False
        self.checked = False

    @classmethod
    def of(cls, model: nn.Module, key: str = "teacher") -> FrozenCheckpoint:
        """An in-memory teacher (tests, programmatic use): ``model(z, t, h, cond)`` at ``h = 0`` is a
        velocity in jumpflow's time; it may carry ``objective`` (a DDPM teacher) and ``cond_encoder``."""
        slot = cls("<in memory>", key)
        slot.__dict__["_model"] = model.requires_grad_(False)
        slot.prepared = True
        return slot

    # -- reading ---------------------------------------------------------------------------
    def model(self) -> nn.Module:
        """The loaded model (read on first use), frozen and in ``eval()`` mode."""
        if self.__dict__["_model"] is None:
            self.__dict__["_model"] = self._read()
        return self.__dict__["_model"]

    def _read(self) -> nn.Module:
        from jumpflow.checkpoint import CheckpointError, load_model

        try:
            with torch.random.fork_rng(devices=[]):          # building the teacher re-seeds torch
                model, _ = load_model(self.source, use_ema=self.use_ema)
        except ConfigError as err:
            raise ConfigError(self.key, f"the checkpoint {self.source!r} cannot be rebuilt ({err})") from None
        except (CheckpointError, OSError) as err:
            raise ConfigError(self.key, f"cannot read a checkpoint at {self.source!r}: {err}") from None
        name = getattr(getattr(model, "objective", None), "name", None)
        if self.kinds is not None and name not in self.kinds:
            raise ConfigError(self.key, f"{self.source!r} holds a {name} model; it must be one of "
                                        f"{', '.join(self.kinds)}")
        shape = tuple(getattr(model, "shape", None) or ())
        if self.shape is not None and shape != self.shape:
            raise ConfigError(self.key, f"the checkpoint's data shape {shape} differs from the student's {self.shape}")
        if self.__dict__["_validate"] is not None:
            self.__dict__["_validate"](model)
        return model.requires_grad_(False).eval()

    def prepare(self) -> None:
        """Read the checkpoint, initialise the students from its backbone, drop it unless ``keep``."""
        if self.prepared:
            return
        model = self.model()
        for student in self.__dict__["_students"]:
            try:
                _bare(student).load_state_dict(_bare(model.backbone).state_dict())
            except RuntimeError:
                raise ConfigError(self.key, f"the backbone of {self.source!r} differs from the student's, so it "
                                            "cannot initialise it (use the same backbone, or turn the initialisation "
                                            "off)") from None
        self.__dict__["_students"] = []
        for encoder in self.__dict__["_condition_students"]:
            self._copy_condition_encoder(model, encoder)
        self.__dict__["_condition_students"] = []
        if not self.keep:
            self.__dict__["_model"] = None
        self.prepared = True

    def share_condition_on_read(self, encoder: nn.Module | None) -> None:
        """Make ``encoder`` (the student generator's condition encoder) the teacher's: frozen now, and
        given the teacher's weights when the teacher is read (at once if it has been). The teacher is
        called with the student's encoded condition, so a conditional student must encode as the
        teacher does, through training. ``Generator`` calls this for every teacher slot it holds; a
        student restored from its own checkpoint gets the teacher's encoder back with its weights.
        Init-only slots (``keep=False``, e.g. ECT's ``init_from``) leave the encoder alone."""
        if encoder is None or not self.keep:
            return
        encoder.requires_grad_(False)
        if self.prepared:
            if self.__dict__["_model"] is not None:
                self._copy_condition_encoder(self.__dict__["_model"], encoder)
            return
        self.__dict__["_condition_students"].append(encoder)

    def _copy_condition_encoder(self, model: nn.Module, encoder: nn.Module) -> None:
        teacher_encoder = getattr(model, "cond_encoder", None)
        if teacher_encoder is None:
            return                       # an unconditional teacher: check_student names the mismatch
        try:
            encoder.load_state_dict(teacher_encoder.state_dict())
        except RuntimeError:
            raise ConfigError(self.key, f"the condition encoder of {self.source!r} differs from the student's, "
                                        "so the student cannot encode as the teacher does (use the same "
                                        "condition config)") from None

    def _apply(self, fn, recurse=True):
        if not self.prepared:
            self.prepare()
        if self.__dict__["_model"] is not None:
            self.__dict__["_model"]._apply(fn)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.prepared = True             # the student's own weights are being restored
        self.__dict__["_students"] = []
        self.__dict__["_condition_students"] = []
        super()._load_from_state_dict(*args, **kwargs)

    def __deepcopy__(self, memo):
        twin = FrozenCheckpoint(self.source, self.key, self.use_ema, (), self.keep, self.shape, self.kinds)
        twin.__dict__["_model"] = self.__dict__["_model"]      # read-only: shared, never copied
        twin.prepared, twin.checked = self.prepared, self.checked
        twin.train(self.training)
        return twin

    def extra_repr(self) -> str:
        return f"source={self.source!r}, key={self.key!r}"

    # -- the teacher's ODE -----------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"ddpm"`` (noise prediction on a discrete grid) or ``"velocity"``."""
        obj = getattr(self.model(), "objective", None)
        return "ddpm" if getattr(obj, "name", None) == "ddpm" else "velocity"

    def levels(self) -> Tensor:
        """DDPM teacher: flow times ``t_k`` of its levels ``k = 0 .. K-1`` (float64, increasing); the
        last is ``1`` (the noisiest level, where its sampler starts from pure noise)."""
        abar = self.model().objective.alphas_cumprod.double()
        t = (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt())
        t[-1] = 1.0
        return t

    @property
    def grid(self) -> Tensor | None:
        """Times where the teacher is defined (``(K,)`` float64, increasing), or ``None`` (all of (0, 1])."""
        return self.levels() if self.kind == "ddpm" else None

    def snap(self, t: Tensor) -> Tensor:
        """``t`` moved to the nearest time of :attr:`grid` (unchanged for a continuous teacher)."""
        grid = self.grid
        if grid is None:
            return t
        grid = grid.to(t.device)
        return grid[(t.double()[:, None] - grid[None]).abs().argmin(1)].to(t.dtype)

    def check_student(self, net, z: Tensor, cond: Tensor | None) -> None:
        """Teacher and student must read the same data and the same condition (checked once):
        equal data shapes, both unconditional or both conditional with the *same* condition
        encoder (the teacher is called with the student's encoded condition), equal data
        normalisation."""
        if self.checked:
            return
        model = self.model()
        shape = tuple(getattr(model, "shape", None) or z.shape[1:])
        if shape != tuple(z.shape[1:]):
            raise ConfigError(self.key, f"the teacher's data shape {shape} differs from the student's "
                                        f"{tuple(z.shape[1:])}")
        t_enc, s_enc = getattr(model, "cond_encoder", None), getattr(net, "cond_encoder", None)
        if (cond is None) != (t_enc is None):
            raise ConfigError(self.key, f"the teacher is {'un' if t_enc is None else ''}conditional but the "
                                        f"student is {'un' if cond is None else ''}conditional")
        if cond is not None and not _same_state(t_enc, s_enc):
            raise ConfigError(self.key, "the student's condition encoder differs from the teacher's, with which "
                                        "the teacher is called (a Generator gives it the teacher's weights and "
                                        "freezes it when the teacher is read; it must not change after)")
        t_norm, s_norm = getattr(model, "normalizer", None), getattr(net, "normalizer", None)
        if (t_norm is not None or s_norm is not None) and not _same_state(t_norm, s_norm):
            raise ConfigError(self.key, "the teacher's data normalisation differs from the student's")
        self.checked = True

    @torch.no_grad()
    def velocity(self, z: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The teacher's probability-flow velocity ``v(z_t, t)`` in jumpflow's time. ``z: (B, *shape)``,
        ``t: (B,)`` in (0, 1] (a DDPM teacher: on its :attr:`grid`) -> ``(B, *shape)``."""
        model = self.model()
        h = torch.zeros_like(t)
        if self.kind == "velocity":
            return model(z, t, h, cond)
        obj = model.objective
        grid = self.levels().to(z.device)
        k = (t.double()[:, None] - grid[None]).abs().argmin(1)                    # (B,) nearest level
        abar = obj.alphas_cumprod.to(z.device)[k].to(z.dtype)                     # (B,)
        tt = t.clamp_min(1e-12)
        scale = 1.0 / torch.sqrt((1 - tt) ** 2 + tt ** 2)                         # z_t -> x_k
        x_k = z * expand_like(scale, z)
        eps_hat = model(x_k, obj.net_time(k).to(z.dtype), h, cond)                 # (B, *shape)
        x0 = (x_k - expand_like((1 - abar).sqrt(), z) * eps_hat) / expand_like(abar.sqrt(), z)
        if obj.clip_sample is not None:
            x0 = x0.clamp(-obj.clip_sample, obj.clip_sample)
        return (z - x0) / expand_like(tt, z)


def teacher_step(slot: FrozenCheckpoint, z: Tensor, t: Tensor, r: Tensor, cond: Tensor | None,
                 solver: str) -> Tensor:
    """One step of the teacher's ODE from ``t`` to ``r <= t`` (``(B,)`` each): Euler, or Heun
    (Karras et al. 2022, Alg. 1: the second evaluation at ``r``, Euler where ``r = 0``)."""
    v1 = slot.velocity(z, t, cond)
    z_euler = z - expand_like(t - r, z) * v1
    if solver == "euler":
        return z_euler
    positive = r > 0
    r_eval = slot.snap(torch.where(positive, r, t))
    v2 = slot.velocity(z_euler, r_eval, cond)
    z_heun = z - expand_like(t - r, z) * 0.5 * (v1 + v2)
    return torch.where(expand_like(positive, z), z_heun, z_euler)


def flow_grid(steps: int, rho: float, dtype=torch.float64) -> Tensor:
    """``t_n = (n / N)^rho``, ``n = 0 .. N``: ``(N + 1,)`` increasing from 0 (data) to 1 (noise);
    ``rho > 1`` puts more points near the data."""
    return torch.linspace(0, 1, steps + 1, dtype=dtype) ** rho


__all__ = ["TEACHERS", "FrozenCheckpoint", "flow_grid", "teacher_step"]
