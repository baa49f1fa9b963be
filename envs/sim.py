"""Simulators from a robomimic dataset's ``env_meta`` (``data.attrs["env_args"]``).

Supported versions: **robosuite 1.4.1 + robomimic 0.3.0 + mujoco 3.9.0** (see
``../shared/ENVIRONMENT.md``): robomimic 0.3.0 was written for robosuite 1.4; mujoco 3.10
changed ``mj_fullM`` (robosuite raises ``TypeError``) and mujoco >= 3.12 breaks robosuite's
joint-type checks; robosuite 1.5 needs ``numpy < 2`` (through ``mink``), which zarr 3 does not
allow. Files written with robosuite 1.5 (robomimic's v1.5 datasets) are read: their composite
controller config is converted to the 1.4 ``OSC_POSE`` config and env kwargs unknown to 1.4 are
dropped (reset from the flattened ``states`` works; their 1.5 model XML does not load in 1.4).

The environment is built by robomimic's own ``EnvUtils.create_env_from_metadata`` (a stub
``mujoco_py`` module is put in ``sys.modules``: robomimic 0.3.0 imports it only for an exception
type), which applies robomimic's kwargs exactly as robomimic's rollouts do; if robomimic is not
importable the same kwargs go to ``robosuite.make`` directly. Observations are then taken from the
raw robosuite env by :func:`convert_obs`, with robomimic's key names (``object``, ``robot0_*``,
``<camera>_image``) and images flipped upright, without robomimic's global ``ObsUtils`` state.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import inspect
import io
import json
import logging
import sys
import types
import weakref

import numpy as np

from jumpflow.envs.grasp_modes import GRASP_MODE_TASKS, MODE_OBS_KEYS, GraspModeTracker
from jumpflow.envs.rendering import require_offscreen_rendering, select_gl_backend
from jumpflow.envs.task_names import TASK_ALIASES, canonical_task  # noqa: F401  (re-exported: the sim's task names)

select_gl_backend()          # must precede the first robosuite import


def _install_mujoco_py_stub() -> None:
    """robomimic 0.3.0 imports ``mujoco_py`` (only for ``mujoco_py.builder.MujocoException``)."""
    if "mujoco_py" in sys.modules:
        return
    try:
        import mujoco_py  # noqa: F401
        return
    except Exception:  # noqa: BLE001, S110  (a broken mujoco_py install fails in many ways: stub it like a missing one)
        pass
    stub = types.ModuleType("mujoco_py")
    builder = types.ModuleType("mujoco_py.builder")

    class MujocoException(Exception):
        pass

    builder.MujocoException = MujocoException
    stub.builder = builder
    sys.modules["mujoco_py"] = stub
    sys.modules["mujoco_py.builder"] = builder


_install_mujoco_py_stub()
logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
with contextlib.redirect_stdout(io.StringIO()):
    import robosuite
logging.getLogger("robosuite_logs").setLevel(logging.ERROR)

ROBOSUITE_TYPE = 1          # robomimic EnvType.ROBOSUITE_TYPE
DEFAULT_CAMERAS = ("agentview", "robot0_eye_in_hand")
# robomimic's standard low-dim observation keys for single-arm tasks
LOW_DIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")

# The OSC_POSE config of robomimic's ph datasets (robosuite 1.4 format): actions in [-1, 1]
# map to +-5 cm and +-0.5 rad of delta per 20 Hz control step.
OSC_POSE_CONFIG = {
    "type": "OSC_POSE", "input_max": 1, "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300],
    "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
    "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2,
}


def default_env_meta(task: str, image: bool = False, camera_names=DEFAULT_CAMERAS,
                     camera_size: int = 84) -> dict:
    """robomimic-style ``env_meta`` (what ``data.attrs["env_args"]`` holds) for a robosuite task.

    Same kwargs as robomimic's ph datasets: Panda, OSC_POSE delta control at 20 Hz, sparse reward.
    """
    task = canonical_task(task)
    kwargs = {
        "has_renderer": False, "has_offscreen_renderer": bool(image), "ignore_done": True,
        "use_object_obs": True, "use_camera_obs": bool(image), "control_freq": 20,
        "controller_configs": copy.deepcopy(OSC_POSE_CONFIG), "robots": ["Panda"],
        "camera_depths": False, "camera_heights": camera_size, "camera_widths": camera_size,
        "reward_shaping": False,
    }
    if image:
        kwargs["camera_names"] = list(camera_names)
    return {"env_name": task, "env_version": robosuite.__version__, "type": ROBOSUITE_TYPE,
            "env_kwargs": kwargs}


def _legacy_controller_config(cfg: dict) -> dict:
    """robosuite 1.5 composite controller config -> the 1.4 arm controller config."""
    if "body_parts" not in cfg:
        return cfg
    parts = cfg["body_parts"]
    arm = parts.get("right") or parts.get("left") or next(iter(parts.values()))
    arm = {k: v for k, v in arm.items() if k not in ("input_type", "input_ref_frame", "gripper")}
    return arm


def _robosuite_kwargs(env_meta: dict, image_cameras: list[str] | None, camera_size: int | None,
                      env_kwargs_override: dict | None) -> dict:
    """env_meta -> kwargs for robosuite 1.4.1 (unknown kwargs dropped, rendering set)."""
    env_name = env_meta["env_name"]
    if env_name not in robosuite.ALL_ENVIRONMENTS:
        raise ValueError(f"env_meta names robosuite task {env_name!r}, which robosuite "
                         f"{robosuite.__version__} does not have; known: {sorted(robosuite.ALL_ENVIRONMENTS)}")
    kwargs = copy.deepcopy(env_meta.get("env_kwargs", {}))
    if "controller_configs" in kwargs:
        kwargs["controller_configs"] = _legacy_controller_config(kwargs["controller_configs"])
    cls = robosuite.environments.base.REGISTERED_ENVS[env_name]
    params = set()
    for klass in cls.__mro__:
        if "__init__" in klass.__dict__:
            params |= set(inspect.signature(klass.__init__).parameters)
    dropped = sorted(k for k in kwargs if k not in params)
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    if dropped:
        logging.getLogger(__name__).info("env kwargs unknown to robosuite %s dropped: %s", robosuite.__version__, dropped)
    kwargs.pop("env_name", None)
    # fast resets: the model is not re-built at every reset (dynamics are the same)
    kwargs.setdefault("hard_reset", False)
    if env_kwargs_override:
        kwargs.update(env_kwargs_override)
    use_images = bool(image_cameras)
    if use_images:
        kwargs["camera_names"] = list(image_cameras)
        if camera_size is not None:
            kwargs["camera_heights"] = kwargs["camera_widths"] = int(camera_size)
    kwargs.update(has_renderer=False, has_offscreen_renderer=use_images, ignore_done=True,
                  use_object_obs=True, use_camera_obs=use_images, camera_depths=False)
    return kwargs


def make_robosuite_env(env_meta: dict, image_cameras: list[str] | None = None,
                       camera_size: int | None = None, env_kwargs_override: dict | None = None,
                       model_seed: int = 0):
    """Build the raw robosuite env for ``env_meta`` (robomimic's utilities first, else robosuite).

    Args:
        env_meta: ``{"env_name", "type", "env_kwargs"}`` as stored in ``data.attrs["env_args"]``.
        image_cameras: cameras to render every step (e.g. ``["agentview"]``); ``None``: no rendering.
        camera_size: square image side (defaults to the env_meta's ``camera_heights``).
        model_seed: numpy seed while the scene model is built. robosuite draws some model
            properties at build time (Lift's cube size), and with ``hard_reset=False`` (our
            default, ~10x faster resets) the model is kept across resets, so this seed makes
            every env instance the same scene and ``reset(seed)`` a function of the seed alone.
    Returns:
        A ``robosuite.environments.base.MujocoEnv``.
    """
    if int(env_meta.get("type", ROBOSUITE_TYPE)) != ROBOSUITE_TYPE:
        raise NotImplementedError(f"env_meta type {env_meta.get('type')} (env {env_meta.get('env_name')!r}) "
                                  "is not a robosuite env; only robosuite (type 1) is supported")
    if image_cameras:
        require_offscreen_rendering()
    kwargs = _robosuite_kwargs(env_meta, image_cameras, camera_size, env_kwargs_override)
    env_name = env_meta["env_name"]
    sink = io.StringIO()
    try:
        import robomimic.utils.env_utils as EnvUtils
        have_robomimic = True
    except Exception:  # noqa: BLE001  (robomimic's import chain can fail beyond ImportError: fall back to robosuite)
        have_robomimic = False
    saved_rng = np.random.get_state()
    np.random.seed(model_seed)
    try:
        with contextlib.redirect_stdout(sink):
            if have_robomimic:
                import robomimic.utils.env_utils as EnvUtils
                meta = {"env_name": env_name, "type": ROBOSUITE_TYPE, "env_kwargs": kwargs}
                wrapper = EnvUtils.create_env_from_metadata(
                    env_meta=meta, render=False, render_offscreen=bool(image_cameras),
                    use_image_obs=bool(image_cameras))
                env = wrapper.env
            else:
                env = robosuite.make(env_name, **kwargs)
                for name in env.observation_names:
                    if "joint_pos" in name or "eef_vel" in name:
                        env.modify_observable(observable_name=name, attribute="active", modifier=True)
    finally:
        np.random.set_state(saved_rng)
    return env


def convert_obs(raw: dict, keys=None) -> dict:
    """robosuite observation dict -> robomimic keys.

    ``object-state`` -> ``object``; ``robot0_*`` low-dim keys kept (float64 as robosuite gives);
    ``<camera>_image`` (H, W, 3) uint8 flipped upright (robosuite renders in the OpenGL
    convention, bottom row first). ``keys``: keep only these (None: all).
    """
    flip = getattr(robosuite.macros, "IMAGE_CONVENTION", "opengl") == "opengl"
    out = {}
    for k, v in raw.items():
        if k.endswith("_image"):
            name = k
            v = np.ascontiguousarray(v[::-1]) if flip else np.asarray(v)
        elif k == "object-state":
            name = "object"
        elif k.startswith("robot") and not k.endswith("proprio-state") and not k.endswith("_depth"):
            name = k
        else:
            continue
        if keys is None or name in keys:
            out[name] = np.array(v, copy=True)
    if keys is not None:
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"observation keys {missing} are not produced by this env; it has "
                           f"{sorted(convert_obs(raw, None))}")
    return out


_LIVE_SIMS: weakref.WeakSet[RobosuiteSim] = weakref.WeakSet()


@atexit.register
def _close_live_sims() -> None:
    # free GL contexts before the interpreter tears EGL / OSMesa down (avoids noisy __del__ errors)
    for sim in list(_LIVE_SIMS):
        sim.close()


class RobosuiteSim:
    """A robosuite task from ``env_meta`` with robomimic's observation keys.

    Args:
        env_meta: dataset ``env_args`` dict (see :func:`default_env_meta`).
        obs_keys: keys returned by ``reset``/``step`` (None: all low-dim keys, plus images asked for).
        image_keys: camera observation keys, e.g. ``("agentview_image",)``; rendered every step.
        camera_size: image side (None: the env_meta's).
        model_seed: seed for the scene model build (see :func:`make_robosuite_env`).

    ``reset(seed)`` seeds numpy's global RNG (robosuite 1.4.1 draws initial states from it) and
    restores the caller's RNG state afterwards, so the initial state is a function of ``seed``.
    """

    def __init__(self, env_meta: dict | str, obs_keys=None, image_keys=(), camera_size: int | None = None,
                 env_kwargs_override: dict | None = None, model_seed: int = 0):
        if isinstance(env_meta, str):
            env_meta = json.loads(env_meta)
        self.env_meta = copy.deepcopy(env_meta)
        self.image_keys = tuple(image_keys)
        bad = [k for k in self.image_keys if not k.endswith("_image")]
        if bad:
            raise ValueError(f"image keys must be '<camera>_image', got {bad}")
        cams = [k[: -len("_image")] for k in self.image_keys]
        self.env = make_robosuite_env(self.env_meta, cams or None, camera_size, env_kwargs_override, model_seed)
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else None
        self._last_raw = None
        self._closed = False
        # Lift / Can / Square: the grasp and approach an episode took (``current_mode``), as the mh demos label it
        self._modes = GraspModeTracker(self.task) if self.task in GRASP_MODE_TASKS else None
        _LIVE_SIMS.add(self)
        self._sample_on_demand()
        with contextlib.redirect_stdout(io.StringIO()):
            self.env.reset()          # canonical post-reset scene (robosuite hides debug sites here)

    def _sample_on_demand(self) -> None:
        """robosuite samples observables inside the control step (at its first physics sub-step),
        so the observation returned by ``env.step`` is not the state at the end of the step. We
        stop in-step sampling (rate ~0) and sample once, at the end, with ``force_update``: then
        ``obs[t]`` is a function of ``states[t]`` exactly, as in robomimic's datasets (whose
        observations were extracted from states), and images are rendered once per step."""
        for name in self.env.observation_names:
            self.env.modify_observable(observable_name=name, attribute="sampling_rate", modifier=1e-9)

    # ------------------------------------------------------------------ basics
    @property
    def task(self) -> str:
        return self.env_meta["env_name"]

    @property
    def action_dim(self) -> int:
        return int(self.env.action_spec[0].shape[0])

    @property
    def tracks_modes(self) -> bool:
        """Whether :meth:`current_mode` labels this task's episodes (Lift, PickPlaceCan)."""
        return self._modes is not None

    def current_mode(self) -> str | None:
        """The grasp and approach of the episode so far, ``"yaw<0|90>_<left|right|above>"``, or
        ``None`` before the object first leaves the table in the hand (:mod:`jumpflow.envs.grasp_modes`)."""
        return None if self._modes is None else self._modes.mode

    def _track(self, raw, start: bool) -> None:
        if self._modes is not None:
            state = convert_obs(raw, MODE_OBS_KEYS)
            if start:
                self._modes.reset(state)
            else:
                self._modes.update(state)

    def _obs(self, raw) -> dict:
        self._last_raw = raw
        keys = None
        if self.obs_keys is not None:
            keys = tuple(self.obs_keys) + tuple(k for k in self.image_keys if k not in self.obs_keys)
        return convert_obs(raw, keys)

    def reset(self, seed: int | None = None) -> dict:
        """Reset to the initial state drawn with ``seed``. Returns the observation dict."""
        if seed is None:
            raw = self.env.reset()
        else:
            saved = np.random.get_state()
            try:
                np.random.seed(int(seed) % (2 ** 32))
                raw = self.env.reset()
            finally:
                np.random.set_state(saved)
        self._track(raw, start=True)
        return self._obs(raw)

    def step(self, action: np.ndarray):
        """One 20 Hz control step. Returns ``(obs, reward, success)``."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape[0] != self.action_dim:
            raise ValueError(f"{self.task}: action has {action.shape[0]} dims, env expects {self.action_dim}")
        _, reward, _, _ = self.env.step(action)
        # after mj_step, positions (xpos, site_xpos) lag qpos by one physics step: recompute them so
        # that observations and images are those of the stored state (no effect on the dynamics)
        self.env.sim.forward()
        raw = self.env._get_observations(force_update=True)
        self._track(raw, start=False)
        return self._obs(raw), float(reward), self.is_success()

    def is_success(self) -> bool:
        s = self.env._check_success()
        if isinstance(s, dict):
            s = s["task"]
        return bool(s)

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state ``(time, qpos, qvel)``: robomimic's ``states`` row."""
        return np.array(self.env.sim.get_state().flatten())

    def get_model_xml(self) -> str:
        """The scene XML (robomimic's per-demo ``model_file`` attribute)."""
        return self.env.sim.model.get_xml()

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> dict:
        """Set the simulator to a stored state (and, if given, the stored scene XML), treating it as
        an episode start: the arm controller and the gripper command are rebuilt at this state as
        ``reset()`` does, so replaying a demo's ``actions`` from its ``states[0]`` reproduces it.

        Args:
            state: ``(S,)`` flattened state, a row of a demo's ``states``.
            model_xml: the demo's ``model_file``; reloading it costs ~0.5 s and is needed only
                when the scene differs from the current one (e.g. another object mesh).
        """
        if model_xml is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                self.env.reset()
                xml = self.env.edit_model_xml(model_xml)
                self.env.reset_from_xml_string(xml)
                self.env.sim.reset()
            self._sample_on_demand()
        state = np.asarray(state, dtype=np.float64)
        expected = self.get_state().shape[0]
        if state.shape != (expected,):
            raise ValueError(f"{self.task}: state has shape {state.shape}, this env's flattened state has "
                             f"({expected},) (was the file made with another robosuite version or robot?)")
        self.env.sim.set_state_from_flattened(state)
        self.env.sim.forward()
        self.env.visualize(vis_settings={vis: False for vis in self.env._visualizations})
        # Hidden controller state that reset() sets and the flattened state lacks: OSC pulls the
        # nullspace toward the joints it saw when it was built (robosuite rebuilds it at every
        # reset, after the initial-state noise), and the Panda gripper ramps its command from 0.
        # Rebuild both at this state, as reset() would have done at a demo's first state.
        for robot in self.env.robots:
            robot._load_controller()
            gripper = getattr(robot, "gripper", None)
            if gripper is not None and hasattr(gripper, "current_action"):
                gripper.current_action = np.zeros(gripper.dof)
        self.env.sim.forward()
        raw = self.env._get_observations(force_update=True)
        self._track(raw, start=True)
        return self._obs(raw)

    def render(self, camera_name: str = "agentview", height: int = 84, width: int = 84) -> np.ndarray:
        """Upright RGB render ``(H, W, 3)`` uint8 of the current state."""
        require_offscreen_rendering()
        if self.env.sim._render_context_offscreen is None:
            from robosuite.utils.binding_utils import MjRenderContextOffscreen
            ctx = MjRenderContextOffscreen(self.env.sim, device_id=-1)
            self.env.sim.add_render_context(ctx)
        img = self.env.sim.render(camera_name=camera_name, height=height, width=width)
        flip = getattr(robosuite.macros, "IMAGE_CONVENTION", "opengl") == "opengl"
        return np.ascontiguousarray(img[::-1]) if flip else img

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.env.close()
