"""Early validation of a composed training config.

Every check raises :class:`ConfigError` whose message is one line of the form
``<key>: <message>`` (e.g. ``optim.lr: must be > 0, got -0.001``). The CLI prints it as
``jumpflow-train: error: <key>: <message>`` and exits with status 2, before any training
step runs or any file is written.

Two kinds of checks live here:

* :func:`validate_config`: plain values of the trainer's own keys (``trainer.*``,
  ``optim.*``, ``ema.*``, ``logger``, ``seed``, ``resume``) and the presence of the
  ``objective`` / ``backbone`` / ``task`` groups.
* :func:`instantiate_checked`: builds a group (``task``, ``backbone``, ``objective``) with
  hydra and turns a ``ValueError`` / ``TypeError`` raised by its constructor (objectives,
  backbones and tasks name the offending field in their messages) into a
  ``ConfigError`` prefixed with the group, e.g. ``objective.ratio_r_neq_t: ...`` or
  ``backbone.horizon: ...``.
"""

from __future__ import annotations

import importlib
import math
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: config groups the CLI checks before hydra composes (hydra's own message is multi-line)
GROUPS = ("objective", "backbone", "task", "experiment")
LOGGERS = ("wandb", "none")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A bad configuration value; ``str(err)`` is ``"<key>: <message>"`` (one line)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, " ".join(str(message).split())
        super().__init__(f"{key}: {self.message}")


def group_options(group: str) -> list[str]:
    """Names of the yaml files shipped in ``jumpflow.configs/<group>/``."""
    try:
        folder = resources.files("jumpflow.configs") / group
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        return []


def check_group_overrides(args: list[str]) -> None:
    """Check ``objective=NAME`` style command-line overrides against the shipped options.

    Hydra reports an unknown group option with a multi-line message; this gives one line
    that lists the valid names. Sweeps (``objective=a,b``) check each name; values that use
    hydra syntax this function does not understand (``choice(...)``, globs) are left to
    hydra. Skipped when the user extends the search path.
    """
    if any(a.startswith(("hydra.searchpath", "+hydra.searchpath")) for a in args):
        return
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS or not value or any(c in value for c in "()[]{}*$"):
            continue
        valid = group_options(key)
        if not valid:
            continue
        for name in value.split(","):
            if name.strip() in ("null", ""):
                continue
            if name.strip() not in valid:
                raise ConfigError(key, f"unknown {key} {name.strip()!r}; valid: {', '.join(valid)}")


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default, throw_on_missing=False)


def _number(cfg, key: str, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False,
            optional=False) -> None:
    value = _get(cfg, key, default="__absent__")
    if value == "__absent__":
        raise ConfigError(key, "missing")
    if value is None:
        if optional:
            return
        raise ConfigError(key, "must be set (got null)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if integer and (not isinstance(value, int) and not float(value).is_integer()):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(key, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ConfigError(key, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def _choice(cfg, key: str, choices) -> None:
    value = _get(cfg, key, default="__absent__")
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


def _target_of(cfg: DictConfig, group: str) -> str:
    node = _get(cfg, group)
    if node is None:
        raise ConfigError(group, f"missing; choose one of {', '.join(group_options(group)) or '(none shipped)'}")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{group}._target_", "missing (each config group entry names its class with _target_)")
    return str(node["_target_"])


def _import_target(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ImportError(path)
    return getattr(importlib.import_module(module), name)


def validate_config(cfg: DictConfig) -> None:
    """Check the trainer's own keys; raise :class:`ConfigError` on the first bad one."""
    _number(cfg, "seed", lo=0, integer=True)
    resume = _get(cfg, "resume", default=False)
    if not isinstance(resume, (bool, str)):
        raise ConfigError("resume", f"must be true, false or a checkpoint path, got {resume!r}")
    _choice(cfg, "logger", LOGGERS)

    _number(cfg, "trainer.max_steps", lo=1, integer=True)
    _number(cfg, "trainer.batch_size", lo=1, integer=True)
    _number(cfg, "trainer.grad_accum", lo=1, integer=True)
    _number(cfg, "trainer.num_workers", lo=0, integer=True)
    _number(cfg, "trainer.eval_every", lo=0, integer=True)
    _number(cfg, "trainer.ckpt_every", lo=0, integer=True)
    _number(cfg, "trainer.log_every", lo=1, integer=True)
    _number(cfg, "trainer.keep_checkpoints", lo=1, integer=True)
    _number(cfg, "trainer.grad_clip", lo=0, lo_open=True, optional=True)
    _number(cfg, "trainer.cpu_threads", lo=1, integer=True, optional=True)
    _choice(cfg, "trainer.precision", PRECISIONS)
    device = _get(cfg, "trainer.device", default="auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfigError("trainer.device", f"must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", f"{device!r} requested but CUDA is not available (use auto or cpu)")

    _number(cfg, "optim.lr", lo=0, lo_open=True)
    _number(cfg, "optim.weight_decay", lo=0)
    _number(cfg, "optim.eps", lo=0, lo_open=True)
    _number(cfg, "optim.warmup_steps", lo=0, integer=True)
    _number(cfg, "optim.min_lr_ratio", lo=0, hi=1)
    _choice(cfg, "optim.schedule", SCHEDULES)
    betas = _get(cfg, "optim.betas")
    if not isinstance(betas, (ListConfig, list, tuple)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {betas!r}")

    enabled = _get(cfg, "ema.enabled", default=False)
    if not isinstance(enabled, bool):
        raise ConfigError("ema.enabled", f"must be true or false, got {enabled!r}")
    if enabled:
        _number(cfg, "ema.decay", lo=0, hi=1, hi_open=True)
        _number(cfg, "ema.power", lo=0, lo_open=True, optional=True)
        _number(cfg, "ema.inv_gamma", lo=0, lo_open=True)
        _number(cfg, "ema.min_decay", lo=0, hi=1, hi_open=True)
        _number(cfg, "ema.update_after_step", lo=0, integer=True)

    for group in ("task", "backbone"):
        target = _target_of(cfg, group)
        try:
            _import_target(target)
        except (ImportError, AttributeError):
            raise ConfigError(f"{group}._target_", f"cannot import {target!r}") from None
    target = _target_of(cfg, "objective")
    from jumpflow.objectives import OBJECTIVES

    valid = ", ".join(sorted(OBJECTIVES))
    try:
        cls = _import_target(target)
    except (ImportError, AttributeError):
        raise ConfigError("objective._target_", f"unknown objective {target!r}; valid: {valid}") from None
    if cls not in OBJECTIVES.values():
        from jumpflow.objectives.base import Objective

        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ConfigError("objective._target_", f"{target!r} is not an objective; valid: {valid}")


def instantiate_checked(node: DictConfig, group: str, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``; constructor errors become one-line
    :class:`ConfigError` s prefixed with ``group``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise as_config_error(group, cause) from err
    except (ValueError, TypeError) as err:
        raise as_config_error(group, err) from err


def as_config_error(group: str, err: BaseException) -> ConfigError:
    if isinstance(err, ConfigError):
        return ConfigError(f"{group}.{err.key}", err.message)
    text = " ".join(str(err).split()) or type(err).__name__
    head, sep, rest = text.partition(": ")
    # objectives / backbones / tasks raise "field: message"; keep the field in the key
    if sep and head and " " not in head and len(head) < 60:
        return ConfigError(f"{group}.{head}", rest)
    return ConfigError(group, text)
