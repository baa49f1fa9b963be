"""bench.recipe_sweep: every recipe composes into a valid main-job config; bench.main_job splits a
run's wall time (startup and demos, setup, training, evaluation) from its files; bench.suite_time
selects the baseline tests; bench.code_ab refuses trees without jumpflow before any run."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from bench.main_job import phase_seconds, run_started
from bench.recipe_sweep import ONE_CORE, RECIPES, main
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


def test_main_job_phases_from_the_runs_files(tmp_path):
    """Training time is the sum of logged steps / it_per_s (intervals of 100 steps at 10 and 5
    it/s: 10 s + 20 s); before the config file: startup and demos; the rest up to the final checkpoint:
    setup; evaluation after it."""
    run = tmp_path / "policy_cpu_tag_20261202_120000"
    (run / "checkpoints").mkdir(parents=True)
    config, ckpt = run / "config.yaml", run / "checkpoints" / "ckpt_000000200.json"
    config.write_text("x"), ckpt.write_text("{}")
    lines = [{"step": 100, "train/it_per_s": 10.0}, {"step": 100, "eval/success_rate": 1.0},
             {"step": 200, "train/it_per_s": 5.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    started = run_started(run)
    assert time.strftime("%Y%m%d_%H%M%S", time.localtime(started)) == "20261202_120000"
    os.utime(config, (started + 4, started + 4))
    os.utime(ckpt, (started + 54, started + 54))
    phases = phase_seconds(run, wall=70.0, started=started)
    assert phases["startup_and_demos_seconds"] == pytest.approx(4.0)
    assert phases["train_seconds"] == pytest.approx(30.0)
    assert phases["train_it_per_s"] == pytest.approx(200 / 30)
    assert phases["setup_seconds"] == pytest.approx(20.0)
    assert phases["eval_seconds"] == pytest.approx(16.0)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/success_rate": 1.0}) + "\n")
    with pytest.raises(RuntimeError, match="no training rate"):
        phase_seconds(Path(run), wall=70.0, started=started)


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


def test_suite_time_selects_the_baseline_tests_with_all_their_parameters():
    from bench.suite_time import select, test_names_at

    ids = ["tests/test_a.py::test_one", "tests/test_a.py::test_two[x-1]", "tests/test_a.py::test_two[y 2]",
           "tests/test_b.py::test_one", "tests/test_a.py::test_three"]
    assert select(ids, {"test_a.py::test_one", "test_a.py::test_two"}) == ids[:3]
    here = test_names_at("HEAD")
    assert "test_recipe_sweep.py::test_main_job_phases_from_the_runs_files" in here
    assert "test_core.py::test_time_convention_pinned" in here and "test_recipe_sweep.py::test_a" not in here


def test_bench_refusals_are_one_line_before_any_run(tmp_path):
    """bench.suite_time with a revision git cannot read, and bench.main_job --refresh without a
    result file, stop with one line and write nothing."""
    from bench.main_job import main as main_job
    from bench.suite_time import main as suite_time

    with pytest.raises(SystemExit, match="--baseline no-such-rev: git cannot read tests/"):
        suite_time(["--baseline", "no-such-rev", "--only", "baseline"])
    missing = tmp_path / "main_job.json"
    with pytest.raises(SystemExit, match=f"--refresh: no result file {missing}"):
        main_job(["--refresh", "--out", str(missing)])
    assert not missing.exists()


def test_policy_bench_fills_the_seed_into_overrides_and_composes():
    """bench.policy: ``{seed}`` in ``--override`` becomes each run's training seed (a distilled
    student reads its own seed's teacher); mh style and the DP protocol's checkpoint schedule reach
    the config, which composes and validates."""
    from bench.policy import DP_CHECKPOINTS, parser, run_overrides

    args = parser().parse_args(["--style", "mh", "--protocol", "dp", "--steps", "1000",
                                "--override", "objective.teacher=/runs/lift_ddpm_s{seed}", "--override", "optim.lr=2e-3"])
    for seed in (0, 2):
        ov = run_overrides(args, "lift_lowdim", "distill_consistency", seed, Path(f"/runs/student_s{seed}"))
        assert f"objective.teacher=/runs/lift_ddpm_s{seed}" in ov and f"seed={seed}" in ov
        assert not any("{seed}" in o for o in ov)
        with initialize_config_module(config_module="jumpflow.configs", version_base=None):
            cfg = compose("train", overrides=ov)
        validate_config(cfg)
        assert cfg.objective.teacher == f"/runs/lift_ddpm_s{seed}" and cfg.seed == seed
        assert cfg.task.demo_style == "mh" and cfg.optim.lr == 2e-3 and cfg.trainer.max_steps == 1000
        assert cfg.trainer.ckpt_every == 1000 // (2 * DP_CHECKPOINTS) and cfg.trainer.keep_checkpoints == DP_CHECKPOINTS


def test_policy_bench_keeps_config_variants_apart():
    """A ``--variant`` row (e.g. ARTM with one token per action step) neither replaces nor is
    averaged with the shipped config's row of the same objective, sampler, NFE and seed."""
    from bench.policy import row_key, seed_summary

    base = {"task": "t", "objective": "transition_matching_ar", "sampler": "transition_matching_ar", "nfe": 4,
            "success_rate": 0.5, "train_steps": 10}
    rows = [{**base, "seed": 0}, {**base, "seed": 1, "success_rate": 0.7},
            {**base, "seed": 0, "success_rate": 1.0, "variant": "tokens16"}]
    assert len({row_key(r) for r in rows}) == 3
    summary = {r["objective"]: r for r in seed_summary(rows)}
    assert summary["transition_matching_ar"]["success_mean"] == 0.6 and summary["transition_matching_ar"]["seeds"] == "0,1"
    assert summary["transition_matching_ar [tokens16]"]["success_mean"] == 1.0
    # seeds that ran at different episode limits are averaged, and the summary says so
    mixed = seed_summary([{**base, "seed": 0, "eval_max_steps": 500}, {**base, "seed": 1}])
    assert mixed[0]["eval_max_steps"] == "500,task" and seed_summary(rows[:2])[0]["eval_max_steps"] == "task"


def test_bench_smoke_covers_every_script_and_refuses_unknown_names():
    """bench.smoke has a smallest setting (or a reason not to run) for every bench script, and an
    unknown ``--only`` name stops it with one line before anything runs."""
    from bench import smoke

    assert smoke.scripts_without_setting() == []
    assert set(smoke.THEN) <= set(smoke.SMALLEST)
    with pytest.raises(SystemExit, match="unknown script"):
        smoke.main(["--only", "toy2d,nope"])


def test_policy_bench_refuses_an_unknown_metaworld_task_before_any_run(tmp_path, capsys):
    from bench.policy import main as policy_main

    with pytest.raises(SystemExit):
        policy_main(["--tasks", "metaworld:nope-v3", "--objectives", "regression", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--tasks: unknown MetaWorld task 'nope-v3'; valid: " in err and "reach-v3" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):
        policy_main(["--tasks", "metaworld:reach-v3", "--style", "mh", "--runs", str(tmp_path / "runs")])
    assert "ph only" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_policy_bench_metaworld_tasks_expand_compose_and_average_per_group():
    """``--tasks metaworld`` is the task set (every group present), ``metaworld:<name>`` one task
    whose overrides compose to ``task=metaworld task.env=<name>``; the per-group table is the mean
    over a group's tasks of each task's seed mean; an unknown name stops with one line."""
    from bench.policy import group_summary, parser, run_overrides, task_specs
    from jumpflow.envs.metaworld_env import GROUPS, TASK_SET

    specs = task_specs("metaworld")
    assert [label for _, label, _, _ in specs] == [f"metaworld_{t}" for t in TASK_SET]
    assert {f["group"] for *_, f in specs} == set(GROUPS)
    (cfg_task, label, extra, fields), plain = task_specs("metaworld:push-v3,lift_lowdim")
    assert (cfg_task, label, extra, fields) == ("metaworld", "metaworld_push-v3", ["task.env=push-v3"],
                                                {"family": "metaworld", "group": "hard"})
    assert plain == ("lift_lowdim", "lift_lowdim", [], {})
    ov = run_overrides(parser().parse_args([]), cfg_task, "regression", 1, Path("/runs/x"), extra)
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=ov)
    validate_config(cfg)
    assert cfg.task.env == "push-v3" and cfg.task.dataset.endswith("metaworld_push-v3_10.hdf5")
    with pytest.raises(ValueError, match="unknown MetaWorld task 'pushh-v3'; valid: .*push-v3"):
        task_specs("metaworld:pushh-v3")

    def row(task, group, seed, rate, objective="meanflow", nfe=1):
        return {"task": task, "family": "metaworld", "group": group, "objective": objective, "sampler": objective,
                "nfe": nfe, "seed": seed, "success_rate": rate}
    rows = [row("metaworld_reach-v3", "easy", 0, 1.0), row("metaworld_reach-v3", "easy", 1, 0.5),
            row("metaworld_button-press-v3", "easy", 0, 0.0), row("metaworld_push-v3", "hard", 0, 0.4),
            row("metaworld_push-v3", "hard", 0, 0.9, objective="regression"), {**row("lift", "easy", 0, 1.0),
                                                                                "family": None}]
    summary = {(r["objective"], r["group"]): r for r in group_summary(rows)}
    assert summary[("meanflow", "easy")]["success_mean"] == 0.375 and summary[("meanflow", "easy")]["tasks"] == 2
    assert summary[("meanflow", "hard")]["success_mean"] == 0.4 and summary[("regression", "hard")]["tasks"] == 1
    assert len(summary) == 3


def test_policy_bench_optional_variants_only_when_named_and_bad_names_stop_before_any_run(tmp_path, capsys):
    """``ddim:100`` (a DDPM policy's ODE, a distilled student's ceiling) is evaluated only when
    ``--variants`` names it; a pair no requested objective offers, or an unknown objective, stops
    the bench with one line before any run directory exists."""
    from bench.policy import VARIANTS, select_variants, variant_order
    from bench.policy import main as policy_main

    assert ("ddim", 100, "ddim") not in select_variants("ddpm", None)
    assert select_variants("ddpm", None) == VARIANTS["ddpm"]
    assert select_variants("ddpm", {"ddim:100", "ddpm:100"}) == [("ddpm", 100, "ddpm"), ("ddim", 100, "ddim")]
    assert select_variants("meanflow", {"ddim:100"}) == []
    order = variant_order()
    assert order.index(("ddpm", "ddim", 100)) == order.index(("ddpm", "ddpm", 1)) + 1
    runs = tmp_path / "runs"
    for argv, message in ((["--objectives", "ddpm", "--variants", "ddim:1000"], "--variants: ['ddim:1000'] not offered"),
                          (["--objectives", "meanflow", "--variants", "ddim:100"], "--variants: ['ddim:100'] not offered"),
                          (["--objectives", "meanflw"], "--objectives: unknown ['meanflw']"),
                          (["--objectives", "meanflow", "--steps", "0"], "--steps: must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            policy_main([*argv, "--runs", str(runs)])
        assert message in capsys.readouterr().err and not runs.exists()


def test_policy_bench_says_when_it_skips_rows_that_exist(tmp_path, monkeypatch, capsys):
    """Without ``--overwrite`` a seed whose rows are all in policy.json is skipped with one line
    saying so (a queued re-run must not pass silently), and nothing is trained."""
    import json

    from bench import policy

    monkeypatch.setattr(policy, "RESULTS", tmp_path)
    row = {"task": "lift_lowdim", "objective": "regression", "sampler": "regression", "nfe": 1, "seed": 0,
           "success_rate": 0.5}
    (tmp_path / "policy.json").write_text(json.dumps({"bench": "policy", "rows": [row]}))
    policy.main(["--objectives", "regression", "--seeds", "0", "--runs", str(tmp_path / "runs")])
    assert "skip lift_lowdim regression seed 0: its rows exist (--overwrite re-runs them)" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_checkpoint_curves_average_seeds_per_step_and_plot(tmp_path, monkeypatch):
    """The per-checkpoint plot averages each step over the seeds evaluated there (exact on
    hand-made rows), labels samplers and variants apart, leaves final-only rows out, and names a
    row whose steps and successes disagree in length."""
    from bench import plot_policy

    def row(obj, sampler, nfe, seed, steps, succ, **kw):
        return {"task": "t", "objective": obj, "sampler": sampler, "nfe": nfe, "seed": seed,
                "success_rate": succ[-1] if succ else 0.0, "checkpoint_steps": steps,
                "checkpoint_successes": succ, **kw}

    rows = [row("ddpm", "ddpm", 100, 0, [10, 20], [0.2, 0.4]), row("ddpm", "ddpm", 100, 1, [10, 20], [0.4, 0.8]),
            row("ddpm", "ddim", 10, 0, [10, 20], [0.1, 0.3]),
            row("flow_matching", "flow_matching", 1, 0, [10, 20], [0.5, 0.1], variant="h2"),
            {"task": "t", "objective": "regression", "sampler": "regression", "nfe": 1, "seed": 0, "success_rate": 0.1},
            row("ddpm", "ddpm", 100, 0, [10], [0.9], task="other")]
    curves = plot_policy.checkpoint_curves(rows, "t")
    assert set(curves) == {"ddpm-100", "ddim-10", "flow_matching-1 (h2)"}
    assert curves["ddpm-100"] == {10: (pytest.approx(0.3), 2), 20: (pytest.approx(0.6), 2)}
    assert curves["ddim-10"] == {10: (0.1, 1), 20: (0.3, 1)}
    assert plot_policy.legend_label("ddpm-100", curves["ddpm-100"]) == "ddpm-100, n=2"
    assert plot_policy.legend_label("x", {10: (0.5, 1), 20: (0.5, 3)}) == "x, n=1-3"
    assert set(plot_policy.checkpoint_curves(rows, "t", variant="h2")) == {"flow_matching-1 (h2)"}
    monkeypatch.setattr(plot_policy, "RESULTS", tmp_path)
    assert plot_policy.plot_checkpoints(rows, "t") == tmp_path / "policy_checkpoints_t.png"
    assert (tmp_path / "policy_checkpoints_t.png").stat().st_size > 0
    assert plot_policy.plot_checkpoints(rows, "missing") is None
    assert plot_policy.plot_checkpoints(rows, "t", variant="h2") == tmp_path / "policy_checkpoints_t_h2.png"
    bad = [row("ddpm", "ddpm", 100, 3, [10, 20], [0.2])]
    with pytest.raises(ValueError, match="ddpm-100 seed 3: 2 checkpoint steps but 1 successes"):
        plot_policy.checkpoint_curves(bad, "t")


def test_curve_styles_stay_apart_past_one_palette():
    """The checkpoint and NFE plots hold up to ~25 curves on Reach Around: no two of the first 30
    share colour, marker and line style at once (ten colours alone repeat from the eleventh)."""
    from bench import plot_policy

    styles = [tuple(sorted(plot_policy.curve_style(i).items())) for i in range(30)]
    assert len(set(styles)) == 30
    assert plot_policy.curve_style(0)["color"] == plot_policy.curve_style(10)["color"]
    assert plot_policy.curve_style(0)["linestyle"] != plot_policy.curve_style(10)["linestyle"]


def test_plot_policy_refuses_an_unknown_variant_before_writing(tmp_path, monkeypatch, capsys):
    """``--variant`` naming no row of the task: one line naming the file and the valid variants,
    and no plot written."""
    import json

    from bench import plot_policy

    monkeypatch.setattr(plot_policy, "RESULTS", tmp_path)
    row = {"task": "t", "objective": "ddpm", "sampler": "ddpm", "nfe": 100, "seed": 0, "success_rate": 0.5,
           "variant": "h2", "checkpoint_steps": [1], "checkpoint_successes": [0.5]}
    (tmp_path / "policy.json").write_text(json.dumps({"bench": "policy", "rows": [row]}))
    with pytest.raises(SystemExit):
        plot_policy.main(["--task", "t", "--variant", "h3"])
    err = capsys.readouterr().err
    assert "--variant: 'h3' has no rows of t in" in err and "policy.json; valid: h2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]


def test_plot_policy_variant_draws_its_own_rows_into_its_own_files(tmp_path, monkeypatch, capsys):
    """``--variant V``: the modes, NFE and checkpoint plots take only V's rows and are written as
    ``policy_<kind>_<task>_V.png`` beside the unfiltered plots, which keep every row."""
    import json

    from bench import plot_policy

    monkeypatch.setattr(plot_policy, "RESULTS", tmp_path)

    def row(variant, nfe, a):
        return {"task": "t", "objective": "meanflow", "sampler": "meanflow", "nfe": nfe, "seed": 0,
                "success_rate": a, "variant": variant, "mode_entropy_ratio": 1.0, "mode_freq/left": a,
                "mode_freq/right": 1.0 - a, "checkpoint_steps": [5, 10], "checkpoint_successes": [a / 2, a]}

    rows = [row("short", 1, 0.2), row("long", 1, 0.8), row("long", 2, 0.6)]
    (tmp_path / "policy.json").write_text(json.dumps({"bench": "policy", "rows": rows}))
    _, mean, _ = plot_policy.mode_rows(plot_policy.of_variant(rows, "long"), "t")
    assert set(mean) == {"meanflow-1 (long)", "meanflow-2 (long)"}
    assert mean["meanflow-1 (long)"] == {"left": 0.8, "right": pytest.approx(0.2)}
    plot_policy.main(["--task", "t", "--variant", "long"])
    out = capsys.readouterr().out
    assert "meanflow-1 (long)" in out and "(short)" not in out
    plot_policy.main(["--task", "t"])
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "policy_checkpoints_t.png", "policy_checkpoints_t_long.png", "policy_modes_t.png",
        "policy_modes_t_long.png", "policy_nfe_t.png", "policy_nfe_t_long.png"]
    assert "meanflow-1 (short)" in capsys.readouterr().out


def test_plot_policy_also_adds_another_variants_rows_to_the_named_plots(tmp_path, monkeypatch, capsys):
    """``--variant V --also W``: W's rows join V's plots (labelled by their variant), the files keep
    V's name, and a W without rows (or ``--also`` without ``--variant``) is refused in one line."""
    import json

    from bench import plot_policy

    monkeypatch.setattr(plot_policy, "RESULTS", tmp_path)

    def row(variant, a):
        return {"task": "t", "objective": "meanflow", "sampler": "meanflow", "nfe": 1, "seed": 0,
                "success_rate": a, "variant": variant, "mode_entropy_ratio": 1.0, "mode_freq/left": a,
                "mode_freq/right": 1.0 - a, "checkpoint_steps": [5, 10], "checkpoint_successes": [a / 2, a]}

    rows = [row("base", 0.2), row("tuned", 0.8), row("other", 0.5)]
    (tmp_path / "policy.json").write_text(json.dumps({"bench": "policy", "rows": rows}))
    curves = plot_policy.checkpoint_curves(rows, "t", "base", ("tuned",))
    assert curves == {"meanflow-1 (base)": {5: (0.1, 1), 10: (0.2, 1)},
                      "meanflow-1 (tuned)": {5: (0.4, 1), 10: (0.8, 1)}}
    plot_policy.main(["--task", "t", "--variant", "base", "--also", "tuned"])
    out = capsys.readouterr().out
    assert "meanflow-1 (tuned)" in out and "(other)" not in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "policy_checkpoints_t_base.png", "policy_modes_t_base.png", "policy_nfe_t_base.png"]
    for argv, needle in ((["--task", "t", "--also", "tuned"], "--also needs --variant"),
                         (["--task", "t", "--variant", "base", "--also", "nope"], "'nope' has no rows of t")):
        with pytest.raises(SystemExit):
            plot_policy.main(argv)
        assert needle in capsys.readouterr().err


def test_readme_main_job_is_what_bench_main_job_times():
    """README command 1 is ``bench.main_job``'s ``README_COMMAND``, and the overrides the bench
    passes by default compose into that command's config (Lift low-dim, dart demos)."""
    from hydra import compose, initialize_config_module

    from bench.main_job import README_COMMAND, default_overrides

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"&& {README_COMMAND}\n" in readme
    command_args = README_COMMAND.split()[1:]
    assert command_args == ["experiment=policy_cpu", *default_overrides("dart")]
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[*command_args, "run_dir=unused"])
    assert cfg.task.env == "Lift" and cfg.task.demo_style == "dart" and not cfg.task.image
    assert cfg.task.dataset.endswith("lift_dart_lowdim_200.hdf5")


def test_expert_episode_stats_counts_successes_lengths_and_failed_seeds():
    """``bench.experts.episode_stats``: episode ``k`` runs seed ``seed + k``; the row's success rate,
    mean length and failed seeds are those of the records, and every record reaches ``on_episode``."""
    from bench.experts import episode_stats

    def run(seed):                       # succeeds on even seeds, in `seed` steps
        return {"success": seed % 2 == 0, "actions": np.zeros((seed, 2))}

    seen = []
    stats = episode_stats(run, 4, 10, on_episode=lambda ep: seen.append(len(ep["actions"])))
    assert seen == [10, 11, 12, 13]
    assert (stats["n_episodes"], stats["n_success"], stats["success_rate"]) == (4, 2, 0.5)
    assert stats["mean_length"] == 11.5 and stats["failed_seeds"] == [11, 13] and stats["seeds"] == "10..13"


def test_policy_bench_checkpoint_summary_is_dp_s_two_figures_and_drops_metrics_some_checkpoint_lacks():
    """DP's protocol: max and mean over the evaluated checkpoints, mode metrics averaged over them;
    a mode metric missing from one checkpoint's evaluation (an evaluator from another tree) leaves
    the row, instead of raising, being averaged over the rest or standing for the last alone."""
    from bench.policy import with_checkpoint_summary

    evals = [{"success_rate": 0.5, "mode_tv": 0.2, "success_p1": 0.75},
             {"success_rate": 0.25, "mode_tv": 0.4, "success_p1": 0.5, "mode_entropy_ratio": 0.9},
             {"success_rate": 1.0, "mode_tv": 0.6, "success_p1": 1.0, "mode_entropy_ratio": 0.7}]
    row = {"task": "t", **evals[-1]}                  # as bench.policy builds it: the last checkpoint's fields
    s = with_checkpoint_summary(row, evals, [10, 20, 30])
    assert s["success_max"] == 1.0 and s["success_last_mean"] == pytest.approx(1.75 / 3, abs=1e-12)
    assert s["checkpoint_successes"] == [0.5, 0.25, 1.0] and s["checkpoint_steps"] == [10, 20, 30]
    assert s["mode_tv"] == pytest.approx(0.4, abs=1e-12) and s["success_p1"] == pytest.approx(0.75, abs=1e-12)
    assert s["success_rate"] == 1.0 and s["task"] == "t"          # the last checkpoint's success stays
    assert "mode_entropy_ratio" not in s and "mode_switches" not in s
    assert row["mode_entropy_ratio"] == 0.7                        # the caller's row is not changed


def test_dp_episode_limits_follow_the_paper_per_task_family_and_demo_style():
    """DP's limits (Chi et al. 2023, Sec. 5): robomimic Lift / Can / Square 400 steps on ph demos and
    500 on mh, low-dim and image alike; Block Push 350; tasks DP did not run have none."""
    from bench.common import dp_episode_limit, rollout_limit

    for task in ("lift_lowdim", "can_lowdim", "square_lowdim", "lift_image", "square_image"):
        assert dp_episode_limit(task, "ph") == 400 and dp_episode_limit(task, "mh") == 500
    assert dp_episode_limit("block_push_lowdim", "ph") == 350
    assert dp_episode_limit("reach_around_lowdim", "ph") is None and dp_episode_limit("metaworld", "ph") is None
    # what both policy benches roll out to: DP's limit under --protocol dp, else the task's own
    assert rollout_limit("dp", "square_lowdim", "mh", 400) == 500 and rollout_limit("last", "square_lowdim", "mh", 400) == 400
    assert rollout_limit("dp", "reach_around_lowdim", "ph", 60) == 60


def test_policy_bench_dp_protocol_rolls_out_to_dp_s_limit_and_writes_it_in_the_row(tmp_path, monkeypatch, capsys):
    """Under ``--protocol dp`` every checkpoint's rollouts get DP's limit for the task and demo style
    (Square mh: 500, though the checkpoint's task says 400; a task DP did not run: its own) and the
    row records the limit it ran; ``--protocol last`` keeps the checkpoint's. An ``--override`` of
    the limit under ``--protocol dp`` is refused in one line before any run directory exists."""
    from types import SimpleNamespace

    from bench import common, policy

    monkeypatch.setattr(policy, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    own_limit = {"square_lowdim": 400, "lift_lowdim": 400, "reach_around_lowdim": 60}
    limits_seen = []

    def fake_train(cfg):
        return {"run_dir": str(cfg.run_dir), "step": int(cfg.trainer.max_steps)}

    def fake_load(path):
        task = SimpleNamespace(eval_max_steps=own_limit[path.parent.name], eval_envs=1)
        return SimpleNamespace(task=task, set_inference=lambda spec: None), {}

    def fake_evaluate(model, episodes, run_dir, max_steps=None):
        limits_seen.append(max_steps)
        return {"success_rate": 0.5, "mean_episode_length": 10.0}

    monkeypatch.setattr(policy, "train", fake_train)
    monkeypatch.setattr(policy, "load_model", fake_load)
    monkeypatch.setattr(policy, "evaluate_variant", fake_evaluate)
    # the fake checkpoint's parent directory names the task whose own limit it carries
    monkeypatch.setattr(policy, "checkpoint_paths",
                        lambda d: [d / next(t for t in own_limit if Path(d).parent.name.startswith(t))
                                   / f"ckpt_{s:09d}.json" for s in (5, 10)])
    cases = ((["--tasks", "square_lowdim", "--style", "mh", "--protocol", "dp"], "square_lowdim_mh", 500),
             (["--tasks", "lift_lowdim", "--protocol", "dp"], "lift_lowdim", 400),
             (["--tasks", "reach_around_lowdim", "--protocol", "dp"], "reach_around_lowdim", 60),
             (["--tasks", "square_lowdim", "--style", "mh"], "square_lowdim_mh", 400))
    for argv, label, limit in cases:
        limits_seen.clear()
        policy.main([*argv, "--objectives", "regression", "--steps", "10", "--overwrite",
                     "--runs", str(tmp_path / "runs")])
        assert limits_seen == ([limit] * 2 if "dp" in argv else [limit])
        rows = [r for r in json.loads((tmp_path / "policy.json").read_text())["rows"] if r["task"] == label]
        assert rows[-1]["eval_max_steps"] == limit
    capsys.readouterr()
    runs = tmp_path / "runs_refused"
    with pytest.raises(SystemExit):
        policy.main(["--protocol", "dp", "--override", "task.eval_max_steps=300", "--runs", str(runs)])
    assert "--override task.eval_max_steps: --protocol dp rolls out to Diffusion Policy's own episode limit" \
        in capsys.readouterr().err and not runs.exists()


def test_policy_bench_seeds_the_policy_noise_of_every_evaluation(monkeypatch):
    """``bench.policy`` hands its fixed ``POLICY_SEED`` to the task's evaluator (which seeds the
    sampling noise per batch of episodes); ``test_load_policy`` checks that the task passes it on."""
    from types import SimpleNamespace

    from bench import policy as bench_policy

    seen = {}

    class FakeEvaluator:
        def run(self, model):
            return {"success_rate": 0.5, "latency_ms_p50": 1.0, "latency_ms_p95": 2.0,
                    "mean_episode_length": 3.0, "n_env_errors": 0, "episodes": []}

        def close(self):
            seen["closed"] = True

    def fake_evaluator(run_dir, **kwargs):
        seen.update(kwargs)
        return FakeEvaluator()

    task = SimpleNamespace(env_meta={}, evaluator=fake_evaluator, mode_summary=lambda ev: {})
    monkeypatch.setattr(bench_policy, "success_levels", lambda env_meta: {})
    out = bench_policy.evaluate_variant(SimpleNamespace(task=task), 4, None, 60)
    assert seen == {"n_episodes": 4, "n_videos": 1, "max_steps": 60, "policy_seed": bench_policy.POLICY_SEED,
                    "closed": True}
    assert out["success_rate"] == 0.5


def test_policy_bench_resume_continues_the_run_and_counts_every_segment(tmp_path, monkeypatch):
    """``--resume`` hands ``resume=true`` to the trainer; a run it continued gets the trainer's
    training time over every segment and the step it resumed from, a fresh run neither."""
    from types import SimpleNamespace

    from bench import common, policy

    monkeypatch.setattr(policy, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    seen = []

    def fake_train(cfg):
        seen.append(bool(cfg.resume))
        resumed = 600 if cfg.resume else 0
        return {"run_dir": str(cfg.run_dir), "step": int(cfg.trainer.max_steps), "train_seconds": 4321.0,
                "resumed_from_step": resumed}

    def fake_load(path):
        task = SimpleNamespace(eval_max_steps=60, eval_envs=1)
        return SimpleNamespace(task=task, set_inference=lambda spec: None), {}

    monkeypatch.setattr(policy, "train", fake_train)
    monkeypatch.setattr(policy, "load_model", fake_load)
    monkeypatch.setattr(policy, "evaluate_variant", lambda *a, **k: {"success_rate": 0.5})
    monkeypatch.setattr(policy, "checkpoint_paths", lambda d: [Path(d) / "ckpt_000000010.json"])
    base = ["--tasks", "reach_around_lowdim", "--objectives", "regression", "--steps", "10", "--overwrite",
            "--runs", str(tmp_path / "runs")]
    for argv, want_resume in ((base, False), ([*base, "--resume"], True)):
        policy.main(argv)
        row = json.loads((tmp_path / "policy.json").read_text())["rows"][-1]
        assert seen[-1] is want_resume
        if want_resume:
            assert row["train_seconds"] == 4321.0 and row["resumed_from_step"] == 600
        else:
            assert row["train_seconds"] < 60.0 and "resumed_from_step" not in row
