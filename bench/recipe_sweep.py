"""Recipe sweep for the main job: which width, learning rate and step count reach the main job's
success in the least time (issue 17, item 4).

Each recipe is a set of overrides on ``experiment=policy_cpu`` (Lift low-dim, MeanFlow, 1 NFE);
every recipe x seed is trained and evaluated (50 closed-loop episodes) by ``bench.main_job``'s
child process on one shared folder of freshly generated demos, so recipes differ only in their
overrides. Rows (``bench/results/recipe_sweep.json``) give the success, the training and
evaluation wall time and the training speed; a re-run skips rows that exist.

The sweep runs on one core (``trainer.cpu_threads=1``, one demo worker) so that two sweeps can
share this 2-core machine; its wall times rank recipes, and the chosen one is then timed end to
end on both cores by ``python -m bench.main_job``::

    python -m bench.recipe_sweep --recipes w256_s2000_lr1e-3,w512_s1500_lr1e-3 --seeds 0,1,2
    python -m bench.recipe_sweep --list
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, load_rows, print_table, write_results
from bench.main_job import phase_seconds, run_main_job

#: name -> overrides on top of ``experiment=policy_cpu``; ``current`` is the recipe as committed
RECIPES: dict[str, list[str]] = {
    "current": [],
    "w256_s3000_lr5e-4": ["backbone.width=256", "trainer.max_steps=3000"],
    "w256_s2000_lr1e-3": ["backbone.width=256", "trainer.max_steps=2000", "optim.lr=1e-3"],
    "w256_s1500_lr1e-3": ["backbone.width=256", "trainer.max_steps=1500", "optim.lr=1e-3"],
    "w512_s1500_lr1e-3": ["trainer.max_steps=1500", "optim.lr=1e-3"],
    "w256_s1000_lr2e-3": ["backbone.width=256", "trainer.max_steps=1000", "optim.lr=2e-3",
                          "optim.warmup_steps=100"],
}

#: keeps a sweep job on one core and leaves nothing but the figures behind
ONE_CORE = ["trainer.cpu_threads=1", "task.demo_workers=1", "task.eval_envs=1", "task.eval_videos=0",
            "logger=none", "trainer.progress=false"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="runs/bench_recipe_sweep")
    ap.add_argument("--data", default=None, help="demo folder shared by the runs (default: a fresh one)")
    ap.add_argument("--out", default=str(RESULTS / "recipe_sweep.json"))
    ap.add_argument("--list", action="store_true", help="print the recipes and stop")
    args = ap.parse_args(argv)
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name:22s} {' '.join(overrides) or '(policy_cpu as committed)'}")
        return
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    data_dir = Path(args.data or tempfile.mkdtemp(prefix="jumpflow_sweep_data_"))
    try:
        _sweep(names, seeds, Path(args.runs), data_dir, out)
    finally:
        if args.data is None:          # demos the sweep generated for itself do not stay behind
            shutil.rmtree(data_dir, ignore_errors=True)
    print_table(summary(load_rows(out)))


def _sweep(names: list[str], seeds: list[int], runs: Path, data_dir: Path, out: Path) -> None:
    for name in names:
        for seed in seeds:
            if any(r["recipe"] == name and r["seed"] == seed for r in load_rows(out)):
                continue
            run_dir = runs / f"{name}_s{seed}_{time.strftime('%Y%m%d_%H%M%S')}"
            overrides = [*ONE_CORE, *RECIPES[name], f"seed={seed}"]
            started = time.time()
            result = run_main_job("policy_cpu", run_dir, overrides, data_dir=data_dir)
            phases = phase_seconds(run_dir, result["wall_seconds"], started)
            # from the run's config file to its final checkpoint (the column earlier rows hold)
            train_s, eval_s = phases["setup_seconds"] + phases["train_seconds"], phases["eval_seconds"]
            row = {"recipe": name, "seed": seed, "overrides": " ".join(RECIPES[name]),
                   "success_rate": result["success_rate"], "step": result["step"],
                   "train_seconds": train_s, "it_per_s": result["step"] / train_s, "eval_seconds": eval_s,
                   "wall_seconds": result["wall_seconds"], "mean_episode_length": result["mean_episode_length"],
                   "latency_ms_p50": result["latency_ms_p50"],
                   "loadavg_1min_before": result["loadavg_1min_before"],
                   "loadavg_1min_after": result["loadavg_1min_after"], "run_dir": str(run_dir)}
            print(json.dumps(row), flush=True)
            rows = [r for r in load_rows(out) if (r["recipe"], r["seed"]) != (name, seed)] + [row]
            write_results("recipe_sweep", {"base": "experiment=policy_cpu", "one_core": ONE_CORE,
                                           "episodes": 50}, rows, out)


def summary(rows: list[dict]) -> list[dict]:
    """Per recipe: mean and min success over its seeds, mean training time and speed."""
    table = []
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = [r for r in rows if r["recipe"] == name]
        table.append({"recipe": name, "seeds": len(rs),
                      "success_mean": sum(r["success_rate"] for r in rs) / len(rs),
                      "success_min": min(r["success_rate"] for r in rs),
                      "train_seconds": sum(r["train_seconds"] for r in rs) / len(rs),
                      "it_per_s": sum(r["it_per_s"] for r in rs) / len(rs),
                      "eval_seconds": sum(r["eval_seconds"] for r in rs) / len(rs)})
    return table


if __name__ == "__main__":
    main()
