"""Behaviour modes of a pick rollout on Lift, PickPlaceCan and NutAssemblySquare, read from the
states it visits.

The mh experts (:mod:`jumpflow.envs.experts`, ``MHStyle.mode``) label each demo with the grasp and
the approach they drew: ``"yaw<0|90>_<left|right>"``, the extra wrist turn of an equivalent grasp
(0: the ph grasp, 90: the other pair of faces / a quarter turn round the can) and the side the
gripper comes in from (``left``: +y, ``right``: -y, offset 5-12 cm from the object at
``hover + 3 cm`` above it). A policy's rollout carries no such label, so the evaluator reads one back
from what the arm did, the way the Block Push sim reads ``b<i>t<j>`` from which block reached which
target. Square's demos draw ``"yaw<0|180>_<left|right>"``: fingers across the nut's handle by the
nearer of the two wrist turns that do it, or by the other one half a turn away, and the side as
above, measured from the handle (where the gripper closes) rather than the nut's centre. The rule,
fixed when the object first leaves the table in the hand:

- **grasp**: the wrist's yaw turn since the episode began, ``|turn| > 45 deg`` -> ``yaw90``, else
  ``yaw0`` (the expert's own turns are ``d`` with ``|d| <= 45 deg`` for the ph grasp and ``d +- 90``
  for the other one, so only a ph grasp turned by almost exactly 45 degrees is ambiguous); Square:
  the turn against the nearer handle turn ``d = wrap(nut yaw - wrist yaw, 180 deg)`` at the start,
  more than 90 degrees from it -> ``yaw180``, else ``yaw0``;
- **side**: from the last step at which the gripper was above ``hover + 2 cm`` over the object,
  back in time to the first step at which it was at least ``SIDE_OFFSET`` to one side in y: the
  sign of that offset (``left`` / ``right``), or ``above`` when it came straight down (a mode no
  demo shows: what averaging the two sides gives).

Lift-off: the object ``LIFT_OFF`` above where it started with the gripper within ``HOLD_RADIUS``
of it. Put down (back within ``LIFT_OFF / 2`` of its start height), let go (the gripper further
than ``HOLD_RADIUS`` from it) and lifted again, the mode is read anew, so a re-grasp the other way
counts as a mode switch. ``python -m bench.experts --style mh`` reports how often the rule reads
back the mode each expert episode drew (``mode_read_back_rate``); the rare misses are wrist turns
within a fraction of a degree of 45 (both labels fit) and a re-approach from the other side after a
deliberate miss beside the cube (the last approach is not the drawn one). The rule is tested on
hand-made paths (``tests/test_grasp_modes.py``) and on demos the experts write
(``tests/test_mh_demos.py``).
"""

from __future__ import annotations

import numpy as np

from jumpflow.envs.experts import MH_TASKS, SquareExpert, quat2mat, wrap_angle, yaw_of

LIFT_OFF = 0.004         # metres above the start height: the object has left the table
HOLD_RADIUS = 0.03       # metres, gripper to grasp point (object centre; Square: handle), for a lift-off to count as a grasp
SIDE_OFFSET = 0.03       # metres of y offset that decide the approach side
ABOVE_MARGIN = 0.02      # the approach is read below ``hover + 3 cm``: from ``hover + ABOVE_MARGIN``
GRASP_MODE_TASKS = ("Lift", "PickPlaceCan", "NutAssemblySquare")
MODE_OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "object")   # what the rule reads, robomimic keys


def wrist_yaw(eef_quat: np.ndarray) -> float:
    """Yaw (radians) of the gripper frame from robosuite's ``(x, y, z, w)`` quaternion."""
    return yaw_of(quat2mat(np.asarray(eef_quat, dtype=np.float64)))


def grasp_label(turn: float) -> str:
    """``"yaw90"`` if the wrist turned more than 45 degrees (``turn`` radians), else ``"yaw0"``."""
    return "yaw90" if abs(wrap_angle(float(turn), 2 * np.pi)) > np.pi / 4 else "yaw0"


def handle_grasp_label(turn: float, nut_yaw_from_start: float) -> str:
    """Square: ``"yaw180"`` if the wrist's turn (radians since the episode began) is more than 90
    degrees from the nearer of the two turns that put the fingers across the handle (the handle is
    symmetric under a half turn of the wrist), else ``"yaw0"``. ``nut_yaw_from_start``: the nut's
    yaw minus the wrist's at the start, radians."""
    nearer = wrap_angle(float(nut_yaw_from_start), np.pi)
    return "yaw180" if abs(wrap_angle(float(turn) - nearer, 2 * np.pi)) > np.pi / 2 else "yaw0"


def side_label(offsets: np.ndarray, hover: float) -> str:
    """Approach side from the gripper's offsets to the object before the grasp.

    Args:
        offsets: ``(T, 3)`` gripper minus object centre, metres, oldest first, up to the grasp.
        hover: the task's approach height above the object (``MH_TASKS[task].hover``).
    Returns:
        ``"left"`` (+y), ``"right"`` (-y) or ``"above"`` (never ``SIDE_OFFSET`` to a side on the way
        down, or never above ``hover + ABOVE_MARGIN``).
    """
    offsets = np.asarray(offsets, dtype=np.float64).reshape(-1, 3)
    high = np.flatnonzero(offsets[:, 2] > hover + ABOVE_MARGIN)
    if high.size == 0:
        return "above"
    for dy in offsets[high[-1]::-1, 1]:
        if abs(dy) >= SIDE_OFFSET:
            return "left" if dy > 0 else "right"
    return "above"


class GraspModeTracker:
    """Reads ``"yaw<0|90>_<left|right|above>"`` from a Lift / PickPlaceCan episode step by step
    (``"yaw<0|180>_..."`` from a NutAssemblySquare one).

    ``reset(obs)`` at the episode's first observation, ``update(obs)`` after every step (robomimic
    keys ``robot0_eef_pos`` (3,), ``robot0_eef_quat`` (4,), ``object`` (>= 3,; Square >= 7,): the
    object's centre first, then its quaternion); ``mode`` is the mode of the latest grasp, ``None``
    before the first.
    """

    def __init__(self, task: str):
        if task not in GRASP_MODE_TASKS:
            raise ValueError(f"grasp modes are defined for {', '.join(GRASP_MODE_TASKS)}; got {task!r}")
        self.hover = MH_TASKS[task].hover
        self.square = task == "NutAssemblySquare"
        self.mode: str | None = None
        self._offsets: list[np.ndarray] = []
        self._start_z = self._start_yaw = self._start_nut_yaw = 0.0
        self._held = False

    def reset(self, obs: dict) -> None:
        self.mode, self._held, self._offsets = None, False, []
        self._start_z = float(obs["object"][2])
        self._start_yaw = wrist_yaw(obs["robot0_eef_quat"])
        # Square: the nut's yaw where the expert chose its turn (the episode's start); read at the grasp
        # instead, a nut nudged across the +-90 degree boundary on the way in would flip the label
        self._start_nut_yaw = yaw_of(quat2mat(obs["object"][3:7])) if self.square else 0.0
        self._observe(obs)

    def update(self, obs: dict) -> str | None:
        offset = self._observe(obs)
        lifted = float(obs["object"][2]) - self._start_z
        if not self._held and lifted > LIFT_OFF and np.linalg.norm(offset) < HOLD_RADIUS:
            self._held = True
            turn = wrist_yaw(obs["robot0_eef_quat"]) - self._start_yaw
            if self.square:
                grasp = handle_grasp_label(turn, self._start_nut_yaw - self._start_yaw)
            else:
                grasp = grasp_label(turn)
            self.mode = f"{grasp}_{side_label(np.array(self._offsets), self.hover)}"
        elif self._held and lifted < LIFT_OFF / 2 and np.linalg.norm(offset) > HOLD_RADIUS:
            self._held, self._offsets = False, []        # put down and let go: the next grasp is read anew
        return self.mode

    def _observe(self, obs: dict) -> np.ndarray:
        """Gripper minus grasp point (the object's centre; Square: the handle point), metres."""
        target = (SquareExpert.handle_point(obs["object"]) if self.square
                  else np.asarray(obs["object"][:3], dtype=np.float64))
        offset = np.asarray(obs["robot0_eef_pos"], dtype=np.float64) - target
        self._offsets.append(offset)
        return offset


def episode_grasp_mode(task: str, observations: dict) -> str | None:
    """The mode :class:`GraspModeTracker` reads from one stored episode.

    Args:
        task: ``Lift``, ``PickPlaceCan`` or ``NutAssemblySquare``.
        observations: ``{key: (T, D)}`` with ``robot0_eef_pos``, ``robot0_eef_quat`` and ``object``
            for the episode's states in order (a demo's ``obs`` followed by its last ``next_obs``).
    """
    tracker = GraspModeTracker(task)
    steps = len(observations["object"])
    tracker.reset({k: observations[k][0] for k in MODE_OBS_KEYS})
    for t in range(1, steps):
        tracker.update({k: observations[k][t] for k in MODE_OBS_KEYS})
    return tracker.mode
