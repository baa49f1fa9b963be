"""Shared helpers of the benchmark scripts: machine description and the one result format
``{"bench", "machine", "config", "rows"}`` written to ``bench/results/<bench>.json``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from jumpflow.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def arg_parser(doc: str | None, threads: int | None = 1) -> argparse.ArgumentParser:
    """A bench script's parser: its docstring as help, and ``--threads`` (torch CPU threads,
    ``None``: torch's default), applied by :func:`parse_args`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=threads, help="torch CPU threads")
    return ap


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` and set torch's thread count from ``--threads``."""
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def run_recipe(run: str | Path) -> dict:
    """How the policy at ``run`` (a run directory or a checkpoint file) was trained, from its
    checkpoint alone, so that a result row naming a scratch run directory still says what ran:
    ``{"objective", "backbone", "width", "depth", "task", "horizon", "n_obs_steps",
    "n_action_steps", "prefix_max", "n_demos", "demo_style", "seed", "step"}`` (a field the
    config lacks is None). No checkpoint, or a damaged one, raises ``CheckpointError`` naming it."""
    from jumpflow.checkpoint import read_checkpoint, resolve_checkpoint

    _, meta = read_checkpoint(resolve_checkpoint(run))
    cfg = meta.get("config", {})
    task, backbone = cfg.get("task", {}) or {}, cfg.get("backbone", {}) or {}
    objective = (cfg.get("objective", {}) or {}).get("_target_", "")
    return {"objective": objective.rsplit(".", 1)[-1] or None, "backbone": backbone.get("family"),
            "width": backbone.get("width"), "depth": backbone.get("depth"),
            "task": task.get("env"), "horizon": task.get("horizon"), "n_obs_steps": task.get("n_obs_steps"),
            "n_action_steps": task.get("n_action_steps"), "prefix_max": task.get("prefix_max"),
            "n_demos": task.get("n_demos"), "demo_style": task.get("demo_style"), "seed": cfg.get("seed"),
            "step": meta.get("step")}


def load_rows(path: Path) -> list[dict]:
    """The rows of a result file, or none when it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text())["rows"] if path.exists() else []


def row_key(row: dict) -> tuple:
    """What makes a ``policy.json`` row unique (``bench.policy`` and ``bench.peer_lerobot`` both
    write there): a re-run replaces (or, without ``--overwrite``, skips) it."""
    return row["task"], row["objective"], row.get("variant", ""), row["sampler"], row["nfe"], row["seed"]


#: Diffusion Policy's rollout limits (Chi et al. 2023, Sec. 5; ``shared/REFERENCES.md``): robomimic
#: Lift, Can and Square run 400 steps on proficient-human (ph) demos and 500 on multi-human (mh)
#: ones, whose slower operators need the room; Block Push 350. Keyed by the task family (a config
#: name without its ``_lowdim`` / ``_image`` suffix) and the demo style.
DP_EPISODE_LIMITS = {"lift": {"ph": 400, "mh": 500}, "can": {"ph": 400, "mh": 500},
                     "square": {"ph": 400, "mh": 500}, "block_push": {"ph": 350}}


def dp_episode_limit(task: str, style: str) -> int | None:
    """Diffusion Policy's episode limit for config ``task`` (``lift_lowdim``, ``square_image``...) on
    ``style`` demos; None for a task DP did not run (Reach Around, MetaWorld), which keeps its own."""
    return DP_EPISODE_LIMITS.get(task.rsplit("_", 1)[0], {}).get(style)


def rollout_limit(protocol: str, task: str, style: str, own: int) -> int:
    """The episode limit a policy bench rolls out to: DP's for ``task`` on ``style`` demos under
    ``--protocol dp`` (:func:`dp_episode_limit`), else (or where DP has none) the task's ``own``."""
    return (dp_episode_limit(task, style) if protocol == "dp" else None) or int(own)


def dp_protocol_conflict(protocol: str, overrides) -> str | None:
    """The one-line refusal of an ``--override`` that ``--protocol dp`` would silently replace (the
    episode limit), or None."""
    if protocol == "dp" and any(o.startswith("task.eval_max_steps=") for o in overrides):
        return ("--override task.eval_max_steps: --protocol dp rolls out to Diffusion Policy's own episode "
                "limit (use --protocol last to set one)")
    return None


def demo_style_recipe(task: str, style: str) -> tuple[str, list[str]]:
    """The rows' task label and the recipe overrides of demo ``style``, the one rule every policy
    bench labels by: ``ph`` (the scripted default) is the task as it is; ``mh`` (human-like demos)
    labels the rows ``<task>_mh`` and composes ``task.demo_style=mh``."""
    if style not in ("ph", "mh"):
        raise ValueError(f"--style: expected ph or mh, got {style!r}")
    return (task, []) if style == "ph" else (f"{task}_mh", [f"task.demo_style={style}"])


def config_keeping(path: Path, config: dict, keep: tuple[str, ...] | None = None) -> dict:
    """``config`` plus the ``config`` entries of the result file already at ``path`` that two benches
    sharing one file must not drop: those named in ``keep``, or (``keep=None``) every entry ``config``
    does not set. Nothing to keep when the file does not exist yet."""
    path = Path(path)
    old = json.loads(path.read_text()).get("config", {}) if path.exists() else {}
    kept = {k: v for k, v in old.items() if (k in keep if keep is not None else k not in config)}
    return {**config, **kept} if keep is not None else {**kept, **config}


def write_results(bench: str, config: dict, rows: list[dict], path: Path | None = None) -> Path:
    """Atomically write the bench JSON and print its rows as a table."""
    path = Path(path or RESULTS / f"{bench}.json")
    doc = {"bench": bench, "machine": machine(), "config": config, "rows": rows}
    atomic_write_text(path, json.dumps(doc, indent=2))
    print_table(rows)
    print(f"\nwrote {path}")
    return path


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    widths = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print(" | ".join(k.ljust(widths[k]) for k in keys))
    print("-+-".join("-" * widths[k] for k in keys))
    for r in rows:
        print(" | ".join(fmt(r.get(k, "")).ljust(widths[k]) for k in keys))


def train_in_child(run_dir: Path, steps: int, threads: int, overrides: list[str], env: dict,
                   cwd: Path | None = None) -> dict:
    """Train ``steps`` steps (no evaluation, no checkpoints) with ``jumpflow.cli.train`` in a fresh
    child process; returns the it/s of the last logging window, the loss (mean of the last fifth of
    the logged values, first and last), the wall time and the child's user CPU seconds."""
    args = [*overrides, f"trainer.max_steps={steps}", f"trainer.log_every={max(1, steps // 10)}",
            "trainer.ckpt_every=0", "trainer.eval_every=0", "trainer.eval_at_end=false", "trainer.progress=false",
            "logger=none", "resume=false", f"trainer.cpu_threads={threads}", f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jumpflow.cli.train", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, cwd=cwd)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    logs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/it_per_s"] for r in logs if r.get("train/it_per_s")]
    losses = [r["train/loss"] for r in logs if "train/loss" in r]
    tail = losses[-max(1, len(losses) // 5):]
    return {"it_per_s": rates[-1], "loss_tail": sum(tail) / len(tail), "loss_first": losses[0],
            "loss_last": losses[-1], "wall_s": wall, "cpu_user_s": after.ru_utime - before.ru_utime}
