"""Scripted experts for robosuite tasks under robomimic's OSC_POSE delta control.

An expert is a small state machine that reads only robomimic's low-dim observation keys
(``robot0_eef_pos`` (3,), ``robot0_eef_quat`` (4,) xyzw, ``robot0_gripper_qpos`` (2,),
``object`` (D,)) and returns a 7-D action in [-1, 1]: ``[dx, dy, dz, dax, day, daz, grip]``,
where ``d*`` scale to +-5 cm / +-0.5 rad (the controller's ``output_max``) and ``grip`` is +1 to
close, -1 to open. Because it uses observations only, an expert is also a closed-loop policy
(:class:`ExpertPolicy`) for the rollout evaluator.

- ``LiftExpert``: above the cube, yaw aligned with the cube's faces; descend; close; lift.
- ``CanExpert`` (``PickPlaceCan``): above the can; descend; close; lift to a safe height; carry
  over the can's target bin; lower; open; retreat upward (the task counts success only once
  the gripper has let go).
- ``SquareExpert`` (``NutAssemblySquare``): fingers across the nut's handle (yaw aligned with the
  nut), grasp the handle 6.6 cm from the nut's centre (clear of the ring), lift, turn the nut to a
  multiple of 90 degrees while carrying its centre over the square peg, lower it onto the peg, open.

These are the ``ph`` style (one proficient way of doing the task). ``MHExpert`` wraps any of them in
the ``mh`` style: a human-like operator drawn per episode (``MHStyle``, :func:`draw_mh_style`: pace,
gains, pauses, Ornstein-Uhlenbeck noise, via-point detours, an equivalent grasp, the approach side,
a deliberate missed grasp and its recovery). ``make_expert(task, env, style="mh")`` builds one.
``DARTExpert`` is the ``dart`` style: the ph labels, executed with noise (DART), with the mh recovery.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jumpflow.envs.task_names import canonical_task

POS_SCALE = 0.05          # metres per unit action (OSC_POSE output_max)
ROT_SCALE = 0.5           # radians per unit action


def quat2mat(q: np.ndarray) -> np.ndarray:
    """xyzw quaternion -> (3, 3) rotation matrix."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _mat2axisangle(r: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> axis * angle (3,), angle in [0, pi]."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    n = np.linalg.norm(axis)
    if n < 1e-8:        # angle ~ pi: axis from the symmetric part
        w, v = np.linalg.eigh((r + r.T) / 2.0)
        axis = v[:, np.argmax(w)]
        n = 1.0
    return axis / n * angle


def yaw_of(rot: np.ndarray) -> float:
    """The heading (rotation about z, radians in (-pi, pi]) of a (3, 3) rotation matrix."""
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def wrap_angle(a: float, period: float) -> float:
    """``a`` wrapped to ``[-period / 2, period / 2)``."""
    return float((a + period / 2) % period - period / 2)


class _Expert:
    """Shared P-controller in position and orientation, plus a phase counter."""

    pos_gain = 1.0
    rot_gain = 1.0
    patience = 1.0            # phase time-outs are scaled by this (the mh wrapper raises it for slow operators)
    #: what a task's expert remembers within an episode (cleared to ``None`` by ``reset``)
    episode_fields: tuple[str, ...] = ()

    def __init__(self):
        self.reset()

    def reset(self, obs: dict | None = None) -> None:
        self.phase, self.t_phase, self.r_target = 0, 0, None
        for name in self.episode_fields:
            setattr(self, name, None)

    def _late(self, steps: int) -> bool:
        """True once the current phase has run longer than ``steps`` x ``patience`` steps."""
        return self.t_phase > steps * self.patience

    def _next(self, phase: int | None = None) -> None:
        self.phase = self.phase + 1 if phase is None else phase
        self.t_phase = 0

    def _advance_if(self, done: bool, obs: dict, *action_args, **action_kwargs) -> np.ndarray:
        """``_action(obs, ...)``, after moving on to the next phase if ``done``."""
        if done:
            self._next()
        return self._action(obs, *action_args, **action_kwargs)

    def _action(self, obs: dict, target_pos: np.ndarray, grip: float, max_speed: float = 1.0) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        d_pos = np.clip(self.pos_gain * (target_pos - eef) / POS_SCALE, -max_speed, max_speed)
        r_cur = quat2mat(obs["robot0_eef_quat"])
        aa = _mat2axisangle(self.r_target @ r_cur.T)
        d_rot = np.clip(self.rot_gain * aa / ROT_SCALE, -1.0, 1.0)
        return np.concatenate([d_pos, d_rot, [grip]]).astype(np.float64)

    def act(self, obs: dict) -> np.ndarray:
        raise NotImplementedError


class LiftExpert(_Expert):
    """Lift: ``object`` = cube_pos (3), cube_quat (4), gripper_to_cube_pos (3)."""

    hover = 0.08

    @staticmethod
    def face_aligned_rotation(obs: dict) -> np.ndarray:
        """The current gripper rotation turned about world z by the smallest angle that aligns the
        fingers with a pair of cube faces."""
        r0 = quat2mat(obs["robot0_eef_quat"])
        cube_yaw = yaw_of(quat2mat(obs["object"][3:7]))
        d = (cube_yaw - yaw_of(r0)) % (np.pi / 2)
        d = d - np.pi / 2 if d > np.pi / 4 else d
        return _rot_z(d) @ r0

    def grasp_point(self, obs: dict) -> np.ndarray:
        """Where the gripper closes: the cube's centre, 3 mm lower."""
        return np.asarray(obs["object"][:3], dtype=np.float64) + [0.0, 0.0, -0.003]

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        cube = np.asarray(obs["object"][:3], dtype=np.float64)
        if self.r_target is None:
            self.r_target = self.face_aligned_rotation(obs)
        self.t_phase += 1
        if self.phase == 0:                           # hover above the cube, gripper open
            target = cube + [0.0, 0.0, self.hover]
            err = target - eef
            done = np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 or self._late(60)
            return self._advance_if(done, obs, target, -1.0)
        if self.phase == 1:                           # descend to grasp height
            target = cube + [0.0, 0.0, -0.003]
            return self._advance_if(np.linalg.norm(target - eef) < 0.01 or self._late(40), obs, target, -1.0)
        if self.phase == 2:                           # close
            target = cube + [0.0, 0.0, -0.003]
            return self._advance_if(self.t_phase >= 10, obs, target, 1.0)
        target = np.array([cube[0], cube[1], cube[2] + 0.2])   # lift
        return self._action(obs, target, 1.0, max_speed=0.8)


class CanExpert(_Expert):
    """PickPlaceCan: ``object`` = can_pos (3), can_quat (4), can_to_eef_pos (3), can_to_eef_quat (4).

    Args:
        bin_target: (3,) centre of the can's target bin quadrant (robosuite's
            ``env.target_bin_placements[env.object_to_id["can"]]``; default for default bins).
    """

    carry_z = 1.05
    release_z = 0.93

    episode_fields = ("_grasp_xy",)

    def __init__(self, bin_target=(0.1975, 0.4025, 0.8)):
        super().__init__()
        self.bin_target = np.asarray(bin_target, dtype=np.float64)

    def grasp_point(self, obs: dict) -> np.ndarray:
        """Where the gripper closes: the can's centre."""
        return np.asarray(obs["object"][:3], dtype=np.float64)

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        can = np.asarray(obs["object"][:3], dtype=np.float64)
        if self.r_target is None:
            self.r_target = quat2mat(obs["robot0_eef_quat"])
        self.t_phase += 1
        ph = self.phase
        if ph == 0:                                   # hover above the can
            target = can + [0.0, 0.0, 0.10]
            err = target - eef
            done = np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.03 or self._late(60)
            return self._advance_if(done, obs, target, -1.0)
        if ph == 1:                                   # descend
            target = can + [0.0, 0.0, 0.0]
            return self._advance_if(np.linalg.norm(target - eef) < 0.01 or self._late(40), obs, target, -1.0)
        if ph == 2:                                   # close
            return self._advance_if(self.t_phase >= 10, obs, can, 1.0)
        if ph == 3:                                   # lift straight up
            target = np.array([eef[0], eef[1], self.carry_z])
            return self._advance_if(eef[2] > self.carry_z - 0.03 or self._late(60), obs, target, 1.0)
        if ph == 4:                                   # carry over the target bin
            target = np.array([self.bin_target[0], self.bin_target[1], self.carry_z])
            done = np.linalg.norm((target - eef)[:2]) < 0.02 or self._late(80)
            return self._advance_if(done, obs, target, 1.0)
        if ph == 5:                                   # lower
            target = np.array([self.bin_target[0], self.bin_target[1], self.release_z])
            return self._advance_if(abs(target[2] - eef[2]) < 0.015 or self._late(40), obs, target, 1.0)
        if ph == 6:                                   # open
            target = np.array([self.bin_target[0], self.bin_target[1], self.release_z])
            return self._advance_if(self.t_phase >= 8, obs, target, -1.0)
        target = np.array([self.bin_target[0], self.bin_target[1], self.carry_z])   # retreat
        return self._action(obs, target, -1.0)


class SquareExpert(_Expert):
    """NutAssemblySquare: ``object`` = nut_pos (3), nut_quat (4), nut_to_eef_pos (3), nut_to_eef_quat (4).

    Args:
        peg: (3,) square peg position (``env.sim.data.body_xpos[env.peg1_body_id]``).
    """

    grasp_offset = 0.066          # along the nut's x axis: the handle, clear of the ring (ends at 0.044)
    grasp_dz = 0.005
    carry_z = 1.05
    release_nut_z = 0.855         # success needs the nut below table + 0.05 = 0.87
    flip_handle = False           # grasp with the wrist half a turn from the nearer choice (mh style)

    episode_fields = ("r0",)

    def __init__(self, peg=(0.23, 0.1, 0.85)):
        super().__init__()
        self.peg = np.asarray(peg, dtype=np.float64)

    def handle_turn(self, nut_yaw: float) -> float:
        """Wrist turn about world z (from the start rotation ``r0``) that puts the fingers across the
        handle: the smaller of the two equivalent turns, or the other one (half a turn away) when
        ``flip_handle`` is set."""
        d = wrap_angle(nut_yaw - yaw_of(self.r0), np.pi)
        if self.flip_handle:
            d = d + np.pi if d < 0 else d - np.pi
        return d

    @classmethod
    def handle_point(cls, nut_pose: np.ndarray) -> np.ndarray:
        """Where the gripper closes: on the handle, ``grasp_offset`` from the nut's centre.
        ``nut_pose``: the first 7 of ``object`` (nut_pos, nut_quat ``(x, y, z, w)``) -> (3,)."""
        nut = np.asarray(nut_pose[:3], dtype=np.float64)
        return nut + quat2mat(nut_pose[3:7]) @ np.array([cls.grasp_offset, 0.0, cls.grasp_dz])

    def grasp_point(self, obs: dict) -> np.ndarray:
        return self.handle_point(obs["object"])

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        nut = np.asarray(obs["object"][:3], dtype=np.float64)
        r_nut = quat2mat(obs["object"][3:7])
        r_eef = quat2mat(obs["robot0_eef_quat"])
        grasp = self.handle_point(obs["object"])
        nut_yaw = yaw_of(r_nut)
        if self.r0 is None:
            self.r0 = r_eef
        self.t_phase += 1
        ph = self.phase
        if ph <= 2:            # fingers across the handle (symmetric under a half turn)
            self.r_target = _rot_z(self.handle_turn(nut_yaw)) @ self.r0
        else:                  # turn the nut to a multiple of 90 degrees (the peg's symmetry)
            d = wrap_angle(-nut_yaw, np.pi / 2)
            self.r_target = _rot_z(d) @ r_eef if abs(d) > 0.02 else r_eef
        if ph == 0:                                   # above the handle, yaw aligned
            target = grasp + [0.0, 0.0, 0.08]
            err = target - eef
            rot_err = np.linalg.norm(_mat2axisangle(self.r_target @ r_eef.T))
            done = (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 and rot_err < 0.05) or self._late(100)
            return self._advance_if(done, obs, target, -1.0)
        if ph == 1:                                   # descend around the handle
            return self._advance_if(np.linalg.norm(grasp - eef) < 0.008 or self._late(40), obs, grasp, -1.0)
        if ph == 2:                                   # close
            return self._advance_if(self.t_phase >= 10, obs, grasp, 1.0)
        if ph == 3:                                   # lift
            done = eef[2] > self.carry_z - 0.03 or self._late(60)
            return self._advance_if(done, obs, np.array([eef[0], eef[1], self.carry_z]), 1.0)
        if ph == 4:                                   # nut centre over the peg, nut square to it
            target = eef + np.r_[self.peg[:2] - nut[:2], 0.0]
            target[2] = self.carry_z
            aligned = abs(wrap_angle(-nut_yaw, np.pi / 2)) < 0.03
            done = (np.linalg.norm((self.peg - nut)[:2]) < 0.005 and aligned) or self._late(100)
            return self._advance_if(done, obs, target, 1.0, max_speed=0.6)
        if ph == 5:                                   # lower onto the peg, correcting xy
            target = eef + np.r_[self.peg[:2] - nut[:2], -0.03]
            done = nut[2] < self.release_nut_z or self._late(60)
            return self._advance_if(done, obs, target, 1.0, max_speed=0.5)
        if ph == 6:                                   # open
            return self._advance_if(self.t_phase >= 8, obs, eef, -1.0)
        return self._action(obs, np.array([eef[0], eef[1], self.carry_z]), -1.0)   # retreat


# ============================================================================ human-like ("mh") style
#
# robomimic's multi-human sets hold demos of one task by several operators of different skill: every
# demo has its own pace, hesitations, wobble, path and grasp, and some contain a failed grasp that the
# operator recovered from. The mh style draws all of that per episode (an ``MHStyle``) and lays it
# over the scripted experts' phase logic (``MHExpert``); the ph experts above are not changed by it.

STYLES = ("ph", "mh", "dart")
MH_QUALITIES = ("better", "okay", "worse")
# Operator quality sets the ranges the rest is drawn from (robomimic's "better / okay / worse").
# speed: cap on the commanded motion (action units); noise: stationary std of the position noise
# (action units); p_miss: chance of one deliberate missed grasp; pauses: P(0, 1, 2, 3 pauses).
_MH_QUALITY = {
    "better": {"speed": (0.75, 1.0), "noise": (0.02, 0.05), "p_miss": 0.10, "pauses": (0.45, 0.35, 0.15, 0.05)},
    "okay": {"speed": (0.6, 0.9), "noise": (0.04, 0.08), "p_miss": 0.20, "pauses": (0.30, 0.35, 0.25, 0.10)},
    "worse": {"speed": (0.45, 0.75), "noise": (0.06, 0.12), "p_miss": 0.35, "pauses": (0.15, 0.30, 0.35, 0.20)},
}
# Feasible wrist turns about world z from the start pose, radians: the Panda's last joint starts at
# 0.8 rad and stops at +-2.9, and a positive turn of the gripper lowers it (a negative turn past
# ~-1.5 rad drives it into its stop; the margin leaves room for Square's later turn of <= 45 deg).
WRIST_TURN_RANGE = (-1.2, 2.6)
REGRASP_DISTANCE = 0.04      # gripper this far from the grasp point while holding: the object was lost
MAX_REGRASPS = 2
MAX_REINSERTS = 2            # Square: lift the nut and try again when it stuck on the peg
_MH_STREAM = 0x6D68          # separates the style's random stream from anything else seeded with the demo seed


@dataclass(frozen=True)
class _MHTask:
    """What the mh wrapper needs to know about one task's expert."""

    grasp_yaws: tuple[int, ...]          # equivalent grasps: extra wrist turn, degrees
    hover: float                         # approach height above the grasp point, metres
    carry_phase: int | None              # expert phase that carries the object through free space
    nominal_steps: int                   # pauses start within this many steps
    miss_kinds: tuple[str, ...]          # "high": closes above the object; "beside": next to it
    miss_high: tuple[float, float]       # metres above the grasp point for a "high" miss
    fine_phases: dict                    # expert phase -> noise multiplier where precision matters
    held_phases: tuple[int, ...]         # expert phases in which the object should be in the hand
    place_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)   # dx, dy ranges of the release point


MH_TASKS = {
    "Lift": _MHTask((0, 90), 0.08, None, 60, ("high", "beside"), (0.045, 0.06), {1: 0.3, 2: 0.3}, (3,)),
    # the can's top is 4 cm above its centre: a "high" miss closes well above it; "beside" could
    # land the fingers on the bin wall, so Can misses high only
    # the can's target (the quadrant's centre) is at the edge of the arm's reach: an operator lets go
    # anywhere in the quadrant, and nearer the robot the arm is not stretched out (it sags otherwise);
    # dividers are 10 cm behind and 12 cm to the right of the centre, the fingers open 4 cm each way
    "PickPlaceCan": _MHTask((0, 90), 0.10, 4, 160, ("high",), (0.075, 0.09), {1: 0.3, 2: 0.3, 5: 0.5, 6: 0.5},
                            (3, 4, 5), place_box=(-0.05, -0.01, -0.04, 0.01)),
    "NutAssemblySquare": _MHTask((0, 180), 0.08, 4, 200, ("high", "beside"), (0.04, 0.055),
                                 {1: 0.3, 2: 0.3, 4: 0.2, 5: 0.2}, (3, 4)),
}


@dataclass(frozen=True)
class MHStyle:
    """One operator's way of doing one episode, drawn by :func:`draw_mh_style`.

    Distances are metres, speeds and noise are in action units (1 = the controller's 5 cm /
    0.5 rad per step), times are control steps (20 Hz).
    """

    quality: str                          # "better" | "okay" | "worse"
    grasp_yaw: int                        # extra wrist turn of the grasp, degrees (0 = the ph grasp)
    side: str                             # "left" (+y) | "right" (-y): where the approach comes in from
    side_offset: float                    # lateral offset of the approach point from the object
    speed: float                          # cap on the commanded motion, scaled by the profile below
    speed_wobble: float                   # relative amplitude of the slow speed modulation
    speed_period: float                   # its period, steps
    speed_phase: float                    # its phase, radians
    pos_gain: float                       # position P-gain, x the expert's
    rot_gain: float                       # orientation P-gain, x the expert's
    noise_scale: float                    # stationary std of the position noise (rotation: half)
    noise_tau: float                      # correlation time of the noise, steps
    pause_starts: tuple[int, ...]         # step at which each pause begins
    pause_lengths: tuple[int, ...]        # its length, steps
    place_offset: tuple[float, float]     # Can: where in the target bin quadrant the can is let go (dx, dy)
    via: tuple[tuple[float, float, float], ...]   # approach detours: (fraction of the way, lateral, rise)
    carry_via: tuple[float, float] | None         # one detour while carrying: (lateral, rise), or none
    missed: bool                          # one deliberate missed grasp, then re-open, lift, re-approach
    miss_kind: str                        # "" | "high" | "beside"
    miss_distance: float                  # how far from the grasp point the miss closes
    miss_sign: int                        # +-1: which side a "beside" miss falls on (Lift)

    @property
    def mode(self) -> str:
        """Grasp and approach label, e.g. ``"yaw90_left"``."""
        return f"yaw{self.grasp_yaw}_{self.side}"

    @property
    def n_pauses(self) -> int:
        return len(self.pause_starts)

    @property
    def n_via(self) -> int:
        return len(self.via)

    @property
    def patience(self) -> float:
        """Phase time-outs scale: a slow, low-gain operator is given the time it needs."""
        return 2.0 / min(self.speed, self.pos_gain)

    def speed_at(self, t: int) -> float:
        """Speed cap at step ``t`` (the per-episode profile), in [0.3, 1]."""
        wobble = 1.0 + self.speed_wobble * np.sin(2.0 * np.pi * t / self.speed_period + self.speed_phase)
        return float(np.clip(self.speed * wobble, 0.3, 1.0))


def draw_mh_style(task: str, rng: np.random.Generator) -> MHStyle:
    """Draw one episode's operator style for ``task`` (``Lift``, ``PickPlaceCan``, ``NutAssemblySquare``).

    Intended mixture: quality uniform over better / okay / worse; grasp yaw uniform over the task's
    equivalent grasps (Lift, Can: 0 / 90 degrees; Square: 0 / 180, taken only where the wrist can
    turn that far, else 0); approach side uniform left / right; missed grasp with probability 0.10 /
    0.20 / 0.35 by quality (0.22 overall); 0-3 pauses; 0-2 approach detours (P 0.4 / 0.4 / 0.2);
    a carrying detour with probability 0.5 (Can, Square).
    """
    spec = MH_TASKS.get(canonical_task(task))
    if spec is None:
        raise ValueError(f"no mh style for task {task!r}; available: {sorted(MH_TASKS)}")
    quality = MH_QUALITIES[int(rng.integers(len(MH_QUALITIES)))]
    q = _MH_QUALITY[quality]
    grasp_yaw = spec.grasp_yaws[int(rng.integers(len(spec.grasp_yaws)))]
    side = ("left", "right")[int(rng.integers(2))]
    n_pauses = int(rng.choice(4, p=q["pauses"]))
    starts = np.sort(rng.integers(0, spec.nominal_steps, n_pauses))
    lengths = rng.integers(4, 21, n_pauses)
    n_via = int(rng.choice(3, p=(0.4, 0.4, 0.2)))
    via = sorted((float(rng.uniform(0.25, 0.75)), float(rng.choice((-1.0, 1.0)) * rng.uniform(0.04, 0.12)),
                  float(rng.uniform(0.0, 0.08))) for _ in range(n_via))
    box = spec.place_box
    place_offset = (float(rng.uniform(box[0], box[1])), float(rng.uniform(box[2], box[3])))
    carry_via = None
    if spec.carry_phase is not None and rng.random() < 0.5:
        carry_via = (float(rng.choice((-1.0, 1.0)) * rng.uniform(0.03, 0.10)), float(rng.uniform(0.0, 0.06)))
    missed = bool(rng.random() < q["p_miss"])
    miss_kind = spec.miss_kinds[int(rng.integers(len(spec.miss_kinds)))] if missed else ""
    miss_distance = float(rng.uniform(*spec.miss_high)) if miss_kind == "high" else \
        float(rng.uniform(0.05, 0.065)) if miss_kind == "beside" else 0.0
    return MHStyle(
        quality=quality, grasp_yaw=int(grasp_yaw), side=side, side_offset=float(rng.uniform(0.05, 0.12)),
        speed=float(rng.uniform(*q["speed"])), speed_wobble=float(rng.uniform(0.0, 0.3)),
        speed_period=float(rng.uniform(30.0, 90.0)), speed_phase=float(rng.uniform(0.0, 2.0 * np.pi)),
        pos_gain=float(rng.uniform(0.7, 1.4)), rot_gain=float(rng.uniform(0.7, 1.4)),
        noise_scale=float(rng.uniform(*q["noise"])), noise_tau=float(rng.uniform(8.0, 20.0)),
        pause_starts=tuple(int(x) for x in starts), pause_lengths=tuple(int(x) for x in lengths),
        place_offset=place_offset, via=tuple(via), carry_via=carry_via, missed=missed, miss_kind=miss_kind, miss_distance=miss_distance,
        miss_sign=int(rng.choice((-1, 1))))


class OUNoise:
    """Ornstein-Uhlenbeck noise sampled at the control rate (an AR(1) process).

    ``x[t+1] = rho x[t] + sqrt(1 - rho^2) sigma eps``, ``rho = exp(-1 / tau)``: stationary std
    ``sigma`` and lag-k autocorrelation ``rho^k``, so the commanded motion drifts smoothly over
    ``tau`` steps instead of jittering per step. Starts from the stationary distribution.
    """

    def __init__(self, sigma, tau: float, rng: np.random.Generator):
        if tau <= 0:
            raise ValueError(f"OUNoise tau must be > 0 steps, got {tau}")
        self.sigma = np.asarray(sigma, dtype=np.float64)
        self.rho = float(np.exp(-1.0 / tau))
        self.rng = rng
        self.x = self.sigma * rng.standard_normal(self.sigma.shape)

    def step(self) -> np.ndarray:
        eps = self.rng.standard_normal(self.sigma.shape)
        self.x = self.rho * self.x + np.sqrt(1.0 - self.rho ** 2) * self.sigma * eps
        return self.x.copy()


def _feasible_turn(d: float, quarter_turns: int) -> float | None:
    """Of the wrist turns ``d +- quarter_turns * 90 deg``, the smaller one that the arm can make
    (``WRIST_TURN_RANGE``), or None."""
    extra = quarter_turns * np.pi / 2
    for turn in sorted((d - extra, d + extra), key=abs):
        if WRIST_TURN_RANGE[0] <= turn <= WRIST_TURN_RANGE[1]:
            return float(turn)
    return None


@dataclass
class _Segment:
    """A stretch the wrapper drives itself (detour, missed grasp) before handing back to the expert."""

    target: np.ndarray
    grip: float
    tol: float = 0.02             # done once within this distance (negative: never; runs max_steps)
    max_steps: int = 60
    noise: float = 1.0            # noise multiplier
    then_phase: int | None = None  # when done, the expert restarts at this phase
    steps: int = 0


class MHExpert:
    """A scripted expert executed the way a human operator would: the mh style.

    Wraps a ph expert (``LiftExpert``, ``CanExpert``, ``SquareExpert``) and keeps its phase logic;
    each episode (``reset``) draws an :class:`MHStyle` and then
    - turns the grasp to the drawn equivalent one (``grasp_yaw``) and comes in from the drawn side
      through the drawn via-points before the expert's own approach;
    - scales the expert's gains and caps its speed by a slowly varying per-episode profile, and
      stretches its phase time-outs to match;
    - adds Ornstein-Uhlenbeck noise to the commanded motion (less where precision matters);
    - holds still (gripper as it was) for the drawn pauses;
    - if ``missed``: closes once high above or beside the object, re-opens, lifts and re-approaches;
    - if the object is not in the hand while it should be (a grasp that did not hold), re-opens,
      rises and re-approaches (at most ``MAX_REGRASPS`` times); Square: a nut that stuck on the peg
      is lifted and lined up again instead of being let go (at most ``MAX_REINSERTS`` times).

    ``reseed(seed)`` makes the next episode's draw a function of ``seed`` alone (the demo writer
    calls it with each episode's reset seed). ``episode_attrs()`` is what the episode drew and did.
    """

    def __init__(self, base: _Expert, task: str, seed: int = 0):
        self.task = canonical_task(task)
        if self.task not in MH_TASKS:
            raise ValueError(f"no mh style for task {task!r}; available: {sorted(MH_TASKS)}")
        self.base = base
        self.spec = MH_TASKS[self.task]
        # the expert's own release point; each episode lets go at its drawn offset from it (Can)
        self.bin_target = np.array(base.bin_target) if isinstance(base, CanExpert) else None
        self.reseed(seed)
        self.style: MHStyle | None = None

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng([_MH_STREAM, int(seed)])

    def reset(self, obs: dict | None = None, style: MHStyle | None = None) -> None:
        """New episode: draw a style (or use ``style``) and reset the wrapped expert."""
        self.base.reset(obs)
        self.style = style if style is not None else draw_mh_style(self.task, self.rng)
        st = self.style
        self.base.pos_gain, self.base.rot_gain, self.base.patience = st.pos_gain, st.rot_gain, st.patience
        self.noise = OUNoise([st.noise_scale] * 3 + [st.noise_scale / 2] * 3, st.noise_tau, self.rng)
        self.noise_trace: list[np.ndarray] = []
        self.t = 0
        self.grip = -1.0
        self.segments: list[_Segment] = []
        self.started = False
        self.grasp_yaw = 0
        self.miss_pending = st.missed
        self.carry_pending = st.carry_via is not None
        self.missed = False
        self.pause_steps = 0
        self.pauses_taken = set()
        self.regrasps = 0
        self.reinserts = 0

    # ---------------------------------------------------------------------------------------- setup
    def _begin(self, obs: dict) -> None:
        """First step: fix the grasp rotation and queue the approach (detours, then the side point)."""
        base, st = self.base, self.style
        r_eef = quat2mat(obs["robot0_eef_quat"])
        if isinstance(base, LiftExpert):
            r = base.face_aligned_rotation(obs)
            d = wrap_angle(yaw_of(r) - yaw_of(r_eef), 2 * np.pi)
            turn = _feasible_turn(d, st.grasp_yaw // 90) if st.grasp_yaw else d
            self.grasp_yaw = st.grasp_yaw if turn is not None else 0
            base.r_target = _rot_z(turn if turn is not None else d) @ r_eef
        elif isinstance(base, SquareExpert):
            base.r0 = r_eef
            nut_yaw = yaw_of(quat2mat(obs["object"][3:7]))
            base.flip_handle = st.grasp_yaw == 180
            turn = base.handle_turn(nut_yaw)
            if not WRIST_TURN_RANGE[0] <= turn <= WRIST_TURN_RANGE[1]:
                # that way round is out of the wrist's reach; the other is not (the range spans > 180 deg)
                base.flip_handle = not base.flip_handle
            self.grasp_yaw = 180 if base.flip_handle else 0
            self._aim(obs)
        else:
            turn = _feasible_turn(0.0, st.grasp_yaw // 90) if st.grasp_yaw else 0.0
            self.grasp_yaw = st.grasp_yaw if turn is not None else 0
            base.r_target = _rot_z(turn or 0.0) @ r_eef
            self.r_carry = r_eef            # the can is turned back to the ph wrist while it is carried
            base.bin_target = self.bin_target + [st.place_offset[0], st.place_offset[1], 0.0]
        grasp = base.grasp_point(obs)
        start = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        side = 1.0 if st.side == "left" else -1.0
        approach = grasp + [0.0, side * st.side_offset, self.spec.hover + 0.03]
        way = approach - start
        perp = np.array([-way[1], way[0], 0.0]) / max(np.linalg.norm(way[:2]), 1e-6)
        for frac, lateral, rise in st.via:
            p = start + frac * way + lateral * perp + [0.0, 0.0, rise]
            p[2] = max(p[2], grasp[2] + self.spec.hover)        # detours stay above the object
            self.segments.append(_Segment(p, -1.0, tol=0.03, max_steps=50))
        self.segments.append(_Segment(approach, -1.0, tol=0.02, max_steps=60))

    def _aim(self, obs: dict) -> None:
        """Square: the grasp rotation follows the nut (as the expert's own phases 0-2 do)."""
        base = self.base
        if isinstance(base, SquareExpert) and base.phase <= 2:
            base.r_target = _rot_z(base.handle_turn(yaw_of(quat2mat(obs["object"][3:7])))) @ base.r0

    def _queue_miss(self, obs: dict) -> None:
        """Close once where the object is not, re-open, lift, and let the expert approach again."""
        base, st = self.base, self.style
        grasp = base.grasp_point(obs)
        if st.miss_kind == "high":
            miss = grasp + [0.0, 0.0, st.miss_distance]
        else:
            if isinstance(base, SquareExpert):     # along the handle, away from the ring
                u = grasp - np.asarray(obs["object"][:3], dtype=np.float64)
            else:                                  # across the finger plane: the fingers close on air
                u = st.miss_sign * base.r_target[:, 0]
            u = np.array([u[0], u[1], 0.0]) / max(np.linalg.norm(u[:2]), 1e-6)
            miss = grasp + st.miss_distance * u + [0.0, 0.0, 0.01]
        up = np.array([miss[0], miss[1], grasp[2] + self.spec.hover + 0.03])
        self.segments += [_Segment(miss, -1.0, tol=0.01, max_steps=60, noise=0.3),
                          _Segment(miss, 1.0, tol=-1.0, max_steps=10, noise=0.3),      # close on nothing
                          _Segment(miss, -1.0, tol=-1.0, max_steps=8, noise=0.3),      # re-open
                          _Segment(up, -1.0, tol=0.02, max_steps=60, then_phase=0)]    # lift, re-approach
        self.miss_pending, self.missed = False, True

    def _queue_carry_detour(self, obs: dict) -> None:
        base, (lateral, rise) = self.base, self.style.carry_via
        start = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        dest = base.bin_target if isinstance(base, CanExpert) else base.peg
        way = np.array([dest[0] - start[0], dest[1] - start[1], 0.0])
        perp = np.array([-way[1], way[0], 0.0]) / max(np.linalg.norm(way), 1e-6)
        p = start + 0.5 * way + lateral * perp
        p[2] = base.carry_z + rise
        self.segments.append(_Segment(p, 1.0, tol=0.03, max_steps=60))
        self.carry_pending = False

    def _queue_reinsert(self, obs: dict) -> None:
        """Square: the nut stuck on the peg (lowering timed out above the release height); rather
        than letting go, lift it clear and line it up again."""
        base = self.base
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self.segments.append(_Segment(np.array([eef[0], eef[1], base.carry_z]), 1.0, tol=0.02, max_steps=60,
                                      then_phase=4))
        self.reinserts += 1

    def _queue_regrasp(self, obs: dict) -> None:
        """The object is not in the hand (slipped, or the grasp closed on its edge): as a person
        would, open, rise, and let the expert approach it again."""
        base = self.base
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        up = np.array([eef[0], eef[1], max(eef[2], base.grasp_point(obs)[2] + self.spec.hover) + 0.03])
        self.segments += [_Segment(eef, -1.0, tol=-1.0, max_steps=8),
                          _Segment(up, -1.0, tol=0.02, max_steps=60, then_phase=0)]
        self.regrasps += 1

    # ---------------------------------------------------------------------------------------- acting
    def _paused(self) -> bool:
        st = self.style
        for i, (s, n) in enumerate(zip(st.pause_starts, st.pause_lengths)):
            if s <= self.t < s + n:
                self.pauses_taken.add(i)
                return True
        return False

    def act(self, obs: dict) -> np.ndarray:
        if self.style is None:
            raise RuntimeError("MHExpert.act before reset(): call reset(obs) at the start of each episode")
        t = self.t
        self.t += 1
        if self._paused():                  # hold still, the gripper as it was
            self.pause_steps += 1
            return np.r_[np.zeros(6), self.grip]
        base = self.base
        if not self.started:
            self._begin(obs)
            self.started = True
        if not self.segments:
            eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
            if self.miss_pending and base.phase == 1:
                self._queue_miss(obs)
            elif (base.phase in self.spec.held_phases and base.t_phase >= 5 and self.regrasps < MAX_REGRASPS
                  and np.linalg.norm(eef - base.grasp_point(obs)) > REGRASP_DISTANCE):
                self._queue_regrasp(obs)
            elif (isinstance(base, SquareExpert) and base.phase == 6 and base.t_phase == 0
                  and self.reinserts < MAX_REINSERTS and obs["object"][2] >= base.release_nut_z):
                self._queue_reinsert(obs)
            elif self.carry_pending and base.phase == self.spec.carry_phase:
                self._queue_carry_detour(obs)
        if isinstance(base, CanExpert) and base.phase >= 3:
            # with the fingers along x (yaw 90) the open fingers would reach the bin's divider; and
            # the retreat goes straight up (the ph one heads for the quadrant's centre, which drags
            # the open fingers across the can when the can was let go elsewhere)
            base.r_target = self.r_carry
            if base.phase == 7 and not self.segments:
                eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
                self.segments.append(_Segment(np.array([eef[0], eef[1], base.carry_z]), -1.0, tol=0.02))
        if self.segments:
            seg = self.segments[0]
            self._aim(obs)
            a = base._action(obs, seg.target, seg.grip)
            seg.steps += 1
            dist = np.linalg.norm(seg.target - np.asarray(obs["robot0_eef_pos"], dtype=np.float64))
            # moves may take a slow operator longer; a timed close or re-open lasts what it lasts
            limit = seg.max_steps * base.patience if seg.tol >= 0 else seg.max_steps
            if dist < seg.tol or seg.steps >= limit:
                self.segments.pop(0)
                if seg.then_phase is not None:
                    base._next(seg.then_phase)
            precision = seg.noise
        else:
            precision = self.spec.fine_phases.get(base.phase, 1.0)
            a = base.act(obs)
        cap = self.style.speed_at(t)
        a[:6] = np.clip(a[:6], -cap, cap)
        n = self.noise.step()
        self.noise_trace.append(n)
        a[:6] += precision * n
        self.grip = float(a[6])
        return np.clip(a, -1.0, 1.0)

    # ---------------------------------------------------------------------------------------- record
    @property
    def mode(self) -> str:
        """The grasp and approach this episode used, e.g. ``"yaw90_left"``."""
        return f"yaw{self.grasp_yaw}_{self.style.side}"

    def episode_attrs(self) -> dict:
        """What the episode drew and did, as flat HDF5-attribute values."""
        st = self.style
        return {
            "style": "mh", "mode": self.mode, "quality": st.quality, "grasp_yaw": int(self.grasp_yaw),
            "grasp_yaw_drawn": int(st.grasp_yaw), "side": st.side, "side_offset": st.side_offset,
            "speed": st.speed, "speed_wobble": st.speed_wobble, "speed_period": st.speed_period,
            "pos_gain": st.pos_gain, "rot_gain": st.rot_gain, "patience": st.patience,
            "noise_scale": st.noise_scale, "noise_tau": st.noise_tau,
            "n_pauses": st.n_pauses, "n_pauses_taken": len(self.pauses_taken), "pause_steps": int(self.pause_steps),
            "n_via": st.n_via, "carry_via": st.carry_via is not None, "missed": bool(self.missed),
            "n_regrasps": int(self.regrasps), "n_reinserts": int(self.reinserts),
            "miss_kind": st.miss_kind if self.missed else "", "miss_distance": st.miss_distance if self.missed else 0.0,
            "place_dx": st.place_offset[0], "place_dy": st.place_offset[1],
        }


# ============================================================================ noise-injected ("dart") style
#
# A ph expert is proficient and deterministic: its demos visit a thin tube of states, and a cloned
# policy that leaves the tube (a cube nudged while the fingers close) has never seen the way back.
# The dart style (DART, Laskey et al. 2017) runs the ph expert's action plus temporally correlated
# noise, so the demos leave the tube, and labels every visited state with the expert's clean action,
# so there is no noise to imitate; a grasp that did not hold is re-opened and re-approached (the mh
# wrapper's recovery), which is what the policy should learn to do after a bad grasp of its own.

# per task: the largest stationary std of the executed motion's noise (drawn per episode from U(0, max),
# action units), and whether it is scaled down where the task needs precision (the mh fine phases:
# Square's insertion fails at noise Lift's grasp takes in its stride)
DART_NOISE = {"Lift": (0.5, False), "PickPlaceCan": (0.5, False), "NutAssemblySquare": (0.2, True)}
DART_TAU = (3.0, 10.0)       # the noise's correlation time, steps
_DART_STREAM = 0x6474        # separates the noise's random stream from the mh style's


def proficient_style() -> MHStyle:
    """The ph expert's own way as an :class:`MHStyle`: full speed, the expert's gains, no noise,
    pauses, detours or misses, the ph grasp, approached from straight above."""
    return MHStyle(quality="better", grasp_yaw=0, side="left", side_offset=0.0, speed=1.0, speed_wobble=0.0,
                   speed_period=60.0, speed_phase=0.0, pos_gain=1.0, rot_gain=1.0, noise_scale=0.0,
                   noise_tau=10.0, pause_starts=(), pause_lengths=(), place_offset=(0.0, 0.0), via=(),
                   carry_via=None, missed=False, miss_kind="", miss_distance=0.0, miss_sign=1)


class DARTExpert(MHExpert):
    """The dart style: the ph expert's clean labels, executed with noise (DART, Laskey et al. 2017).

    ``act(obs) -> (7,)`` is the label: the ph expert's action, plus the mh wrapper's recovery when
    the object is not in the hand while it should be (re-open, rise, re-approach). ``perturb(action)
    -> (7,)`` is what the simulator runs: the label plus Ornstein-Uhlenbeck noise on the motion
    (position std ``noise_scale``, rotation half of it; the gripper command is left alone; Square:
    scaled down in its precise phases), with ``noise_scale ~ U(0, DART_NOISE[task])`` and
    ``noise_tau ~ U(DART_TAU)`` drawn per episode from the seed
    (``reseed``), so some episodes are nearly clean and others are pushed well off the ph path.
    ``labels_clean`` tells the demo writer to store ``perturb``'s output as ``executed_actions``.
    """

    labels_clean = True

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng([_DART_STREAM, int(seed)])

    def reset(self, obs: dict | None = None, style: MHStyle | None = None) -> None:
        super().reset(obs, style=proficient_style() if style is None else style)
        self.base.patience = 1.0                      # the ph expert's phase time-outs
        top, self.noise_fine = DART_NOISE[self.task]
        self.noise_scale = float(self.rng.uniform(0.0, top))
        self.noise_tau = float(self.rng.uniform(*DART_TAU))
        self.execution_noise = OUNoise([self.noise_scale] * 3 + [self.noise_scale / 2] * 3, self.noise_tau, self.rng)

    def perturb(self, action: np.ndarray) -> np.ndarray:
        """The executed action: ``action`` with the next noise step added to its motion, clipped."""
        out = np.array(action, dtype=np.float64)
        precision = self.spec.fine_phases.get(self.base.phase, 1.0) if self.noise_fine and not self.segments else 1.0
        out[:6] += precision * self.execution_noise.step()
        return np.clip(out, -1.0, 1.0)

    def episode_attrs(self) -> dict:
        """What the episode drew and did, as flat HDF5-attribute values (no ``mode``: one way)."""
        return {"style": "dart", "noise_scale": self.noise_scale, "noise_tau": self.noise_tau,
                "n_regrasps": int(self.regrasps)}


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert, "NutAssemblySquare": SquareExpert}


def check_style(style: str) -> str:
    """``style`` if it is a known demo style, else ``ValueError`` naming the valid ones."""
    if style not in STYLES:
        raise ValueError(f"demo style must be one of {', '.join(STYLES)}; got {style!r}")
    return style


def make_expert(task: str, env=None, style: str = "ph", seed: int = 0) -> _Expert | MHExpert:
    """Expert for a robosuite task name (``Lift``, ``PickPlaceCan``, ``NutAssemblySquare``); ``env``:
    the raw robosuite env, used to read task constants (the can's target bin, the square peg).

    ``style``: ``"ph"`` (the scripted expert, one way of doing the task), ``"mh"`` (an
    :class:`MHExpert` around it that draws a human-like style per episode; ``seed`` starts its draws)
    or ``"dart"`` (a :class:`DARTExpert`: the ph labels, executed with noise drawn per episode).
    """
    check_style(style)
    task = canonical_task(task)
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; available: {sorted(EXPERTS)}")
    if task == "PickPlaceCan" and env is not None and hasattr(env, "target_bin_placements"):
        base = CanExpert(env.target_bin_placements[env.object_to_id["can"]])
    elif task == "NutAssemblySquare" and env is not None and hasattr(env, "peg1_body_id"):
        base = SquareExpert(np.array(env.sim.data.body_xpos[env.peg1_body_id]))
    else:
        base = EXPERTS[task]()
    if style == "dart":
        return DARTExpert(base, task, seed)
    return MHExpert(base, task, seed) if style == "mh" else base


class ExpertPolicy:
    """The scripted expert as a ``predict_action`` policy (one expert per batch row).

    ``predict_action(obs_dict)``: values ``(B, T, D)`` (torch or numpy), the last step is used;
    returns ``(B, 1, 7)`` numpy. Use with ``n_action_steps = 1`` (the expert is closed-loop).
    ``reset()`` starts new episodes (the evaluator calls it before each batch of episodes).
    """

    def __init__(self, task: str, bin_target=None):
        self.task = task
        self.bin_target = bin_target
        self.experts: list[_Expert] = []

    def reset(self) -> None:
        self.experts = []

    def _new(self) -> _Expert:
        if canonical_task(self.task) == "PickPlaceCan" and self.bin_target is not None:
            return CanExpert(self.bin_target)
        return make_expert(self.task)

    def predict_action(self, obs_dict: dict) -> np.ndarray:
        obs = {k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for k, v in obs_dict.items()}
        b = next(iter(obs.values())).shape[0]
        while len(self.experts) < b:
            self.experts.append(self._new())
        out = np.zeros((b, 1, 7), dtype=np.float32)
        for i in range(b):
            out[i, 0] = self.experts[i].act({k: v[i, -1] for k, v in obs.items()})
        return out
