"""Where the main job's time goes: demo generation, data (sampling, per-item seeding,
windowing, collation), forward (loss, incl. the JVP), backward, optimiser, EMA, evaluation
rollouts; measured on small counts in one process and scaled to the main job's counts (200
demos, 3,000 steps, 50 episodes).

    python -m bench.profile --demos 10 --steps 60 --episodes 3
    python -m bench.profile --objective drifting --steps 10 --episodes 1   # -> profile_drifting.json

Writes ``bench/results/profile.json`` (shares of the extrapolated wall time and of the CPU time
of each phase) and prints the table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from bench.common import arg_parser, parse_args, write_results
from jumpflow.build import build_components
from jumpflow.trainer import GlobalBatchSampler, ItemSeeded

MAIN_JOB = {"demos": 200, "steps": 2500, "episodes": 50}


class Clock:
    """Wall and process-CPU seconds per phase."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, phase: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.wall[phase] = clock.wall.get(phase, 0.0) + time.perf_counter() - self.w
                clock.cpu[phase] = clock.cpu.get(phase, 0.0) + time.process_time() - self.c
        return _Span()


def main(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--demos", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--objective", default="meanflow", help="the main job's objective unless set")
    args = parse_args(ap, argv)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "lift.hdf5"
        from jumpflow.envs.demos import ensure_demos

        with clock("demo_generation"):
            ensure_demos(data, task="Lift", n_demos=args.demos, seed=0)
        with initialize_config_module(config_module="jumpflow.configs", version_base=None):
            cfg = compose("train", overrides=["experiment=policy_cpu", f"objective={args.objective}", f"task.dataset={data}",
                                              f"task.n_demos={args.demos}", f"task.cache_dir={Path(tmp) / 'cache'}",
                                              "task.eval_videos=0", f"run_dir={Path(tmp) / 'run'}"])
        with clock("build_and_cache"):
            parts = build_components(cfg)
        model, task = parts.model, parts.task
        dataset = task.train_dataset()
        b = int(cfg.trainer.batch_size)
        sampler = GlobalBatchSampler(len(dataset), b, 1, [0], 0)
        batches = iter(DataLoader(ItemSeeded(dataset), batch_sampler=sampler, num_workers=0))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.95, 0.999), weight_decay=1e-6)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
        for step in range(args.steps + 5):
            timed = step >= 5                                  # warm-up steps are not counted
            span = clock if timed else (lambda _: _Null())
            with span("data"):
                batch = next(batches)
            with span("forward"):
                loss = model.compute_loss(batch).loss.mean()
            with span("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with span("optimiser"):
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                parts.objective.on_step_end(model)
            with span("ema"):
                ema.update_parameters(model)
        evaluator = task.evaluator(None, n_episodes=args.episodes, n_videos=0)
        try:
            with clock("evaluation"):
                evaluator.run(ema.module.eval())
        finally:
            evaluator.close()
    scale = {"demo_generation": MAIN_JOB["demos"] / args.demos, "build_and_cache": 1.0,
             **{k: MAIN_JOB["steps"] / args.steps for k in ("data", "forward", "backward", "optimiser", "ema")},
             "evaluation": MAIN_JOB["episodes"] / args.episodes}
    wall = {k: clock.wall[k] * scale[k] for k in clock.wall}
    cpu = {k: clock.cpu[k] * scale[k] for k in clock.cpu}
    total_wall, total_cpu = sum(wall.values()), sum(cpu.values())
    rows = [{"phase": k, "measured_wall_s": round(clock.wall[k], 3), "main_job_wall_s": round(wall[k], 1),
             "wall_share": round(wall[k] / total_wall, 3), "main_job_cpu_s": round(cpu[k], 1),
             "cpu_share": round(cpu[k] / total_cpu, 3)} for k in wall]
    name = "profile" if args.objective == "meanflow" else f"profile_{args.objective}"
    write_results(name, {"measured": vars(args), "main_job": MAIN_JOB, "threads": args.threads,
                              "total_main_job_wall_s": round(total_wall, 1), "total_main_job_cpu_s": round(total_cpu, 1),
                              "note": "phases timed on small counts in one process, scaled linearly to the main job"},
                  rows)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
