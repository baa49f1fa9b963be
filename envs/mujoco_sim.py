"""What jumpflow's own MuJoCo simulators share (the planar tasks and MetaWorld): the checks on
``env_meta`` options, observation keys, states and actions; the observation dict; one offscreen
renderer per image size; and freeing GL contexts before the interpreter exits.

A subclass sets ``LOWDIM_KEYS``, ``IMAGE_KEYS``, ``DEFAULT_KWARGS``, ``DEFAULT_CAMERA`` and
``CAMERA_ALIASES``, calls :meth:`MujocoSim._configure` first in its constructor, exposes ``model`` and
``data`` (MuJoCo's ``MjModel`` / ``MjData``), and implements ``_lowdim()``, ``action_dim``,
``state_dim`` and ``_image_camera(key)``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import weakref
from typing import ClassVar

import numpy as np

from jumpflow.envs.rendering import require_offscreen_rendering, select_gl_backend

select_gl_backend()          # MuJoCo reads MUJOCO_GL when it is first imported

import mujoco

_LIVE_SIMS: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK = []


def _close_live_sims() -> None:
    for sim in list(_LIVE_SIMS):
        sim.close()


def _register_exit_hook() -> None:
    """Free GL contexts before the interpreter tears EGL / OSMesa down (avoids noisy ``__del__``
    errors). Registered after MuJoCo's GL module registered its own exit handler, so it runs first
    (``atexit`` runs last-registered first)."""
    if not _EXIT_HOOK:
        atexit.register(_close_live_sims)
        _EXIT_HOOK.append(True)


class MujocoSim:
    """Base of jumpflow's own MuJoCo sims (see the module docstring)."""

    LOWDIM_KEYS: tuple[str, ...] = ()
    IMAGE_KEYS: tuple[str, ...] = ()
    DEFAULT_KWARGS: ClassVar[dict] = {}
    DEFAULT_CAMERA = ""
    CAMERA_ALIASES: ClassVar[dict] = {}

    name = ""
    _closed = True

    def _configure(self, name: str, env_meta: dict, obs_keys, image_keys, camera_size: int | None,
                   env_kwargs_override: dict | None) -> None:
        """Check and store the options (before any model is built). Sets ``name``, ``env_meta``,
        ``kwargs`` (the defaults under ``env_meta["env_kwargs"]`` under the override), ``obs_keys``,
        ``image_keys`` (an image key named in ``obs_keys`` is rendered too) and ``camera_size``."""
        self.name = name
        self.env_meta = copy.deepcopy(env_meta)
        kwargs = dict(self.env_meta.get("env_kwargs") or {})
        kwargs.update(env_kwargs_override or {})
        unknown = sorted(set(kwargs) - set(self.DEFAULT_KWARGS))
        if unknown:
            raise ValueError(f"{name}: env_kwargs {unknown} are unknown; valid: {sorted(self.DEFAULT_KWARGS)}")
        self.kwargs = {**self.DEFAULT_KWARGS, **kwargs}
        self.image_keys = tuple(image_keys)
        bad = [k for k in self.image_keys if k not in self.IMAGE_KEYS]
        if bad:
            raise ValueError(f"{name}: image keys {bad} are not produced; valid: {list(self.IMAGE_KEYS)}")
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else None
        if self.obs_keys is not None:
            bad = [k for k in self.obs_keys if k not in self.LOWDIM_KEYS and k not in self.IMAGE_KEYS]
            if bad:
                raise ValueError(f"{name}: observation keys {bad} are not produced by this env; it has "
                                 f"{list(self.LOWDIM_KEYS) + list(self.IMAGE_KEYS)}")
            self.image_keys += tuple(k for k in self.obs_keys if k in self.IMAGE_KEYS and k not in self.image_keys)
        self.camera_size = int(camera_size if camera_size is not None else self.kwargs.get("camera_size", 84))
        if self.image_keys:
            require_offscreen_rendering()
        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}

    def _opened(self) -> None:
        """Call once the simulator exists: ``close()`` now has something to free."""
        self._closed = False
        _LIVE_SIMS.add(self)

    # ------------------------------------------------------------------ basics
    @property
    def task(self) -> str:
        return self.name

    def _check_state(self, state: np.ndarray, layout: str) -> np.ndarray:
        """``state`` as a ``(state_dim,)`` float64 row, or a ``ValueError`` naming the expected layout."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape != (self.state_dim,):
            raise ValueError(f"{self.name}: state has shape {state.shape}, this env's state has "
                             f"({self.state_dim},) = {layout}")
        if not np.isfinite(state).all():
            raise ValueError(f"{self.name}: state contains NaN or inf")
        return state

    def _check_action(self, action: np.ndarray) -> np.ndarray:
        """``action`` as a finite ``(action_dim,)`` float64 vector clipped to ``[-1, 1]``."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_dim:
            raise ValueError(f"{self.name}: action has {action.shape[0]} dims, env expects {self.action_dim}")
        if not np.isfinite(action).all():
            raise ValueError(f"{self.name}: action is not finite: {action}")
        return np.clip(action, -1.0, 1.0)

    # ------------------------------------------------------------------ observations
    def observe(self) -> dict:
        """Observation of the current state: ``{key: (D,) float64}`` (+ image keys ``(H, W, 3)`` uint8)."""
        low = self._lowdim()
        keys = self.obs_keys if self.obs_keys is not None else self.LOWDIM_KEYS
        out = {k: low[k] for k in keys if k in low}
        for k in self.image_keys:
            out[k] = self.render(self._image_camera(k), self.camera_size, self.camera_size)
        return out

    def render(self, camera_name: str | None = None, height: int = 84, width: int = 84) -> np.ndarray:
        """RGB render ``(H, W, 3)`` uint8 of the current state (``None``: the default camera;
        ``CAMERA_ALIASES`` map the evaluator's ``agentview`` to this env's video camera)."""
        require_offscreen_rendering()
        camera_name = camera_name or self.DEFAULT_CAMERA
        camera_name = self.CAMERA_ALIASES.get(camera_name, camera_name)
        m = self.model
        if mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, camera_name) < 0:
            cams = [m.camera(i).name for i in range(m.ncam)]
            raise ValueError(f"{self.name}: no camera {camera_name!r}; cameras: {cams}")
        size = (int(height), int(width))
        renderer = self._renderers.get(size)
        if renderer is None:
            m.vis.global_.offheight = max(m.vis.global_.offheight, size[0])
            m.vis.global_.offwidth = max(m.vis.global_.offwidth, size[1])
            renderer = mujoco.Renderer(m, height=size[0], width=size[1])
            _register_exit_hook()
            # shadows and reflections cost most of a software-rendered frame and carry no information
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
            self._renderers[size] = renderer
        renderer.update_scene(self.data, camera=camera_name)
        return renderer.render().copy()

    # ------------------------------------------------------------------ closing
    def _release(self) -> None:
        """What a subclass frees beyond the renderers (its own environment)."""

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for r in self._renderers.values():
            with contextlib.suppress(Exception):     # a GL context already gone at exit
                r.close()
        self._renderers = {}
        self._release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()
