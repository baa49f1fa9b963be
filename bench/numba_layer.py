"""Drifting training speed under numba's threading layers: ``omp`` (numba's default on Linux:
its own OpenMP pool beside torch's) against ``workqueue`` (jumpflow's default since this bench).

Each setting trains the same seed of the same Drifting run in a fresh child process (the layer
is fixed at a process's first parallel launch) with ``NUMBA_THREADING_LAYER`` set; settings are
interleaved over ``--repeats`` rounds so that the machine's load hits both alike, and the load
average is recorded. A row gives the steps per second of the last logging window, the child's
user CPU seconds and the mean loss of the last 20% of steps (the layer must not change it)::

    python -m bench.numba_layer --steps 60 --repeats 2
    python -m bench.numba_layer --recipe toy2d --steps 150
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import arg_parser, parse_args, train_in_child, write_results

LAYERS = ("omp", "workqueue")

#: recipe -> overrides that make a short Drifting run of it (no evaluation, no checkpoints)
RECIPES = {
    "policy_cpu": ["experiment=policy_cpu", "task.n_demos=20"],
    "toy2d": ["experiment=toy2d"],
}


def run_child(layer: str, recipe: str, steps: int, threads: int, tmp: Path, tag: str) -> dict:
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "JUMPFLOW_DATA": str(tmp / "data")}
    return train_in_child(tmp / f"run_{tag}", steps, threads, [*RECIPES[recipe], "objective=drifting"], env)


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="policy_cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="result file (default bench/results/numba_layer.json)")
    args = parse_args(ap, argv)
    results: dict[str, list[dict]] = {layer: [] for layer in LAYERS}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        # a warm-up child writes the demos and numba's kernel cache, which no measured run pays
        run_child("workqueue", args.recipe, 2, args.threads, Path(tmp), "warmup")
        for rep in range(args.repeats):
            for layer in LAYERS:
                out = run_child(layer, args.recipe, args.steps, args.threads, Path(tmp), f"{layer}_{rep}")
                results[layer].append(out)
                load.append(os.getloadavg()[0])
                print(layer, out, flush=True)
    mean = {layer: {k: sum(o[k] for o in outs) / len(outs) for k in outs[0]} for layer, outs in results.items()}
    rows = [{"recipe": args.recipe, "objective": "drifting", "layer": layer, "it_per_s": round(m["it_per_s"], 3),
             "speedup_vs_omp": round(m["it_per_s"] / mean["omp"]["it_per_s"], 3),
             "cpu_user_s": round(m["cpu_user_s"], 1), "wall_s": round(m["wall_s"], 1),
             "loss_tail": round(results[layer][0]["loss_tail"], 6), "repeats": len(results[layer]),
             "steps": args.steps, "torch_threads": args.threads} for layer, m in mean.items()]
    write_results("numba_layer", {"steps": args.steps, "repeats": args.repeats, "recipe": args.recipe,
                                  "load_average_1min": load}, rows,
                  Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
