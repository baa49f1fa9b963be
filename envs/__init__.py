"""MuJoCo / robosuite environments from robomimic ``env_meta``, the gymnasium wrapper, scripted
experts and the demo writer (``jumpflow-demos``). Imported as ``jumpflow.envs``.

Names are loaded lazily (robosuite takes ~2 s to import):

- ``RobosuiteSim``, ``default_env_meta``, ``canonical_task``, ``LOW_DIM_KEYS`` (``jumpflow.envs.sim``)
- ``RobomimicGymEnv`` (``jumpflow.envs.gym_env``)
- ``make_expert``, ``LiftExpert``, ``CanExpert``, ``SquareExpert``, ``ExpertPolicy`` (``jumpflow.envs.experts``)
- ``generate_demos``, ``ensure_demos`` (``jumpflow.envs.demos``)
- ``select_gl_backend``, ``RenderingUnavailableError`` (``jumpflow.envs.rendering``)
"""

import importlib

_EXPORTS = {
    "RobosuiteSim": "sim", "default_env_meta": "sim", "canonical_task": "sim", "LOW_DIM_KEYS": "sim",
    "RobomimicGymEnv": "gym_env",
    "make_expert": "experts", "LiftExpert": "experts", "CanExpert": "experts", "SquareExpert": "experts",
    "ExpertPolicy": "experts",
    "generate_demos": "demos", "ensure_demos": "demos",
    "select_gl_backend": "rendering", "RenderingUnavailableError": "rendering",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605  (a list, built from the lazy-export table)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jumpflow.envs.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jumpflow.envs' has no attribute {name!r}")
