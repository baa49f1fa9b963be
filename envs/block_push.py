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
``block2_pos`` (2), ``block2_yaw`` (2), ``target_pos`` (2), ``target2_pos`` (2), ``block_rel`` and
``block2_rel`` (2 each: the block's position minus the effector's, the analogue of robosuite's
``gripper_to_cube_pos``; pushing is precise to millimetres relative to the block, which a network
reads far more easily than as a small difference of two large inputs); optional
``overhead_image`` (84, 84, 3) uint8. Action: see :mod:`jumpflow.envs.planar` (2-d desired effector
displacement, ``max_delta`` = 0.03 m per unit).

:class:`BlockPushOracle` draws, at reset, which block goes first and which target each block goes
to (4 equally likely orders), then pushes: it circles to the back of the block on the
block-to-goal line, pushes along the line while steering the effector back onto it (the push fades
out as the block drifts off the line and the effector falls back behind it), then does the same
with the other block. When the other block sits in the first block's corridor, the first block is
aimed beside it. It is a memoryless feedback law (no hidden approach/push switch), so that a
policy that sees only the last observations can learn it. The demo's mode is the drawn first
(block, target) pair, e.g. ``"b0t1"``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from jumpflow.envs.experts import OUNoise
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


def parse_mode(mode: str) -> tuple[int, int]:
    """``"b0t1" -> (0, 1)``, the inverse of :func:`mode_name`; anything else is refused."""
    if mode not in BLOCK_PUSH_MODES:
        raise ValueError(f"unknown Block Push mode {mode!r}; valid: {list(BLOCK_PUSH_MODES)}")
    return int(mode[1]), int(mode[3])


BLOCK_PUSH_MODES = tuple(mode_name(b, t) for b in (0, 1) for t in (0, 1))


def order_of(first_block: int, first_target: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The whole order once the first (block, target) pair is chosen: the other block goes to the
    other target. ``(0, 1) -> ((0, 1), (1, 0))``."""
    first_block, first_target = int(first_block), int(first_target)
    return (first_block, first_target), (1 - first_block, 1 - first_target)


#: the oracle's four orders, in the order of ``BLOCK_PUSH_MODES`` (each order's first pair is its mode)
BLOCK_PUSH_ORDERS = tuple(order_of(*parse_mode(m)) for m in BLOCK_PUSH_MODES)


class BlockPushSim(PlanarSim):
    """Multimodal Block Push (see the module docstring). ``env_kwargs``: ``control_freq`` (10),
    ``max_delta`` (0.03 m), ``goal_tolerance`` (0.05 m), ``horizon`` (350, informative: the
    episode cap is the evaluator's ``max_steps``), ``camera_size`` (84)."""

    TASK = "BlockPush"
    XML = BLOCK_PUSH_XML
    LOWDIM_KEYS = ("effector_pos", "block_pos", "block_yaw", "block2_pos", "block2_yaw",
                   "target_pos", "target2_pos", "block_rel", "block2_rel")
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
            out[f"{name}_rel"] = out[f"{name}_pos"] - out["effector_pos"]
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


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


class BlockPushOracle:
    """Scripted pusher for :class:`BlockPushSim`: a feedback law of the current observation and the
    order drawn at reset, with no other memory.

    Args:
        max_delta: metres per unit action (the env's ``max_delta``).
        order: fix the order ``((first_block, its_target), (second_block, its_target))`` instead of
            drawing it at ``reset``.
        noise_std: stationary std (action units) of the Ornstein-Uhlenbeck noise added to every
            action (:class:`jumpflow.envs.experts.OUNoise`, time constant ``noise_tau`` steps: lag-1
            correlation 0.90); 0 gives the bare law.

    ``reset(obs, seed)`` draws the order, then the noise, from ``np.random.default_rng(seed)`` (4
    equally likely orders); ``act(obs) -> (2,)`` action in ``[-1, 1]``; ``mode`` is the drawn first
    pair (``"b0t1"``), ``draw`` the whole draw as a dict.

    Why noise, and why the label is the law (DART, Laskey et al. 2017): a noise-free expert visits
    a thin tube of states, and a cloned policy that leaves it (its first imprecise step does) has
    never seen the way back. The demos therefore *execute* ``perturb(law(obs))`` (temporally
    correlated noise drives them off the tube) but *label* every visited state with ``law(obs)``
    (``labels_clean``; the demo writer stores the executed actions as ``executed_actions``).
    Version 3 stored the executed action as the label: the OU noise, lag-1 correlation 0.9, is
    predictable from the two-step observation history, so a cloned policy learnt to continue the
    noise (teacher-forced on held-out demos its lateral actions followed the noisy labels with
    correlation 0.86 but the law with 0.63, ``bench.label_fit``) and drifted off the block in
    closed loop (the copycat problem of history-conditioned cloning).

    The law (why it has no switches a learner cannot see): the stage is read off the blocks (the
    first block is done when it is within ``done_radius`` of its target); the effector orbits the
    block on a clearing circle until it is within 60 degrees of the point behind the block on the
    block-to-goal line, then servoes to a point behind the block's face that moves closer as the
    lateral error shrinks, adding a push along the line in proportion to the alignment. Every term
    is a proportional step (``gain`` < 0.5 of the error per step), so holding an action for a few
    steps, as a chunked policy does, does not overshoot (``bench.oracle_robustness``). When the
    other block lies in the corridor the first block sweeps, the block is aimed beside it.
    """

    VERSION = 4                 # stored with the demos (data attrs "oracle_version"); 1: the switching
                                # pusher, 2: this law without noise, 3: noise, executed actions as labels
    labels_clean = True         # demos label each visited state with law(obs), not the noisy action run
    noise_std = 0.15
    noise_tau = 9.5             # steps; exp(-1 / 9.5) = 0.90 from one step to the next
    gain = 0.35                 # fraction of the position error commanded per step
    push_speed = 0.015          # m per step while pushing
    approach_gap = 0.03         # how far behind the block's face the effector waits when misaligned
    align_width = 0.02          # lateral error (m) at which the push fades out completely
    done_radius = 0.02          # a block this close to its goal is done
    behind_angle = np.pi / 3    # within this angle of "behind", servo; beyond it, orbit
    orbit_step = 0.6            # rad per step at most around the block
    orbit_radius = EFFECTOR_RADIUS + BLOCK_HALF * np.sqrt(2) + 0.02
    other_clearance = EFFECTOR_RADIUS + BLOCK_HALF * np.sqrt(2) + 0.03
    corridor = 2 * BLOCK_HALF * np.sqrt(2) + 0.015
    separation = 2 * BLOCK_HALF * np.sqrt(2) + 0.03     # blocks closer than this are pushed apart

    def __init__(self, max_delta: float = 0.03, order=None, noise_std: float | None = None):
        self.max_delta = float(max_delta)
        if noise_std is not None:
            if not noise_std >= 0:
                raise ValueError(f"noise_std must be >= 0, got {noise_std}")
            self.noise_std = float(noise_std)
        self.fixed_order = order
        self.order = order
        self.reset()

    @property
    def mode(self) -> str:
        return mode_name(*self.order[0])

    @property
    def draw(self) -> dict:
        return {"order": [mode_name(b, t) for b, t in self.order], "first_block": int(self.order[0][0]),
                "first_target": int(self.order[0][1]), "noise_std": self.noise_std, "noise_tau": self.noise_tau}

    def reset(self, obs: dict | None = None, seed: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        if self.fixed_order is not None:
            self.order = tuple(tuple(int(v) for v in p) for p in self.fixed_order)
        else:
            self.order = order_of(*rng.integers(0, 2, size=2))
        self._noise = OUNoise(np.full(2, self.noise_std), self.noise_tau, rng)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _blocks(obs: dict):
        pos = [np.asarray(obs["block_pos"], dtype=np.float64)[:2], np.asarray(obs["block2_pos"], dtype=np.float64)[:2]]
        yaw = [float(np.arctan2(*np.asarray(obs[k], dtype=np.float64)[:2])) for k in ("block_yaw", "block2_yaw")]
        return pos, yaw

    def _aim(self, block: np.ndarray, goal: np.ndarray, other: np.ndarray) -> np.ndarray:
        """Where to push ``block``: ``goal``, or a point beside ``other`` when ``other`` lies in the
        corridor the block would sweep on its way."""
        seg = goal - block
        s = np.dot(other - block, seg) / max(np.dot(seg, seg), 1e-12)
        if not 0.0 < s < 1.0:
            return goal
        off = block + s * seg - other
        dist = np.linalg.norm(off)
        if dist >= self.corridor:
            return goal
        side = off / dist if dist > 1e-4 else _perp(_unit(seg))
        return other + side * (self.corridor + 0.03)

    # ------------------------------------------------------------------ policy
    def act(self, obs: dict) -> np.ndarray:
        """One action ``(2,)`` in ``[-1, 1]`` from one observation ``{key: (D,)}``: the feedback law
        plus the noise (none once both blocks are done)."""
        return self.perturb(self.law(obs))

    def perturb(self, action: np.ndarray) -> np.ndarray:
        """The executed action: ``action`` (the law's) plus the next step of the OU noise, clipped to
        ``[-1, 1]``; a zero action (both blocks done) is left alone."""
        if self.noise_std == 0 or not action.any():
            return action
        return np.clip(action + self._noise.step(), -1.0, 1.0)

    def law(self, obs: dict) -> np.ndarray:
        """The noise-free feedback law: ``(2,)`` in ``[-1, 1]`` from one observation."""
        p = np.asarray(obs["effector_pos"], dtype=np.float64)[:2]
        blocks, yaws = self._blocks(obs)
        targets = [np.asarray(obs["target_pos"], dtype=np.float64)[:2],
                   np.asarray(obs["target2_pos"], dtype=np.float64)[:2]]
        done = [np.linalg.norm(blocks[b] - targets[t]) < self.done_radius for b, t in self.order]
        if done[0] and done[1]:
            return np.zeros(2)
        stage = 1 if done[0] else 0
        b, t = self.order[stage]
        block, other, goal = blocks[b], blocks[1 - b], targets[t]
        # the second block's way may cross the first block, now in its target: no detour, the
        # targets are far enough apart
        aim = self._aim(block, goal, other) if stage == 0 else goal
        d = _unit(aim - block)
        # a block pressed against the other one is pushed apart from it first (else the pusher jams
        # the pair and the feedback law settles there)
        apart = np.linalg.norm(block - other)
        if apart < self.separation:
            d = _unit(d + _unit(block - other) * (self.separation - apart) / (self.separation - 2 * BLOCK_HALF))
        n = _perp(d)
        rel = p - block
        # angle of the effector about the block, 0 = behind it (on -d), positive counter-clockwise
        angle = float(np.arctan2(-np.dot(rel, n), np.dot(rel, -d)))
        contact = _support(-d, yaws[b]) + EFFECTOR_RADIUS
        if abs(angle) > self.behind_angle:
            # orbit toward the back of the block on a circle that clears it
            turn = min(abs(angle) - self.behind_angle + 0.2, self.orbit_step)
            radius = max(self.orbit_radius, min(np.linalg.norm(rel), self.orbit_radius + 0.03))
            via = block + radius * _rotate(-d, angle - np.sign(angle) * turn)
            delta = 2 * self.gain * (via - p)
        else:
            misalign = min(abs(float(np.dot(rel, n))) / self.align_width, 1.0)
            servo = block - d * (contact + self.approach_gap * misalign)
            delta = self.gain * (servo - p)
            # push in proportion to the alignment; no test of contact (the effector sits a hair
            # inside the face while pushing, and a contact test would chatter push / back off)
            dist = np.linalg.norm(goal - block)
            speed = float(np.clip(0.8 * dist, 0.004, self.push_speed)) if aim is goal else self.push_speed
            delta = delta + (1.0 - misalign) * speed * d
        # keep clear of the block that is not being pushed
        away = p - other
        gap = np.linalg.norm(away)
        if gap < self.other_clearance:
            delta = delta + _unit(away) * (self.other_clearance - gap)
        n_delta = np.linalg.norm(delta)
        if n_delta > self.max_delta:
            delta = delta / n_delta * self.max_delta
        return np.clip(delta / self.max_delta, -1.0, 1.0)
