"""MetaWorld v3 as a simulator family: names, task set, sim, scripted-policy demos, replay, evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jumpflow.envs.rendering import select_gl_backend

select_gl_backend()                     # before MetaWorld imports MuJoCo (which reads MUJOCO_GL once)
pytest.importorskip("metaworld")

PUSH = "push-v3"
BUTTON = "button-press-v3"


# ---------------------------------------------------------------------------- names and task set (no simulator)
def test_unknown_task_name_is_one_line_listing_the_valid_names(tmp_path, monkeypatch):
    import metaworld.env_dict

    from jumpflow.envs.demos import ensure_demos, generate_demos
    from jumpflow.envs.registry import make_sim

    built = []
    monkeypatch.setattr(metaworld.env_dict, "ALL_V3_ENVIRONMENTS",
                        {k: (lambda *a, _c=v, **kw: built.append(1) or _c(*a, **kw))
                         for k, v in metaworld.env_dict.ALL_V3_ENVIRONMENTS.items()})
    for call in (lambda: make_sim({"env_name": "push-v2", "type": "metaworld", "env_kwargs": {}}),
                 lambda: make_sim(json.dumps({"env_name": "pushh-v3", "type": "metaworld"})),
                 lambda: generate_demos(tmp_path / "a.hdf5", task="metaworld:pushh-v3", n_demos=1, progress=False),
                 lambda: ensure_demos(tmp_path / "b.hdf5", task="door-opne-v3", n_demos=1)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "unknown MetaWorld task" in msg
        assert "push-v3" in msg and "reach-v3" in msg and "stick-pull-v3" in msg
    assert built == [] and not list(tmp_path.iterdir())          # nothing was built or written


def test_task_set_spans_the_difficulty_groups():
    from metaworld.policies import ENV_POLICY_MAP

    from jumpflow.envs.metaworld_env import GROUPS, TASK_SET, task_group, task_names

    names = task_names()
    assert len(names) == 50 and set(names) == set(ENV_POLICY_MAP)
    assert len(TASK_SET) >= 10 and set(TASK_SET) <= set(names)
    assert set(TASK_SET.values()) == set(GROUPS)
    assert all(task_group(t) == g for t, g in TASK_SET.items())
    counts = {g: sum(task_group(n) == g for n in names) for g in GROUPS}
    assert counts == {"easy": 28, "medium": 11, "hard": 6, "very_hard": 5}      # Seo et al. 2022's split


def test_task_names_route_to_metaworld_without_importing_it():
    from jumpflow.envs.metaworld_env import looks_like_metaworld

    assert looks_like_metaworld("push-v3") and looks_like_metaworld("metaworld:push-v3")
    assert looks_like_metaworld("door-open-v2")                  # then rejected with the valid list
    assert not any(looks_like_metaworld(t) for t in ("Lift", "lift", "BlockPush", "reach_around", "square"))


# ---------------------------------------------------------------------------- simulator
@pytest.mark.sim
def test_sim_from_registry_interface_and_seeded_resets():
    from jumpflow.envs.metaworld_env import LOWDIM_KEYS, MetaWorldSim, metaworld_env_meta
    from jumpflow.envs.registry import make_sim

    meta = metaworld_env_meta(PUSH)
    assert meta["type"] == "metaworld" and meta["env_kwargs"]["control_freq"] == 80.0
    sim = make_sim(meta)
    assert isinstance(sim, MetaWorldSim) and sim.action_dim == 4 and sim.get_model_xml() == ""
    a, b, c = sim.reset(7), sim.reset(7), sim.reset(8)
    assert sorted(a) == sorted(LOWDIM_KEYS)
    assert a["state"].shape == (39,) and a["hand_pos"].shape == (3,) and a["gripper"].shape == (1,)
    assert a["obj_state"].shape == (14,) and a["goal_pos"].shape == (3,)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["obj_state"][:3], c["obj_state"][:3]) and not np.allclose(a["goal_pos"], c["goal_pos"])
    np.testing.assert_array_equal(a["state"][:18], a["state"][18:36])          # previous frame = current at reset
    assert np.abs(a["goal_pos"]).sum() > 0                                     # goal observable by default
    assert not sim.is_success() and sim.get_state().shape == (sim.state_dim,)
    obs, reward, success = sim.step(np.array([1.0, 0.0, 0.0, -1.0]))
    assert obs["hand_pos"][0] > c["hand_pos"][0] and np.isfinite(reward) and success is False
    np.testing.assert_array_equal(obs["state"][18:36], c["state"][:18])          # the last reset's frame
    with pytest.raises(ValueError, match="action has 2 dims"):
        sim.step(np.zeros(2))
    with pytest.raises(ValueError, match=r"state has shape \(3,\)"):
        sim.reset_to(np.zeros(3))
    with pytest.raises(ValueError, match=r"observation keys \['object'\] are not produced"):
        make_sim(meta, obs_keys=["object"])
    with pytest.raises(ValueError, match=r"image keys \['agentview_image'\]"):
        make_sim(meta, image_keys=["agentview_image"])
    with pytest.raises(ValueError, match=r"env_kwargs \['nope'\] are unknown"):
        make_sim({**meta, "env_kwargs": {"nope": 1}})
    with pytest.raises(ValueError, match="control_freq is 20"):
        make_sim({**meta, "env_kwargs": {"control_freq": 20}})
    sim.close()


# ---------------------------------------------------------------------------- demos
@pytest.fixture(scope="module")
def push_demos(tmp_path_factory):
    from jumpflow.envs.metaworld_demos import generate_metaworld_demos

    path = tmp_path_factory.mktemp("mw") / "push.hdf5"
    summary = generate_metaworld_demos(path, PUSH, n_demos=4, seed=0, noise_std=0.1, progress=False)
    return path, summary


@pytest.mark.sim
def test_demos_read_back_through_the_robomimic_reader_and_sequence_dataset(push_demos, tmp_path):
    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.datasets.sequence import RobomimicSequenceDataset

    path, summary = push_demos
    assert summary["n_demos"] == 4 and summary["n_attempts"] >= 4 and summary["noise_std"] == 0.1
    with RobomimicFile(path) as rf:
        meta = rf.env_meta
        assert meta["type"] == "metaworld" and meta["env_name"] == PUSH
        assert len(rf.demo_names()) == 4 and sorted(rf.filter_keys()) == ["train", "valid"]
        assert set(rf.obs_keys()) == {"state", "hand_pos", "gripper", "obj_state", "goal_pos"}
        demo = rf.read_demo("demo_0", ["state", "hand_pos"])
        t = demo["action"].shape[0]
        assert demo["action"].shape == (t, 4) and np.abs(demo["action"]).max() <= 1.0
        assert demo["obs"]["state"].shape == (t, 39) and demo["obs"]["hand_pos"].shape == (t, 3)
        assert 1 < t <= 500 and bool(rf.data["demo_0"].attrs["success"])
        assert float(rf.data.attrs["noise_std"]) == 0.1
    ds = RobomimicSequenceDataset(path, ["state"], horizon=16, n_obs_steps=2, n_action_steps=8, cache_dir=tmp_path)
    assert ds.shape_meta() == {"action": (4,), "obs": {"state": (39,)}} and ds.env_meta["env_name"] == PUSH
    item = ds[0]
    assert tuple(item["obs"]["state"].shape) == (2, 39) and tuple(item["action"].shape) == (16, 4)
    norm = ds.get_normalizer()
    assert np.isfinite(np.asarray(norm.normalize("state", item["obs"]["state"]))).all()


@pytest.mark.sim
def test_replaying_a_demo_from_its_stored_state_reproduces_it(push_demos):
    import h5py

    from jumpflow.envs.registry import make_sim

    path, _ = push_demos
    with h5py.File(path, "r") as f:
        sim = make_sim(json.loads(f["data"].attrs["env_args"]))
        for name in ("demo_0", "demo_3"):
            g = f["data"][name]
            states, actions = g["states"][()], g["actions"][()]
            obs = sim.reset(seed=int(g.attrs["seed"]))                  # same initial state as the seed's
            np.testing.assert_array_equal(obs["state"], g["obs/state"][0])
            sim.reset(seed=12345)                                       # elsewhere, then back from the state
            obs = sim.reset_to(states[0])
            np.testing.assert_array_equal(obs["state"], g["obs/state"][0])
            for t, a in enumerate(actions):
                np.testing.assert_array_equal(sim.get_state(), states[t])
                obs, _, success = sim.step(a)
            np.testing.assert_array_equal(obs["state"], g["next_obs/state"][-1])
            assert success and sim.is_success()
        sim.close()


@pytest.mark.sim
def test_expert_bench_measures_the_episode_the_demo_generator_records(push_demos):
    """``bench/experts.py``'s MetaWorld row runs the generator's own episode: from a stored demo's
    seed (same action noise) it succeeds in exactly that demo's number of steps."""
    import h5py

    from bench.experts import run_metaworld_task

    path, _ = push_demos
    with h5py.File(path, "r") as f:
        demos = [(int(f["data"][n].attrs["seed"]), f["data"][n]["actions"].shape[0]) for n in ("demo_0", "demo_1")]
    for seed, length in demos:
        row = run_metaworld_task(PUSH, 1, seed, noise_std=0.1)
        assert (row["n_success"], row["mean_length"], row["seeds"]) == (1, float(length), f"{seed}..{seed}")


@pytest.mark.sim
def test_ensure_demos_hook_and_image_observations(tmp_path):
    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.demos import ensure_demos

    path = tmp_path / "button.hdf5"
    assert ensure_demos(path, task=f"metaworld:{BUTTON}", n_demos=2, image=True, camera_size=32) == path
    with RobomimicFile(path) as rf:
        assert rf.env_meta["env_name"] == BUTTON and len(rf.demo_names()) == 2
        img = rf.read_demo("demo_0", ["corner2_image"])["obs"]["corner2_image"]
        assert img.dtype == np.uint8 and img.shape[1:] == (32, 32, 3) and img.std() > 5
    ensure_demos(path, task=BUTTON, n_demos=2)                            # an existing file is kept
    with pytest.raises(ValueError, match="holds task 'button-press-v3', asked for 'push-v3'"):
        ensure_demos(path, task=PUSH, n_demos=2)
    with pytest.raises(ValueError, match="holds 2 demos, asked for 5"):
        ensure_demos(path, task=BUTTON, n_demos=5)


# ---------------------------------------------------------------------------- evaluator
@pytest.mark.sim
def test_evaluator_with_the_scripted_expert_reproduces_its_success():
    from jumpflow.envs.metaworld_env import (
        MetaWorldExpert,
        MetaWorldExpertPolicy,
        MetaWorldSim,
        metaworld_env_meta,
    )
    from jumpflow.eval.rollout import RolloutEvaluator

    meta = metaworld_env_meta(PUSH)
    seeds = [1_000_000, 1_000_001]
    # the expert run directly on the sim, seeing what the evaluator's policy sees (float32 observations)
    sim, expert = MetaWorldSim(meta), MetaWorldExpert(PUSH)
    direct = []
    for s in seeds:
        obs, ok, t = sim.reset(s), False, 0
        for t in range(1, 501):
            obs, _, ok = sim.step(np.clip(expert.act(obs["state"].astype(np.float32)), -1, 1))
            if ok:
                break
        direct.append((ok, t))
    sim.close()
    ev = RolloutEvaluator(meta, n_episodes=2, max_steps=500, n_obs_steps=2, n_action_steps=1, obs_keys=["state"],
                          seed_offset=seeds[0])
    try:
        res = ev.run(MetaWorldExpertPolicy(PUSH))
    finally:
        ev.close()
    assert res["n_env_errors"] == 0 and res["control_freq"] == 80.0
    assert [(e["success"], e["length"]) for e in res["episodes"]] == direct
    assert all(ok for ok, _ in direct)


def test_task_config_composes_with_the_policy_recipe():
    from hydra import compose, initialize_config_module

    from jumpflow.config import validate_config

    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=unused", "experiment=policy_cpu", "task=metaworld",
                                          "task.env=reach-v3", "objective=meanflow"])
    validate_config(cfg)
    assert cfg.task.env == "reach-v3" and list(cfg.task.obs_keys) == ["state"] and cfg.task.eval_max_steps == 500
    assert str(cfg.task.dataset).endswith("metaworld_reach-v3_10.hdf5")
