"""A checkpoint is enough to act: after training, the dataset (and its zarr cache) is deleted,
and the policy loads, evaluates closed loop and reports mode metrics from the checkpoint alone."""

from __future__ import annotations

import shutil

import pytest
import torch
from hydra import compose, initialize_config_module

pytestmark = pytest.mark.sim


def test_policy_acts_from_its_checkpoint_without_the_dataset(tmp_path):
    from jumpflow.checkpoint import CheckpointError
    from jumpflow.policy import load_policy
    from jumpflow.trainer import train

    data = tmp_path / "data" / "reach.hdf5"
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            "experiment=policy_cpu", "task=reach_around_lowdim", f"task.dataset={data}", "task.n_demos=6",
            f"task.cache_dir={tmp_path / 'cache'}", "task.eval_episodes=2", "task.eval_videos=0",
            "trainer.max_steps=4", "trainer.batch_size=16", "trainer.ckpt_every=4", "trainer.eval_at_end=false",
            "logger=none", "trainer.progress=false", "backbone.width=32", "backbone.depth=1",
            f"run_dir={tmp_path / 'run'}"])
    train(cfg)
    data.unlink()
    shutil.rmtree(tmp_path / "cache")
    policy = load_policy(tmp_path / "run")
    assert not data.exists() and policy.env_meta["env_name"] == "ReachAround"
    assert policy.obs_keys == ["agent_pos", "goal_pos"] and policy.inference.steps == 1
    assert sorted(set(policy.task.demo_modes)) <= ["left", "right"] and len(policy.task.demo_modes) == 6
    obs = {k: torch.zeros(1, 2, 2) for k in policy.obs_keys}
    assert policy.predict_action(obs).shape == (1, 8, 2)
    evaluator = policy.task.evaluator(None, n_episodes=2, n_videos=0, policy_seed=3)
    assert evaluator.policy_seed == 3                          # bench.policy's seeded noise reaches it
    try:
        result = evaluator.run(policy)
    finally:
        evaluator.close()
    summary = policy.task.mode_summary(result)
    assert result["n_episodes"] == 2 and 0.0 <= summary["mode_tv"] <= 1.0
    assert not data.exists()                                   # nothing was generated again
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_policy(tmp_path / "nowhere")
