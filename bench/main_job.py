"""The main job, timed end to end as a fresh machine would run it (README command 1).

Runs ``jumpflow-train experiment=policy_cpu task.demo_style=dart`` (``README_COMMAND``) in a child process with
``JUMPFLOW_DATA`` pointing at an empty folder, so the wall time includes generating the scripted
Lift demos, training and the 50-episode closed-loop evaluation. The figures come from the run's
own ``eval_step<N>.json`` and the child's resource usage, and are written in the one result
format to ``bench/results/main_job.json``::

    python -m bench.main_job                       # the README's default, about 5 min on 2 idle cores
    python -m bench.main_job --override trainer.max_steps=200 --tag smoke --out /tmp/main_job_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, load_rows, write_results
from jumpflow.envs.experts import STYLES

# README command 1 after ``pip install``: the CPU recipe on Lift low-dim, dart demos (the ph expert's
# labels executed with noise, so the policy has seen the way back from a nudged grasp)
EXPERIMENT, DEMO_STYLE = "policy_cpu", "dart"


def default_overrides(demo_style: str) -> list[str]:
    """The overrides the README's command passes (its demo style), ahead of any ``--override``."""
    return [f"task.demo_style={demo_style}"]


README_COMMAND = " ".join(["jumpflow-train", f"experiment={EXPERIMENT}", *default_overrides(DEMO_STYLE)])


def run_main_job(experiment: str, run_dir: Path, overrides: list[str], data_dir: Path | None = None) -> dict:
    """Train + evaluate in a child process; returns the timing and eval. The demos go to a fresh
    folder that is removed afterwards, or to ``data_dir`` (kept: a sweep shares one set)."""
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; the main job is timed on a fresh run directory")
    fresh = data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="jumpflow_fresh_data_")) if fresh else Path(data_dir)
    env = {**os.environ, "JUMPFLOW_DATA": str(data_dir)}
    cmd = [sys.executable, "-m", "jumpflow.cli.train", f"experiment={experiment}", f"run_dir={run_dir}",
           f"hydra.run.dir={run_dir}", *overrides]
    print("+ JUMPFLOW_DATA=" + str(data_dir), " ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True)
    finally:
        if fresh:
            shutil.rmtree(data_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    evals = sorted(run_dir.glob("eval_step*.json"), key=lambda p: int(p.stem.removeprefix("eval_step")))
    if not evals:
        raise RuntimeError(f"the main job left no eval_step*.json in {run_dir}")
    ev = json.loads(evals[-1].read_text())
    # the 1-min load average before and after says whether other jobs shared the cores
    return {"wall_seconds": wall, "cpu_user_seconds": after.ru_utime - before.ru_utime,
            "cpu_system_seconds": after.ru_stime - before.ru_stime,
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0], **ev}


def phase_seconds(run_dir: Path, wall: float, started: float) -> dict:
    """Where a main job's wall time went, from the run's own files: ``startup_and_demos`` (imports,
    validation, demo generation: up to the run's config file, which the trainer writes once the data
    is ready), ``train`` (the sum over logged intervals of steps / it_per_s in ``metrics.jsonl``),
    ``setup`` (the rest up to the final checkpoint: dataset cache, model build, checkpoint writes)
    and ``eval`` (after the final checkpoint)."""
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt_*.json"))
    if not ckpts:
        raise RuntimeError(f"{run_dir} has no checkpoint")
    configured, trained = (run_dir / "config.yaml").stat().st_mtime, ckpts[-1].stat().st_mtime
    train_s, last_step = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/it_per_s" in rec:
            train_s += (rec["step"] - last_step) / rec["train/it_per_s"]
            last_step = rec["step"]
    if last_step == 0:
        raise RuntimeError(f"{run_dir}/metrics.jsonl logs no training rate")
    return {"startup_and_demos_seconds": configured - started, "setup_seconds": trained - configured - train_s,
            "train_seconds": train_s, "train_it_per_s": last_step / train_s, "eval_seconds": started + wall - trained}


def run_started(run_dir: Path) -> float:
    """The start time a run directory's name records (``<experiment>_<tag>_%Y%m%d_%H%M%S``)."""
    return time.mktime(time.strptime("_".join(run_dir.name.split("_")[-2:]), "%Y%m%d_%H%M%S"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=EXPERIMENT)
    ap.add_argument("--runs", default="runs/bench_main_job", help="where the run directory goes")
    ap.add_argument("--tag", default="default", help="row label; a row with the same tag is replaced")
    ap.add_argument("--demo-style", default=DEMO_STYLE, choices=STYLES,
                    help="task.demo_style of the run (the README's main job: dart)")
    ap.add_argument("--override", action="append", default=[], help="extra hydra override (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "main_job.json"), help="result file (a smoke run: elsewhere)")
    ap.add_argument("--refresh", action="store_true",
                    help="run nothing: add the phase split to the rows whose run directory still exists")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.refresh:
        if not out.exists():
            raise SystemExit(f"--refresh: no result file {out}")
        rows = load_rows(out)
        for r in rows:
            run_dir = Path(r["run_dir"])
            if (run_dir / "metrics.jsonl").exists() and "train_seconds" not in r:
                r.update(phase_seconds(run_dir, r["wall_seconds"], run_started(run_dir)))
                print(r["tag"], {k: round(v, 1) for k, v in r.items() if k.endswith(("_seconds", "_per_s"))})
        write_results("main_job", json.loads(out.read_text())["config"], rows, out)
        return
    run_dir = Path(args.runs) / f"{args.experiment}_{args.tag}_{time.strftime('%Y%m%d_%H%M%S')}"
    started = time.time()
    overrides = default_overrides(args.demo_style) + args.override
    result = run_main_job(args.experiment, run_dir, overrides)
    row = {"tag": args.tag, "experiment": args.experiment, "overrides": " ".join(overrides),
           "run_dir": str(run_dir), **result, **phase_seconds(run_dir, result["wall_seconds"], started)}
    rows = [r for r in load_rows(out) if r.get("tag") != args.tag] + [row]
    write_results("main_job", {"command": f"{README_COMMAND} (fresh JUMPFLOW_DATA; rows: their experiment and overrides)",
                               "load_note": "timed on whatever else the machine runs; see the machine block"},
                  rows, out)


if __name__ == "__main__":
    main()
