"""Action-chunk policies: every objective plugs into ChunkPolicy; shapes, normalisation,
temporal ensembling; a short closed-loop rollout of a briefly trained policy (sim)."""

from __future__ import annotations

import pytest
import torch
from robot_fixtures import LOWDIM, write_synthetic_robomimic

from jumpflow.backbones import build_backbone
from jumpflow.objectives import OBJECTIVES
from jumpflow.policy.task import PolicyTask

pytestmark = pytest.mark.xdist_group("policy")   # one worker builds the module fixture

SMALL = {"drifting": {"group_by": "sample", "gen_per_group": 4}, "transition_matching": {"transition_steps": 2,
                                                                                       "inner_steps": 2}}


def _task(path, **kw):
    task = PolicyTask(str(path), generate_if_missing=False, obs_keys=LOWDIM, horizon=8, n_obs_steps=2,
                      n_action_steps=4, cache_dir=str(path.parent / "cache"), **kw)
    task.prepare()
    return task


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "synthetic.hdf5"
    write_synthetic_robomimic(path, lengths=(12, 15, 10))
    return path


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_plugs_into_chunk_policy(synthetic, name):
    torch.manual_seed(0)
    task = _task(synthetic)
    backbone = build_backbone("MLP", task.shape, task.cond_dim, width=32, depth=1)
    policy = task.build_model(backbone, OBJECTIVES[name](**SMALL.get(name, {})))
    data = task.train_dataset()
    batch = torch.utils.data.default_collate([data[i] for i in range(6)])
    out = policy.compute_loss(batch)
    assert torch.isfinite(out.loss).all() and out.loss.dim() == 1
    out.loss.mean().backward()
    policy.objective.on_step_end(policy)          # what the trainer calls after each step
    # DTM reads the backbone's features, not its output projection
    unused = ("out.",) if name == "transition_matching" else ()
    assert all(p.grad is not None for n, p in policy.backbone.named_parameters() if not n.startswith(unused))
    steps = {"ddpm": 3, "transition_matching": 2}.get(name, 1)
    policy.set_inference(steps)
    action = policy.predict_action(batch["obs"])
    assert action.shape == (6, 4, 7) and torch.isfinite(action).all()


def test_predict_action_window_and_unnormalisation(synthetic):
    """The executed actions are chunk[n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps], in raw units."""
    task = _task(synthetic)
    policy = task.build_model(build_backbone("MLP", task.shape, task.cond_dim, width=16, depth=1),
                              OBJECTIVES["meanflow"]())
    norm = policy.normalizer
    raw = torch.tensor(task.train_dataset().buffer.data["action"][:], dtype=torch.float32)
    x = norm.normalize("action", raw)
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    assert torch.allclose(norm.unnormalize("action", x), raw, atol=1e-4)
    chunk = torch.linspace(-1, 1, 8)[None, :, None].expand(2, 8, 7)
    policy.objective.sample = lambda net, noise, cond, inference: chunk.clone()
    obs = {k: v[:2] for k, v in torch.utils.data.default_collate([task.train_dataset()[i] for i in range(2)])["obs"].items()}
    action = policy.predict_action(obs)
    assert torch.allclose(action, norm.unnormalize("action", chunk)[:, 1:5], atol=1e-5)


def test_temporal_ensembling_blends_overlapping_predictions(synthetic):
    task = _task(synthetic, temporal_ensemble=1.0)
    policy = task.build_model(build_backbone("MLP", task.shape, task.cond_dim, width=16, depth=1),
                              OBJECTIVES["meanflow"]())
    chunks = iter([torch.zeros(1, 8, 7), torch.ones(1, 8, 7)])
    policy.predict_chunk = lambda obs, generator=None: next(chunks)
    first = policy.predict_action({})
    second = policy.predict_action({})
    # the previous chunk's tail covers 3 of the 4 new steps: weight 1 averages 0 and 1
    assert torch.equal(first, torch.zeros(1, 4, 7))
    assert torch.allclose(second[:, :3], torch.full((1, 3, 7), 0.5)) and torch.equal(second[:, 3], torch.ones(1, 7))
    policy.reset()
    chunks = iter([torch.ones(1, 8, 7)])
    assert torch.equal(policy.predict_action({}), torch.ones(1, 4, 7))


def test_missing_dataset_without_generation_is_a_clear_error(tmp_path):
    task = PolicyTask(str(tmp_path / "nope.hdf5"), generate_if_missing=False)     # values only: no disk
    with pytest.raises(FileNotFoundError, match="task.dataset"):
        task.prepare()


def test_bad_window_sizes_fail_early(synthetic):
    with pytest.raises(ValueError, match="horizon"):
        PolicyTask(str(synthetic), generate_if_missing=False, horizon=4, n_obs_steps=2, n_action_steps=8)


@pytest.mark.sim
def test_briefly_trained_policy_runs_closed_loop(lift_demos, tmp_path):
    """Train a few steps through the one trainer on 3 generated demos, then roll out."""
    from hydra import compose, initialize_config_module

    from jumpflow.checkpoint import load_model
    from jumpflow.trainer import train

    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            "experiment=policy_cpu", f"task.dataset={lift_demos}", "task.n_demos=3",
            "task.eval_episodes=1", "task.eval_max_steps=24", "task.eval_videos=1", "trainer.max_steps=5",
            "trainer.batch_size=16", "trainer.ckpt_every=5", "logger=none", "trainer.progress=false",
            "backbone.width=32", "backbone.depth=1", f"run_dir={tmp_path / 'run'}",
            f"task.cache_dir={tmp_path / 'cache'}"])
    result = train(cfg)
    metrics = {k.split("/")[-1]: v for k, v in result["metrics"].items()}
    assert metrics["mean_episode_length"] <= 24 and metrics["latency_ms_p50"] > 0
    assert (tmp_path / "run" / "videos").exists() and list((tmp_path / "run" / "videos").glob("*.mp4"))
    model, _ = load_model(tmp_path / "run")
    model.set_inference(2)
    obs = {k: torch.zeros(1, 2, *s) for k, s in model.task.obs_shapes.items()}
    assert model.predict_action(obs).shape == (1, 8, 7)


@pytest.mark.sim
def test_square_task_config_generates_its_demos(tmp_path):
    """``task=square_lowdim`` on a missing dataset generates NutAssemblySquare demos with the
    scripted expert (the embedded default), with the nut's 14-d object state and 7-d actions."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from jumpflow.datasets.robomimic import RobomimicFile

    dataset = tmp_path / "square.hdf5"
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["experiment=policy_cpu", "task=square_lowdim", "task.n_demos=1",
                                          f"task.dataset={dataset}", f"task.cache_dir={tmp_path / 'cache'}",
                                          "run_dir=unused"])
    task = instantiate(cfg.task)
    assert not dataset.exists()                   # constructing a task touches no disk
    task.prepare()
    assert dataset.exists() and task.obs_shapes["object"] == (14,) and task.shape == (16, 7)
    with RobomimicFile(dataset) as f:
        assert f.env_meta["env_name"] == "NutAssemblySquare" and len(f.demo_names()) == 1
