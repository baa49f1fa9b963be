"""Per-chunk latency of every trained policy, all measured in one process, back to back.

``bench.policy`` times ``predict_action`` inside its rollouts, but its rows are trained and
rolled out at different times, beside whatever else the machine runs. This script loads
each finished run of ``bench.policy`` (``runs/bench_policy/<task>_<objective>_s<seed>``),
feeds ``predict_action`` the same recorded observation window (batch 1, as in closed-loop
control) ``--calls`` times per variant, and reports p50 / p95 and the ratios the policy
issue asks for: 1-NFE latency against DDPM-100 and DDIM-10 on the same backbone.

    python -m bench.policy_latency --tasks lift_lowdim,can_lowdim,lift_image --threads 2

Writes ``bench/results/policy_latency.json`` and prints the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from bench.common import arg_parser, parse_args, write_results
from bench.policy import VARIANTS
from jumpflow.checkpoint import load_model


def time_calls(model, obs: dict, calls: int, warmup: int = 5) -> np.ndarray:
    """Milliseconds per ``predict_action`` call (``reset`` before each: no ensembling state)."""
    out = []
    with torch.inference_mode():
        for i in range(warmup + calls):
            model.reset()
            t0 = time.perf_counter()
            model.predict_action(obs)
            if i >= warmup:
                out.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(out)


def main(argv=None) -> None:
    ap = arg_parser(__doc__, threads=2)
    ap.add_argument("--tasks", default="lift_lowdim,can_lowdim,lift_image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/bench_policy")
    ap.add_argument("--calls", type=int, default=200)
    args = parse_args(ap, argv)
    rows = []
    for task in args.tasks.split(","):
        obs = None
        for objective, variants in VARIANTS.items():
            run_dir = Path(args.runs) / f"{task}_{objective}_s{args.seed}"
            if not (run_dir / "checkpoints").is_dir():
                print(f"skip {run_dir}: no checkpoints")
                continue
            model, _ = load_model(run_dir)
            if obs is None:                     # one recorded window, shared by every row of the task
                item = model.task.train_dataset()[0]
                obs = default_collate([item["obs"]])
            for label, nfe, sampler in variants:
                model.set_inference({"steps": nfe, "sampler": sampler})
                ms = time_calls(model, obs, args.calls)
                rows.append({"task": task, "objective": objective, "sampler": sampler or label, "nfe": nfe,
                             "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
                             "latency_ms_p95": round(float(np.percentile(ms, 95)), 3), "calls": args.calls})
    for task in {r["task"] for r in rows}:
        ref = {(r["sampler"], r["nfe"]): r["latency_ms_p50"] for r in rows if r["task"] == task}
        for r in rows:
            if r["task"] == task and r["nfe"] == 1 and r["sampler"] != "ddpm":
                if ("ddpm", 100) in ref:
                    r["ratio_to_ddpm100_p50"] = round(r["latency_ms_p50"] / ref[("ddpm", 100)], 4)
                if ("ddim", 10) in ref:
                    r["ratio_to_ddim10_p50"] = round(r["latency_ms_p50"] / ref[("ddim", 10)], 4)
    write_results("policy_latency", {"threads": args.threads, "calls": args.calls, "batch": 1,
                                     "note": "predict_action on one recorded observation window, one process, "
                                             "back to back; targets: 1-NFE <= 1/20 of DDPM-100 and <= 1/3 of "
                                             "DDIM-10; image p95 <= 50 ms (20 Hz)"}, rows)


if __name__ == "__main__":
    main()
