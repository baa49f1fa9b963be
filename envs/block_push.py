"""Multimodal Block Push in plain MuJoCo, and its scripted oracle.

Reference: the ``BlockPushMultimodal`` task of Implicit BC (Florence et al. 2021), used by Behavior
Transformers (Shafiullah et al. 2022) and Diffusion Policy (Chi et al. 2023): two blocks and two
target zones on a table, a cylindrical end effector pushing in the plane at 10 Hz, 350 steps.
Layout (ported from that task's reset distribution; the xArm and PyBullet are replaced by a
PD-servoed cylinder in MuJoCo): blocks at ``x = 0.4 +- 0.1``, ``y = -0.2 +- 0.15``, yaw
``U[0, pi)``, at least 0.1 m apart (Euclidean; the original compares x only); targets at
``x = 0.4 +- 0.12`` (which one is left is a coin flip, plus +-5 mm), ``y = 0.2 +- 7.5 mm``; the
effector starts at ``(0.3, -0.4)``. A block is *in* a target when its centre is within
``goal_tolerance`` (0.05 m) of the target's centre.

Success (``success_dict()``): ``p1`` = at least one block is in a target, ``p2`` = both blocks are
in distinct targets (``is_success()`` returns ``p2``). Reward: 1.0 at ``p2``, 0.5 at ``p1`` only,
else 0 (so an evaluator's ``max_reward >= 0.5`` means ``p1`` was reached at some step).

Mode (``current_mode()``): ``"b<i>t<j>"``, block ``i`` in target ``j``, for the block that entered a
target first among the blocks now in targets; kept when that block leaves its target and no other
block is in one; ``None`` before any block reached a target. It lives in the state vector.

Observation keys (float64): ``effector_pos`` (2), ``block_pos`` (2), ``block_yaw`` (2: sin, cos),
``block2_pos`` (2), ``block2_yaw`` (2), ``target_pos`` (2), ``target2_pos`` (2); optional
``overhead_image`` (84, 84, 3) uint8. Action: see :mod:`jumpflow.envs.planar` (2-d desired effector
displacement, ``max_delta`` = 0.03 m per unit).

:class:`BlockPushOracle` draws, at reset, which block goes first and which target each block goes
to (4 equally likely orders), then pushes: it goes behind the block on the block-to-goal line
(detouring around blocks), pushes along the line while steering the effector back onto it, goes
behind it again when the block drifts off the line, then does the same with the other block.
When the other block sits in the first block's corridor, the first push goes through a side
waypoint. The demo's mode is the drawn first (block, target) pair, e.g. ``"b0t1"``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from jumpflow.envs.planar import PlanarSim, effector_body, free_planar_box, planar_scene

BLOCK_HALF = 0.02            # block half side (4 cm cube)
EFFECTOR_RADIUS = 0.015
TARGET_RADIUS = 0.05         # drawn zone = goal tolerance
WORKSPACE = ((0.15, -0.5), (0.70, 0.5))
EFFECTOR_START = (0.3, -0.4)
MIN_BLOCK_DIST = 0.1

BLOCK_PUSH_XML = planar_scene(
    "jumpflow_block_push", light_pos="0.4 0 1.5", camera_pos="0.42 -0.08 0.92", workspace=WORKSPACE,
    option_extra=' cone="elliptic"',
    defaults="""
  <default>
    <geom friction="0.3 0.005 0.0001" solref="0.01 1"/>
  </default>""",
    bodies=f"""    <geom name="table" type="plane" size="0.6 0.7 0.01" pos="0.42 0 0" rgba="0.6 0.6 0.58 1"
          friction="0.5 0.005 0.0001" contype="1" conaffinity="1"/>
    <body name="target0" mocap="true" pos="0.28 0.2 0.0005">
      <geom name="target0" type="cylinder" size="{TARGET_RADIUS} 0.0005" rgba="0.95 0.8 0.2 1"
            contype="0" conaffinity="0"/>
    </body>
    <body name="target1" mocap="true" pos="0.52 0.2 0.0005">
      <geom name="target1" type="cylinder" size="{TARGET_RADIUS} 0.0005" rgba="0.3 0.6 0.95 1"
            contype="0" conaffinity="0"/>
    </body>
{effector_body("effector", WORKSPACE, EFFECTOR_RADIUS, "0.2 0.2 0.2 1")}
{free_planar_box("block0", BLOCK_HALF, "0.85 0.2 0.2 1")}
{free_planar_box("block1", BLOCK_HALF, "0.2 0.7 0.3 1")}""")


def mode_name(block: int, target: int) -> str:
    """``(0, 1) -> "b0t1"``."""
    return f"b{int(block)}t{int(target)}"


BLOCK_PUSH_MODES = tuple(mode_name(b, t) for b in (0, 1) for t in (0, 1))


class BlockPushSim(PlanarSim):
    """Multimodal Block Push (see the module docstring). ``env_kwargs``: ``control_freq`` (10),
    ``max_delta`` (0.03 m), ``goal_tolerance`` (0.05 m), ``horizon`` (350, informative: the
    episode cap is the evaluator's ``max_steps``), ``camera_size`` (84)."""

    TASK = "BlockPush"
    XML = BLOCK_PUSH_XML
    LOWDIM_KEYS = ("effector_pos", "block_pos", "block_yaw", "block2_pos", "block2_yaw",
                   "target_pos", "target2_pos")
    DEFAULT_KWARGS: ClassVar[dict] = {"control_freq": 10, "max_delta": 0.03, "goal_tolerance": 0.05, "horizon": 350,
                      "camera_size": 84}
    # in_target: index of the target each block is in (-1: none); entered_step: control step at which
    # it entered (-1); committed: (block, target) of the mode so far (-1, -1: none)
    STATE_LAYOUT = (("target_pos", 4), ("step", 1), ("in_target", 2), ("entered_step", 2), ("committed", 2))
    MODES = BLOCK_PUSH_MODES
    SUCCESS_LEVELS: ClassVar[dict] = {"p1": 0.5}       # Diffusion Policy's Table IV reports p1 beside p2

    def __init__(self, *args, **kwargs):
        self._targets = np.zeros((2, 2))
        self._step = 0
        self._in_target = np.full(2, -1)
        self._entered = np.full(2, -1)
        self._committed = np.full(2, -1)
        super().__init__(*args, **kwargs)

    def _setup(self) -> None:
        self.goal_tolerance = float(self.kwargs["goal_tolerance"])
        self._block_qpos = [[int(self.model.joint(f"block{i}_{a}").qposadr[0]) for a in ("x", "y", "yaw")]
                            for i in (0, 1)]

    # ------------------------------------------------------------------ state
    def _sample_state(self, rng: np.random.Generator) -> np.ndarray:
        def block_xy():
            return np.array([0.4 + rng.uniform(-0.1, 0.1), -0.2 + rng.uniform(-0.15, 0.15)])

        b0 = block_xy()
        for _ in range(1000):
            b1 = block_xy()
            if np.linalg.norm(b1 - b0) > MIN_BLOCK_DIST:
                break
        yaw = rng.uniform(0.0, np.pi, size=2)
        add = 0.12 * rng.choice([-1.0, 1.0])
        targets = [[0.4 + s * add + rng.uniform(-0.005, 0.005), 0.2 + rng.uniform(-0.0075, 0.0075)]
                   for s in (1.0, -1.0)]
        # qpos: effector x, y; block0 x, y, z, yaw; block1 x, y, z, yaw
        qpos = np.array([*EFFECTOR_START, *b0, 0.0, yaw[0], *b1, 0.0, yaw[1]])
        extra = np.concatenate([np.ravel(targets), [0.0], [-1, -1], [-1, -1], [-1, -1]])
        return self._compose_state(qpos, extra)

    def _get_extra(self) -> np.ndarray:
        return np.concatenate([self._targets.ravel(), [self._step], self._in_target, self._entered,
                               self._committed]).astype(np.float64)

    def _set_extra(self, extra: np.ndarray) -> None:
        self._targets = np.asarray(extra[0:4], dtype=np.float64).reshape(2, 2).copy()
        self._step = round(extra[4])
        self._in_target = np.rint(extra[5:7]).astype(int)
        self._entered = np.rint(extra[7:9]).astype(int)
        self._committed = np.rint(extra[9:11]).astype(int)
        for i in (0, 1):
            self.data.mocap_pos[i] = [self._targets[i, 0], self._targets[i, 1], 0.0005]

    # ------------------------------------------------------------------ task
    def block_pos(self, i: int) -> np.ndarray:
        return self.data.qpos[self._block_qpos[i][:2]].copy()

    def block_yaw(self, i: int) -> float:
        return float(self.data.qpos[self._block_qpos[i][2]])

    def target_pos(self, j: int) -> np.ndarray:
        return self._targets[j].copy()

    def _which_target(self, i: int) -> int:
        d = np.linalg.norm(self._targets - self.block_pos(i), axis=1)
        j = int(np.argmin(d))
        return j if d[j] < self.goal_tolerance else -1

    def _after_step(self) -> None:
        self._step += 1
        for i in (0, 1):
            j = self._which_target(i)
            if j != self._in_target[i]:
                self._in_target[i] = j
                self._entered[i] = self._step if j >= 0 else -1
        inside = [i for i in (0, 1) if self._in_target[i] >= 0]
        if inside:
            first = min(inside, key=lambda i: (self._entered[i], i))
            self._committed[:] = (first, self._in_target[first])

    def _lowdim(self) -> dict:
        out = {"effector_pos": self.effector_pos()}
        for i, name in ((0, "block"), (1, "block2")):
            yaw = self.block_yaw(i)
            out[f"{name}_pos"] = self.block_pos(i)
            out[f"{name}_yaw"] = np.array([np.sin(yaw), np.cos(yaw)])
        out["target_pos"] = self.target_pos(0)
        out["target2_pos"] = self.target_pos(1)
        return out

    def success_dict(self) -> dict:
        """``{"p1": one block in a target, "p2": both blocks in distinct targets}`` now."""
        which = [self._which_target(i) for i in (0, 1)]
        p1 = any(j >= 0 for j in which)
        p2 = which[0] >= 0 and which[1] >= 0 and which[0] != which[1]
        return {"p1": bool(p1), "p2": bool(p2)}

    def is_success(self) -> bool:
        return self.success_dict()["p2"]

    def reward(self) -> float:
        s = self.success_dict()
        return 1.0 if s["p2"] else (self.SUCCESS_LEVELS["p1"] if s["p1"] else 0.0)

    def current_mode(self) -> str | None:
        """``"b<i>t<j>"`` committed so far (see the module docstring), or ``None``."""
        b, t = self._committed
        return mode_name(b, t) if b >= 0 else None


# ---------------------------------------------------------------------------- oracle
def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1e-9 else np.zeros_like(v)


def _perp(v: np.ndarray) -> np.ndarray:
    return np.array([-v[1], v[0]])


def _support(direction: np.ndarray, yaw: float) -> float:
    """Distance from a square block's centre to its boundary along ``direction`` (unit)."""
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.array([c * direction[0] + s * direction[1], -s * direction[0] + c * direction[1]])
    # the face hit by the ray is the one whose normal is most aligned with it
    return BLOCK_HALF / max(abs(local[0]), abs(local[1]), 1e-6)


class BlockPushOracle:
    """Scripted pusher for :class:`BlockPushSim` that reads observations only.

    Args:
        max_delta: metres per unit action (the env's ``max_delta``).
        order: fix the order ``((first_block, its_target), (second_block, its_target))`` instead of
            drawing it at ``reset``.

    ``reset(obs, seed)`` draws the order from ``np.random.default_rng(seed)`` (4 equally likely
    orders); ``act(obs) -> (2,)`` action in ``[-1, 1]``; ``mode`` is the drawn first pair
    (``"b0t1"``), ``draw`` the whole draw as a dict.
    """

    push_speed = 0.02           # m per step while pushing
    approach_gap = 0.03         # how far behind the block's face the effector lines up
    realign_lateral = 0.018     # lateral drift (m) that sends the effector behind the block again
    done_radius = 0.015         # a block this close to its goal is done
    waypoint_radius = 0.03      # a side waypoint this close is passed
    block_clearance = EFFECTOR_RADIUS + BLOCK_HALF * np.sqrt(2) + 0.012

    def __init__(self, max_delta: float = 0.03, order=None):
        self.max_delta = float(max_delta)
        self.fixed_order = order
        self.order = order
        self.reset()

    @property
    def mode(self) -> str:
        return mode_name(*self.order[0])

    @property
    def draw(self) -> dict:
        return {"order": [mode_name(b, t) for b, t in self.order], "first_block": int(self.order[0][0]),
                "first_target": int(self.order[0][1])}

    def reset(self, obs: dict | None = None, seed: int | None = None) -> None:
        if self.fixed_order is not None:
            self.order = tuple(tuple(int(v) for v in p) for p in self.fixed_order)
        else:
            rng = np.random.default_rng(seed)
            first_block, first_target = (int(v) for v in rng.integers(0, 2, size=2))
            self.order = ((first_block, first_target), (1 - first_block, 1 - first_target))
        self.stage = 0           # index into order
        self.pushing = False
        self.via = None          # side waypoint of the current push, or None
        self._via_planned = False

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _blocks(obs: dict):
        pos = [np.asarray(obs["block_pos"], dtype=np.float64)[:2], np.asarray(obs["block2_pos"], dtype=np.float64)[:2]]
        yaw = [float(np.arctan2(*np.asarray(obs[k], dtype=np.float64)[:2])) for k in ("block_yaw", "block2_yaw")]
        return pos, yaw

    def _to_action(self, delta: np.ndarray) -> np.ndarray:
        return np.clip(delta / self.max_delta, -1.0, 1.0)

    def _navigate(self, p: np.ndarray, goal: np.ndarray, obstacles: list[np.ndarray]) -> np.ndarray:
        """Displacement toward ``goal`` that goes around discs of radius ``block_clearance``."""
        r = self.block_clearance
        # a disc that holds the goal itself (the approach point next to a close neighbour) is not
        # avoided: the effector may brush that block rather than never arrive
        obstacles = [c for c in obstacles if np.linalg.norm(goal - c) >= r]
        seg = goal - p
        length = np.linalg.norm(seg)
        blocking = []
        for c in obstacles:
            s = np.clip(np.dot(c - p, seg) / max(length ** 2, 1e-12), 0.0, 1.0)
            q = p + s * seg
            if np.linalg.norm(q - c) < r and s > 0:
                blocking.append((s, c, q))
        if blocking:                     # head for a point beside the first disc in the way
            _, c, q = min(blocking, key=lambda x: x[0])
            side = q - c
            if np.linalg.norm(side) < 1e-4:
                side = _perp(_unit(seg))
            step = c + _unit(side) * (r + 0.02) - p
        else:
            step = seg
        n = np.linalg.norm(step)
        step = step if n <= self.max_delta else step / n * self.max_delta
        for c in obstacles:
            # inside a disc (just after a push): slide along its rim instead of going deeper, and
            # drift outward; backing straight out and turning back in would oscillate
            radial = p - c
            dist = np.linalg.norm(radial)
            if dist < r:
                u = _unit(radial) if dist > 1e-6 else _perp(_unit(seg))
                inward = np.dot(step, u)
                if inward < 0:
                    step = step - inward * u
                    if np.linalg.norm(step) < 0.2 * self.max_delta:
                        step = step + _perp(u) * np.sign(np.dot(_perp(u), seg) or 1.0) * 0.5 * self.max_delta
                step = step + u * min(r - dist, 0.5 * self.max_delta)
        n = np.linalg.norm(step)
        return step if n <= self.max_delta else step / n * self.max_delta

    def _plan_via(self, block: np.ndarray, goal: np.ndarray, other: np.ndarray) -> np.ndarray | None:
        """A side waypoint when ``other`` lies in the corridor the pushed block sweeps to ``goal``."""
        corridor = 2 * BLOCK_HALF * np.sqrt(2) + 0.012
        seg = goal - block
        s = np.dot(other - block, seg) / max(np.dot(seg, seg), 1e-12)
        if not 0.0 < s < 1.0:
            return None
        q = block + s * seg
        if np.linalg.norm(q - other) >= corridor:
            return None
        side = q - other
        if np.linalg.norm(side) < 1e-4:
            side = _perp(_unit(seg))
        return other + _unit(side) * (corridor + 0.03)

    # ------------------------------------------------------------------ policy
    def act(self, obs: dict) -> np.ndarray:
        """One action ``(2,)`` in ``[-1, 1]`` from one observation ``{key: (D,)}``."""
        p = np.asarray(obs["effector_pos"], dtype=np.float64)[:2]
        blocks, yaws = self._blocks(obs)
        targets = [np.asarray(obs["target_pos"], dtype=np.float64)[:2],
                   np.asarray(obs["target2_pos"], dtype=np.float64)[:2]]
        while self.stage < 2:
            b, t = self.order[self.stage]
            if np.linalg.norm(blocks[b] - targets[t]) < self.done_radius:
                self.stage += 1
                self.pushing, self.via, self._via_planned = False, None, False
                continue
            break
        if self.stage >= 2:            # both done: stay clear of the blocks
            return self._to_action(self._navigate(p, p, blocks))
        b, t = self.order[self.stage]
        block, other, yaw = blocks[b], blocks[1 - b], yaws[b]
        if not self._via_planned:
            self.via = self._plan_via(block, targets[t], other)
            self._via_planned = True
        if self.via is not None and np.linalg.norm(block - self.via) < self.waypoint_radius:
            self.via = None
        goal = self.via if self.via is not None else targets[t]
        d = _unit(goal - block)
        n = _perp(d)
        contact = _support(-d, yaw) + EFFECTOR_RADIUS
        rel = p - block
        along, lateral = float(np.dot(rel, d)), float(np.dot(rel, n))
        if self.pushing and (abs(lateral) > self.realign_lateral or along > -contact + 0.004):
            self.pushing = False
        if not self.pushing:
            approach = block - d * (contact + self.approach_gap)
            if np.linalg.norm(p - approach) < 0.008:
                self.pushing = True
            else:
                return self._to_action(self._navigate(p, approach, blocks))
        # push along the line, pulling the effector back onto it; slow down near the goal
        dist = np.linalg.norm(goal - block)
        speed = self.push_speed if self.via is not None else float(np.clip(0.8 * dist, 0.004, self.push_speed))
        delta = speed * d - 0.8 * lateral * n
        return self._to_action(delta)

