"""Bad configuration values fail before training starts, with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.config import ConfigError, check_group_overrides, group_options, validate_config
from jumpflow.objectives import OBJECTIVES
from jumpflow.tasks import Task
from jumpflow.trainer import build_components, train

TINY = ["logger=none", "trainer.progress=false", "trainer.cpu_threads=1", "++backbone.width=32",
        "++backbone.depth=1", "task.n=512", "trainer.batch_size=32", "trainer.max_steps=2",
        "trainer.eval_every=0", "trainer.eval_at_end=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def make_cfg(run_dir, *overrides):
    with initialize_config_module("jumpflow.configs", version_base=None):
        return compose("train", overrides=[f"run_dir={run_dir}", *TINY, *overrides])


def fails_before_writing(tmp_path, key: str, *overrides) -> str:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(make_cfg(run_dir, *overrides))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{key}: "), msg
    assert err.value.key == key
    assert not run_dir.exists()                 # nothing written, nothing trained
    return msg


class ChunkTask(Task):
    """An action-chunk shaped task, to check that backbone constructor errors surface early."""

    def __init__(self, horizon: int = 16, action_dim: int = 7):
        self.shape, self.cond_dim = (horizon, action_dim), 0

    def build_model(self, backbone, objective):
        from jumpflow.generator import Generator

        return Generator(backbone, objective, None, shape=self.shape)


def test_shipped_objective_configs_match_the_registry():
    assert group_options("objective") == sorted(OBJECTIVES)
    for name in OBJECTIVES:
        with initialize_config_module("jumpflow.configs", version_base=None):
            cfg = compose("train", overrides=[f"objective={name}", "run_dir=/nonexistent"])
        from hydra.utils import instantiate

        assert isinstance(instantiate(cfg.objective), OBJECTIVES[name])


@pytest.mark.parametrize("override,key,text", [
    ("optim.lr=-1e-3", "optim.lr", "must be > 0"),
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("trainer.batch_size=0", "trainer.batch_size", "must be >= 1"),
    ("trainer.max_steps=-5", "trainer.max_steps", "must be >= 1"),
    ("trainer.num_workers=-1", "trainer.num_workers", "must be >= 0"),
    ("trainer.grad_clip=0", "trainer.grad_clip", "must be > 0"),
    ("trainer.precision=fp8", "trainer.precision", "must be one of fp32, bf16"),
    ("optim.betas=[0.9,1.5]", "optim.betas", "two numbers in [0, 1)"),
    ("ema.decay=1.5", "ema.decay", "must be < 1"),
    ("logger=tensorboard", "logger", "must be one of wandb, none"),
    ("trainer.batch_size=abc", "trainer.batch_size", "must be a number"),
    ("objective._target_=jumpflow.objectives.Nope", "objective._target_", "valid: ddpm, drifting"),
    ("objective.ratio_r_neq_t=2.0", "objective.ratio_r_neq_t", "must be in [0, 1]"),
    ("objective.tangent=v_2_1", "objective.tangent", "must be one of"),
    ("task.dataset=donut", "task.dataset", "unknown 2-D toy"),
    ("trainer.batch_size=1000", "trainer.batch_size", "larger than the dataset"),
    pytest.param("trainer.device=cuda", "trainer.device", "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_values_fail_early_naming_the_key(tmp_path, override, key, text):
    extra = ["objective=meanflow"] if override.startswith("objective.") and "_target_" not in override else []
    msg = fails_before_writing(tmp_path, key, *extra, override)
    assert text in msg


def test_bad_horizon_fails_before_training(tmp_path):
    """A horizon the 1-D UNet cannot halve fails in the backbone constructor, before anything runs."""
    pytest.importorskip("jumpflow.backbones.unet")
    task = [f"task._target_={__name__}.ChunkTask", "~task.dataset", "~task.n", "~task.data_seed", "~task.conditional",
            "~task.cond_dim", "~task.eval_samples", "~task.eval_steps", "~task.eval_projections", "+task.horizon=10"]
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"run_dir={tmp_path / 'run'}", "logger=none", "backbone=unet1d_s", *task])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith("backbone") and "horizon 10" in msg and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()
    with initialize_config_module("jumpflow.configs", version_base=None):
        ok = compose("train", overrides=[f"run_dir={tmp_path / 'ok'}", "backbone=unet1d_s", *task[:-1],
                                         "+task.horizon=16"])
    assert build_components(ok).backbone is not None


def test_unknown_group_option_lists_valid_names():
    with pytest.raises(ConfigError, match="objective: unknown objective 'nope'; valid: ddpm, drifting"):
        check_group_overrides(["objective=nope"])
    with pytest.raises(ConfigError, match="unknown objective 'bad'"):
        check_group_overrides(["-m", "objective=meanflow,bad"])
    check_group_overrides(["objective=meanflow", "task=toy2d", "--cfg", "job", "optim.lr=1"])


def test_validate_accepts_the_shipped_defaults(tmp_path):
    validate_config(make_cfg(tmp_path))
    with initialize_config_module("jumpflow.configs", version_base=None):
        validate_config(compose("train", overrides=["run_dir=x", "experiment=toy2d_meanflow"]))


@pytest.mark.parametrize("args,key", [
    (["objective=nope"], ("objective: unknown objective 'nope'; valid: ddpm, drifting, flow_matching, meanflow, "
                          "transition_matching, tvm")),
    (["optim.lr=-0.001"], "optim.lr: must be > 0, got -0.001"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, key):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jumpflow.cli.train", f"hydra.run.dir={run_dir}", "logger=none",
                          *args], env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"jumpflow-train: error: {key}"
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_toy2d_experiments_compose_validate_and_build(name):
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=unused", f"experiment=toy2d_{name}"])
    validate_config(cfg)
    assert isinstance(build_components(cfg).objective, OBJECTIVES[name])


POLICY_TASKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "task").glob("*_lowdim.yaml")) + \
    sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "task").glob("*_image.yaml"))
POLICY_EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml")
                            if p.stem.split("_")[0] in {"lift", "can", "square"})


@pytest.mark.parametrize("task", POLICY_TASKS)
def test_policy_task_configs_compose_with_the_cpu_recipe(task):
    """Every robot task (Lift, Can and Square; low-dim and image) validates under the shared recipe,
    names a task the scripted experts can demonstrate, and keeps its own dataset file."""
    from jumpflow.envs.experts import EXPERTS

    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=unused", "experiment=lift_lowdim_meanflow", f"task={task}"])
    validate_config(cfg)
    assert cfg.task.env in EXPERTS
    stem = Path(cfg.task.dataset).name
    assert stem.startswith(task.split("_")[0] + "_ph_" + task.split("_")[1]) and cfg.task.image == task.endswith("_image")


@pytest.mark.parametrize("name", POLICY_EXPERIMENTS)
def test_policy_experiments_compose_and_validate(name):
    task, objective = name.split("_", 2)[:2], name.split("_", 2)[2]
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=unused", f"experiment={name}"])
    validate_config(cfg)
    assert cfg.objective._target_.rsplit(".", 1)[-1] == OBJECTIVES[objective].__name__
    assert cfg.task.image == (task[1] == "image")
