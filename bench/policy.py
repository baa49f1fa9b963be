"""Policy benchmark: every objective on the same data, backbone and training budget,
evaluated by closed-loop rollouts at the NFEs that matter.

For each task and objective the CPU recipe (``experiment=policy_cpu task=<task>
objective=<objective>``; image tasks ``policy_cpu_image``) is trained once per seed through
the one trainer; the EMA policy is then rolled out for
``--episodes`` test seeds (disjoint from the demos' seeds) at each NFE of ``VARIANTS``:
DDPM at 100 steps, DDIM at 10, DDPM at 1; Flow Matching at 1 and 10; MeanFlow at 1 and 2;
TVM at 1; Drifting at 1; DTM at 4. Latency is ``predict_action`` per chunk (one env, batch 1).
The policy's sampling noise is seeded per batch of test episodes (``POLICY_SEED``), so every
checkpoint and NFE meets the same noise, whatever the process evaluated before it.

    python -m bench.policy --tasks lift_lowdim --objectives meanflow,drifting,ddpm --seeds 0
    python -m bench.policy --tasks lift_lowdim,can_lowdim --steps 5000 --episodes 50

Rows are appended to ``bench/results/policy.json`` as they finish (a re-run skips rows that
exist unless ``--overwrite``), and a markdown table is written to ``bench/results/policy.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from bench.common import (
    RESULTS,
    config_keeping,
    demo_style_recipe,
    dp_protocol_conflict,
    load_rows,
    machine,
    print_table,
    rollout_limit,
    row_key,
    write_results,
)
from jumpflow.checkpoint import checkpoint_paths, load_model
from jumpflow.envs.registry import success_levels
from jumpflow.eval import rollout  # noqa: F401  (imported now: a later edit of the tree cannot break evaluation)
from jumpflow.io import atomic_write_text
from jumpflow.trainer import train

# objective -> [(label, nfe, sampler)]
VARIANTS = {
    "ddpm": [("ddpm", 100, "ddpm"), ("ddim", 10, "ddim"), ("ddpm", 1, "ddpm")],
    "flow_matching": [("flow_matching", 1, None), ("flow_matching", 10, None)],
    "meanflow": [("meanflow", 1, None), ("meanflow", 2, None)],
    "tvm": [("tvm", 1, None)],
    "drifting": [("drifting", 1, None)],
    "transition_matching": [("transition_matching", 4, None)],
    "regression": [("regression", 1, None)],
    "shortcut": [("shortcut", 1, None), ("shortcut", 4, None)],
    "consistency": [("consistency", 1, None), ("consistency", 2, None)],
    "sct": [("sct", 1, None)],
    "alpha_flow": [("alpha_flow", 1, None)],
    "improved_meanflow": [("improved_meanflow", 1, None)],
    "distill_consistency": [("distill_consistency", 1, None), ("distill_consistency", 2, None)],
    "distill_ayf": [("distill_ayf", 1, None), ("distill_ayf", 2, None)],
    "ect": [("ect", 1, None), ("ect", 2, None)],
    "transition_matching_ar": [("transition_matching_ar", 4, None)],
}

#: evaluated only when ``--variants`` names them: DDIM at 100 steps is a DDPM policy's
#: probability-flow ODE at full resolution, the map a distilled one-step student learns (its ceiling)
OPTIONAL_VARIANTS = {
    "ddpm": [("ddim", 100, "ddim")],
}


def select_variants(objective: str, wanted: set[str] | None) -> list[tuple]:
    """The ``(label, nfe, sampler)`` evaluations of ``objective``: all of ``VARIANTS`` when
    ``wanted`` is ``None``; else those of ``VARIANTS`` and ``OPTIONAL_VARIANTS`` named in
    ``wanted`` as ``sampler:nfe``."""
    if wanted is None:
        return list(VARIANTS[objective])
    return [v for v in VARIANTS[objective] + OPTIONAL_VARIANTS.get(objective, [])
            if f"{v[2] or v[0]}:{v[1]}" in wanted]


def variant_order() -> list[tuple[str, str, int]]:
    """``(objective, sampler, nfe)`` in table order: each objective's variants, then its optional ones."""
    return [(o, s or lbl, n) for o, vs in VARIANTS.items() for lbl, n, s in vs + OPTIONAL_VARIANTS.get(o, [])]


#: Diffusion Policy's protocol (Chi et al. 2023, Sec. 5): the last checkpoints of training, each
#: rolled out on the same fixed test seeds; the paper reports the max over them and the mean of
#: the last ones
DP_CHECKPOINTS = 5


#: seeds the policy's sampling noise at each batch of test episodes (``RolloutEvaluator.policy_seed``),
#: so that a row does not depend on what the process evaluated before it (other checkpoints, NFEs,
#: seeds, the protocol) and every checkpoint and NFE meets the same noise; rows
#: written before 2026-12-07 drew it from torch's unseeded global generator (no ``policy_seed`` field)
POLICY_SEED = 0


def run_evaluator(model, episodes: int, run_dir, max_steps: int | None = None,
                  policy_seed: int | None = POLICY_SEED, n_videos: int = 1) -> dict:
    """The task's evaluator's raw result for ``model`` (``episodes`` rollouts of at most ``max_steps``,
    default the task's limit, ``policy_seed`` seeding the sampling noise); its envs are closed after."""
    evaluator = model.task.evaluator(run_dir, n_episodes=episodes, n_videos=n_videos, max_steps=max_steps,
                                     policy_seed=policy_seed)
    try:
        return evaluator.run(model)
    finally:
        evaluator.close()


def evaluate_variant(model, episodes: int, run_dir, max_steps: int | None = None,
                     policy_seed: int | None = POLICY_SEED) -> dict:
    """One rollout evaluation (episodes of at most ``max_steps``, default the task's limit): success,
    latency, episode length and, on tasks whose demos label behaviour modes, the mode metrics
    (entropy ratio, TV, switches, frequencies)."""
    ev = run_evaluator(model, episodes, run_dir, max_steps, policy_seed)
    out = {"success_rate": ev["success_rate"], "latency_ms_p50": ev["latency_ms_p50"],
           "latency_ms_p95": ev["latency_ms_p95"], "mean_episode_length": ev["mean_episode_length"],
           "env_errors": ev["n_env_errors"]}
    for name, level in success_levels(model.task.env_meta).items():    # e.g. Block Push's p1
        out[f"success_{name}"] = sum(e["max_reward"] >= level for e in ev["episodes"]) / len(ev["episodes"])
    out.update(model.task.mode_summary(ev))
    return out


def task_specs(tasks: str) -> list[tuple[str, str, list[str], dict]]:
    """``--tasks`` -> one ``(config task, row label, task overrides, row fields)`` per task.

    ``metaworld`` is jumpflow's MetaWorld task set (``jumpflow.envs.metaworld_env.TASK_SET``, four
    difficulty groups) and ``metaworld:<name>`` one v3 task: config ``task=metaworld
    task.env=<name>``, rows labelled ``metaworld_<name>`` with ``family`` and ``group`` (the per-group
    table averages over them). Other names are task configs as given.

    Raises:
        ValueError: an unknown MetaWorld task (one line listing the valid names).
    """
    out = []
    for name in (n.strip() for n in tasks.split(",") if n.strip()):
        if name == "metaworld" or name.startswith("metaworld:"):
            from jumpflow.envs.metaworld_env import TASK_SET, check_task_name, task_group
            for env in (TASK_SET if name == "metaworld" else [check_task_name(name)]):
                out.append(("metaworld", f"metaworld_{env}", [f"task.env={env}"],
                            {"family": "metaworld", "group": task_group(env)}))
        else:
            out.append((name, name, [], {}))
    return out


def group_summary(rows: list[dict]) -> list[dict]:
    """MetaWorld rows per difficulty group: for each (objective, variant, sampler, NFE, group) the
    mean over the group's tasks of each task's mean over training seeds."""
    per_task: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("family") == "metaworld":
            key = (r["objective"], r.get("variant", ""), r["sampler"], r["nfe"], r["group"], r["task"])
            per_task.setdefault(key, []).append(r["success_rate"])
    groups: dict[tuple, list[float]] = {}
    for (*key, _task), rates in per_task.items():
        groups.setdefault(tuple(key), []).append(sum(rates) / len(rates))
    from jumpflow.envs.metaworld_env import GROUPS
    order = variant_order()
    out = [{"objective": o + (f" [{v}]" if v else ""), "sampler": s, "nfe": n, "group": g, "tasks": len(means),
            "success_mean": sum(means) / len(means)}
           for (o, v, s, n, g), means in groups.items()]
    return sorted(out, key=lambda r: (order.index((r["objective"].split(" [")[0], r["sampler"], r["nfe"]))
                                      if (r["objective"].split(" [")[0], r["sampler"], r["nfe"]) in order
                                      else len(order), r["objective"], GROUPS.index(r["group"])))


def recipe_for(task: str) -> str:
    """The CPU recipe a task trains with (image tasks: batch 64, shorter episodes)."""
    return "policy_cpu_image" if task.endswith("_image") else "policy_cpu"


def seed_summary(rows: list[dict]) -> list[dict]:
    """One row per (task, objective, config variant, sampler, NFE): success mean / min / max over the
    training seeds that ran, and the training steps and episode limits they ran at; tasks together,
    variants in the order of ``VARIANTS``."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    order = variant_order()

    def rank(r):
        key = (r["objective"], r["sampler"], r["nfe"])
        return tasks.index(r["task"]), order.index(key) if key in order else len(order)
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=rank):
        groups.setdefault((r["task"], r["objective"], r.get("variant", ""), r["sampler"], r["nfe"]), []).append(r)
    out = []
    for (task, objective, variant, sampler, nfe), rs in groups.items():
        rates = [r["success_rate"] for r in sorted(rs, key=lambda r: r["seed"])]
        out.append({"task": task, "objective": objective + (f" [{variant}]" if variant else ""), "sampler": sampler,
                    "nfe": nfe,
                    "seeds": ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"])),
                    "success_mean": sum(rates) / len(rates), "success_min": min(rates), "success_max": max(rates),
                    "train_steps": ",".join(sorted({str(r["train_steps"]) for r in rs})),
                    # the episode limits the seeds ran at: two values flag a group mixing protocols
                    # ("task": a row from before rows recorded it, run at its task config's limit)
                    "eval_max_steps": ",".join(sorted({str(r.get("eval_max_steps", "task")) for r in rs}))})
        for key in ("success_last_mean", "mode_entropy_ratio", "mode_tv", "mode_switches"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if len(vals) == len(rs):
                out[-1][f"{key}_mean" if key == "success_last_mean" else key] = sum(vals) / len(vals)
        if all("success_max" in r and "checkpoint_successes" in r for r in rs):
            out[-1]["dp_success_max_mean"] = sum(r["success_max"] for r in rs) / len(rs)
    return out


def _markdown_table(rows: list[dict], keys: list[str]) -> list[str]:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                       for k in keys) + " |")
    return lines


def write_markdown(rows: list[dict], path: Path) -> None:
    keys = ["task", "objective", "sampler", "nfe", "seed", "success_rate", "latency_ms_p50", "latency_ms_p95",
            "train_seconds", "train_steps", "episodes"]
    summary = seed_summary(rows)
    text = ["## Success over training seeds (50 rollouts per seed)", "",
            *_markdown_table(summary, ["task", "objective", "sampler", "nfe", "seeds", "success_mean", "success_min",
                                       "success_max", "train_steps", "eval_max_steps"]),
            "", "## Every run", "", *_markdown_table(rows, keys)]
    groups = group_summary(rows)
    if groups:
        text[-3:-3] = ["", "## MetaWorld: success per difficulty group (mean over tasks of the mean over seeds)", "",
                       *_markdown_table(groups, ["objective", "sampler", "nfe", "group", "tasks", "success_mean"])]
    atomic_write_text(path, "\n".join(text) + "\n")


def with_checkpoint_summary(row: dict, evals: list[dict], steps: list[int]) -> dict:
    """``row`` (built from the last checkpoint's evaluation) with Diffusion Policy's two figures over
    the evaluated checkpoints (``success_max``, the mean ``success_last_mean``), each checkpoint's
    success, and the mode metrics and partial successes (``success_p1`` ...) replaced by their mean
    over the checkpoints. A metric that some evaluations have and others lack (an evaluator from
    another tree) is dropped from the row, neither averaged over the others nor left standing for
    the last checkpoint alone under the mean's name."""
    successes = [e["success_rate"] for e in evals]
    out = {**row, "success_max": max(successes), "success_last_mean": sum(successes) / len(successes),
           "checkpoint_successes": successes, "checkpoint_steps": list(steps)}
    partial = {k for e in evals for k in e if k.startswith("success_") and k != "success_rate"}
    for k in ("mode_entropy_ratio", "mode_tv", "mode_switches", *sorted(partial)):
        if all(k in e for e in evals):
            out[k] = sum(e[k] for e in evals) / len(evals)
        else:
            out.pop(k, None)
    return out


def run_overrides(args, task_name: str, objective: str, seed: int, run_dir: Path,
                  task_overrides: list[str] = ()) -> list[str]:
    """Hydra overrides of one training run: the task's CPU recipe, the task (and its
    ``task_overrides``, e.g. a MetaWorld env), the demo style, the seed, ``--steps``, the DP
    protocol's checkpoint schedule and ``--override`` with ``{seed}`` filled in (so that e.g. each
    distilled student reads the teacher trained with its own seed)."""
    overrides = [f"experiment={recipe_for(task_name)}", f"task={task_name}", *task_overrides,
                 *demo_style_recipe(task_name, args.style)[1], f"objective={objective}",
                 f"seed={seed}", "logger=none", "trainer.progress=false", "trainer.eval_at_end=false",
                 f"run_dir={run_dir}", *(o.replace("{seed}", str(seed)) for o in args.override)]
    overrides.append(f"trainer.max_steps={args.steps}")
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if args.protocol == "dp":     # checkpoints every tenth of training, the last five kept
        total = args.steps
        overrides += [f"trainer.ckpt_every={max(1, total // (2 * DP_CHECKPOINTS))}",
                      f"trainer.keep_checkpoints={DP_CHECKPOINTS}"]
    return overrides


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="lift_lowdim",
                    help="comma list of task configs; metaworld: jumpflow's MetaWorld task set; metaworld:<name>: "
                         "one v3 task (rows metaworld_<name>, with a per-difficulty-group table)")
    ap.add_argument("--objectives", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=3000,
                    help="training steps (the benchmark's budget; the policy_cpu recipe's own default is the main job's)")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--runs", default="runs/bench_policy", help="where run directories go")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate an existing finished run directory instead of training it again")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run directory from its newest checkpoint (training time: the "
                         "checkpoints' train_seconds, summed over resumes)")
    ap.add_argument("--override", action="append", default=[],
                    help="extra hydra override (repeatable); {seed} is replaced by the training seed, e.g. "
                         "objective.teacher=runs/lift_lowdim_ddpm_s{seed}")
    ap.add_argument("--variant", default="",
                    help="name of a config variant made by --override (e.g. tokens16 for backbone.tokens=16): its "
                         "rows and run directories are kept apart from the shipped config's")
    ap.add_argument("--style", choices=("ph", "mh"), default="ph",
                    help="demonstrations: ph (the scripted expert) or mh (human-like, multimodal); "
                         "mh rows are labelled <task>_mh")
    ap.add_argument("--variants", default=None,
                    help="evaluate only these sampler:nfe pairs, e.g. meanflow:1,ddpm:100,ddim:10 (default: all of "
                         "VARIANTS); ddim:100 (a DDPM policy's ODE at full resolution) only when named")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite policy.md from policy.json and stop")
    ap.add_argument("--protocol", choices=("last", "dp"), default="last",
                    help="last: evaluate the final EMA policy; dp: Diffusion Policy's protocol, the last "
                         f"{DP_CHECKPOINTS} checkpoints (second half of training), success_max and success_last_mean, "
                         "rolled out to DP's episode limit (robomimic tasks 400 on ph demos, 500 on mh; "
                         "Block Push 350; tasks DP did not run keep their own)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    out = RESULTS / "policy.json"
    rows = load_rows(out)
    if args.markdown_only:
        write_markdown(rows, RESULTS / "policy.md")
        print_table(seed_summary(rows))
        if group_summary(rows):
            print_table(group_summary(rows))
        return
    if args.steps < 1:
        parser().error(f"--steps: must be >= 1, got {args.steps}")
    try:
        specs = task_specs(args.tasks)
    except ValueError as e:
        parser().error(f"--tasks: {e}")
    if args.style != "ph" and any(fields for *_, fields in specs):
        parser().error("--style mh: MetaWorld demos come from its own scripted policies (ph only)")
    conflict = dp_protocol_conflict(args.protocol, args.override)
    if conflict:
        parser().error(conflict)
    done = {row_key(r) for r in rows}
    wanted = None if args.variants is None else {v.strip() for v in args.variants.split(",") if v.strip()}
    objectives = args.objectives.split(",")
    unknown = sorted(set(objectives) - set(VARIANTS))
    if unknown:
        parser().error(f"--objectives: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    offered = {f"{s or lbl}:{n}" for o in objectives for lbl, n, s in select_variants(o, None)
               + OPTIONAL_VARIANTS.get(o, [])}
    if wanted is not None and wanted - offered:
        parser().error(f"--variants: {sorted(wanted - offered)} not offered by {objectives}; "
                       f"valid: {', '.join(sorted(offered))}")
    for task_name, label, task_overrides, fields in specs:
        task = demo_style_recipe(label, args.style)[0]             # the rows' label
        for objective in objectives:
            for seed in map(int, args.seeds.split(",")):
                variants = select_variants(objective, wanted)
                if not variants:
                    continue
                if not args.overwrite and all((task, objective, args.variant, s or lbl, n, seed) in done
                                              for lbl, n, s in variants):
                    print(f"skip {task} {objective} seed {seed}{' variant ' + args.variant if args.variant else ''}: "
                          "its rows exist (--overwrite re-runs them)", flush=True)
                    continue
                run_dir = Path(args.runs) / f"{task}_{objective}{'_' + args.variant if args.variant else ''}_s{seed}"
                overrides = run_overrides(args, task_name, objective, seed, run_dir, task_overrides)
                with initialize_config_module(config_module="jumpflow.configs", version_base=None):
                    cfg = compose("train", overrides=overrides)
                final = run_dir / "checkpoints" / f"ckpt_{int(cfg.trainer.max_steps):09d}.json"
                run_fields: dict = {}
                if args.reuse and final.exists():
                    # evaluate a finished run again (e.g. after a crash in evaluation): the training
                    # time is the span from the run's config file to its final checkpoint
                    result = {"run_dir": str(run_dir), "step": int(cfg.trainer.max_steps)}
                    train_seconds = final.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
                    print(f"reusing {final} (trained in {train_seconds:.0f} s)", flush=True)
                else:
                    t0 = time.perf_counter()
                    result = train(cfg)
                    train_seconds = time.perf_counter() - t0
                    if result.get("resumed_from_step"):
                        # a resumed run: its training loop's time over every segment (setup not included)
                        train_seconds = result["train_seconds"]
                        run_fields = {"resumed_from_step": int(result["resumed_from_step"])}
                ckpts = checkpoint_paths(Path(result["run_dir"]) / "checkpoints")
                if args.protocol == "dp":
                    ckpts = ckpts[-DP_CHECKPOINTS:]
                else:
                    ckpts = ckpts[-1:]
                models = [load_model(c)[0] for c in ckpts]
                # DP's protocol rolls out to DP's limit for the task and demo style, whatever the
                # checkpoint's config says (a run reused from before the limit was set included)
                limit = rollout_limit(args.protocol, task_name, args.style, models[-1].task.eval_max_steps)
                for lbl, nfe, sampler in variants:
                    evals, t_eval = [], time.perf_counter()
                    for ckpt, model in zip(ckpts, models):
                        model.set_inference({"steps": nfe, "sampler": sampler})
                        evals.append(evaluate_variant(model, args.episodes, result["run_dir"], limit))
                        # a long evaluation can be followed in the log (stdout is buffered under nohup)
                        print(f"{task} {objective} seed {seed} {lbl}-{nfe} {ckpt.stem}: success "
                              f"{evals[-1]['success_rate']:.2f}", flush=True)
                    last = evals[-1]
                    row = {"task": task, **fields, **run_fields, "objective": objective, "sampler": sampler or lbl, "nfe": nfe,
                           "seed": seed,
                           **last, "train_seconds": train_seconds,
                           # every checkpoint this variant evaluated, all its episodes (envs included)
                           "eval_seconds": time.perf_counter() - t_eval, "train_steps": int(result["step"]),
                           "episodes": args.episodes, "eval_max_steps": limit,
                           "threads": torch.get_num_threads(), "protocol": args.protocol,
                           "policy_seed": POLICY_SEED,
                           # > 1: lock-step batches of spawned envs, latency per batch call
                           "eval_envs": int(getattr(models[-1].task, "eval_envs", 1)),
                           **({"variant": args.variant, "variant_overrides": args.override} if args.variant else {})}
                    if args.protocol == "dp":
                        row = with_checkpoint_summary(row, evals, [int(c.stem.split("_")[1]) for c in ckpts])
                    # re-read: another bench process may have added rows since this one started
                    rows = [r for r in load_rows(out) if row_key(r) != row_key(row)] + [row]
                    print(json.dumps(row), flush=True)
                    config = {"episodes": args.episodes, "steps": args.steps,
                              "overrides": args.override, "machine_note": machine()}
                    # the peer bench (bench/peer_lerobot.py) keeps its settings in this file too
                    write_results("policy", config_keeping(out, config, keep=("peer_lerobot",)), rows)
                    write_markdown(rows, RESULTS / "policy.md")
    print_table(rows)


if __name__ == "__main__":
    main()
