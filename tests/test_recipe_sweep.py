"""bench.recipe_sweep: every recipe composes into a valid main-job config, and a wall time is
split at the final checkpoint; bench.code_ab refuses trees without jumpflow before any run."""

import os
import time

import pytest
from hydra import compose, initialize_config_module

from bench.recipe_sweep import ONE_CORE, RECIPES, main, train_and_eval_seconds
from jumpflow.config import validate_config


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_composes_and_validates(name):
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=["experiment=policy_cpu", "run_dir=unused", *ONE_CORE, *RECIPES[name]])
    validate_config(cfg)
    assert cfg.trainer.cpu_threads == 1 and cfg.task.eval_videos == 0
    for override in RECIPES[name]:
        key, value = override.split("=")
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert str(node) == value or float(node) == float(value), override


def test_wall_split_at_final_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    config, ckpt = tmp_path / "config.yaml", tmp_path / "checkpoints" / "ckpt_000000100.json"
    config.write_text("x"), ckpt.write_text("{}")
    now = time.time()
    os.utime(config, (now - 50, now - 50))
    os.utime(ckpt, (now - 20, now - 20))
    train_s, eval_s = train_and_eval_seconds(tmp_path, wall=60.0, started=now - 55)
    assert train_s == pytest.approx(30.0, abs=1e-3)
    assert eval_s == pytest.approx(25.0, abs=1e-3)   # ends at now + 5


def test_unknown_recipe_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="unknown recipe"):
        main(["--recipes", "nope", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o.json").exists()


def test_code_ab_refuses_a_tree_without_jumpflow_before_running(tmp_path):
    from bench.code_ab import main as code_ab

    (tmp_path / "good" / "jumpflow").mkdir(parents=True)
    (tmp_path / "good" / "jumpflow" / "__init__.py").write_text("")
    out = tmp_path / "ab.json"
    with pytest.raises(SystemExit, match="missing"):
        code_ab(["--tree", f"a={tmp_path / 'good'}", "--tree", f"b={tmp_path / 'empty'}", "--tag", "t",
                 "--out", str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit, match="--tree takes label=path"):
        code_ab(["--tree", str(tmp_path / "good"), "--tree", f"b={tmp_path / 'good'}", "--tag", "t",
                 "--out", str(out)])
    assert not out.exists()
