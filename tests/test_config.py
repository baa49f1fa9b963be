"""Bad configuration values fail before training starts, with one line naming the key."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from jumpflow.build import build_components
from jumpflow.config import ConfigError, check_group_overrides, group_options, validate_config
from jumpflow.objectives import OBJECTIVES
from jumpflow.tasks import Task
from jumpflow.trainer import train

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
    ("trainer.jvp_bf16=true", "trainer.jvp_bf16", "needs precision: bf16"),
    ("optim.betas=[0.9,1.5]", "optim.betas", "two numbers in [0, 1)"),
    ("ema.decay=1.5", "ema.decay", "must be in [0, 1)"),
    ("logger=tensorboard", "logger", "must be one of wandb, none"),
    ("trainer.batch_size=abc", "trainer.batch_size", "could not be converted to Integer"),
    ("objective._target_=jumpflow.objectives.Nope", "objective._target_", "valid: alpha_flow, consistency, ddpm"),
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
    task = [f"task._target_={__name__}.ChunkTask", "~task.dataset", "~task.n", "~task.data_seed", "~task.conditional",
            "~task.cond_dim", "~task.eval_samples", "~task.eval_steps", "~task.eval_projections", "+task.horizon=10"]
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"run_dir={tmp_path / 'run'}", "logger=none", "backbone=unet1d", "backbone.size=S", *task])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert msg.startswith("backbone") and "horizon 10" in msg and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()
    with initialize_config_module("jumpflow.configs", version_base=None):
        ok = compose("train", overrides=[f"run_dir={tmp_path / 'ok'}", "backbone=unet1d", "backbone.size=S", *task[:-1],
                                         "+task.horizon=16"])
    assert build_components(ok).backbone is not None


def test_unknown_group_option_lists_valid_names():
    with pytest.raises(ConfigError, match="objective: unknown objective 'nope'; valid: alpha_flow, consistency, ddpm"):
        check_group_overrides(["objective=nope"])
    with pytest.raises(ConfigError, match="unknown objective 'bad'"):
        check_group_overrides(["-m", "objective=meanflow,bad"])
    check_group_overrides(["objective=meanflow", "task=toy2d", "--cfg", "job", "optim.lr=1"])


def test_validate_accepts_the_shipped_defaults(tmp_path):
    validate_config(make_cfg(tmp_path))
    with initialize_config_module("jumpflow.configs", version_base=None):
        validate_config(compose("train", overrides=["run_dir=x", "experiment=toy2d", "objective=meanflow"]))


@pytest.mark.parametrize("args,key", [
    (["objective=nope"], f"objective: unknown objective 'nope'; valid: {', '.join(sorted(OBJECTIVES))}"),
    (["optim.lr=-0.001"], "optim.lr: must be > 0, got -0.001"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, args, key):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jumpflow.cli.train", f"hydra.run.dir={run_dir}", "logger=none",
                          *args], env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"jumpflow-train: error: {key}"
    assert not run_dir.exists() or not any(run_dir.iterdir())


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONFIGS / "task").glob("*.yaml"))
#: which tasks each recipe's workload takes
WORKLOAD_TASKS = {"policy": [t for t in TASKS if t.endswith(("_lowdim", "_image")) or t == "metaworld"], "toy2d": ["toy2d"],
                  "mnist": ["mnist"], "imagenet256": ["imagenet256_latent", "imagenet256_pixel", "fake"]}


@functools.cache
def _recipe_workload(recipe: str) -> str:
    """The workload a recipe selects (hydra's recorded choice of the ``workload`` group)."""
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["run_dir=unused", f"experiment={recipe}"], return_hydra_config=True)
    return cfg.hydra.runtime.choices.workload


ALL_COMBOS = [(r, t, o) for r in RECIPES for t in WORKLOAD_TASKS[_recipe_workload(r)] for o in sorted(OBJECTIVES)]
#: the default run covers every recipe, every task of its workload and every objective at least
#: once (each on a recipe's first task / objective); the whole product runs under -m slow
COMBOS = sorted({c for c in ALL_COMBOS if c[1] == WORKLOAD_TASKS[_recipe_workload(c[0])][0]
                 or c[2] == "meanflow"})
SLOW_COMBOS = [c for c in ALL_COMBOS if c not in COMBOS]


def test_experiment_folder_holds_recipes_only():
    """A run is recipe + task + objective: at most 10 recipe files, none named after an objective."""
    assert 0 < len(RECIPES) <= 10
    assert not [r for r in RECIPES if any(o in r for o in OBJECTIVES)]


@pytest.mark.parametrize("recipe,task,objective", COMBOS + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_COMBOS],
                         ids=["-".join(c) for c in COMBOS + SLOW_COMBOS])
def test_every_task_composes_with_every_objective_and_recipe(recipe, task, objective):
    """Config only (no data, no training): compose, validate against the typed schemas, and
    build the objective; the per-(workload, objective) specialization lands where it exists."""
    overrides = ["run_dir=unused", f"experiment={recipe}", f"task={task}", f"objective={objective}"]
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=overrides)
    validate_config(cfg)
    from jumpflow.build import build_objective

    assert isinstance(build_objective(cfg), OBJECTIVES[objective])
    workload = _recipe_workload(recipe)
    special = CONFIGS / "specialize" / workload / f"{objective}.yaml"
    if special.exists() and objective == "drifting" and workload == "policy":
        assert cfg.objective.group_by == "sample"


@pytest.mark.parametrize("override,key", [
    ("objective.ratio_r_neq_t=2.0", "objective.ratio_r_neq_t"),
    ("backbone.depth=-1", "backbone.depth"),
    ("backbone.size=Q", "backbone.size"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("+task.inference.sampler=heun", "task.inference.sampler"),
    ("+objective.nonsense=1", "objective.nonsense"),
    ("task.demo_style=xx", "task.demo_style"),
])
def test_bad_value_on_a_missing_dataset_fails_before_generating_anything(tmp_path, override, key):
    """The issue's report: a bad objective value used to be rejected only after 200 demos had
    been generated and written. Now nothing is generated, written or trained."""
    data = tmp_path / "data" / "lift.hdf5"
    with initialize_config_module("jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[f"run_dir={tmp_path / 'run'}", "experiment=policy_cpu", "logger=none",
                                          f"task.dataset={data}", override])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert err.value.key.startswith(key) and "\n" not in str(err.value), str(err.value)
    assert not data.exists() and not data.parent.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("group,node,key", [
    ("trainer", {"max_steps": 0}, "trainer.max_steps"),
    ("trainer", {"precision": "fp16"}, "trainer.precision"),
    ("trainer", {"cpu_threads": "two"}, "trainer.cpu_threads"),
    ("optim", {"betas": [0.9]}, "optim.betas"),
    ("optim", {"schedule": "linear"}, "optim.schedule"),
    ("ema", {"power": -1.0}, "ema.power"),
    ("ema", {"decay": "high"}, "ema.decay"),
])
def test_structured_configs_name_the_key_once(tmp_path, group, node, key):
    from omegaconf import open_dict

    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        cfg[group].update(node)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert err.value.key == key and str(err.value).count(key) == 1, str(err.value)


def test_schema_from_signature_types_and_defaults():
    from jumpflow.schemas import component_schema

    schema = component_schema(OBJECTIVES["meanflow"])
    fields = {f.name: f for f in __import__("dataclasses").fields(schema)}
    assert fields["ratio_r_neq_t"].default == 0.25 and fields["ratio_r_neq_t"].type is float
    assert "inference" in fields and component_schema(OBJECTIVES["meanflow"]) is schema
