"""Speed settings of the main job, each measured on and off in one run: bf16 autocast
(``trainer.precision``), torch threads (``trainer.cpu_threads``), data-loader workers with
prefetch (``trainer.num_workers``) and ``torch.compile`` of the backbone (``trainer.compile``),
for Flow Matching and MeanFlow on the main job's recipe (MLP 512x4, batch 256, Lift low-dim).

Every setting trains the same seed for ``--steps`` steps on the same small generated dataset; a row
gives the it/s of the last logging window (a tenth of the steps; compilation happens before it),
the wall time of the whole run (compilation included) and the mean loss of the last 20% of
steps, so that a speed-up that changes the numbers shows. Settings are interleaved (``--repeats`` rounds) so that a change
in the machine's load hits all of them alike; the load average is recorded. MeanFlow differentiates
with JVPs, for which the trainer keeps autocast and compilation off (its bf16 and compiled rows
are the eager fp32 computation: a control for the noise of the measurement).

On a CPU without native bf16 (``avx512_bf16`` / ``amx_bf16``) autocast is emulated and about 13x
slower; that row is then measured once on 30 steps (its ``steps`` says so).

    python -m bench.speedups --steps 300 --repeats 2
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from bench.common import arg_parser, parse_args, write_results
from jumpflow.trainer import train

#: name -> hydra overrides (the first is the reference)
SETTINGS = {
    "fp32, 1 thread": ["trainer.cpu_threads=1"],
    "bf16, 1 thread": ["trainer.cpu_threads=1", "trainer.precision=bf16"],
    "fp32, 2 threads": ["trainer.cpu_threads=2"],
    "fp32, 1 thread, 1 loader worker": ["trainer.cpu_threads=1", "trainer.num_workers=1"],
    # for JVP objectives the trainer keeps the backbone eager: their row is a control
    "fp32, 1 thread, compiled": ["trainer.cpu_threads=1", "trainer.compile=true"],
}


def run(objective: str, overrides: list[str], data: Path, run_dir: Path, steps: int) -> dict:
    with initialize_config_module(config_module="jumpflow.configs", version_base=None):
        cfg = compose("train", overrides=[
            "experiment=policy_cpu", f"objective={objective}", f"task.dataset={data}", "task.n_demos=20",
            f"task.cache_dir={data.parent / 'cache'}", f"trainer.max_steps={steps}",
            f"trainer.log_every={max(1, steps // 10)}", "trainer.ckpt_every=0", "trainer.eval_at_end=false",
            "trainer.progress=false", "logger=none", "resume=false", f"run_dir={run_dir}", *overrides])
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    logs = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/it_per_s"] for r in logs if r.get("train/it_per_s")]
    losses = [r["train/loss"] for r in logs if "train/loss" in r]
    tail = losses[-max(1, len(losses) // 5):]
    return {"it_per_s": rates[-1] if rates else float("nan"), "loss_tail": sum(tail) / len(tail), "wall_s": wall}


def main(argv=None) -> None:
    ap = arg_parser(__doc__, threads=None)
    ap.add_argument("--objectives", default="flow_matching,meanflow")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    args = parse_args(ap, argv)
    from jumpflow.objectives import OBJECTIVES
    from jumpflow.trainer import native_bf16_cpu

    native = native_bf16_cpu()
    settings = SETTINGS
    results: dict[tuple[str, str], list[dict]] = {}
    load = [os.getloadavg()[0]]
    n_runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data" / "lift.hdf5"
        for rep in range(args.repeats):
            for objective in args.objectives.split(","):
                for name, overrides in settings.items():
                    # emulated bf16 (no native support) runs ~13x slower: measured once, on a few steps
                    emulated = ("trainer.precision=bf16" in overrides and not native
                                and not OBJECTIVES[objective].uses_jvp)
                    if emulated and rep > 0:
                        continue
                    steps = min(args.steps, 30) if emulated else args.steps
                    n_runs += 1             # a fresh run directory each time: nothing resumes
                    out = run(objective, overrides, data, Path(tmp) / f"run_{n_runs:03d}", steps)
                    out["steps"] = steps
                    results.setdefault((objective, name), []).append(out)
                    print(objective, name, out, flush=True)
                    load.append(os.getloadavg()[0])
    rows = []
    for (objective, name), outs in results.items():
        ref = results[(objective, next(iter(settings)))]
        speed = sum(o["it_per_s"] for o in outs) / len(outs)
        ref_speed = sum(o["it_per_s"] for o in ref) / len(ref)
        rows.append({"objective": objective, "setting": name, "it_per_s": round(speed, 2),
                     "speedup": round(speed / ref_speed, 3), "loss_tail": round(outs[0]["loss_tail"], 5),
                     "loss_tail_ref": round(ref[0]["loss_tail"], 5), "repeats": len(outs),
                     "wall_s": round(sum(o["wall_s"] for o in outs) / len(outs), 1), "steps": outs[0]["steps"]})
    write_results("speedups", {"steps": args.steps, "repeats": args.repeats, "recipe": "experiment=policy_cpu",
                               "native_bf16": native,
                               "load_average_1min": load}, rows)


if __name__ == "__main__":
    main()
