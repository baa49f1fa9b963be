"""Shared machinery of jumpflow's own planar MuJoCo tasks (``BlockPush``, ``ReachAround``).

Reference: the planar pushing setting of Implicit BC (Florence et al. 2021, "Block Push"),
reused by Behavior Transformers and Diffusion Policy; here rebuilt in plain MuJoCo (no robot
arm: the end effector is a cylinder whose x and y slide joints are driven by position actuators
with velocity damping, i.e. a PD servo), so it runs without robosuite.

A planar sim offers the interface :class:`jumpflow.envs.sim.RobosuiteSim` offers to the gym
wrapper and the demo writer: ``reset(seed) -> obs``, ``step(action) -> (obs, reward, success)``,
``is_success()``, ``get_state()``, ``reset_to(state)``, ``get_model_xml()``,
``render(camera_name, height, width)``, ``close()``, ``action_dim``, ``task``, ``env_meta``,
``obs_keys`` / ``image_keys``; plus ``observe()`` (the current observation without stepping),
``success_dict()`` and ``current_mode()`` (the behaviour mode committed so far, or ``None``).

Action: ``(2,)`` in ``[-1, 1]``, the desired end-effector displacement in x and y for this control
step in units of ``max_delta`` metres (0.03 m by default, 0.3 m/s at 10 Hz): the servo target is
``clip(effector_pos + max_delta * action)`` to the workspace. The target is recomputed from the
current position every step, so the state holds no hidden controller set-point (no wind-up when
the effector is blocked).

State (``get_state()``, the ``states`` rows of a demo file): ``[time, qpos (nq), qvel (nv),
task-specific entries]``; the task entries (target positions, mode bookkeeping, ...) are listed
by each task's ``STATE_LAYOUT``. ``reset(seed)`` draws an initial state and then goes through
``reset_to`` itself, so replaying a demo's ``actions`` from its ``states[0]`` is bitwise the same
computation as the original episode.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np

from jumpflow.envs.mujoco_sim import MujocoSim
from jumpflow.envs.rendering import select_gl_backend

select_gl_backend()          # MuJoCo reads MUJOCO_GL when it is first imported

import mujoco

PLANAR_TYPE = "jumpflow"     # env_meta["type"] of jumpflow's own planar tasks
OVERHEAD_IMAGE = "overhead_image"


def effector_body(name: str, workspace, radius: float, rgba: str) -> str:
    """MJCF of a planar effector: a cylinder on two slide joints (``effector_x``, ``effector_y``)
    limited to ``workspace``, driven by :func:`servo_actuators`."""
    (x_lo, y_lo), (x_hi, y_hi) = workspace
    return f"""    <body name="{name}" pos="0 0 0.022">
      <joint name="effector_x" type="slide" axis="1 0 0" range="{x_lo} {x_hi}"/>
      <joint name="effector_y" type="slide" axis="0 1 0" range="{y_lo} {y_hi}"/>
      <geom name="{name}" type="cylinder" size="{radius} 0.02" mass="0.5" rgba="{rgba}" contype="2" conaffinity="2"/>
    </body>"""


def free_planar_box(name: str, half: float, rgba: str) -> str:
    """MJCF of a box that slides in x, y (and settles in z) and turns about z on the table."""
    joints = "\n".join(f'      <joint name="{name}_{axis}" type="slide" axis="{vec}"/>'
                        for axis, vec in (("x", "1 0 0"), ("y", "0 1 0"), ("z", "0 0 1")))
    return f"""    <body name="{name}" pos="0 0 {half}">
{joints}
      <joint name="{name}_yaw" type="hinge" axis="0 0 1"/>
      <geom name="{name}" type="box" size="{half} {half} {half}" mass="0.1" rgba="{rgba}" contype="3" conaffinity="3"/>
    </body>"""


def planar_scene(model: str, light_pos: str, camera_pos: str, bodies: str, workspace,
                 option_extra: str = "", defaults: str = "") -> str:
    """The MJCF of a planar task: jumpflow's physics options, cheap offscreen rendering, a top-down
    light and the ``overhead`` camera around the task's ``bodies`` (MJCF lines), and the effector's
    servos over ``workspace``."""
    return f"""
<mujoco model="{model}">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.004" integrator="implicitfast"{option_extra}/>
  <visual>
    <quality offsamples="0" shadowsize="0"/>
    <global offwidth="640" offheight="640"/>
    <headlight ambient="0.35 0.35 0.35" diffuse="0.3 0.3 0.3" specular="0 0 0"/>
  </visual>{defaults}
  <worldbody>
    <light pos="{light_pos}" dir="0 0 -1" directional="true" diffuse="0.4 0.4 0.4" castshadow="false"/>
    <camera name="overhead" pos="{camera_pos}" xyaxes="1 0 0 0 1 0" fovy="45"/>
{bodies}
  </worldbody>
{servo_actuators(workspace)}
</mujoco>
"""


def servo_actuators(workspace) -> str:
    """MJCF of the two position servos (x, y) that drive a planar effector inside ``workspace``
    (``((x_lo, y_lo), (x_hi, y_hi))``): stiff enough to track 10 Hz targets, force-limited so a
    blocked effector pushes without exploding."""
    (x_lo, y_lo), (x_hi, y_hi) = workspace
    return f"""  <actuator>
    <position name="servo_x" joint="effector_x" kp="2000" kv="60" forcerange="-40 40" ctrlrange="{x_lo} {x_hi}"/>
    <position name="servo_y" joint="effector_y" kp="2000" kv="60" forcerange="-40 40" ctrlrange="{y_lo} {y_hi}"/>
  </actuator>"""


def planar_env_meta(env_name: str, **env_kwargs) -> dict:
    """``env_meta`` of a planar task: ``{"env_name", "type": "jumpflow", "env_version", "env_kwargs"}``."""
    return {"env_name": env_name, "type": PLANAR_TYPE, "env_version": str(mujoco.__version__),
            "env_kwargs": dict(env_kwargs)}


class PlanarSim(MujocoSim):
    """Base class: a MuJoCo model with a PD-servoed planar effector and an overhead camera.

    Args:
        env_meta: ``{"env_name", "type": "jumpflow", "env_kwargs"}`` (dict or JSON string; ``None``:
            the task's defaults).
        obs_keys: low-dim (and image) keys returned by ``reset`` / ``step`` (None: all low-dim keys,
            plus the image keys asked for).
        image_keys: ``("overhead_image",)`` to render an ``(H, W, 3)`` uint8 image every step.
        camera_size: image side (None: ``env_kwargs["camera_size"]``, default 84).
        env_kwargs_override: replaces entries of ``env_meta["env_kwargs"]``.
        model_seed: accepted for interface parity with ``RobosuiteSim``; the planar scene has no
            randomised model properties, so it is unused.

    Subclasses set ``TASK``, ``XML``, ``LOWDIM_KEYS``, ``DEFAULT_KWARGS``, ``STATE_LAYOUT`` and
    implement ``_sample_state(rng)``, ``_lowdim()``, ``_after_step()``, ``success_dict()``,
    ``is_success()``, ``reward()``, ``current_mode()`` and the ``_extra`` get/set pair.
    """

    TASK = ""
    XML = ""
    LOWDIM_KEYS: tuple[str, ...] = ()
    IMAGE_KEYS = (OVERHEAD_IMAGE,)
    DEFAULT_CAMERA = "overhead"
    CAMERA_ALIASES: ClassVar[dict] = {"agentview": "overhead"}   # the evaluator's default video camera
    DEFAULT_KWARGS: ClassVar[dict] = {}
    STATE_LAYOUT: tuple[tuple[str, int], ...] = ()
    EFFECTOR_JOINTS = ("effector_x", "effector_y")
    SUBSTEP_CHECK = False      # True: call _after_substep() after every physics step

    def __init__(self, env_meta: dict | str | None = None, obs_keys=None, image_keys=(),
                 camera_size: int | None = None, env_kwargs_override: dict | None = None, model_seed: int = 0):
        if env_meta is None:
            env_meta = planar_env_meta(self.TASK, **self.DEFAULT_KWARGS)
        if isinstance(env_meta, str):
            env_meta = json.loads(env_meta)
        if env_meta.get("env_name") != self.TASK:
            raise ValueError(f"env_meta names env {env_meta.get('env_name')!r}, but this is the {self.TASK} sim")
        self._configure(self.TASK, env_meta, obs_keys, image_keys, camera_size, env_kwargs_override)
        self.model = mujoco.MjModel.from_xml_string(self.XML)
        self.data = mujoco.MjData(self.model)
        control_freq = float(self.kwargs["control_freq"])
        self.n_substeps = max(1, round(1.0 / (control_freq * self.model.opt.timestep)))
        self.max_delta = float(self.kwargs["max_delta"])
        self._eff_qpos = [int(self.model.joint(j).qposadr[0]) for j in self.EFFECTOR_JOINTS]
        lo = self.model.actuator_ctrlrange[:, 0].copy()
        hi = self.model.actuator_ctrlrange[:, 1].copy()
        self._ctrl_lo, self._ctrl_hi = lo, hi
        self._extra_size = sum(n for _, n in self.STATE_LAYOUT)
        self._opened()
        self._setup()
        self.reset(seed=0)

    # ------------------------------------------------------------------ basics
    @property
    def action_dim(self) -> int:
        return 2

    @property
    def state_dim(self) -> int:
        return 1 + self.model.nq + self.model.nv + self._extra_size

    def effector_pos(self) -> np.ndarray:
        return self.data.qpos[self._eff_qpos].copy()

    def get_model_xml(self) -> str:
        """The scene MJCF (the demo file's ``model_file`` attribute; the scene never changes)."""
        return self.XML

    # ------------------------------------------------------------------ state
    def get_state(self) -> np.ndarray:
        """``(S,)`` float64: ``[time, qpos, qvel, task entries]`` (see ``STATE_LAYOUT``)."""
        return np.concatenate([[self.data.time], self.data.qpos, self.data.qvel,
                               self._get_extra()]).astype(np.float64)

    def reset_to(self, state: np.ndarray, model_xml: str | None = None) -> dict:
        """Set the simulator to a stored state row and return its observation.

        ``model_xml`` is accepted for parity with ``RobosuiteSim`` and ignored (the scene is fixed;
        per-episode quantities such as target positions are in the state).
        """
        state = self._check_state(state, f"time, qpos ({self.model.nq}), qvel ({self.model.nv}), "
                                         + ", ".join(f"{n} ({k})" for n, k in self.STATE_LAYOUT))
        # a full data reset clears warm-starts and controls, so that the same state always gives
        # bitwise the same continuation (reset(seed) goes through here too)
        mujoco.mj_resetData(self.model, self.data)
        nq, nv = self.model.nq, self.model.nv
        self.data.time = state[0]
        self.data.qpos[:] = state[1: 1 + nq]
        self.data.qvel[:] = state[1 + nq: 1 + nq + nv]
        self._set_extra(state[1 + nq + nv:])
        self.data.ctrl[:] = np.clip(self.effector_pos(), self._ctrl_lo, self._ctrl_hi)
        mujoco.mj_forward(self.model, self.data)
        return self.observe()

    def reset(self, seed: int | None = None) -> dict:
        """Reset to the initial state drawn from ``np.random.default_rng(seed)``; returns the observation."""
        rng = np.random.default_rng(None if seed is None else int(seed) % (2 ** 63))
        return self.reset_to(self._sample_state(rng))

    def _compose_state(self, qpos: np.ndarray, extra: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], qpos, np.zeros(self.model.nv), extra]).astype(np.float64)

    # ------------------------------------------------------------------ stepping
    def step(self, action: np.ndarray):
        """One control step (``1 / control_freq`` s). Returns ``(obs, reward, success)``."""
        self._apply_action(self._check_action(action))
        if self.SUBSTEP_CHECK:
            for _ in range(self.n_substeps):
                mujoco.mj_step(self.model, self.data)
                self._after_substep()
        else:
            mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)
        # after mj_step, body poses lag qpos by one physics step: recompute them (kinematics only,
        # no effect on the dynamics) so that images show the stored state
        mujoco.mj_kinematics(self.model, self.data)
        self._after_step()
        return self.observe(), float(self.reward()), self.is_success()

    def _apply_action(self, action: np.ndarray) -> None:
        target = self.effector_pos() + self.max_delta * action
        self.data.ctrl[:] = np.clip(target, self._ctrl_lo, self._ctrl_hi)

    def _after_substep(self) -> None:
        pass

    def _image_camera(self, key: str) -> str:
        return "overhead"

    # ------------------------------------------------------------------ task hooks
    def _setup(self) -> None:
        """Called once the model is built, before the first reset (look up joint addresses here)."""

    def _sample_state(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _get_extra(self) -> np.ndarray:
        raise NotImplementedError

    def _set_extra(self, extra: np.ndarray) -> None:
        raise NotImplementedError

    def _lowdim(self) -> dict:
        raise NotImplementedError

    def _after_step(self) -> None:
        pass

    def success_dict(self) -> dict:
        raise NotImplementedError

    def is_success(self) -> bool:
        raise NotImplementedError

    #: partial successes an evaluator can read off ``max_reward``: ``{name: reward level}`` (a rollout
    #: whose max reward reached the level achieved it at some step); full success is ``is_success``
    SUCCESS_LEVELS: ClassVar[dict[str, float]] = {}

    def reward(self) -> float:
        return float(self.is_success())

    def current_mode(self) -> str | None:
        return None
