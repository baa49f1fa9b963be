"""Trainer overhead: jumpflow's trainer against a plain loop on the same model, objective,
optimiser, EMA and batch size, in one process, for the main job's backbone.

The plain loop is what a 30-line script does: random tensors of the batch's shapes (no data
loading), ``compute_loss``, backward, clipping, AdamW, the EMA update. The trainer runs its
real loop on a small generated Lift dataset (data order, per-item seeding, collation,
normalisation, logging). ``ratio`` is plain it/s over trainer it/s (1.0: no overhead).

    python -m bench.trainer_overhead --steps 200 --objectives meanflow,flow_matching
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.common import arg_parser, parse_args, write_results
from jumpflow.build import build_components
from jumpflow.trainer import train


def _cfg(objective: str, data: Path, run_dir: Path, steps: int, threads: int):
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        return compose("train", overrides=[
            "experiment=policy_cpu", f"objective={objective}", f"task.dataset={data}", "task.n_demos=10",
            f"task.cache_dir={data.parent / 'cache'}", f"trainer.max_steps={steps}", f"trainer.log_every={steps // 2}",
            "trainer.ckpt_every=0", "trainer.eval_at_end=false", "trainer.progress=false", "logger=none",
            f"trainer.cpu_threads={threads}", f"run_dir={run_dir}"])


def plain_loop(cfg, steps: int) -> float:
    """it/s of the plain loop (second half of ``steps``)."""
    parts = build_components(cfg)
    model, task = parts.model, parts.task
    b = int(cfg.trainer.batch_size)
    batch = {"obs": {k: torch.randn(b, task.n_obs_steps, *s) for k, s in task.obs_shapes.items()},
             "action": torch.rand(b, task.horizon, task.action_dim) * 2 - 1}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas),
                            weight_decay=float(cfg.optim.weight_decay))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    t0 = None
    for step in range(steps):
        if step == steps // 2:
            t0 = time.perf_counter()
        loss = model.compute_loss(batch).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        parts.objective.on_step_end(model)
        ema.update_parameters(model)
    return (steps - steps // 2) / (time.perf_counter() - t0)


def trainer_loop(cfg, steps: int) -> float:
    result = train(cfg)
    rates = [json.loads(line).get("train/it_per_s") for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return float([r for r in rates if r][-1])          # the second half (log_every = steps / 2)


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--objectives", default="meanflow,flow_matching")
    ap.add_argument("--steps", type=int, default=200)
    args = parse_args(ap, argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data" / "lift.hdf5"
        from jumpflow.envs.demos import ensure_demos
        ensure_demos(data, task="Lift", n_demos=10, seed=0)
        for objective in args.objectives.split(","):
            cfg = _cfg(objective, data, Path(tmp) / f"run_{objective}", args.steps, args.threads)
            bare = plain_loop(cfg, args.steps)
            trainer = trainer_loop(cfg, args.steps)
            rows.append({"objective": objective, "backbone": "MLP 512x4 (main job)", "batch": int(cfg.trainer.batch_size),
                         "bare_it_per_s": round(bare, 2), "trainer_it_per_s": round(trainer, 2),
                         "ratio": round(bare / trainer, 3), "steps": args.steps, "threads": args.threads})
            print(rows[-1], flush=True)
    write_results("trainer_overhead", {"steps": args.steps, "threads": args.threads,
                                       "note": "ratio = bare it/s / trainer it/s; second half of the steps timed"},
                  rows)


if __name__ == "__main__":
    main()
