"""Typed configs: structured-config dataclasses (registered with hydra's ConfigStore) for the
trainer's own groups, and schemas derived from each component's constructor.

* ``TrainerConfig``, ``OptimConfig``, ``EMAConfig``, ``RunConfig``: written here, with their
  range checks in ``__post_init__`` (they raise :class:`ConfigError` naming the field).
* Objectives and tasks: ``component_schema(cls)`` builds a dataclass from the constructor's
  signature (names, annotations, defaults), so the constructor stays the one place that
  defines a component's hyper-parameters and OmegaConf still rejects an unknown key or a
  value of the wrong type, naming the key, before anything is built. Range checks stay in
  the constructors (``require`` -> ``ConfigError``), which never touch data or disk.

``jumpflow.config.validate_config`` merges each group of a composed config into its schema.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from jumpflow.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _finite(x) -> bool:
    return x is None or math.isfinite(float(x))


@dataclass
class RunConfig:
    seed: int = 0
    resume: Any = False            # true | false | "latest" | a checkpoint path
    logger: str = "wandb"
    debug: bool = False

    def __post_init__(self):
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _check(isinstance(self.resume, (bool, str)), "resume",
               f"must be true, false or a checkpoint path, got {self.resume!r}")
        _check(self.logger in ("wandb", "none"), "logger", f"must be one of wandb, none; got {self.logger!r}")


@dataclass
class TrainerConfig:
    max_steps: int = 10000
    batch_size: int = 256
    grad_accum: int = 1
    num_workers: int = 0
    eval_every: int = 1000
    eval_at_end: bool = True
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    jvp_bf16: bool = False         # with precision bf16: JVP objectives keep autocast through their JVPs
    device: str = "auto"
    progress: bool = True
    cpu_threads: int | None = None
    compile: bool = False          # torch.compile the backbone in place (not for JVP objectives)
    parallel: str = "ddp"          # under torchrun: ddp (DistributedDataParallel) | fsdp (fully_shard)

    def __post_init__(self):
        for name, lo in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("num_workers", 0),
                         ("eval_every", 0), ("ckpt_every", 0), ("keep_checkpoints", 1), ("log_every", 1)):
            v = getattr(self, name)
            _check(v >= lo, name, f"must be >= {lo}, got {v}")
        _check(self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0), "grad_clip",
               f"must be > 0 or null, got {self.grad_clip}")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads",
               f"must be >= 1 or null, got {self.cpu_threads}")
        _check(self.precision in ("fp32", "bf16"), "precision", f"must be one of fp32, bf16; got {self.precision!r}")
        _check(not self.jvp_bf16 or self.precision == "bf16", "jvp_bf16",
               f"needs precision: bf16 (the JVPs autocast only inside a bf16 step), got precision {self.precision!r}")
        _check(self.parallel in ("ddp", "fsdp"), "parallel", f"must be one of ddp, fsdp; got {self.parallel!r}")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device",
               f"must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 500
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        _check(_finite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
               f"must be two numbers in [0, 1), got {list(self.betas)}")
        _check(_finite(self.eps) and self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
               f"must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in ("cosine", "constant"), "schedule",
               f"must be one of cosine, constant; got {self.schedule!r}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    power: float | None = None
    inv_gamma: float = 1.0
    min_decay: float = 0.0
    update_after_step: int = 0

    def __post_init__(self):
        if not self.enabled:
            return
        _check(0.0 <= self.decay < 1.0, "decay", f"must be in [0, 1), got {self.decay}")
        _check(self.power is None or self.power > 0, "power", f"must be > 0 or null, got {self.power}")
        _check(self.inv_gamma > 0, "inv_gamma", f"must be > 0, got {self.inv_gamma}")
        _check(0.0 <= self.min_decay < 1.0, "min_decay", f"must be in [0, 1), got {self.min_decay}")
        _check(self.update_after_step >= 0, "update_after_step", f"must be >= 0, got {self.update_after_step}")


# ------------------------------------------------------------------ schemas from signatures
_PLAIN = (int, float, bool, str)


def _field_type(annotation) -> Any:
    """An OmegaConf-supported type for a constructor annotation (``Any`` where it has none)."""
    if isinstance(annotation, str) or annotation is inspect.Parameter.empty:
        return Any
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN:
            return args[0] | None
        if len(args) == 2 and set(args) == {int, float}:
            return float | None
        return Any
    if annotation in _PLAIN:
        return annotation
    return Any


def _default_field(default):
    if default is inspect.Parameter.empty:
        return field(default=dataclasses.MISSING)
    if isinstance(default, (list, tuple, dict, set)):
        value = list(default) if isinstance(default, (tuple, set)) else default
        return field(default_factory=lambda v=value: type(v)(v))
    return field(default=default)


@functools.cache
def component_schema(cls) -> type | None:
    """A structured-config dataclass from ``cls.__init__``'s signature; ``None`` when the
    constructor takes ``**kwargs`` (no fixed set of keys) or ``cls`` is not a class."""
    if not isinstance(cls, type):
        return None
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve is typed Any below)
        hints = {}
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    fields = []
    for p in params:
        annotation = _field_type(hints.get(p.name, p.annotation))
        if p.default is None and annotation in _PLAIN:
            annotation = annotation | None
        fields.append((p.name, annotation, _default_field(p.default)))
    # required fields first: a dataclass rejects a defaulted field before a required one
    fields.sort(key=lambda f: f[2].default is not dataclasses.MISSING or f[2].default_factory is not dataclasses.MISSING)
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def register_schemas() -> None:
    """Register the trainer's schemas and every objective's derived schema with hydra's
    ConfigStore (``<group>/<name>_schema``), for users who compose structured configs."""
    from jumpflow.objectives import OBJECTIVES

    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="ema", name="ema_schema", node=EMAConfig)
    for name, cls in OBJECTIVES.items():
        schema = component_schema(cls)
        if schema is not None:
            cs.store(group="objective", name=f"{name}_schema", node=schema)
