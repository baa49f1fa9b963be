"""The LeRobot peer baseline's adapter (bench/peer_lerobot.py): jumpflow windows -> LeRobot DP
batches (keys, shapes, padding masks, normalisation) and the ``predict_action`` adapter, on a tiny
generated robomimic file. Runs without LeRobot; the tests that build LeRobot's DiffusionPolicy skip
where ``lerobot`` is not installed (it lives in its own environment: see the bench's docstring)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from robot_fixtures import LOWDIM, write_synthetic_robomimic

from bench import peer_lerobot as pl
from jumpflow.datasets.sequence import RobomimicSequenceDataset

H, N_OBS, N_ACT = 4, 2, 2
LENGTHS = (5, 7, 4)


@pytest.fixture
def windows(tmp_path):
    path = tmp_path / "synth.hdf5"
    write_synthetic_robomimic(path, lengths=LENGTHS)
    ds = RobomimicSequenceDataset(path, LOWDIM, horizon=H, n_obs_steps=N_OBS, n_action_steps=N_ACT,
                                  cache_dir=tmp_path / "cache")
    return ds, ds.get_normalizer()


def test_split_obs_keys_proprioception_and_environment_state():
    assert pl.split_obs_keys(LOWDIM) == (["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"], ["object"])
    assert pl.split_obs_keys(["agent_pos", "goal_pos"]) == (["agent_pos"], ["goal_pos"])
    assert pl.split_obs_keys(["effector_pos", "block_pos", "target_pos"]) == (["effector_pos"],
                                                                             ["block_pos", "target_pos"])
    assert pl.split_obs_keys(LOWDIM, ["object", "robot0_eef_quat"]) == (
        ["robot0_eef_pos", "robot0_gripper_qpos"], ["robot0_eef_quat", "object"])
    with pytest.raises(ValueError, match="env-state-keys"):
        pl.split_obs_keys(["robot0_eef_pos", "robot0_gripper_qpos"])
    with pytest.raises(ValueError, match="not observation keys"):
        pl.split_obs_keys(LOWDIM, ["cube"])


def test_pad_masks_mark_the_repeated_edge_steps(windows):
    ds, _ = windows
    s = ds.sampler
    a_pad, o_pad = pl.window_pad_masks(s.indices, H, N_OBS)
    assert a_pad.shape == (len(ds), H) and o_pad.shape == (len(ds), N_OBS) and a_pad.dtype == bool
    assert np.array_equal(o_pad, a_pad[:, :N_OBS])
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    for w, (b0, b1, s0, _) in enumerate(s.indices):
        ep = int(np.searchsorted(np.cumsum(LENGTHS), b0, side="right"))
        t = (b0 - s0 - starts[ep]) + np.arange(H)              # unclamped time of each window position
        expect = (t < 0) | (t >= LENGTHS[ep])
        assert np.array_equal(a_pad[w], expect), w
        # synthetic actions are 100 * demo + t: a padded position holds the first / last step's action
        act = ds[w]["action"][:, 0].numpy()
        assert np.allclose(act, 100 * ep + np.clip(t, 0, LENGTHS[ep] - 1))
    # DP's windows: n_obs_steps - 1 padded steps before an episode, n_action_steps - 1 after
    assert a_pad[:, 0].sum() == len(LENGTHS) * (N_OBS - 1)
    assert a_pad[:, -1].sum() == len(LENGTHS) * (N_ACT - 1)


def test_lerobot_batch_keys_shapes_and_normalisation(windows):
    ds, norm = windows
    idx = [0, 3, len(ds) - 1]
    obs, action, a_pad, o_pad = pl.collate_windows(ds, idx)
    state_keys, env_keys = pl.split_obs_keys(LOWDIM)
    batch = pl.to_lerobot_batch(obs, action, norm, state_keys, env_keys, a_pad, o_pad)
    assert set(batch) == {"observation.state", "observation.environment_state", "action", "action_is_pad",
                          "observation.state_is_pad", "observation.environment_state_is_pad"}
    assert batch["observation.state"].shape == (3, N_OBS, 3 + 4 + 2)
    assert batch["observation.environment_state"].shape == (3, N_OBS, 10)
    assert batch["action"].shape == (3, H, 7) and batch["action"].dtype == torch.float32
    assert batch["action_is_pad"].shape == (3, H) and batch["action_is_pad"].dtype == torch.bool
    assert batch["observation.state_is_pad"].shape == (3, N_OBS)
    assert torch.equal(batch["action_is_pad"], torch.from_numpy(a_pad))
    # the normalisation is the task's per-key min/max -> [-1, 1] (LeRobot's MIN_MAX), per key in order
    all_actions = np.concatenate([100.0 * i + np.arange(n) for i, n in enumerate(LENGTHS)])
    lo, hi = all_actions.min(), all_actions.max()
    expect = 2 * (action.numpy() - lo) / (hi - lo) - 1
    assert np.allclose(batch["action"].numpy(), expect, atol=1e-5)
    assert batch["action"].abs().max() <= 1 + 1e-6
    pos = norm.normalize("robot0_eef_pos", obs["robot0_eef_pos"])
    assert torch.allclose(batch["observation.state"][..., :3], pos.float())
    assert torch.allclose(batch["observation.environment_state"], norm.normalize("object", obs["object"]).float())
    # at inference only the observations are converted
    obs_only = pl.to_lerobot_batch(obs, None, norm, state_keys, env_keys)
    assert set(obs_only) == {"observation.state", "observation.environment_state"}
    with pytest.raises(ValueError, match="action_is_pad"):
        pl.to_lerobot_batch(obs, action, norm, state_keys, env_keys)


class _StubDiffusion:
    """Stands in for LeRobot's DiffusionModel: records the batch, returns normalised zeros."""

    num_inference_steps = 100

    def __init__(self, horizon, n_action_steps, action_dim):
        self.seen = None
        self.shape = (horizon, n_action_steps, action_dim)

    def generate_actions(self, batch):
        self.seen = batch
        return torch.zeros(batch["observation.state"].shape[0], self.shape[1], self.shape[2])

    def _prepare_global_conditioning(self, batch):
        return torch.cat([batch["observation.state"], batch["observation.environment_state"]], -1).flatten(1)

    def conditional_sample(self, batch_size, global_cond=None):
        return torch.zeros(batch_size, self.shape[0], self.shape[2])


class _StubPolicy(torch.nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.diffusion = _StubDiffusion(*shape)
        self.resets = 0

    def reset(self):
        self.resets += 1


def test_adapter_predict_action_is_raw_actions_of_the_evaluator_shape(windows):
    ds, norm = windows
    policy = _StubPolicy(H, N_ACT, 7)
    adapter = pl.LeRobotDPAdapter(policy, norm, *pl.split_obs_keys(LOWDIM), N_OBS, N_ACT)
    obs, _, _, _ = pl.collate_windows(ds, [1, 2])
    out = adapter.predict_action(obs)
    assert out.shape == (2, N_ACT, 7)
    # normalised 0 is the middle of the action range, in raw units
    all_actions = np.concatenate([100.0 * i + np.arange(n) for i, n in enumerate(LENGTHS)])
    assert torch.allclose(out, torch.full_like(out, (all_actions.min() + all_actions.max()) / 2))
    assert policy.diffusion.seen["observation.state"].shape == (2, N_OBS, 9)
    assert adapter.predict_chunk(obs).shape == (2, H, 7)
    adapter.reset()
    assert policy.resets == 1
    assert adapter.inference_steps == 100


def test_side_by_side_means_over_seeds():
    rows = [{"task": "t", "objective": "lerobot_dp", "sampler": "ddpm", "nfe": 100, "seed": s, "success_rate": v,
             "success_max": v, "success_last_mean": v, "latency_ms_p50": 10.0} for s, v in ((1, 0.5), (0, 0.9))]
    jf = [{"task": "t", "objective": "ddpm", "sampler": "ddpm", "nfe": 100, "seed": 0, "success_rate": 0.8}]
    table = pl.side_by_side(rows, jf)
    assert table[0]["source"] == "lerobot" and table[0]["seeds"] == "0,1"
    assert table[0]["success"] == pytest.approx(0.7) and table[0]["latency_ms_p50"] == 10.0
    assert table[1]["source"] == "jumpflow" and table[1]["success_max"] is None


def test_lerobot_dp_trains_and_acts_on_converted_batches(windows):
    pytest.importorskip("lerobot")
    ds, norm = windows
    state_keys, env_keys = pl.split_obs_keys(LOWDIM)
    shapes = {k: tuple(v) for k, v in ds.shape_meta()["obs"].items()}
    config = pl.make_config(shapes, state_keys, env_keys, 7, H, N_OBS, N_ACT, sampler="ddim", nfe=3,
                            down_dims=(8, 16), diffusion_step_embed_dim=8)
    policy = pl.make_policy(config)
    obs, action, a_pad, o_pad = pl.collate_windows(ds, list(range(4)))
    loss, _ = policy.forward(pl.to_lerobot_batch(obs, action, norm, state_keys, env_keys, a_pad, o_pad))
    assert torch.isfinite(loss)
    loss.backward()
    adapter = pl.LeRobotDPAdapter(policy, norm, state_keys, env_keys, N_OBS, N_ACT)
    assert adapter.inference_steps == 3
    masked = pl.make_config(shapes, state_keys, env_keys, 7, H, N_OBS, N_ACT, down_dims=(8, 16),
                            diffusion_step_embed_dim=8, options={"do_mask_loss_for_padding": True})
    assert masked.do_mask_loss_for_padding and not config.do_mask_loss_for_padding
    assert adapter.predict_action(obs).shape == (4, N_ACT, 7)


def test_peer_rows_share_policy_json_with_jumpflow_rows(tmp_path):
    out = tmp_path / "policy.json"
    jf = {"task": "t", "objective": "ddpm", "sampler": "ddpm", "nfe": 100, "seed": 0, "success_rate": 0.8}
    out.write_text(json.dumps({"bench": "policy", "config": {"episodes": 50}, "rows": [jf]}))
    args = SimpleNamespace(episodes=50, steps=1000, protocol="dp", override=[])
    peer = {"task": "t", "objective": "lerobot_dp", "variant": pl.peer_variant("jumpflow", (64, 128, 256)),
            "sampler": "ddpm", "nfe": 100, "seed": 0, "success_rate": 0.7}
    pl._write_rows([jf, peer], out, args)
    doc = json.loads(out.read_text())
    # the policy bench's own config survives; the peer's settings sit beside it
    assert doc["bench"] == "policy" and doc["config"]["episodes"] == 50
    assert doc["config"]["peer_lerobot"]["steps"] == 1000
    assert pl.jumpflow_rows("t", out) == [jf] and pl.peer_rows("t", out) == [peer]
    # one key for both benches: a jumpflow DDPM row and the peer's never replace each other
    assert pl.row_key(peer) != pl.row_key(jf)
    assert pl.row_key(peer) == ("t", "lerobot_dp", "unet64-128-256", "ddpm", 100, 0)
    assert pl.peer_variant("lerobot", (8, 16)) == "unet8-16_lerobot_optim"
    # a DiffusionConfig option beyond the defaults is part of the key, so its rows sit beside the default's
    options = pl.parse_options(["do_mask_loss_for_padding=true", "kernel_size=3"])
    assert options == {"do_mask_loss_for_padding": True, "kernel_size": 3}
    assert pl.peer_variant("jumpflow", (64, 128, 256), options) == \
        "unet64-128-256_do_mask_loss_for_padding=True_kernel_size=3"
    with pytest.raises(ValueError, match="--lerobot-option: expected KEY=VALUE, got 'oops'"):
        pl.parse_options(["oops"])
    # and bench.policy writing the same file afterwards keeps the peer's settings, drops its own old ones
    from bench.common import config_keeping
    new = config_keeping(out, {"episodes": 20}, keep=("peer_lerobot",))
    assert new == {"episodes": 20, "peer_lerobot": doc["config"]["peer_lerobot"]}
    assert config_keeping(tmp_path / "missing.json", {"episodes": 20}, keep=("peer_lerobot",)) == {"episodes": 20}


def test_style_mh_labels_rows_as_bench_policy_does_and_composes_the_mh_demos():
    """``--style mh``: rows labelled ``<task>_mh`` (the key jumpflow's mh rows carry) and the recipe
    composed with ``task.demo_style=mh``; ph leaves both as they are; anything else is refused."""
    assert pl.demo_style_recipe("can_lowdim", "ph") == ("can_lowdim", [])
    label, overrides = pl.demo_style_recipe("can_lowdim", "mh")
    assert label == "can_lowdim_mh" and overrides == ["task.demo_style=mh"]
    cfg = pl.compose_recipe("can_lowdim", 10, overrides)
    assert cfg.task.demo_style == "mh" and pl.compose_recipe("can_lowdim", 10).task.demo_style == "ph"
    with pytest.raises(ValueError, match="--style: expected ph or mh, got 'xx'"):
        pl.demo_style_recipe("can_lowdim", "xx")


def test_peer_row_keeps_the_dp_protocol_figures_and_the_rollout_time(monkeypatch):
    """make_row: the last checkpoint's success, DP's max and mean over the checkpoints, mode metrics
    averaged over them, the summed rollout wall time, the options in the variant."""
    monkeypatch.setattr(pl, "lerobot_version", lambda: "0.0-test")
    evals = [{"success_rate": s, "mean_episode_length": 10.0, "env_errors": 0, "rollout_latency_ms_p50": 1.0,
              "eval_seconds": t, "mode_tv": tv} for s, t, tv in ((0.5, 30.0, 0.2), (0.7, 40.0, 0.4))]
    trained = {"train_seconds": 9.0, "checkpoints": [(5, {}), (10, {})], "params": 123, "losses": [0.5, 0.25],
               "state_keys": ["a"], "env_keys": ["b"], "options": {"do_mask_loss_for_padding": True}}
    cfg = SimpleNamespace(trainer=SimpleNamespace(max_steps=10, batch_size=4))
    args = SimpleNamespace(eval_envs=2, episodes=3, protocol="dp", optim="jumpflow")
    row = pl.make_row("t", 1, "ddpm", 100, evals, {"latency_ms_p50": 2.0}, trained, cfg, args, (8, 16))
    assert row["success_rate"] == 0.7 and row["success_max"] == 0.7
    assert row["success_last_mean"] == pytest.approx(0.6) and row["mode_tv"] == pytest.approx(0.3)
    assert row["eval_seconds"] == 70.0 and row["checkpoint_steps"] == [5, 10]
    assert row["variant"] == "unet8-16_do_mask_loss_for_padding=True"
    assert row["lerobot_options"] == {"do_mask_loss_for_padding": True} and row["final_loss"] == pytest.approx(0.375)
    # a window padded for LeRobot's UNet names its horizon in the variant
    padded = pl.make_row("t", 1, "ddpm", 100, evals, {"latency_ms_p50": 2.0},
                         {**trained, "horizon": 8, "task_horizon": 2}, cfg, args, (8, 16))
    assert padded["variant"] == "unet8-16_pad8_do_mask_loss_for_padding=True" and padded["lerobot_horizon"] == 8
    unpadded = pl.make_row("t", 1, "ddpm", 100, evals, {"latency_ms_p50": 2.0},
                           {**trained, "horizon": 8, "task_horizon": 8}, cfg, args, (8, 16))
    assert unpadded["variant"] == row["variant"]


def test_lerobot_horizon_pads_to_the_unet_downsampling_or_refuses_in_one_line():
    assert pl.lerobot_horizon(16, (64, 128, 256)) == 16
    assert pl.lerobot_horizon(2, (64, 128, 256), pad=True) == 8
    assert pl.lerobot_horizon(9, (8, 16), pad=True) == 12
    assert pl.lerobot_horizon(8, (8, 16), pad=True) == 8
    with pytest.raises(ValueError, match=r"horizon 2 is not a multiple of LeRobot's UNet downsampling 8 .*"
                                         r"--pad-horizon to pad the action window to 8 steps") as err:
        pl.lerobot_horizon(2, (64, 128, 256))
    assert "\n" not in str(err.value)


def test_pad_action_window_repeats_the_last_step_and_marks_it_padding():
    action = torch.arange(2 * 2 * 3, dtype=torch.float64).reshape(2, 2, 3)      # (B=2, H=2, A=3)
    is_pad = np.array([[True, False], [False, False]])
    padded, padded_mask = pl.pad_action_window(action, is_pad, 8)
    assert padded.shape == (2, 8, 3) and padded_mask.shape == (2, 8) and padded_mask.dtype == torch.bool
    assert torch.equal(padded[:, :2], action)
    assert torch.equal(padded[:, 2:], action[:, 1:2].expand(-1, 6, -1))
    assert padded_mask.tolist() == [[True, False] + [True] * 6, [False, False] + [True] * 6]
    same, same_mask = pl.pad_action_window(action, is_pad, 2)
    assert torch.equal(same, action) and same_mask.tolist() == is_pad.tolist()
    with pytest.raises(ValueError, match="horizon 1 is shorter than the window's 2 steps"):
        pl.pad_action_window(action, is_pad, 1)


def test_padded_adapter_crops_the_chunk_and_names_its_variant(windows):
    ds, norm = windows
    policy = _StubPolicy(8, N_ACT, 7)                    # LeRobot's UNet runs 8 steps, the task's window is H
    adapter = pl.LeRobotDPAdapter(policy, norm, *pl.split_obs_keys(LOWDIM), N_OBS, N_ACT, horizon=H)
    obs, _, _, _ = pl.collate_windows(ds, [0, 3])
    assert adapter.predict_chunk(obs).shape == (2, H, 7)
    assert adapter.predict_action(obs).shape == (2, N_ACT, 7)
    assert pl.peer_variant("jumpflow", (64, 128, 256), {"do_mask_loss_for_padding": True}, 8) == \
        "unet64-128-256_pad8_do_mask_loss_for_padding=True"
    assert pl.peer_variant("jumpflow", (64, 128, 256), None, None) == "unet64-128-256"


def test_peer_refuses_an_unpaddable_horizon_before_any_work(tmp_path, capsys):
    out = tmp_path / "policy.json"
    with pytest.raises(SystemExit):
        pl.main(["--tasks", "block_push_lowdim", "--seeds", "0", "--steps", "10", "--out", str(out),
                 "--data", str(tmp_path / "no_data")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "block_push_lowdim: the task's horizon 2 is not a multiple of LeRobot's UNet downsampling 8" in err
    assert "--pad-horizon" in err
    assert not out.exists() and not (tmp_path / "no_data").exists()
    # observation keys LeRobot's low-dim DP cannot split are refused the same way, before any work
    with pytest.raises(SystemExit):
        pl.main(["--tasks", "block_push_lowdim", "--pad-horizon", "--env-state-keys", "cube", "--out", str(out),
                 "--data", str(tmp_path / "no_data")])
    assert "block_push_lowdim: env_state_keys ['cube'] are not observation keys" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "no_data").exists()


def test_lerobot_trains_and_acts_on_a_padded_window(windows):
    """LeRobot refuses the task's 5-step window on a two-stage UNet; padded to 8 it trains on the
    padded batch and acts with the task's shapes (LeRobot only)."""
    pytest.importorskip("lerobot")
    ds, norm = windows
    state_keys, env_keys = pl.split_obs_keys(LOWDIM)
    shapes = {k: tuple(v) for k, v in ds.shape_meta()["obs"].items()}
    kw = {"down_dims": (8, 16), "diffusion_step_embed_dim": 8, "sampler": "ddim", "nfe": 2}
    with pytest.raises(ValueError, match="integer multiple of the downsampling factor"):
        pl.make_config(shapes, state_keys, env_keys, 7, H + 1, N_OBS, N_ACT, **kw)
    horizon = pl.lerobot_horizon(H + 1, (8, 16), pad=True)
    assert horizon == 8
    policy = pl.make_policy(pl.make_config(shapes, state_keys, env_keys, 7, horizon, N_OBS, N_ACT, **kw))
    obs, action, a_pad, o_pad = pl.collate_windows(ds, list(range(4)))
    action, a_pad = pl.pad_action_window(action, a_pad, horizon)
    loss, _ = policy.forward(pl.to_lerobot_batch(obs, action, norm, state_keys, env_keys, a_pad, o_pad))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    adapter = pl.LeRobotDPAdapter(policy, norm, state_keys, env_keys, N_OBS, N_ACT, horizon=H)
    assert adapter.predict_chunk(obs).shape == (4, H, 7)
    assert adapter.predict_action(obs).shape == (4, N_ACT, 7)


class _TinyDP(torch.nn.Module):
    """Stands in for LeRobot's DiffusionPolicy in training: ``forward(batch) -> (loss, None)`` with a
    noise draw, so the resumed run must restore the weights, optimiser, EMA and per-step draws."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(9 + 10, 7)          # robot0_* (9) and object (10) of the last step

    def forward(self, batch):
        cond = torch.cat([batch["observation.state"][:, -1], batch["observation.environment_state"][:, -1]], -1)
        pred = self.lin(cond) + 0.1 * torch.randn(cond.shape[0], 7)
        return ((pred - batch["action"][:, 0]) ** 2).mean(), None


def _train_tiny(monkeypatch, ds, ckpt_dir, resume=False, stop_at=None, seed=0):
    monkeypatch.setattr(pl, "make_config", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(pl, "make_policy", lambda config: _TinyDP())
    cfg = pl.compose_recipe("lift_lowdim", 6, ["trainer.batch_size=4", "trainer.log_every=1"])
    task = SimpleNamespace(train_dataset=lambda: ds, obs_keys=LOWDIM, action_dim=7, horizon=H, n_obs_steps=N_OBS,
                           n_action_steps=N_ACT, obs_shapes={k: tuple(v) for k, v in ds.shape_meta()["obs"].items()})

    def log(line):
        if stop_at is not None and f"step {stop_at}/" in line:
            raise KeyboardInterrupt(line)
    return pl.train_lerobot_dp(cfg, task, seed, "jumpflow", (8, 16), ckpt_every=2, keep=5, log=log,
                               ckpt_dir=ckpt_dir, resume=resume)


def test_interrupted_peer_run_resumes_to_the_uninterrupted_weights(windows, tmp_path, monkeypatch):
    ds, _ = windows
    whole = _train_tiny(monkeypatch, ds, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(monkeypatch, ds, tmp_path / "cut", stop_at=5)            # killed after checkpoint 4
    from jumpflow.checkpoint import checkpoint_paths
    assert [p.name for p in checkpoint_paths(tmp_path / "cut")] == ["ckpt_000000002.json", "ckpt_000000004.json"]
    with pytest.raises(ValueError, match="holds checkpoints .*pass --resume"):
        _train_tiny(monkeypatch, ds, tmp_path / "cut")
    with pytest.raises(ValueError, match=r"ckpt_000000004.json was trained with other settings \(seed 0 there, "
                                         r"1 now\): use another --run-dir"):
        _train_tiny(monkeypatch, ds, tmp_path / "cut", resume=True, seed=1)
    resumed = _train_tiny(monkeypatch, ds, tmp_path / "cut", resume=True)
    assert resumed["resumed_from_step"] == 4 and whole["resumed_from_step"] is None
    assert [s for s, _ in resumed["checkpoints"]] == [s for s, _ in whole["checkpoints"]] == [2, 4, 6]
    for (_, a), (_, b) in zip(whole["checkpoints"], resumed["checkpoints"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)     # the EMA weights
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=0, abs=0)
    assert len(resumed["losses"]) == 6 and resumed["train_seconds"] > 0


def test_resume_needs_a_run_dir(capsys):
    with pytest.raises(SystemExit):
        pl.main(["--tasks", "reach_around_lowdim", "--resume"])
    assert "--resume continues the runs of a --run-dir: name it" in capsys.readouterr().err


def test_peer_refuses_a_run_folder_it_cannot_resume_before_any_work(tmp_path, capsys):
    from jumpflow.checkpoint import save_checkpoint
    ckpt_dir = pl.seed_run_dir(tmp_path / "runs", "lift_lowdim", "unet64-128-256", 0) / "checkpoints"
    save_checkpoint(ckpt_dir, 100, {"model.w": torch.zeros(1)}, {"peer": {"seed": 0}})
    out = tmp_path / "policy.json"
    common = ["--tasks", "lift_lowdim", "--seeds", "0", "--run-dir", str(tmp_path / "runs"), "--out", str(out),
              "--data", str(tmp_path / "no_data")]
    with pytest.raises(SystemExit):
        pl.main(common)
    assert f"{ckpt_dir} holds checkpoints (ckpt_000000100.json): pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pl.main([*common, "--resume"])
    err = capsys.readouterr().err
    assert "ckpt_000000100.json was trained with other settings (" in err and "steps None there, 1000 now" in err
    assert not out.exists() and not (tmp_path / "no_data").exists()
    assert pl.padded_horizon(8, 2) == 8 and pl.padded_horizon(16, 16) is None
