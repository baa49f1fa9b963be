"""Early validation of a composed training config.

Every check raises :class:`ConfigError` whose message is one line of the form
``<key>: <message>`` (e.g. ``optim.lr: must be > 0, got -0.001``). The CLI prints it as
``jumpflow-train: error: <key>: <message>`` and exits with status 2, before any training
step runs or any file is written.

Two kinds of checks live here:

* :func:`validate_config`: every group against its typed schema (``jumpflow.schemas``):
  the trainer's own groups (``trainer``, ``optim``, ``ema``, run keys) and the schema derived
  from each component's constructor (``objective``, ``task``); unknown keys and wrong types
  are named by OmegaConf, ranges by the dataclasses' ``__post_init__``.
* :func:`instantiate_checked`: builds a group with hydra; constructors raise
  :class:`ConfigError` (``require`` in objectives, backbones and tasks) whose key gets the
  group prefixed (``objective.ratio_r_neq_t: ...``). No message text is ever parsed.
"""

from __future__ import annotations

import importlib
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jumpflow.errors import ConfigError

#: config groups the CLI checks before hydra composes (hydra's own message is multi-line)
GROUPS = ("objective", "backbone", "task", "experiment")


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


def _check_typed(group: str, schema: type, node) -> Any:
    """Merge ``node`` (a DictConfig or dict) into the structured ``schema``; OmegaConf's type
    errors and ``__post_init__`` checks become :class:`ConfigError` naming ``<group>.<key>``."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except ConfigError as err:
        raise err.within(group) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{group}.{key}" if key else group, msg) from None


def validate_config(cfg: DictConfig) -> None:
    """Check everything that can be checked from the config alone, in an order that touches
    no data and no disk: the trainer's own groups against their structured schemas, then
    each component group (``objective``, ``task``, ``backbone``) against the schema derived
    from its class. Raises :class:`ConfigError` (``<key>: <message>``) on the first bad value."""
    from jumpflow.schemas import EMAConfig, OptimConfig, RunConfig, TrainerConfig, component_schema

    run = {k: _get(cfg, k) for k in ("seed", "resume", "logger", "debug") if k in cfg}
    _check_typed("", RunConfig, run)
    _check_typed("trainer", TrainerConfig, cfg.get("trainer", {}))
    _check_typed("optim", OptimConfig, cfg.get("optim", {}))
    _check_typed("ema", EMAConfig, cfg.get("ema", {}))
    device = _get(cfg, "trainer.device", default="auto")
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", f"{device!r} requested but CUDA is not available (use auto or cpu)")

    from jumpflow.objectives import OBJECTIVES
    from jumpflow.objectives.base import Objective

    for group in ("objective", "task", "backbone"):
        target = _target_of(cfg, group)
        try:
            cls = _import_target(target)
        except (ImportError, AttributeError):
            hint = f"; valid: {', '.join(sorted(OBJECTIVES))}" if group == "objective" else ""
            raise ConfigError(f"{group}._target_", f"cannot import {target!r}{hint}") from None
        if group == "objective" and not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise ConfigError("objective._target_", f"{target!r} is not an objective; valid: "
                              f"{', '.join(sorted(OBJECTIVES))}")
        schema = component_schema(cls)
        if schema is not None:
            node = OmegaConf.to_container(cfg[group], resolve=True)
            _check_typed(group, schema, {k: v for k, v in node.items() if not k.startswith("_")})


def instantiate_checked(node: DictConfig, group: str, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``; a :class:`ConfigError` raised by a
    constructor gets the group prefixed to its key (``objective`` + ``ratio_r_neq_t``); any
    other ``ValueError`` / ``TypeError`` names the group only (its text is never parsed)."""
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
        return err.within(group)
    return ConfigError(group, " ".join(str(err).split()) or type(err).__name__)
