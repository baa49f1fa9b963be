"""``jumpflow-eval``: closed-loop evaluation of a trained policy checkpoint.

    jumpflow-eval runs/lift_mf                       # newest valid checkpoint, task's settings
    jumpflow-eval runs/lift_mf --episodes 100 --nfe 2 --videos 4 --out eval.json
    jumpflow-eval runs/lift_ddpm --nfe 10 --sampler ddim
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jumpflow-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run directory (newest valid checkpoint) or a checkpoint file")
    ap.add_argument("--episodes", type=int, default=None, help="episodes (default: the task's eval_episodes)")
    ap.add_argument("--nfe", type=int, default=None, help="network evaluations per chunk (default: the task's)")
    ap.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="DDPM objective only")
    ap.add_argument("--envs", type=int, default=None, help="parallel environments (spawned workers)")
    ap.add_argument("--videos", type=int, default=None, help="mp4 videos of the first N episodes")
    ap.add_argument("--temporal-ensemble", type=float, default=None, help="weight of the previous chunk")
    ap.add_argument("--no-ema", action="store_true", help="evaluate the raw weights, not the EMA copy")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="write the result JSON here (default: <run>/eval_cli.json)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from jumpflow.checkpoint import CheckpointError, load_model, resolve_checkpoint
    from jumpflow.io import atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        model, _ = load_model(ckpt, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"jumpflow-eval: error: {e}", file=sys.stderr)
        return 2
    task = model.task
    if not hasattr(model, "predict_action"):
        print(f"jumpflow-eval: error: {ckpt} is not a policy checkpoint (task {type(task).__name__})", file=sys.stderr)
        return 2
    if args.nfe is not None or args.sampler is not None:
        model.set_inference({"steps": args.nfe if args.nfe is not None else model.inference_steps,
                             "sampler": args.sampler})
    if args.temporal_ensemble is not None:
        model.temporal_ensemble = args.temporal_ensemble
    if args.envs is not None:
        task.eval_envs = args.envs
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    evaluator = task.evaluator(run_dir, n_episodes=args.episodes, n_videos=args.videos)
    try:
        result = evaluator.run(model)
    finally:
        evaluator.close()
    result["checkpoint"], result["nfe"] = str(ckpt), model.inference_steps
    out = Path(args.out) if args.out else run_dir / "eval_cli.json"
    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"success rate {result['success_rate']:.3f} over {result['n_episodes']} episodes | latency per chunk "
          f"p50 {result['latency_ms_p50']:.2f} ms, p95 {result['latency_ms_p95']:.2f} ms (nfe {model.inference_steps})"
          f" | videos: {len(result['videos'])} | {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
