"""ReachAround: a short-horizon bimodal planar reach past a post, in plain MuJoCo.

Reference: the two-path toy problems used to show that regressing onto multimodal demos fails
(Implicit BC, Florence et al. 2021, Fig. 1; Diffusion Policy, Chi et al. 2023, Sec. 4's
"multimodal action distributions"), built as a task of the same family as
:mod:`jumpflow.envs.block_push` (PD-servoed cylinder in the plane, 10 Hz, action = desired
displacement; see :mod:`jumpflow.envs.planar`).

Scene: the agent (a 2 cm cylinder) starts at ``(+-0.03, -0.25 +- 0.02)``; the goal is at
``(+-0.03, 0.25 +- 0.02)``; a post of radius 6 cm stands at the origin, on the straight line
between them. Success: the agent's centre is within ``goal_tolerance`` (0.03 m) of the goal.
Touching the post is a crash: the agent is stopped (velocity zeroed, servo held) for the rest of
the episode. The oracle goes around the left or the right of the post (a coin flip per episode)
through a waypoint at ``(-+0.16, 0)``; the average of the two paths, and of the two oracle
actions at the start, points straight into the post, so a policy that regresses to the mean
crashes. Default horizon: 60 steps (the oracle needs about 25).

Mode (``current_mode()``): ``"left"`` (x < 0) or ``"right"`` (x > 0), the side of the post the agent is
on while it is beside the post (``|y| <= post radius`` and ``|x| >= post radius``); kept after it
leaves that region; ``None`` before (and for an agent that crashed into the post's front). Observation keys (float64): ``agent_pos`` (2), ``goal_pos`` (2); optional
``overhead_image`` (84, 84, 3) uint8.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from jumpflow.envs.planar import PlanarSim, effector_body, planar_scene

AGENT_RADIUS = 0.02
POST_RADIUS = 0.06
POST_POS = np.array([0.0, 0.0])
WAYPOINT_X = 0.16
WORKSPACE = ((-0.3, -0.35), (0.3, 0.35))
SIDES = ("left", "right")

REACH_AROUND_XML = planar_scene(
    "jumpflow_reach_around", light_pos="0 0 1.5", camera_pos="0 0 0.9", workspace=WORKSPACE,
    bodies=f"""    <geom name="floor" type="plane" size="0.4 0.4 0.01" rgba="0.6 0.6 0.58 1" contype="0" conaffinity="0"/>
    <geom name="post" type="cylinder" size="{POST_RADIUS} 0.04" pos="{POST_POS[0]} {POST_POS[1]} 0.04"
          rgba="0.4 0.3 0.25 1" contype="2" conaffinity="2"/>
    <body name="goal" mocap="true" pos="0 0.25 0.0005">
      <geom name="goal" type="cylinder" size="0.03 0.0005" rgba="0.3 0.8 0.3 1" contype="0" conaffinity="0"/>
    </body>
{effector_body("agent", WORKSPACE, AGENT_RADIUS, "0.2 0.2 0.7 1")}""")


class ReachAroundSim(PlanarSim):
    """Reach a goal behind a post (see the module docstring). ``env_kwargs``: ``control_freq`` (10),
    ``max_delta`` (0.03 m), ``goal_tolerance`` (0.03 m), ``horizon`` (60, informative),
    ``camera_size`` (84)."""

    TASK = "ReachAround"
    XML = REACH_AROUND_XML
    LOWDIM_KEYS = ("agent_pos", "goal_pos")
    DEFAULT_KWARGS: ClassVar[dict] = {"control_freq": 10, "max_delta": 0.03, "goal_tolerance": 0.03, "horizon": 60,
                      "camera_size": 84}
    # stuck: 1 after the agent touched the post; side: -1 none, 0 left, 1 right
    STATE_LAYOUT = (("goal_pos", 2), ("step", 1), ("stuck", 1), ("side", 1))
    SUBSTEP_CHECK = True
    MODES = SIDES

    def __init__(self, *args, **kwargs):
        self._goal = np.zeros(2)
        self._step = 0
        self._stuck = False
        self._side = -1
        super().__init__(*args, **kwargs)

    def _setup(self) -> None:
        self.goal_tolerance = float(self.kwargs["goal_tolerance"])
        self._agent_dofs = [int(self.model.joint(j).dofadr[0]) for j in self.EFFECTOR_JOINTS]

    # ------------------------------------------------------------------ state
    def _sample_state(self, rng: np.random.Generator) -> np.ndarray:
        start = [rng.uniform(-0.03, 0.03), -0.25 + rng.uniform(-0.02, 0.02)]
        goal = [rng.uniform(-0.03, 0.03), 0.25 + rng.uniform(-0.02, 0.02)]
        return self._compose_state(np.array(start), np.array([*goal, 0.0, 0.0, -1.0]))

    def _get_extra(self) -> np.ndarray:
        return np.array([*self._goal, self._step, float(self._stuck), self._side], dtype=np.float64)

    def _set_extra(self, extra: np.ndarray) -> None:
        self._goal = np.asarray(extra[0:2], dtype=np.float64).copy()
        self._step = round(extra[2])
        self._stuck = bool(extra[3] > 0.5)
        self._side = round(extra[4])
        self.data.mocap_pos[0] = [self._goal[0], self._goal[1], 0.0005]

    # ------------------------------------------------------------------ dynamics
    def _apply_action(self, action: np.ndarray) -> None:
        if self._stuck:                  # a crashed agent does not move again
            self.data.ctrl[:] = self.effector_pos()
            return
        super()._apply_action(action)

    def _touching_post(self) -> bool:
        return np.linalg.norm(self.effector_pos() - POST_POS) <= POST_RADIUS + AGENT_RADIUS + 1e-3

    def _after_substep(self) -> None:
        if not self._stuck and self._touching_post():
            self._stuck = True
            self.data.qvel[self._agent_dofs] = 0.0
            self.data.ctrl[:] = self.effector_pos()
        elif self._stuck:
            self.data.qvel[self._agent_dofs] = 0.0

    def _after_step(self) -> None:
        self._step += 1
        dx, dy = self.effector_pos() - POST_POS
        if abs(dy) <= POST_RADIUS and abs(dx) >= POST_RADIUS:     # beside the post, not before it
            self._side = 0 if dx < 0 else 1

    # ------------------------------------------------------------------ task
    @property
    def stuck(self) -> bool:
        return self._stuck

    def goal_pos(self) -> np.ndarray:
        return self._goal.copy()

    def _lowdim(self) -> dict:
        return {"agent_pos": self.effector_pos(), "goal_pos": self.goal_pos()}

    def success_dict(self) -> dict:
        """``{"success": agent within goal_tolerance of the goal, "stuck": touched the post}``."""
        ok = bool(np.linalg.norm(self.effector_pos() - self._goal) < self.goal_tolerance)
        return {"success": ok and not self._stuck, "stuck": bool(self._stuck)}

    def is_success(self) -> bool:
        return self.success_dict()["success"]

    def current_mode(self) -> str | None:
        return SIDES[self._side] if self._side >= 0 else None


class ReachAroundOracle:
    """Scripted reacher: ``reset(obs, seed)`` draws ``side`` ("left" / "right", 50/50) from
    ``np.random.default_rng(seed)``; ``act(obs) -> (2,)`` heads for the waypoint beside the post on
    that side, then for the goal. ``mode`` is the side; ``draw`` ``{"side": ...}``.

    Args:
        max_delta: metres per unit action (the env's ``max_delta``).
        side: fix the side instead of drawing it.
    """
    VERSION = 1                 # stored with the demos (data attrs "oracle_version")

    def __init__(self, max_delta: float = 0.03, side: str | None = None):
        if side is not None and side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.max_delta = float(max_delta)
        self.fixed_side = side
        self.side = side or "left"
        self.reset()

    @property
    def mode(self) -> str:
        return self.side

    @property
    def draw(self) -> dict:
        return {"side": self.side}

    def reset(self, obs: dict | None = None, seed: int | None = None) -> None:
        if self.fixed_side is not None:
            self.side = self.fixed_side
        else:
            self.side = SIDES[int(np.random.default_rng(seed).integers(0, 2))]
        self.passed_waypoint = False

    def act(self, obs: dict) -> np.ndarray:
        p = np.asarray(obs["agent_pos"], dtype=np.float64)[:2]
        goal = np.asarray(obs["goal_pos"], dtype=np.float64)[:2]
        waypoint = POST_POS + np.array([-WAYPOINT_X if self.side == "left" else WAYPOINT_X, 0.0])
        # the waypoint is passed once the agent is level with it (or close): from there the
        # straight line to the goal clears the post
        if not self.passed_waypoint and (np.linalg.norm(p - waypoint) < 0.03 or p[1] >= waypoint[1]):
            self.passed_waypoint = True
        aim = goal if self.passed_waypoint else waypoint
        delta = aim - p
        n = np.linalg.norm(delta)
        if n > self.max_delta:
            delta = delta / n * self.max_delta
        return np.clip(delta / self.max_delta, -1.0, 1.0)
