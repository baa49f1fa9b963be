"""Lift / Can / Square rollout modes read back from states (jumpflow.envs.grasp_modes): the rule on hand-made
paths, the tracker's commit and re-read, and the sim's ``current_mode`` during a demo replay."""

from __future__ import annotations

import numpy as np
import pytest

HOVER = 0.08          # Lift's approach height above the cube (MH_TASKS["Lift"].hover)


def _quat_yaw(yaw: float) -> np.ndarray:
    """(x, y, z, w) of a gripper pointing down (180 deg about x), turned by ``yaw`` about z."""
    down = np.array([1.0, 0.0, 0.0, 0.0])                            # 180 deg about x
    turn = np.array([0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)])    # yaw about z
    x1, y1, z1, w1 = turn
    x2, y2, z2, w2 = down
    return np.array([w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2, w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                     w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2, w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2])


def _approach(side: float, start=(-0.1, 0.0, 0.19), n: int = 10) -> np.ndarray:
    """Gripper-minus-cube offsets: start -> the side point at hover + 3 cm -> above -> down to the cube."""
    side_point = np.array([0.0, side, HOVER + 0.03])
    legs = [np.linspace(start, side_point, n), np.linspace(side_point, [0.0, 0.0, HOVER], n),
            np.linspace([0.0, 0.0, HOVER], [0.0, 0.0, -0.003], n)]
    return np.concatenate(legs)


def test_grasp_label_splits_wrist_turns_at_45_degrees():
    from jumpflow.envs.grasp_modes import grasp_label, wrist_yaw

    assert grasp_label(np.radians(30)) == "yaw0" and grasp_label(np.radians(-44)) == "yaw0"
    assert grasp_label(np.radians(46)) == "yaw90" and grasp_label(np.radians(-120)) == "yaw90"
    assert grasp_label(2 * np.pi + 0.1) == "yaw0"                   # a full turn is no turn
    for yaw in (-2.0, -0.3, 0.0, 0.7, 2.5):
        assert wrist_yaw(_quat_yaw(yaw)) == pytest.approx(yaw, abs=1e-9)


@pytest.mark.parametrize(("side", "label"), [(0.08, "left"), (-0.05, "right"), (0.0, "above")])
def test_side_label_reads_the_last_approach(side, label):
    from jumpflow.envs.grasp_modes import side_label

    assert side_label(_approach(side), HOVER) == label


def test_side_label_ignores_the_start_and_detours_before_the_approach():
    from jumpflow.envs.grasp_modes import side_label

    # Can's start: the gripper begins 34 cm to the left of the can and crosses over it to a right approach
    crossing = _approach(-0.08, start=(-0.14, 0.34, HOVER + 0.045))
    assert side_label(crossing, HOVER) == "right"
    # a detour far to the right before a left approach
    detour = np.concatenate([np.linspace([-0.1, 0.0, 0.2], [-0.05, -0.15, 0.2], 5), _approach(0.1, start=(-0.05, -0.15, 0.2))])
    assert side_label(detour, HOVER) == "left"
    # never above hover + 2 cm: no approach to read
    assert side_label(np.array([[0.0, 0.1, 0.05], [0.0, 0.0, 0.0]]), HOVER) == "above"


def _obs(offset, cube_z: float, yaw: float, cube_xy=(0.0, 0.0)) -> dict:
    cube = np.array([cube_xy[0], cube_xy[1], cube_z])
    return {"robot0_eef_pos": cube + np.asarray(offset), "robot0_eef_quat": _quat_yaw(yaw),
            "object": np.r_[cube, 0.0, 0.0, 0.0, 1.0]}


def test_tracker_commits_at_lift_off_and_rereads_after_a_put_down():
    from jumpflow.envs.grasp_modes import GraspModeTracker

    z0 = 0.83
    tracker = GraspModeTracker("Lift")
    path = _approach(0.09)
    tracker.reset(_obs(path[0], z0, 0.1))
    for p in path[1:]:
        assert tracker.update(_obs(p, z0, 0.1)) is None             # on the table: no mode yet
    assert tracker.update(_obs([0, 0, -0.003], z0 + 0.002, 0.1)) is None     # not lifted enough
    assert tracker.update(_obs([0, 0, 0.05], z0 + 0.01, 0.1)) is None        # lifted, gripper away: not a grasp
    assert tracker.update(_obs([0, 0, -0.003], z0 + 0.01, 0.1)) == "yaw0_left"
    # set down while still held: the same grasp
    assert tracker.update(_obs([0, 0, -0.003], z0, 0.1)) == "yaw0_left"
    # let go, come back from the right with the wrist turned a quarter, lift: a new mode
    for p in _approach(-0.07, start=(0.0, 0.0, 0.2)):
        assert tracker.update(_obs(p, z0, 1.6)) == "yaw0_left"
    assert tracker.update(_obs([0, 0, -0.003], z0 + 0.01, 1.6)) == "yaw90_right"
    tracker.reset(_obs(path[0], z0, 0.0))
    assert tracker.mode is None
    with pytest.raises(ValueError, match="Lift, PickPlaceCan, NutAssemblySquare; got 'Stack'"):
        GraspModeTracker("Stack")


def test_handle_grasp_label_measures_the_turn_from_the_nearer_handle_turn():
    """Square's handle is symmetric under half a wrist turn: of the two turns that put the fingers
    across it, the one within 90 degrees of zero is ``yaw0``, the other ``yaw180``."""
    from jumpflow.envs.grasp_modes import handle_grasp_label

    deg = np.radians
    assert handle_grasp_label(deg(30), deg(30)) == "yaw0" and handle_grasp_label(deg(-150), deg(30)) == "yaw180"
    # the nut at 100 degrees: the nearer turn is -80, the other +100
    assert handle_grasp_label(deg(-80), deg(100)) == "yaw0" and handle_grasp_label(deg(100), deg(100)) == "yaw180"
    assert handle_grasp_label(deg(-80 + 360), deg(100)) == "yaw0"              # a full turn more is the same grasp
    assert handle_grasp_label(deg(5), deg(-170)) == "yaw0"                      # -170 is +10 for the handle


def _square_obs(eef, nut_z: float, nut_yaw: float, wrist_yaw: float) -> dict:
    nut = np.array([0.0, 0.0, nut_z])
    quat = np.array([0.0, 0.0, np.sin(nut_yaw / 2), np.cos(nut_yaw / 2)])
    return {"robot0_eef_pos": np.asarray(eef, dtype=np.float64), "robot0_eef_quat": _quat_yaw(wrist_yaw),
            "object": np.r_[nut, quat, np.zeros(7)]}


def test_square_tracker_reads_the_side_from_the_handle_not_the_nut_centre():
    """The nut turned 80 degrees puts its handle 6.5 cm to the left (+y) of its centre; a gripper that
    comes down 5 cm to the right of the handle is still left of the centre, and the rule reads
    ``right``, the side the Square expert's approach point is drawn on. The wrist's half turn from the
    nearer handle turn is ``yaw180``."""
    from jumpflow.envs.experts import MH_TASKS, SquareExpert
    from jumpflow.envs.grasp_modes import GraspModeTracker

    z0, nut_yaw = 0.83, np.radians(80)
    hover = MH_TASKS["NutAssemblySquare"].hover
    handle = SquareExpert.handle_point(np.r_[0.0, 0.0, z0, 0.0, 0.0, np.sin(nut_yaw / 2), np.cos(nut_yaw / 2)])
    assert handle[:2] == pytest.approx(SquareExpert.grasp_offset * np.array([np.cos(nut_yaw), np.sin(nut_yaw)]), abs=1e-12)
    side_point = handle + [0.0, -0.05, hover + 0.03]
    path = np.concatenate([np.linspace(handle + [-0.1, 0.0, 0.2], side_point, 8),
                           np.linspace(side_point, handle + [0.0, 0.0, hover], 8),
                           np.linspace(handle + [0.0, 0.0, hover], handle, 8)])
    assert (path[:, 1] > 0.0).all()                            # never right of the nut's centre
    turn = nut_yaw - np.pi                                     # nearer turn +80, this one -100
    tracker = GraspModeTracker("NutAssemblySquare")
    tracker.reset(_square_obs(path[0], z0, nut_yaw, 0.0))
    for p in path[1:]:
        assert tracker.update(_square_obs(p, z0, nut_yaw, 0.4 * turn)) is None
    assert tracker.update(_square_obs(handle + [0, 0, 0.01], z0 + 0.01, nut_yaw, turn)) == "yaw180_right"


def test_an_episode_that_switches_grasps_counts_one_switch():
    from jumpflow.envs.grasp_modes import GraspModeTracker
    from jumpflow.eval.modes import mode_switches

    z0, tracker, seq = 0.83, GraspModeTracker("Lift"), []
    tracker.reset(_obs([-0.1, 0, 0.19], z0, 0.0))
    for side, yaw in ((0.08, 0.0), (-0.08, 0.0)):
        for p in _approach(side, start=(0.0, 0.0, 0.2)):
            seq.append(tracker.update(_obs(p, z0, yaw)))
        seq.append(tracker.update(_obs([0, 0, -0.003], z0 + 0.01, yaw)))
        seq.append(tracker.update(_obs([0, 0, -0.003], z0, yaw)))
    assert seq[-1] == "yaw0_right" and "yaw0_left" in seq
    assert mode_switches(seq) == 1


def test_square_and_lift_sims_track_modes():
    """The sim labels modes where the mh demos do (Lift, Can, Square): ``tracks_modes`` true and
    ``current_mode`` ``None`` until the object leaves the table in the hand."""
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta

    for task in ("NutAssemblySquare", "Lift"):
        sim = RobosuiteSim(default_env_meta(task), obs_keys=("robot0_eef_pos",))
        try:
            sim.reset(seed=0)
            for _ in range(3):
                sim.step(np.zeros(7))
            assert sim.tracks_modes is True
            assert sim.current_mode() is None      # nothing lifted yet
        finally:
            sim.close()


@pytest.mark.sim
def test_square_mh_demos_read_back_their_drawn_modes(tmp_path):
    """Five NutAssemblySquare mh demos from seed 0 (both grasps, both sides, a missed grasp "high"
    above the handle; none of the "beside" misses whose re-approach may come from the other side):
    the rule gives each drawn mode from the stored states, and the sim gives the half-turn grasp's
    while its actions are replayed from its first state."""
    import h5py

    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.demos import generate_demos
    from jumpflow.envs.grasp_modes import MODE_OBS_KEYS, episode_grasp_mode
    from jumpflow.envs.sim import RobosuiteSim

    path = tmp_path / "square_mh.hdf5"
    generate_demos(path, "NutAssemblySquare", n_demos=5, seed=0, style="mh", progress=False)
    with h5py.File(path, "r") as f:
        demos = [f[f"data/demo_{i}"] for i in range(5)]
        drawn = [g.attrs["mode"] for g in demos]
        read = [episode_grasp_mode("NutAssemblySquare",
                                   {k: np.concatenate([g["obs"][k][()], g["next_obs"][k][-1:]]) for k in MODE_OBS_KEYS})
                for g in demos]
        assert not any(g.attrs["miss_kind"] == "beside" for g in demos)
    assert read == drawn
    assert {m.split("_")[0] for m in drawn} == {"yaw0", "yaw180"} and {m.split("_")[1] for m in drawn} == {"left", "right"}
    demo = drawn.index(next(m for m in drawn if m.startswith("yaw180")))
    with RobomimicFile(path) as rf:
        sim = RobosuiteSim(rf.env_meta, obs_keys=("robot0_eef_pos",))
        try:
            states, xml = rf.read_states(f"demo_{demo}")
            sim.reset_to(states[0], xml)
            for a in rf.data[f"demo_{demo}"]["actions"][()]:
                sim.step(a)
            assert sim.current_mode() == drawn[demo]
        finally:
            sim.close()
