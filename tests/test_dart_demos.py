"""Noise-injected ("dart") demonstrations: clean labels, noisy execution, replay and recovery."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.sim, pytest.mark.xdist_group("dart_demos")]

N_DART = 6
EXPERT_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object")


@pytest.fixture(scope="module")
def lift_dart(tmp_path_factory):
    from jumpflow.envs.demos import generate_demos

    path = tmp_path_factory.mktemp("lift_dart") / "lift_dart.hdf5"
    summary = generate_demos(path, "Lift", n_demos=N_DART, seed=0, style="dart", progress=False)
    return path, summary


def test_dart_labels_are_the_clean_expert_and_execution_adds_its_noise(lift_dart):
    """Fed the stored observations, a fresh expert reseeded with the demo's seed gives exactly the
    stored labels, and its perturbation of each label is exactly the stored executed action: the
    labels carry no noise, the executed actions carry the drawn noise on the motion only."""
    import h5py

    from jumpflow.envs.experts import DART_NOISE, DART_TAU, DARTExpert, make_expert

    path, summary = lift_dart
    assert summary["style"] == "dart" and summary["n_demos"] == N_DART and "modes" not in summary
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["demo_style"] == "dart"
        noisy = 0
        for name in f["data"]:
            g = f[f"data/{name}"]
            labels, executed = g["actions"][()], g["executed_actions"][()]
            assert g.attrs["style"] == "dart" and "mode" not in g.attrs
            assert 0.0 <= g.attrs["noise_scale"] <= DART_NOISE["Lift"][0]
            assert DART_TAU[0] <= g.attrs["noise_tau"] <= DART_TAU[1]
            expert = make_expert("Lift", style="dart")
            assert isinstance(expert, DARTExpert)
            expert.reseed(int(g.attrs["seed"]))
            obs = [{k: g[f"obs/{k}"][t] for k in EXPERT_KEYS} for t in range(len(labels))]
            expert.reset(obs[0])
            for t in range(len(labels)):
                label = np.clip(expert.act(obs[t]), -1.0, 1.0)
                np.testing.assert_array_equal(label, labels[t], err_msg=f"{name} step {t}")
                np.testing.assert_array_equal(np.clip(expert.perturb(label), -1.0, 1.0), executed[t])
            np.testing.assert_array_equal(executed[:, 6], labels[:, 6])          # the gripper command is clean
            assert g.attrs["n_regrasps"] == expert.regrasps
            if g.attrs["noise_scale"] > 0.1:
                noisy += 1
                assert np.abs(executed[:, :3] - labels[:, :3]).mean() > 0.02     # the noise ran
        assert noisy >= 2


def test_dart_demo_replays_its_executed_actions_to_success(lift_dart):
    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.sim import RobosuiteSim

    path, _ = lift_dart
    with RobomimicFile(path) as rf:
        sim = RobosuiteSim(rf.env_meta, obs_keys=list(EXPERT_KEYS))
        for demo in rf.demo_names()[:3]:
            states, _ = rf.read_states(demo)
            executed = rf.data[demo]["executed_actions"][()]
            sim.reset_to(states[0])
            success = False
            for t, a in enumerate(executed):
                if 0 < t <= 50:     # later, contact chaos lets 1e-7 differences grow to ~1e-3 in long episodes
                    np.testing.assert_allclose(sim.get_state()[1:], states[t][1:], atol=1e-4, err_msg=f"{demo} {t}")
                _, _, success = sim.step(a)
            assert success, demo
        # the labels alone do not retrace the noisy episode (what a replay of `actions` would wrongly assume)
        demo = max(rf.demo_names(), key=lambda d: rf.data[d].attrs["noise_scale"])
        states, _ = rf.read_states(demo)
        sim.reset_to(states[0])
        for a in rf.data[demo]["actions"][()][:20]:
            sim.step(a)
        assert np.abs(sim.get_state()[1:] - states[20][1:]).max() > 1e-3
        sim.close()


def test_dart_expert_recovers_a_grasp_that_did_not_hold():
    """Lifting (phase 3) with the gripper far from the cube: the label re-opens and the expert
    re-approaches (phase 0) instead of lifting on without the cube."""
    from jumpflow.envs.experts import make_expert

    expert = make_expert("Lift", style="dart")
    expert.reseed(0)
    cube = np.array([0.0, 0.0, 0.83])
    obs = {"robot0_eef_pos": cube + [0.0, 0.0, 0.01], "robot0_eef_quat": np.array([1.0, 0.0, 0.0, 0.0]),
           "robot0_gripper_qpos": np.array([0.02, -0.02]), "object": np.r_[cube, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]}
    expert.reset(obs)
    expert.act(obs)                                       # first step queues the approach from above
    expert.segments.clear()
    expert.base._next(3)                                  # the expert believes it holds the cube
    expert.base.t_phase = 5
    far = dict(obs, robot0_eef_pos=cube + [0.0, 0.0, 0.10])
    a = expert.act(far)
    assert expert.regrasps == 1 and a[6] == -1.0          # open the hand
    while expert.segments:
        expert.act(far)
    assert expert.base.phase == 0                         # and approach the cube again
    near = dict(obs, robot0_eef_pos=cube + [0.0, 0.0, -0.003])
    expert.base._next(3)
    expert.base.t_phase = 5
    expert.act(near)
    assert expert.regrasps == 1                           # a held cube is lifted on


def test_dart_style_reaches_the_task_config():
    from jumpflow.errors import ConfigError
    from jumpflow.policy.task import DEMO_STYLES

    assert DEMO_STYLES == ("ph", "mh", "dart")
    from jumpflow.policy.task import PolicyTask
    with pytest.raises(ConfigError, match="ph, mh, dart"):
        PolicyTask(dataset="x.hdf5", env="Lift", demo_style="noisy")
