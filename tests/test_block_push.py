"""Planar MuJoCo tasks (BlockPush, ReachAround), their oracles, oracle demos and the env registry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("block_push")   # one worker builds the module fixture

BP_KEYS = ["effector_pos", "block_pos", "block_yaw", "block2_pos", "block2_yaw", "target_pos", "target2_pos",
           "block_rel", "block2_rel"]


def _fake_factory(env_meta, obs_keys=None, image_keys=(), camera_size=None, **kw):
    return {"built": env_meta["env_name"], "obs_keys": obs_keys, "kw": kw}


def _binomial_ok(count: int, n: int, p: float, z: float = 3.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------- registry (no simulator)
def test_registry_rejects_unknown_type_and_env_in_one_line():
    from jumpflow.envs.registry import make_sim

    with pytest.raises(ValueError) as e:
        make_sim({"env_name": "door-open-v2", "type": "isaac", "env_kwargs": {}})
    msg = str(e.value)
    assert "'metaworld'" in msg and "'jumpflow'" in msg and "1 (robosuite)" in msg and "\n" not in msg
    with pytest.raises(ValueError) as e:
        make_sim(json.dumps({"env_name": "BlockPull", "type": "jumpflow"}))
    msg = str(e.value)
    assert "'BlockPull'" in msg and "BlockPush" in msg and "ReachAround" in msg and "\n" not in msg


def test_registry_dispatch_and_new_family(monkeypatch):
    from jumpflow.envs import registry

    assert registry.sim_class_path({"env_name": "Lift", "type": 1}) == "jumpflow.envs.sim:RobosuiteSim"
    assert registry.sim_class_path({"env_name": "Lift"}) == "jumpflow.envs.sim:RobosuiteSim"     # robomimic default
    assert registry.sim_class_path({"env_name": "ReachAround", "type": "jumpflow"}).endswith(":ReachAroundSim")
    # a later family (e.g. MetaWorld) is one more entry, imported when first used
    monkeypatch.setitem(registry.SIM_FAMILIES, "fake", f"{__name__}:_fake_factory")
    built = registry.make_sim({"env_name": "door", "type": "fake"}, obs_keys=["a"], model_seed=3)
    assert built == {"built": "door", "obs_keys": ["a"], "kw": {"model_seed": 3}}
    assert registry.planar_task_name("block_push") == "BlockPush" and registry.planar_task_name("Lift") is None
    with pytest.raises(ValueError, match=r"env_kwargs \['speed'\] are unknown"):
        registry.planar_env_meta("BlockPush", speed=2)


# ---------------------------------------------------------------------------- simulators
@pytest.mark.sim
def test_sims_from_registry_reset_by_seed_and_reject_bad_input():
    from jumpflow.envs.registry import make_sim, planar_env_meta

    sim = make_sim(planar_env_meta("BlockPush"), obs_keys=BP_KEYS)
    assert type(sim).__name__ == "BlockPushSim" and sim.action_dim == 2
    a, b, c = sim.reset(5), sim.reset(5), sim.reset(6)
    assert sorted(a) == sorted(BP_KEYS) and all(v.shape == (2,) for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["block_pos"], c["block_pos"])
    assert np.linalg.norm(a["block_pos"] - a["block2_pos"]) > 0.1
    for block in ("block", "block2"):                                   # relative keys: block - effector
        np.testing.assert_array_equal(a[f"{block}_rel"], a[f"{block}_pos"] - a["effector_pos"])
    assert abs(a["target_pos"][0] - a["target2_pos"][0]) > 0.2          # targets 0.24 m apart in x
    with pytest.raises(ValueError, match=r"state has shape \(3,\)"):
        sim.reset_to(np.zeros(3))
    with pytest.raises(ValueError, match="action has 7 dims"):
        sim.step(np.zeros(7))
    with pytest.raises(ValueError, match=r"observation keys \['object'\] are not produced"):
        make_sim(planar_env_meta("BlockPush"), obs_keys=["object"])
    with pytest.raises(ValueError, match=r"image keys \['agentview_image'\]"):
        make_sim(planar_env_meta("ReachAround"), image_keys=["agentview_image"])
    with pytest.raises(ValueError, match=r"env_kwargs \['nope'\] are unknown"):
        make_sim({"env_name": "ReachAround", "type": "jumpflow", "env_kwargs": {"nope": 1}})
    sim.close()


@pytest.mark.sim
def test_block_push_success_and_mode_bookkeeping():
    """p1 / p2 and the committed mode on hand-placed blocks (state layout: time, qpos (10), qvel (10),
    targets (4), step, in_target (2), entered_step (2), committed (2))."""
    from jumpflow.envs.block_push import BlockPushSim

    sim = BlockPushSim()
    sim.reset(0)
    base = sim.get_state()
    t0, t1 = base[21:23], base[23:25]
    far0, far1 = np.array([0.35, -0.3]), np.array([0.5, -0.3])

    def place(state, b0, b1):
        s = state.copy()
        s[3:5], s[6], s[7:9], s[10] = b0, 0.0, b1, 0.0          # block xy and yaw
        s[11:21] = 0.0                                          # at rest
        sim.reset_to(s)
        sim.step(np.zeros(2))
        return sim.get_state()

    assert sim.current_mode() is None and sim.success_dict() == {"p1": False, "p2": False}
    s = place(base, far0, t0)                                   # block 1 into target 0
    assert sim.current_mode() == "b1t0" and sim.success_dict() == {"p1": True, "p2": False}
    assert sim.reward() == 0.5
    from jumpflow.envs.registry import planar_env_meta, success_levels
    # the level an evaluator reads p1 from is the reward the sim gives at p1 (one source)
    assert success_levels(planar_env_meta("BlockPush")) == {"p1": sim.reward()}
    assert success_levels(planar_env_meta("ReachAround")) == {}
    assert success_levels({"env_name": "Lift", "type": 1}) == {}          # robosuite: none declared
    s = place(s, t1, t0)                                        # then block 0 into target 1
    assert sim.success_dict() == {"p1": True, "p2": True} and sim.is_success() and sim.reward() == 1.0
    assert sim.current_mode() == "b1t0"                         # block 1 was there first
    place(s, t0 + [0.045, 0.0], t0)                             # both in target 0: not distinct
    assert sim.success_dict() == {"p1": True, "p2": False}
    s = place(s, far0, far1)                                    # all out: the committed mode stays
    assert sim.current_mode() == "b1t0" and not sim.success_dict()["p1"]
    place(s, t1, far1)                                          # another block enters first now
    assert sim.current_mode() == "b0t1"


@pytest.mark.sim
def test_reach_around_mean_of_the_two_modes_crashes():
    from jumpflow.envs.reach_around import ReachAroundOracle, ReachAroundSim

    sim = ReachAroundSim()
    for side in ("left", "right"):
        obs = sim.reset(4)
        oracle = ReachAroundOracle(side=side)
        for _ in range(60):
            obs, _, success = sim.step(oracle.act(obs))
            if success:
                break
        assert success and sim.current_mode() == side and not sim.stuck
    obs = sim.reset(4)
    left, right = ReachAroundOracle(side="left"), ReachAroundOracle(side="right")
    for _ in range(60):
        obs, _, success = sim.step(0.5 * (left.act(obs) + right.act(obs)))
        assert not success
    assert sim.stuck and sim.current_mode() is None
    stuck_at = obs["agent_pos"].copy()
    obs, _, _ = sim.step(np.array([1.0, 1.0]))                  # a crashed agent stays put
    np.testing.assert_allclose(obs["agent_pos"], stuck_at, atol=1e-9)
    assert np.linalg.norm(stuck_at) < 0.085                     # stopped at the post (radius 0.06 + 0.02)


# ---------------------------------------------------------------------------- oracle demos
@pytest.fixture(scope="module")
def block_push_demos(tmp_path_factory):
    from jumpflow.envs.planar_demos import generate_planar_demos

    path = tmp_path_factory.mktemp("bp") / "bp.hdf5"
    summary = generate_planar_demos(path, "BlockPush", n_demos=60, seed=0, progress=False)
    return path, summary


@pytest.mark.sim
def test_block_push_oracle_modes_and_success(block_push_demos):
    from jumpflow.eval.modes import read_demo_modes

    path, summary = block_push_demos
    n = summary["n_demos"]
    assert n == 60 and summary["n_attempts"] <= 63                     # p2 >= 0.95 on these seeds
    assert summary["success_rate"] >= 0.9 and summary["p1_rate"] >= summary["success_rate"]
    modes = read_demo_modes(path)
    counts = {m: modes.count(m) for m in ("b0t0", "b0t1", "b1t0", "b1t1")}
    assert sum(counts.values()) == n and counts == summary["mode_counts"]
    assert all(_binomial_ok(c, n, 0.25) for c in counts.values()), counts


@pytest.mark.sim
def test_block_push_demo_replays_from_its_initial_state(block_push_demos):
    import h5py

    from jumpflow.datasets.robomimic import RobomimicFile
    from jumpflow.envs.block_push import BlockPushOracle, parse_mode
    from jumpflow.envs.registry import make_sim

    path, _ = block_push_demos
    with pytest.raises(ValueError, match="unknown Block Push mode 'b2t0'"):
        parse_mode("b2t0")
    with RobomimicFile(path) as rf:
        meta = rf.env_meta
        assert meta["type"] == "jumpflow" and meta["env_name"] == "BlockPush"
        assert meta["env_kwargs"]["control_freq"] == 10 and meta["env_kwargs"]["horizon"] == 350
        demo = rf.read_demo("demo_3", BP_KEYS)
        assert demo["action"].shape[1] == 2 and np.abs(demo["action"]).max() <= 1.0
    sim = make_sim(meta, obs_keys=BP_KEYS)
    with h5py.File(path, "r") as f:
        for name in ("demo_0", "demo_3"):
            g = f[f"data/{name}"]
            # the executed (noisy) actions replay the episode; the labels are the law's (DART)
            states, actions, labels = g["states"][()], g["executed_actions"][()], g["actions"][()]
            draw = json.loads(g.attrs["draw"])
            assert draw["order"][0] == g.attrs["mode"] and draw["noise_std"] == 0.15      # what it drew, stored
            law = BlockPushOracle(order=[parse_mode(m) for m in draw["order"]], noise_std=0)
            assert parse_mode(draw["order"][0]) == (draw["first_block"], draw["first_target"])
            np.testing.assert_array_equal(
                labels, np.stack([law.law({k: g[f"obs/{k}"][t] for k in BP_KEYS}) for t in range(len(labels))]))
            assert labels.shape == actions.shape and np.abs(actions - labels).mean() > 0.05     # noise ran
            obs = sim.reset_to(states[0])
            for k in BP_KEYS:
                np.testing.assert_array_equal(obs[k], g[f"obs/{k}"][0])
            for t, a in enumerate(actions):
                np.testing.assert_array_equal(sim.get_state(), states[t])
                obs, _, success = sim.step(a)
                assert success == (t == len(actions) - 1)
            assert success and sim.current_mode() == g.attrs["mode"]
            np.testing.assert_array_equal(obs["block_pos"], g["next_obs/block_pos"][-1])
            k = len(actions) // 2                    # any stored row resets to its observation
            obs = sim.reset_to(states[k])
            np.testing.assert_array_equal(obs["effector_pos"], g["obs/effector_pos"][k])
    sim.close()


@pytest.mark.sim
def test_block_push_demos_from_another_oracle_version_are_refused(block_push_demos, tmp_path):
    import shutil

    import h5py

    from jumpflow.envs.block_push import BlockPushOracle
    from jumpflow.envs.planar_demos import ensure_planar_demos

    path, _ = block_push_demos
    with h5py.File(path, "r") as f:
        assert int(f["data"].attrs["oracle_version"]) == BlockPushOracle.VERSION == 4
    assert ensure_planar_demos(path, "BlockPush", n_demos=60) == path
    old = tmp_path / "old.hdf5"
    shutil.copy(path, old)
    with h5py.File(old, "a") as f:
        del f["data"].attrs["oracle_version"]               # files written before versions: version 1
    with pytest.raises(ValueError, match=r"old\.hdf5: data attrs 'oracle_version' is 1, .*BlockPush oracle is version 4"):
        ensure_planar_demos(old, "BlockPush", n_demos=60)
    # training on an existing file checks it too (the file is not missing, so nothing is generated)
    from jumpflow.errors import ConfigError
    from jumpflow.policy.task import PolicyTask

    PolicyTask(str(path), env="BlockPush", generate_if_missing=False, obs_keys=BP_KEYS,
               cache_dir=str(tmp_path / "cache")).prepare()
    with pytest.raises(ConfigError, match=r"task\.dataset.*old\.hdf5: data attrs 'oracle_version' is 1") as e:
        PolicyTask(str(old), env="BlockPush", generate_if_missing=True, obs_keys=BP_KEYS).prepare()
    assert "\n" not in str(e.value)
    with h5py.File(old, "r") as f:                          # refused, not regenerated or rewritten
        assert "oracle_version" not in f["data"].attrs


@pytest.mark.sim
def test_block_push_oracle_is_memoryless_and_survives_held_actions():
    """The oracle is a feedback law of the observation and its drawn order: a fresh oracle with
    the same order acts identically mid-episode (nothing hidden a learner could not see), and
    holding each action for 4 steps, as a chunked policy acts open loop, still succeeds."""
    from bench.experts import PerturbedOracle
    from jumpflow.envs.block_push import BlockPushOracle, BlockPushSim
    from jumpflow.envs.planar_demos import run_oracle_episode

    sim = BlockPushSim()
    oracle = BlockPushOracle(max_delta=sim.max_delta, noise_std=0.0)
    obs = sim.reset(3)
    oracle.reset(obs, seed=3)
    for t in range(60):
        a = oracle.act(obs)
        if t % 15 == 14:
            fresh = BlockPushOracle(max_delta=sim.max_delta, order=oracle.order, noise_std=0.0)
            np.testing.assert_array_equal(fresh.act(obs), a)
            noisy = BlockPushOracle(max_delta=sim.max_delta, order=oracle.order)
            noisy.reset(obs, seed=3)
            assert not np.array_equal(noisy.act(obs), a)            # the demos' noise is on by default
        obs, _, _ = sim.step(a)
    held = PerturbedOracle(BlockPushOracle(max_delta=sim.max_delta, noise_std=0.0), noise_std=0.0, hold=4)
    episodes = [run_oracle_episode(sim, held, seed, 350) for seed in range(3)]
    sim.close()
    assert all(ep["success"] for ep in episodes), [len(ep["actions"]) for ep in episodes]
    # smooth: the bare law's action moves little from step to step (a law that alternated push and
    # back-off, as a contact test made it do, changes by ~0.15 a step)
    bare = BlockPushOracle(max_delta=sim.max_delta, noise_std=0.0)
    sim = BlockPushSim()
    changes = [np.abs(np.diff(np.asarray(run_oracle_episode(sim, bare, seed, 350)["actions"]), axis=0)).mean()
               for seed in range(3)]
    sim.close()
    assert max(changes) < 0.05, changes


@pytest.mark.sim
def test_reach_around_demos_modes_replay_and_images(tmp_path):
    import h5py

    from jumpflow.envs.demos import ensure_demos, generate_demos
    from jumpflow.envs.reach_around import ReachAroundSim
    from jumpflow.eval.modes import read_demo_modes

    path = tmp_path / "ra.hdf5"
    summary = generate_demos(path, "reach_around", n_demos=60, seed=100, progress=False)     # the CLI's entry
    assert summary["task"] == "ReachAround" and summary["n_attempts"] <= 63
    modes = read_demo_modes(path)
    assert set(modes) == {"left", "right"} and _binomial_ok(modes.count("left"), 60, 0.5)
    sim = ReachAroundSim()
    with h5py.File(path, "r") as f:
        for name in ("demo_0", "demo_1"):
            g = f[f"data/{name}"]
            sim.reset_to(g["states"][0])
            assert "executed_actions" not in g                 # no noise: the label is what ran
            for a in g["actions"][()]:
                _, _, success = sim.step(a)
            assert success and sim.current_mode() == g.attrs["mode"]
            assert g.attrs["num_samples"] <= 60
    img_path = tmp_path / "ra_img.hdf5"
    assert ensure_demos(img_path, "ReachAround", n_demos=2, seed=0, image=True, progress=False) == img_path
    with h5py.File(img_path, "r") as f:
        img = f["data/demo_0/obs/overhead_image"][()]
        assert img.dtype == np.uint8 and img.shape[1:] == (84, 84, 3)
        assert not np.array_equal(img[0], img[-1])                 # the agent moved in the picture
        sim = ReachAroundSim(image_keys=("overhead_image",))
        np.testing.assert_array_equal(sim.reset_to(f["data/demo_0/states"][0])["overhead_image"], img[0])
    ensure_demos(img_path, "ReachAround", n_demos=2, image=True)       # existing file: checked, kept
    with pytest.raises(ValueError, match="holds task 'ReachAround', asked for 'BlockPush'"):
        ensure_demos(img_path, "BlockPush", n_demos=2)
    with pytest.raises(ValueError, match="style 'mh' is not available for planar tasks"):
        generate_demos(tmp_path / "x.hdf5", "BlockPush", n_demos=2, style="mh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ra.hdf5", "ra_img.hdf5"]   # no temp files left


@pytest.mark.sim
def test_gym_env_runs_planar_task_and_reports_mode():
    from jumpflow.envs.gym_env import RobomimicGymEnv
    from jumpflow.envs.reach_around import ReachAroundOracle
    from jumpflow.envs.registry import planar_env_meta

    env = RobomimicGymEnv(planar_env_meta("ReachAround"), obs_keys=["agent_pos", "goal_pos"], n_obs_steps=2,
                          n_action_steps=1, max_steps=60)
    obs, info = env.reset(seed=11)
    assert obs["agent_pos"].shape == (2, 2) and info["mode"] is None and info["mode_switches"] == 0
    oracle = ReachAroundOracle(side="right")
    done = False
    while not done:
        obs, _, term, trunc, info = env.step(oracle.act({k: v[-1] for k, v in obs.items()})[None])
        done = term or trunc
    assert info["success"] and term and info["mode"] == "right" and info["mode_switches"] == 0
    assert env.render().shape == (128, 128, 3)                      # "agentview" -> the overhead camera
    env.close()


def test_dataset_naming_an_unknown_env_type_fails_at_prepare(tmp_path):
    """A dataset whose env_meta names an env family nobody registered fails in one line naming
    the file and the key, before any training (and before anything is written)."""
    import json

    import h5py

    from jumpflow.envs.planar_demos import generate_planar_demos
    from jumpflow.errors import ConfigError
    from jumpflow.policy.task import PolicyTask

    path = tmp_path / "reach.hdf5"
    generate_planar_demos(path, task="ReachAround", n_demos=3, seed=0, progress=False)
    with h5py.File(path, "r+") as f:
        meta = json.loads(f["data"].attrs["env_args"])
        f["data"].attrs["env_args"] = json.dumps({**meta, "type": "isaac"})
    task = PolicyTask(str(path), generate_if_missing=False, obs_keys=["agent_pos", "goal_pos"],
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        task.prepare()
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "env_args" in msg and "isaac" in msg


def test_perturbed_oracle_holds_and_draws_reproducible_noise():
    from bench.experts import PerturbedOracle

    class CountingOracle:
        mode = "b0t0"

        def __init__(self):
            self.calls = 0

        def reset(self, obs=None, seed=None):
            self.calls = 0

        def act(self, obs):
            self.calls += 1
            return np.full(2, 0.1 * self.calls)

    held = PerturbedOracle(CountingOracle(), noise_std=0.0, hold=3)
    held.reset(seed=[7, 1])
    acts = np.array([held.act({}) for _ in range(7)])
    assert held.oracle.calls == 3 and held.mode == "b0t0"              # asked at steps 0, 3, 6
    assert np.allclose(acts[:, 0], [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3])
    noisy = PerturbedOracle(CountingOracle(), noise_std=5.0)
    runs = []
    for _ in range(2):
        noisy.reset(seed=[7, 1])
        runs.append(np.array([noisy.act({}) for _ in range(4)]))
    assert np.array_equal(runs[0], runs[1]) and np.abs(runs[0]).max() == 1.0   # same seed, same noise; clipped
    with pytest.raises(ValueError, match="hold >= 1"):
        PerturbedOracle(CountingOracle(), hold=0)


@pytest.mark.sim
def test_label_fit_tells_law_labels_from_executed_ones(block_push_demos, tmp_path):
    """``bench.label_fit`` on oracle-v4 demos: the stored labels are the law exactly; with the
    executed (noisy) actions put back as labels, as v3 stored them, they are not."""
    import shutil

    import h5py
    from hydra import compose, initialize_config_module

    from bench.label_fit import label_fit
    from jumpflow.trainer import train

    path, _ = block_push_demos
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            "experiment=policy_cpu", "task=block_push_lowdim", "objective=regression", f"task.dataset={path}",
            "task.n_demos=60", f"task.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4", "trainer.batch_size=16",
            "trainer.ckpt_every=4", "trainer.eval_at_end=false", "logger=none", "trainer.progress=false",
            "backbone.width=32", "backbone.depth=1", f"run_dir={tmp_path / 'run'}"])
    train(cfg)
    row = label_fit(str(tmp_path / "run"), None, n_demos=3, stride=5)
    assert row["oracle_version"] == 4 and row["samples"] > 20 and row["n_obs_steps"] == 2
    assert row["label_law_x"] == row["label_law_y"] == 1.0
    # the labels are the law, so the policy's fit to either is the same number
    assert all(row[f"pred_label_{x}"] == row[f"pred_law_{x}"] for x in "xy")
    noisy = tmp_path / "noisy.hdf5"
    shutil.copy(path, noisy)
    with h5py.File(noisy, "a") as f:
        for g in f["data"].values():
            g["actions"][...] = g["executed_actions"][()]
    noisy_row = label_fit(str(tmp_path / "run"), str(noisy), n_demos=3, stride=5)
    assert max(noisy_row["label_law_x"], noisy_row["label_law_y"]) < 0.98
    assert noisy_row["pred_law_x"] == row["pred_law_x"]            # same policy, same states
    assert noisy_row["pred_label_x"] != row["pred_label_x"]
    with pytest.raises(FileNotFoundError, match=r"--dataset: .*gone\.hdf5 does not exist"):
        label_fit(str(tmp_path / "run"), str(tmp_path / "gone.hdf5"), n_demos=3, stride=5)
    # a row naming this (scratch) run still says how it was trained, from the checkpoint alone
    from bench.common import run_recipe

    recipe = run_recipe(tmp_path / "run")
    assert recipe == run_recipe(tmp_path / "run" / "checkpoints" / "ckpt_000000004.json")
    assert {k: recipe[k] for k in ("objective", "backbone", "width", "depth", "task", "horizon", "n_action_steps",
                                   "n_demos", "seed", "step")} == {
        "objective": "Regression", "backbone": "MLP", "width": 32, "depth": 1, "task": "BlockPush", "horizon": 2,
        "n_action_steps": 1, "n_demos": 60, "seed": 0, "step": 4}
    from jumpflow.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"no checkpoint found in .*gone"):
        run_recipe(tmp_path / "gone")


@pytest.mark.sim
def test_block_push_probe_filter_keeps_one_mode_and_refuses_bad_input(block_push_demos, tmp_path):
    """``bench.block_push_probe filter``: only demos of the asked modes survive, the mask lists
    follow, the total is recounted; a demo without ``mode`` or an unknown mode is refused by
    name and leaves no file behind."""
    import h5py

    from bench.block_push_probe import filter_modes, nearest_law_distance

    path, _ = block_push_demos
    with h5py.File(path, "r") as f:
        want = sorted(k for k, g in f["data"].items() if g.attrs["mode"] in ("b0t0", "b1t1"))
        n_samples = sum(int(f["data"][k].attrs["num_samples"]) for k in want)
    out = tmp_path / "one" / "bp.hdf5"
    assert filter_modes(path, out, ["b0t0", "b1t1"]) == len(want) > 0
    with h5py.File(out, "r") as f:
        assert sorted(f["data"].keys()) == want
        assert {g.attrs["mode"] for g in f["data"].values()} <= {"b0t0", "b1t1"}
        listed = {v.decode() for split in f["mask"].values() for v in split[()]}
        assert listed and listed <= set(want)
        assert int(f["data"].attrs["total"]) == n_samples
    bad = tmp_path / "nomode.hdf5"
    import shutil
    shutil.copy(path, bad)
    with h5py.File(bad, "a") as f:
        del f["data/demo_3"].attrs["mode"]
    with pytest.raises(KeyError, match=r"nomode\.hdf5: data/demo_3 has no 'mode'"):
        filter_modes(bad, tmp_path / "x.hdf5", ["b0t0"])
    with pytest.raises(ValueError, match="unknown Block Push mode 'b2t0'"):
        filter_modes(path, tmp_path / "x.hdf5", ["b2t0"])
    nodata = tmp_path / "nodata.hdf5"
    with h5py.File(nodata, "w") as f:
        f.create_group("demos")
    with pytest.raises(KeyError, match=r"nodata\.hdf5: no 'data' group"):
        filter_modes(nodata, tmp_path / "x.hdf5", ["b0t0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodata.hdf5", "nomode.hdf5", "one"]
    # the nearest of four laws, exactly
    laws = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    d, k = nearest_law_distance(np.array([0.1, 0.8]), laws)
    assert k == 1 and d == pytest.approx(np.hypot(0.1, 0.2), abs=1e-12)


def test_block_push_orders_pair_the_other_block_with_the_other_target():
    """The four orders the oracle draws and the probe compares against: each is its mode's pair
    then the complementary pair, one per mode, all distinct."""
    from jumpflow.envs.block_push import (
        BLOCK_PUSH_MODES,
        BLOCK_PUSH_ORDERS,
        BlockPushOracle,
        mode_name,
        order_of,
    )

    assert order_of(0, 1) == ((0, 1), (1, 0)) and order_of(1, 1) == ((1, 1), (0, 0))
    assert [mode_name(*o[0]) for o in BLOCK_PUSH_ORDERS] == list(BLOCK_PUSH_MODES)
    assert len(set(BLOCK_PUSH_ORDERS)) == 4
    for first, second in BLOCK_PUSH_ORDERS:
        assert {first[0], second[0]} == {0, 1} and {first[1], second[1]} == {0, 1}
    drawn = set()
    oracle = BlockPushOracle()
    for seed in range(64):
        oracle.reset(seed=seed)
        drawn.add(oracle.order)
    assert drawn == set(BLOCK_PUSH_ORDERS)
