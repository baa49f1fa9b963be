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
"""

from __future__ import annotations

import numpy as np

POS_SCALE = 0.05          # metres per unit action (OSC_POSE output_max)
ROT_SCALE = 0.5           # radians per unit action


def _quat2mat(q: np.ndarray) -> np.ndarray:
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


def _yaw_of(rot: np.ndarray) -> float:
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def _wrap(a: float, period: float) -> float:
    """``a`` wrapped to ``[-period / 2, period / 2)``."""
    return float((a + period / 2) % period - period / 2)


class _Expert:
    """Shared P-controller in position and orientation, plus a phase counter."""

    pos_gain = 1.0
    rot_gain = 1.0

    def __init__(self):
        self.phase = 0
        self.t_phase = 0
        self.r_target = None

    def reset(self, obs: dict | None = None) -> None:
        self.phase, self.t_phase, self.r_target = 0, 0, None

    def _next(self, phase: int | None = None) -> None:
        self.phase = self.phase + 1 if phase is None else phase
        self.t_phase = 0

    def _action(self, obs: dict, target_pos: np.ndarray, grip: float, max_speed: float = 1.0) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        d_pos = np.clip(self.pos_gain * (target_pos - eef) / POS_SCALE, -max_speed, max_speed)
        r_cur = _quat2mat(obs["robot0_eef_quat"])
        aa = _mat2axisangle(self.r_target @ r_cur.T)
        d_rot = np.clip(self.rot_gain * aa / ROT_SCALE, -1.0, 1.0)
        return np.concatenate([d_pos, d_rot, [grip]]).astype(np.float64)

    def act(self, obs: dict) -> np.ndarray:
        raise NotImplementedError


class LiftExpert(_Expert):
    """Lift: ``object`` = cube_pos (3), cube_quat (4), gripper_to_cube_pos (3)."""

    hover = 0.08

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        cube = np.asarray(obs["object"][:3], dtype=np.float64)
        if self.r_target is None:
            r0 = _quat2mat(obs["robot0_eef_quat"])
            # rotate about world z by the smallest angle that aligns the fingers with a cube face
            cube_yaw = _yaw_of(_quat2mat(obs["object"][3:7]))
            d = (cube_yaw - _yaw_of(r0)) % (np.pi / 2)
            d = d - np.pi / 2 if d > np.pi / 4 else d
            self.r_target = _rot_z(d) @ r0
        self.t_phase += 1
        if self.phase == 0:                           # hover above the cube, gripper open
            target = cube + [0.0, 0.0, self.hover]
            err = target - eef
            if np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 or self.t_phase > 60:
                self._next()
            return self._action(obs, target, -1.0)
        if self.phase == 1:                           # descend to grasp height
            target = cube + [0.0, 0.0, -0.003]
            if np.linalg.norm(target - eef) < 0.01 or self.t_phase > 40:
                self._next()
            return self._action(obs, target, -1.0)
        if self.phase == 2:                           # close
            target = cube + [0.0, 0.0, -0.003]
            if self.t_phase >= 10:
                self._next()
            return self._action(obs, target, 1.0)
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

    def __init__(self, bin_target=(0.1975, 0.4025, 0.8)):
        super().__init__()
        self.bin_target = np.asarray(bin_target, dtype=np.float64)
        self._grasp_xy = None

    def reset(self, obs: dict | None = None) -> None:
        super().reset(obs)
        self._grasp_xy = None

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        can = np.asarray(obs["object"][:3], dtype=np.float64)
        if self.r_target is None:
            self.r_target = _quat2mat(obs["robot0_eef_quat"])
        self.t_phase += 1
        ph = self.phase
        if ph == 0:                                   # hover above the can
            target = can + [0.0, 0.0, 0.10]
            err = target - eef
            if np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.03 or self.t_phase > 60:
                self._next()
            return self._action(obs, target, -1.0)
        if ph == 1:                                   # descend
            target = can + [0.0, 0.0, 0.0]
            if np.linalg.norm(target - eef) < 0.01 or self.t_phase > 40:
                self._next()
            return self._action(obs, target, -1.0)
        if ph == 2:                                   # close
            if self.t_phase >= 10:
                self._next()
            return self._action(obs, can, 1.0)
        if ph == 3:                                   # lift straight up
            target = np.array([eef[0], eef[1], self.carry_z])
            if eef[2] > self.carry_z - 0.03 or self.t_phase > 60:
                self._next()
            return self._action(obs, target, 1.0)
        if ph == 4:                                   # carry over the target bin
            target = np.array([self.bin_target[0], self.bin_target[1], self.carry_z])
            if np.linalg.norm((target - eef)[:2]) < 0.02 or self.t_phase > 80:
                self._next()
            return self._action(obs, target, 1.0)
        if ph == 5:                                   # lower
            target = np.array([self.bin_target[0], self.bin_target[1], self.release_z])
            if abs(target[2] - eef[2]) < 0.015 or self.t_phase > 40:
                self._next()
            return self._action(obs, target, 1.0)
        if ph == 6:                                   # open
            target = np.array([self.bin_target[0], self.bin_target[1], self.release_z])
            if self.t_phase >= 8:
                self._next()
            return self._action(obs, target, -1.0)
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

    def __init__(self, peg=(0.23, 0.1, 0.85)):
        super().__init__()
        self.peg = np.asarray(peg, dtype=np.float64)
        self.r0 = None

    def reset(self, obs: dict | None = None) -> None:
        super().reset(obs)
        self.r0 = None

    def act(self, obs: dict) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        nut = np.asarray(obs["object"][:3], dtype=np.float64)
        r_nut = _quat2mat(obs["object"][3:7])
        r_eef = _quat2mat(obs["robot0_eef_quat"])
        grasp = nut + r_nut @ np.array([self.grasp_offset, 0.0, self.grasp_dz])
        nut_yaw = _yaw_of(r_nut)
        if self.r0 is None:
            self.r0 = r_eef
        self.t_phase += 1
        ph = self.phase
        if ph <= 2:            # fingers across the handle (symmetric under a half turn)
            self.r_target = _rot_z(_wrap(nut_yaw - _yaw_of(self.r0), np.pi)) @ self.r0
        else:                  # turn the nut to a multiple of 90 degrees (the peg's symmetry)
            d = _wrap(-nut_yaw, np.pi / 2)
            self.r_target = _rot_z(d) @ r_eef if abs(d) > 0.02 else r_eef
        if ph == 0:                                   # above the handle, yaw aligned
            target = grasp + [0.0, 0.0, 0.08]
            err = target - eef
            rot_err = np.linalg.norm(_mat2axisangle(self.r_target @ r_eef.T))
            if (np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02 and rot_err < 0.05) or self.t_phase > 100:
                self._next()
            return self._action(obs, target, -1.0)
        if ph == 1:                                   # descend around the handle
            if np.linalg.norm(grasp - eef) < 0.008 or self.t_phase > 40:
                self._next()
            return self._action(obs, grasp, -1.0)
        if ph == 2:                                   # close
            if self.t_phase >= 10:
                self._next()
            return self._action(obs, grasp, 1.0)
        if ph == 3:                                   # lift
            if eef[2] > self.carry_z - 0.03 or self.t_phase > 60:
                self._next()
            return self._action(obs, np.array([eef[0], eef[1], self.carry_z]), 1.0)
        if ph == 4:                                   # nut centre over the peg, nut square to it
            target = eef + np.r_[self.peg[:2] - nut[:2], 0.0]
            target[2] = self.carry_z
            aligned = abs(_wrap(-nut_yaw, np.pi / 2)) < 0.03
            if (np.linalg.norm((self.peg - nut)[:2]) < 0.005 and aligned) or self.t_phase > 100:
                self._next()
            return self._action(obs, target, 1.0, max_speed=0.6)
        if ph == 5:                                   # lower onto the peg, correcting xy
            target = eef + np.r_[self.peg[:2] - nut[:2], -0.03]
            if nut[2] < self.release_nut_z or self.t_phase > 60:
                self._next()
            return self._action(obs, target, 1.0, max_speed=0.5)
        if ph == 6:                                   # open
            if self.t_phase >= 8:
                self._next()
            return self._action(obs, eef, -1.0)
        return self._action(obs, np.array([eef[0], eef[1], self.carry_z]), -1.0)   # retreat


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert, "NutAssemblySquare": SquareExpert}


def make_expert(task: str, env=None) -> _Expert:
    """Expert for a robosuite task name (``Lift``, ``PickPlaceCan``, ``NutAssemblySquare``); ``env``:
    the raw robosuite env, used to read task constants (the can's target bin, the square peg)."""
    from jumpflow.envs.sim import canonical_task
    task = canonical_task(task)
    if task not in EXPERTS:
        raise ValueError(f"no scripted expert for task {task!r}; available: {sorted(EXPERTS)}")
    if task == "PickPlaceCan" and env is not None and hasattr(env, "target_bin_placements"):
        return CanExpert(env.target_bin_placements[env.object_to_id["can"]])
    if task == "NutAssemblySquare" and env is not None and hasattr(env, "peg1_body_id"):
        return SquareExpert(np.array(env.sim.data.body_xpos[env.peg1_body_id]))
    return EXPERTS[task]()


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
        from jumpflow.envs.sim import canonical_task
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
