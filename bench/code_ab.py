"""A code change's effect on training speed and numbers: the same short run under two installed
trees of jumpflow (e.g. ``pip install --no-deps --target /tmp/before`` of the parent commit and of
the change), in fresh child processes, interleaved over ``--repeats`` rounds so that the machine's
load hits both alike.

A row gives a tree's steps per second over the last logging window, the child's user CPU
seconds and the training loss (mean of the last fifth of the steps, and its first and last
logged values) so that a speed-up that changes the numbers shows::

    python -m bench.code_ab --tree before=/tmp/before --tree after=/tmp/after \\
        --override experiment=policy_cpu --steps 200 --tag mlp_cheap_jvp
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.common import RESULTS, arg_parser, load_rows, parse_args, train_in_child, write_results


def run_child(tree: Path, overrides: list[str], steps: int, threads: int, tmp: Path, tag: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "JUMPFLOW_DATA": str(tmp / "data")}
    # cwd outside any checkout: ``python -m`` puts the working directory first on the path
    return train_in_child(tmp / f"run_{tag}", steps, threads, overrides, env, cwd=tmp)


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--tree", action="append", required=True, help="label=path of an installed tree (two or more)")
    ap.add_argument("--override", action="append", default=[], help="hydra override of the run (repeatable)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tag", required=True, help="names the comparison; its rows replace earlier ones")
    ap.add_argument("--out", default=str(RESULTS / "code_ab.json"))
    args = parse_args(ap, argv)
    malformed = [t for t in args.tree if "=" not in t]
    if malformed:
        raise SystemExit(f"--tree takes label=path, got {malformed}")
    trees = dict(t.split("=", 1) for t in args.tree)
    missing = [p for p in trees.values() if not (Path(p) / "jumpflow" / "__init__.py").exists()]
    if len(trees) < 2 or missing:
        raise SystemExit(f"need two or more --tree label=path with jumpflow installed in each; missing: {missing}")
    results: dict[str, list[dict]] = {label: [] for label in trees}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        first = next(iter(trees.values()))     # warm-up: writes the demos, which no measured run pays
        run_child(Path(first), args.override, 2, args.threads, Path(tmp), "warmup")
        for rep in range(args.repeats):
            for label, tree in trees.items():
                out = run_child(Path(tree), args.override, args.steps, args.threads, Path(tmp), f"{label}_{rep}")
                results[label].append(out)
                load.append(os.getloadavg()[0])
                print(label, out, flush=True)
    ref = next(iter(results))
    mean = {label: {k: sum(o[k] for o in outs) / len(outs) for k in outs[0]} for label, outs in results.items()}
    rows = [{"tag": args.tag, "tree": label, "overrides": " ".join(args.override), "steps": args.steps,
             "it_per_s": round(m["it_per_s"], 3), "speedup": round(m["it_per_s"] / mean[ref]["it_per_s"], 3),
             "cpu_user_s": round(m["cpu_user_s"], 1), "loss_tail": results[label][0]["loss_tail"],
             "loss_first": results[label][0]["loss_first"], "loss_last": results[label][0]["loss_last"],
             "repeats": len(results[label]), "torch_threads": args.threads, "load_average_1min": load}
            for label, m in mean.items()]
    out = Path(args.out)
    kept = [r for r in load_rows(out) if r.get("tag") != args.tag]
    write_results("code_ab", {"note": "each tag compares installed trees of jumpflow on one run; see rows"},
                  kept + rows, out)


if __name__ == "__main__":
    main()
