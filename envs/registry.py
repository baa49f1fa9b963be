"""One entry point from a dataset's ``env_meta`` to a simulator: :func:`make_sim`.

Reference: robomimic's ``EnvUtils.create_env_from_metadata`` (dispatch on ``env_meta["type"]``),
with families imported lazily so that building a planar sim never imports robosuite.

``env_meta`` formats:

- robomimic / robosuite (``type`` 1, robomimic's ``EnvType.ROBOSUITE_TYPE``; a missing ``type`` is
  read as 1, as :class:`jumpflow.envs.sim.RobosuiteSim` does): ``{"env_name": "Lift", "type": 1,
  "env_version": "1.4.1", "env_kwargs": {...}}`` -> ``jumpflow.envs.sim.RobosuiteSim``.
- jumpflow's planar tasks (``type`` ``"jumpflow"``): ``{"env_name": "BlockPush" | "ReachAround",
  "type": "jumpflow", "env_version": <mujoco version>, "env_kwargs": {"control_freq": 10,
  "max_delta": 0.03, ...}}`` -> ``BlockPushSim`` / ``ReachAroundSim``.

A new family (e.g. MetaWorld) is one more entry in :data:`SIM_FAMILIES` (or a call to
:func:`register_family`): ``type -> "module:callable"``, the callable taking
``(env_meta, obs_keys=None, image_keys=(), camera_size=None, **kw)``.
"""

from __future__ import annotations

import copy
import importlib
import json

ROBOSUITE_TYPE = 1
PLANAR_TYPE = "jumpflow"

# env_meta["type"] -> "module:callable" building the sim (imported on first use)
SIM_FAMILIES: dict = {
    ROBOSUITE_TYPE: "jumpflow.envs.sim:RobosuiteSim",
    PLANAR_TYPE: "jumpflow.envs.registry:make_planar_sim",
    "metaworld": "jumpflow.envs.metaworld_env:MetaWorldSim",     # {"env_name": "push-v3", "type": "metaworld", ...}
}
FAMILY_NAMES = {ROBOSUITE_TYPE: "robosuite", PLANAR_TYPE: "jumpflow planar", "metaworld": "MetaWorld"}

# jumpflow planar env_name -> "module:class"
PLANAR_ENVS: dict = {
    "BlockPush": "jumpflow.envs.block_push:BlockPushSim",
    "ReachAround": "jumpflow.envs.reach_around:ReachAroundSim",
}
PLANAR_ALIASES = {"blockpush": "BlockPush", "block_push": "BlockPush", "reacharound": "ReachAround",
                  "reach_around": "ReachAround"}


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def register_family(env_type, factory: str, name: str | None = None) -> None:
    """Add (or replace) a simulator family: ``env_meta["type"] == env_type`` -> ``factory``
    (``"module:callable"``, imported when first used)."""
    if ":" not in factory:
        raise ValueError(f"factory must be 'module:callable', got {factory!r}")
    SIM_FAMILIES[env_type] = factory
    FAMILY_NAMES[env_type] = name or str(env_type)


def planar_task_name(task: str) -> str | None:
    """Canonical planar task name (``"block_push"`` -> ``"BlockPush"``), or ``None`` if ``task`` is not one."""
    if task in PLANAR_ENVS:
        return task
    return PLANAR_ALIASES.get(str(task).lower())


def planar_env_meta(task: str, **env_kwargs) -> dict:
    """Default ``env_meta`` of a planar task, ``env_kwargs`` overriding the task's defaults."""
    name = planar_task_name(task)
    if name is None:
        raise ValueError(f"unknown jumpflow planar env {task!r}; valid: {sorted(PLANAR_ENVS)}")
    cls = _load(PLANAR_ENVS[name])
    unknown = sorted(set(env_kwargs) - set(cls.DEFAULT_KWARGS))
    if unknown:
        raise ValueError(f"{name}: env_kwargs {unknown} are unknown; valid: {sorted(cls.DEFAULT_KWARGS)}")
    from jumpflow.envs.planar import planar_env_meta as _meta
    return _meta(name, **{**cls.DEFAULT_KWARGS, **env_kwargs})


def _normalise_type(env_type):
    if isinstance(env_type, str) and env_type.strip().lstrip("-").isdigit():
        return int(env_type)
    return env_type


def _resolve(env_meta) -> dict:
    if isinstance(env_meta, str):
        try:
            env_meta = json.loads(env_meta)
        except json.JSONDecodeError as e:
            raise ValueError(f"env_meta is not valid JSON ({e})") from None
    if not isinstance(env_meta, dict):
        raise TypeError(f"env_meta must be a dict or a JSON string, got {type(env_meta).__name__}")
    return env_meta


def sim_class_path(env_meta) -> str:
    """``"module:callable"`` that :func:`make_sim` would use for ``env_meta`` (raises like it)."""
    env_meta = _resolve(env_meta)
    env_type = _normalise_type(env_meta.get("type", ROBOSUITE_TYPE))
    if env_type not in SIM_FAMILIES:
        valid = ", ".join(f"{t!r} ({FAMILY_NAMES.get(t, t)})" for t in SIM_FAMILIES)
        raise ValueError(f"env_meta type {env_type!r} (env {env_meta.get('env_name')!r}) is unknown; "
                         f"valid types: {valid}")
    if env_type == PLANAR_TYPE:
        name = env_meta.get("env_name")
        if name not in PLANAR_ENVS:
            raise ValueError(f"env_meta names jumpflow env {name!r}, which is unknown; valid: {sorted(PLANAR_ENVS)}")
        return PLANAR_ENVS[name]
    return SIM_FAMILIES[env_type]


def success_levels(env_meta) -> dict[str, float]:
    """The partial-success levels ``{name: reward}`` the sim of ``env_meta`` declares
    (``SUCCESS_LEVELS``; ``{}`` for sims that declare none, e.g. robosuite's)."""
    return dict(getattr(_load(sim_class_path(env_meta)), "SUCCESS_LEVELS", {}))


def make_planar_sim(env_meta: dict, obs_keys=None, image_keys=(), camera_size=None, **kw):
    """The ``"jumpflow"`` family: ``env_meta["env_name"]`` in :data:`PLANAR_ENVS`."""
    return _load(sim_class_path(env_meta))(env_meta, obs_keys=obs_keys, image_keys=image_keys,
                                           camera_size=camera_size, **kw)


def make_sim(env_meta: dict | str, obs_keys=None, image_keys=(), camera_size: int | None = None, **kw):
    """Build the simulator ``env_meta`` describes.

    Args:
        env_meta: a dataset's ``env_args`` (dict or JSON string), see the module docstring.
        obs_keys: observation keys ``reset`` / ``step`` return (None: the family's default).
        image_keys: camera observation keys (``"<camera>_image"``) rendered every step.
        camera_size: image side (None: the env_meta's).
        **kw: passed to the family's constructor (``env_kwargs_override``, ``model_seed``).
    Returns:
        A sim with ``reset(seed)``, ``step(action) -> (obs, reward, success)``, ``is_success()``,
        ``get_state()``, ``reset_to(state)``, ``render(camera, h, w)``, ``close()``, ``action_dim``.
    Raises:
        ValueError: one line naming an unknown ``type`` or env name and listing the valid ones.
    """
    env_meta = copy.deepcopy(_resolve(env_meta))
    env_type = _normalise_type(env_meta.get("type", ROBOSUITE_TYPE))
    sim_class_path(env_meta)                   # validate before importing anything heavy
    factory = _load(SIM_FAMILIES[env_type])
    return factory(env_meta, obs_keys=obs_keys, image_keys=image_keys, camera_size=camera_size, **kw)
