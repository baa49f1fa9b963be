"""Closed-loop rollout evaluator: seeds, expert / replay reproduction, failures, latency, videos."""

from __future__ import annotations

import time

import numpy as np
import pytest
from robot_fixtures import LOWDIM, ReplayPolicy

pytestmark = pytest.mark.sim


def _stored_actions(path):
    from jumpflow.datasets.robomimic import RobomimicFile

    with RobomimicFile(path) as rf:
        names = rf.demo_names()
        seeds = [int(rf.data[n].attrs["seed"]) for n in names]
        return [rf.data[n]["actions"][()] for n in names], seeds


def test_replaying_demo_actions_reproduces_demos(lift_demos):
    """Open-loop replay of the stored actions in 8-step chunks from the demos' own seeds: every
    episode succeeds at exactly the demo's length (the evaluator's seeding = the demo writer's)."""
    from jumpflow.eval.rollout import RolloutEvaluator

    actions, seeds = _stored_actions(lift_demos)
    assert seeds == [0, 1, 2]
    policy = ReplayPolicy(actions, n_envs=1, n_action_steps=8)
    ev = RolloutEvaluator(lift_demos, n_episodes=3, n_envs=1, n_obs_steps=2, n_action_steps=8, seed_offset=0,
                          obs_keys=LOWDIM)
    res = ev.run(policy)
    ev.close()
    assert res["success_rate"] == 1.0 and res["n_env_errors"] == 0
    assert [e["length"] for e in res["episodes"]] == [len(a) for a in actions]
    assert res["mean_max_reward"] == 1.0
    shapes = policy.seen_shapes[0]
    assert shapes["object"] == ((1, 2, 10), "torch.float32") and shapes["robot0_eef_pos"][0] == (1, 2, 3)


def test_expert_policy_matches_expert_success_on_test_seeds(lift_demos):
    """The expert as a closed-loop policy through the evaluator = the expert run directly."""
    from jumpflow.envs.demos import run_expert_episode
    from jumpflow.envs.experts import ExpertPolicy, make_expert
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta
    from jumpflow.eval.rollout import TEST_SEED_OFFSET, RolloutEvaluator

    ev = RolloutEvaluator(default_env_meta("Lift"), n_episodes=3, n_envs=1, n_obs_steps=2, n_action_steps=1)
    res = ev.run(ExpertPolicy("Lift"))
    ev.close()
    assert res["seeds"] == [TEST_SEED_OFFSET, TEST_SEED_OFFSET + 2]          # disjoint from demo seeds
    sim = RobosuiteSim(default_env_meta("Lift"))
    direct = [run_expert_episode(sim, make_expert("Lift"), TEST_SEED_OFFSET + i, 400) for i in range(3)]
    sim.close()
    assert [e["success"] for e in res["episodes"]] == [d["success"] for d in direct]
    assert [e["length"] for e in res["episodes"]] == [len(d["actions"]) for d in direct]
    assert res["success_rate"] == 1.0


def test_failures_are_isolated_and_latency_measured(monkeypatch):
    """Episode 0: the simulator raises; episode 1: the policy emits NaN; episode 2 runs normally
    (times out). All are counted and evaluation continues; latency covers predict_action only."""
    from jumpflow.envs.sim import RobosuiteSim, default_env_meta
    from jumpflow.eval.rollout import RolloutEvaluator

    orig_step = RobosuiteSim.step
    state = {"calls": 0}

    def flaky_step(self, action):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("MuJoCo exploded")
        return orig_step(self, action)

    monkeypatch.setattr(RobosuiteSim, "step", flaky_step)

    class SlowPolicy:
        def __init__(self):
            self.episode = -1

        def reset(self):
            self.episode += 1

        def predict_action(self, obs):
            time.sleep(0.01)
            a = np.zeros((1, 4, 7), dtype=np.float32)
            if self.episode == 1:
                a[:] = np.nan
            return a

    ev = RolloutEvaluator(default_env_meta("Lift"), n_episodes=3, n_envs=1, max_steps=8, n_action_steps=4)
    res = ev.run(SlowPolicy())
    ev.close()
    eps = res["episodes"]
    assert len(eps) == 3 and res["success_rate"] == 0.0 and res["n_env_errors"] == 2
    assert "MuJoCo exploded" in eps[0]["error"] and "non-finite" in eps[1]["error"]
    assert eps[2]["error"] == "" and eps[2]["length"] == 8
    assert 10.0 <= res["latency_ms_p50"] <= res["latency_ms_p95"] < 1000.0


def test_bad_policy_output_shape_raises():
    from jumpflow.envs.sim import default_env_meta
    from jumpflow.eval.rollout import RolloutEvaluator

    class Bad:
        def predict_action(self, obs):
            return np.zeros((1, 7))

    ev = RolloutEvaluator(default_env_meta("Lift"), n_episodes=1, max_steps=4)
    with pytest.raises(ValueError, match="expected \\(1, >= 8, action_dim\\)"):
        ev.run(Bad())
    ev.close()


def test_videos_of_first_episodes(lift_demos, tmp_path):
    import imageio.v2 as imageio

    from jumpflow.eval.rollout import RolloutEvaluator

    actions, _ = _stored_actions(lift_demos)
    ev = RolloutEvaluator(lift_demos, n_episodes=2, n_envs=1, n_action_steps=8, seed_offset=0,
                          video_dir=tmp_path / "vid", n_videos=1, video_size=64)
    res = ev.run(ReplayPolicy(actions, 1, 8))
    ev.close()
    assert len(res["videos"]) == 1 and res["videos"][0].endswith("episode_000_seed0.mp4")
    frames = imageio.mimread(res["videos"][0])
    assert len(frames) == len(actions[0]) + 1 and frames[0].shape == (64, 64, 3)
    assert sorted(p.name for p in (tmp_path / "vid").iterdir()) == ["episode_000_seed0.mp4"]


def test_parallel_spawned_envs_match_sequential(lift_demos):
    """n_envs = 2 (AsyncVectorEnv, spawn): same per-episode results as in-process, odd episode
    count (the last batch runs one env)."""
    from jumpflow.eval.rollout import RolloutEvaluator

    actions, _ = _stored_actions(lift_demos)
    ev = RolloutEvaluator(lift_demos, n_episodes=3, n_envs=2, n_action_steps=8, seed_offset=0)
    res = ev.run(ReplayPolicy(actions, n_envs=2, n_action_steps=8))
    again = ev.run(ReplayPolicy(actions, n_envs=2, n_action_steps=8))        # envs are reused
    ev.close()
    for r in (res, again):
        assert [e["seed"] for e in r["episodes"]] == [0, 1, 2]
        assert [e["length"] for e in r["episodes"]] == [len(a) for a in actions]
        assert r["success_rate"] == 1.0
