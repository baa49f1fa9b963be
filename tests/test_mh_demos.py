"""Human-like ("mh") demonstrations: the style draw, its noise, the stored attributes, and the ph default unchanged."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytestmark = [pytest.mark.sim, pytest.mark.xdist_group("mh_demos")]   # one worker builds the module fixture

N_MH = 24                    # real Lift mh episodes generated once for this module (~15 s)
LIFT_MODES = {"yaw0_left", "yaw0_right", "yaw90_left", "yaw90_right"}
# sha256 of round(actions, 6) of ph Lift demos seeds 0 and 1, taken before the mh style was added
# (robosuite 1.4.1, mujoco 3.9.0): the scripted expert's actions must never change
PH_LIFT_ACTION_SHA256 = {
    0: "ab307dfa31588f95b4af3799b75785961b23e5562358cf857a0060fe01025360",
    1: "9771f5b96437312d54e94703837b7b9d9f3262301fc20fd83e251bc9f4bbea9c",
}


def _within_binomial(count: int, n: int, p: float, z: float = 4.0) -> bool:
    return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def lift_mh(tmp_path_factory):
    from jumpflow.envs.demos import generate_demos

    path = tmp_path_factory.mktemp("lift_mh") / "lift_mh.hdf5"
    summary = generate_demos(path, "Lift", n_demos=N_MH, seed=0, style="mh", progress=False)
    return path, summary


# ---------------------------------------------------------------------------- the draw and the noise
def test_style_draw_mixture_over_1000_draws():
    from jumpflow.envs.experts import MH_QUALITIES, draw_mh_style

    rng = np.random.default_rng(123)
    styles = [draw_mh_style("lift", rng) for _ in range(1000)]
    modes = [s.mode for s in styles]
    assert set(modes) == LIFT_MODES
    for m in LIFT_MODES:                                    # 4 grasp x side modes, 1/4 each
        assert _within_binomial(modes.count(m), 1000, 0.25), (m, modes.count(m))
    assert _within_binomial(sum(s.grasp_yaw == 90 for s in styles), 1000, 0.5)
    assert _within_binomial(sum(s.side == "left" for s in styles), 1000, 0.5)
    for q in MH_QUALITIES:
        assert _within_binomial(sum(s.quality == q for s in styles), 1000, 1 / 3)
    p_miss = (0.10 + 0.20 + 0.35) / 3
    assert _within_binomial(sum(s.missed for s in styles), 1000, p_miss)
    assert all(s.miss_kind in ("high", "beside") for s in styles if s.missed)
    assert all(s.miss_kind == "" for s in styles if not s.missed)
    assert {s.n_pauses for s in styles} == {0, 1, 2, 3} and {s.n_via for s in styles} == {0, 1, 2}
    assert all(0.45 <= s.speed <= 1.0 and 0.7 <= s.pos_gain <= 1.4 for s in styles)
    assert all(s.carry_via is None for s in styles)         # Lift carries nothing anywhere
    # every drawn correlation time gives a lag-1 autocorrelation above 0.8
    assert min(np.exp(-1.0 / s.noise_tau) for s in styles) > 0.8
    square = [draw_mh_style("square", rng) for _ in range(400)]
    assert {s.grasp_yaw for s in square} == {0, 180}
    assert _within_binomial(sum(s.grasp_yaw == 180 for s in square), 400, 0.5)
    assert _within_binomial(sum(s.carry_via is not None for s in square), 400, 0.5)


def test_style_draw_is_a_function_of_the_seed():
    from jumpflow.envs.experts import draw_mh_style

    a = draw_mh_style("can", np.random.default_rng(7))
    b = draw_mh_style("can", np.random.default_rng(7))
    c = draw_mh_style("can", np.random.default_rng(8))
    assert a == b and a != c


def test_ou_noise_is_temporally_correlated():
    from jumpflow.envs.experts import OUNoise

    tau, sigma = 8.0, 0.1                                   # the shortest correlation time drawn
    noise = OUNoise([sigma] * 6, tau, np.random.default_rng(0))
    x = np.stack([noise.step() for _ in range(6000)])
    x = x - x.mean(axis=0)
    lag1 = (x[1:] * x[:-1]).sum(axis=0) / (x * x).sum(axis=0)
    assert np.all(lag1 > 0.8), lag1
    np.testing.assert_allclose(lag1, np.exp(-1.0 / tau), atol=0.03)
    np.testing.assert_allclose(x.std(axis=0), sigma, rtol=0.15)      # stationary std is sigma
    # per-step increments are much smaller than the noise itself: smooth, not white
    assert np.all(np.diff(x, axis=0).std(axis=0) < 0.6 * x.std(axis=0))
    with pytest.raises(ValueError, match="tau"):
        OUNoise([0.1], 0.0, np.random.default_rng(0))


# ---------------------------------------------------------------------------- real mh demos
def test_mh_lift_demos_store_their_style(lift_mh):
    import h5py

    path, summary = lift_mh
    assert summary["style"] == "mh" and summary["n_demos"] == N_MH
    assert sum(summary["modes"].values()) == N_MH
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["demo_style"] == "mh"
        for i in range(N_MH):
            g = f[f"data/demo_{i}"]
            at = dict(g.attrs)
            assert at["success"] and at["style"] == "mh" and at["mode"] in LIFT_MODES
            assert at["mode"] == f"yaw{at['grasp_yaw']}_{at['side']}"
            assert at["quality"] in ("better", "okay", "worse")
            for key in ("speed", "pos_gain", "rot_gain", "noise_scale", "noise_tau", "patience"):
                assert np.isfinite(at[key]) and at[key] > 0, key
            for key in ("n_pauses", "n_pauses_taken", "pause_steps", "n_via"):
                assert int(at[key]) >= 0, key
            assert isinstance(at["missed"], (bool, np.bool_))
            actions = g["actions"][()]
            assert np.abs(actions).max() <= 1.0
            # pauses are held still: at least that many steps command no motion at all
            still = np.all(actions[:, :6] == 0.0, axis=1).sum()
            assert still >= at["pause_steps"]
            # a missed grasp closes, re-opens and closes again; otherwise the gripper closes once
            closes = int(np.sum((actions[1:, 6] > 0) & (actions[:-1, 6] < 0)))
            assert closes == (2 if at["missed"] else 1), (i, closes, at["missed"])


def test_mh_lift_mixture_and_variety(lift_mh):
    import h5py

    path, _ = lift_mh
    with h5py.File(path, "r") as f:
        attrs = [dict(f[f"data/demo_{i}"].attrs) for i in range(N_MH)]
        lengths = [f[f"data/demo_{i}/actions"].shape[0] for i in range(N_MH)]
        yaw_turns = []
        for i in range(N_MH):
            q = f[f"data/demo_{i}/obs/robot0_eef_quat"][()]
            yaw_turns.append(_yaw(q[-1]) - _yaw(q[0]))
    modes = [a["mode"] for a in attrs]
    assert len(set(modes)) >= 3
    assert _within_binomial(sum(a["grasp_yaw"] == 90 for a in attrs), N_MH, 0.5, z=3.0)
    assert _within_binomial(sum(a["side"] == "left" for a in attrs), N_MH, 0.5, z=3.0)
    assert any(a["missed"] for a in attrs) and any(a["pause_steps"] > 0 for a in attrs)
    assert any(a["n_via"] > 0 for a in attrs)
    assert len({a["quality"] for a in attrs}) == 3
    # the grasp choice is real: yaw0 turns the wrist by at most 45 degrees to the nearer cube faces,
    # yaw90 by 45-135 degrees to the other pair
    turn = np.abs((np.array(yaw_turns) + np.pi) % (2 * np.pi) - np.pi)
    yaw90 = np.array([a["grasp_yaw"] == 90 for a in attrs])
    assert turn[yaw90].mean() > turn[~yaw90].mean() + 0.4, (turn[yaw90], turn[~yaw90])
    assert np.std(lengths) > 5                              # operators differ in pace


def _yaw(q_xyzw: np.ndarray) -> float:
    x, y, z, w = q_xyzw
    return float(np.arctan2(2 * (x * y + z * w), 1 - 2 * (y * y + z * z)))


def test_rollout_modes_read_back_the_drawn_modes(lift_mh):
    """The grasp-mode rule (jumpflow.envs.grasp_modes) gives the mode each demo drew, from its
    stored observations and from the sim while the demo's actions are replayed from its first state."""
    import h5py

    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.grasp_modes import MODE_OBS_KEYS, episode_grasp_mode
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.envs.sim import RobosuiteSim

    path, _ = lift_mh
    with h5py.File(path, "r") as f:
        drawn, read = [], []
        for i in range(N_MH):
            g = f[f"data/demo_{i}"]
            obs = {k: np.concatenate([g["obs"][k][()], g["next_obs"][k][-1:]]) for k in MODE_OBS_KEYS}
            drawn.append(g.attrs["mode"])
            read.append(episode_grasp_mode("Lift", obs))
    agree = [a == b for a, b in zip(drawn, read)]
    assert sum(agree) >= N_MH - 2, list(zip(drawn, read))    # misses: wrist turns within a degree of 45
    demo = int(np.argmax(agree))
    with RobomimicFile(path) as rf:
        sim = RobosuiteSim(rf.env_meta, obs_keys=("robot0_eef_pos",))
        assert sim.tracks_modes and sim.current_mode() is None
        states, xml = rf.read_states(f"demo_{demo}")
        sim.reset_to(states[0], xml)
        for a in rf.data[f"demo_{demo}"]["actions"][()]:
            sim.step(a)
        assert sim.current_mode() == drawn[demo]
        sim.reset(seed=0)
        assert sim.current_mode() is None
        sim.close()
        env = RobomimicGymEnv(rf.env_meta, obs_keys=["robot0_eef_pos"], n_obs_steps=1, n_action_steps=8,
                              max_steps=10)
        _, info = env.reset(seed=0)
        assert info["mode"] is None and info["mode_switches"] == 0
        env.close()


def test_mh_demos_deterministic_by_seed_via_cli_and_workers(tmp_path, lift_mh):
    """The CLI with two worker processes writes exactly the demos one process wrote (every array
    and attribute of each demo), in seed order."""
    import h5py

    from jumpflow.envs.demos import main

    out = tmp_path / "mh2.hdf5"
    assert main(["--task", "lift", "--style", "mh", "--n-demos", "3", "--out", str(out), "--no-progress",
                 "--workers", "2"]) == 0
    with h5py.File(out, "r") as a, h5py.File(lift_mh[0], "r") as b:
        assert list(a["data"]) == ["demo_0", "demo_1", "demo_2"]
        for n in ("demo_0", "demo_1", "demo_2"):
            ga, gb = a[f"data/{n}"], b[f"data/{n}"]
            # robosuite's model XML lists the robot's visual meshes differently (.stl vs .obj sets)
            # depending on what the process built before, so a fresh worker and this long-lived
            # test process write different ``model_file`` text for the same scene; every other
            # attribute and every array (states, actions, observations) must be equal
            without_xml = [{k: v for k, v in g.attrs.items() if k != "model_file"} for g in (ga, gb)]
            assert without_xml[0] == without_xml[1] and "model_file" in ga.attrs
            keys = []
            ga.visititems(lambda k, obj, keys=keys: keys.append(k) if isinstance(obj, h5py.Dataset) else None)
            assert keys
            for k in keys:
                np.testing.assert_array_equal(ga[k][()], gb[k][()], err_msg=f"{n}/{k}")


def test_workers_must_be_positive(tmp_path):
    from jumpflow.envs.demos import generate_demos

    with pytest.raises(ValueError, match="workers"):
        generate_demos(tmp_path / "x.hdf5", "Lift", n_demos=1, workers=0)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- ph unchanged, bad input
def test_ph_default_unchanged(lift_demos):
    """The default style is ph, its files carry no style attributes, and its actions are exactly
    the scripted expert's (the same code path, and a hash taken before mh existed)."""
    import h5py

    from jumpflow.envs.demos import run_expert_episode
    from jumpflow.envs.experts import LiftExpert, make_expert
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta

    sim = RobosuiteSim(default_env_meta("Lift"))
    assert type(make_expert("Lift", sim.env)) is LiftExpert
    with h5py.File(lift_demos, "r") as f:
        assert "demo_style" not in f["data"].attrs
        for seed in (0, 1):
            g = f[f"data/demo_{seed}"]
            assert set(g.attrs) == {"num_samples", "model_file", "seed", "success"}
            stored = g["actions"][()]
            ep = run_expert_episode(sim, LiftExpert(), seed, 400)
            assert "attrs" not in ep
            np.testing.assert_array_equal(ep["actions"], stored)
            digest = hashlib.sha256((np.round(stored, 6) + 0.0).tobytes()).hexdigest()
            assert digest == PH_LIFT_ACTION_SHA256[seed], f"ph Lift seed {seed} actions changed"
    sim.close()


def test_unknown_style_one_line_and_nothing_written(tmp_path, capsys, lift_demos):
    from jumpflow.envs.demos import ensure_demos, generate_demos, main
    from jumpflow.envs.experts import make_expert

    out = tmp_path / "sub" / "x.hdf5"
    assert main(["--task", "lift", "--style", "human", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--style" in err and "ph, mh" in err and "'human'" in err
    for call in (lambda: generate_demos(out, "Lift", n_demos=1, style="human", progress=False),
                 lambda: ensure_demos(out, "Lift", n_demos=1, style="human"),
                 lambda: make_expert("Lift", style="human")):
        with pytest.raises(ValueError, match="ph, mh") as info:
            call()
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="holds ph demos, asked for mh"):
        ensure_demos(lift_demos, "lift", n_demos=3, style="mh")
