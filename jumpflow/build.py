"""Components from a config: the objective, the task, the backbone and the trained module.

The order is chosen so that every configuration error surfaces before any data is read,
generated or written:

1. ``objective``: built from its config (pure hyper-parameters);
2. ``task``: constructed (its constructor validates values and touches no data);
3. ``backbone``: a probe build on the meta device with the task's provisional shape
   (``task.probe_shape`` / ``probe_cond_dim``), so a bad backbone value fails here;
4. ``task.prepare()`` (or ``task.restore(artifact)`` from a checkpoint): the first step
   that reads (or generates) data; afterwards ``task.shape`` / ``cond_dim`` are final;
5. the backbone for real, under the run's seed, then ``task.build_model(backbone, objective)``.

Backbone configs get ``shape`` / ``cond_dim`` from the task: either ``_partial_: true``
(called with ``shape=``, ``cond_dim=``) or keys ``shape:`` / ``cond_dim:`` that are overwritten
with the task's values. A task that sets ``cond_dim_follows_backbone`` (ImageNet's class
embedding with ``cond_dim: null``) gets the backbone's width from the probe build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from jumpflow.config import ConfigError, as_config_error, instantiate_checked


@dataclass
class Components:
    task: Any
    backbone: nn.Module
    objective: Any
    model: nn.Module


def _instantiate_backbone(cfg: DictConfig, shape, cond_dim: int) -> nn.Module:
    node = cfg.backbone
    with open_dict(node):
        for key, value in (("shape", list(shape)), ("cond_dim", int(cond_dim))):
            if key in node:
                node[key] = value
    if bool(node.get("_partial_", False)):
        built = instantiate_checked(node, "backbone")
        try:
            return built(shape=tuple(shape), cond_dim=int(cond_dim))
        except (ValueError, TypeError) as err:
            raise as_config_error("backbone", err) from err
    return instantiate_checked(node, "backbone", shape=list(shape), cond_dim=int(cond_dim))


def _width_of(net: nn.Module) -> int | None:
    for name in ("hidden_size", "width"):
        if isinstance(getattr(net, name, None), int):
            return int(getattr(net, name))
    return None


def build_objective(cfg: DictConfig):
    return instantiate_checked(cfg.objective, "objective")


def build_task(cfg: DictConfig):
    task = instantiate_checked(cfg.task, "task")
    for key in ("probe_shape", "probe_cond_dim", "prepare", "build_model"):
        if not hasattr(task, key):
            raise ConfigError("task._target_", f"{type(task).__name__} is not a jumpflow Task (no {key})")
    return task


def build_components(cfg: DictConfig, artifact: dict | None = None) -> Components:
    """Build everything a run needs, checking configuration first (see the module docstring).

    Args:
        cfg: the composed config (a copy is modified: backbone ``shape`` / ``cond_dim``).
        artifact: the task's saved artifact (from a checkpoint): the task is restored from
            it instead of preparing its data, so acting needs no dataset.
    """
    objective = build_objective(cfg)
    task = build_task(cfg)
    if getattr(task, "inference", None) is not None:     # the task's sampling settings fit the method
        try:
            objective.resolve(task.inference)
        except ConfigError as err:
            raise err.within("task") from None
    with torch.device("meta"):                       # a bad backbone value fails before any data
        probe = _instantiate_backbone(cfg, task.probe_shape, task.probe_cond_dim or 1)
    if getattr(task, "cond_dim_follows_backbone", False):
        width = _width_of(probe)
        if width is None:
            raise ConfigError("task.cond_dim", f"null (follow the backbone) but {type(probe).__name__} has no width")
        task.cond_dim = width
    if artifact is not None:
        task.restore(artifact)
    else:
        task.prepare()
    shape, cond_dim = [int(s) for s in task.shape], int(task.cond_dim)
    torch.manual_seed(int(cfg.seed))
    backbone = _instantiate_backbone(cfg, shape, cond_dim)
    try:
        model = task.build_model(backbone, objective)
    except ConfigError as err:
        raise err.within("objective") from err
    except (ValueError, TypeError) as err:
        raise as_config_error("objective", err) from err
    if not hasattr(model, "compute_loss"):
        raise ConfigError("task", f"{type(task).__name__}.build_model returned a module without compute_loss")
    return Components(task, backbone, objective, model)
