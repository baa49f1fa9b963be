"""What a cloned Block Push policy learnt: the oracle's law, or the noise on its labels.

Teacher-forced on held-out demos (``mask/valid``), each policy's first predicted action at a
demo state is compared with the demo's stored label and with the oracle's noise-free law at
that state (``BlockPushOracle.law`` with the demo's drawn order). Pearson correlations per
action dimension:

- ``label_law``: stored label vs the law (1.0 when the labels are the law, i.e. oracle v4's DART
  labels; below 1 when the labels are the executed, noisy actions, as in v3);
- ``pred_label`` and ``pred_law``: the policy's action vs each.

A policy that has learnt the law has ``pred_law`` near 1. A policy whose ``pred_label`` exceeds
``label_law`` predicts part of the noise, which it can only do from the observation history
(Ornstein-Uhlenbeck noise with lag-1 correlation 0.9 is visible in the last two states): the
copycat failure of history-conditioned cloning, which continues the noise in closed loop.
For a generative policy one sample may also take another order's action than the demo's (the
demos hold 4 orders), so its ``pred_law`` mixes fit and mode choice; regression has no such part.

    python -m bench.label_fit --runs RUN_DIR[,RUN_DIR...] [--demos 40] [--stride 3]

Each run's dataset is the ``task.dataset`` in its ``config.yaml`` (``--dataset`` overrides it for
every run). Writes ``bench/results/label_fit.json`` and prints the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.common import arg_parser, parse_args, print_table, write_results


def label_fit(run_dir: str, dataset: str | None, n_demos: int, stride: int) -> dict:
    """Correlations of one run's policy with its demos' labels and with the law (module doc)."""
    import h5py
    import torch
    import yaml

    from jumpflow.envs.block_push import BlockPushOracle, parse_mode
    from jumpflow.policy import load_policy

    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    source = "--dataset" if dataset else f"{run_dir}/config.yaml: task.dataset"
    dataset = dataset or cfg["task"]["dataset"]
    if not Path(dataset).is_file():
        raise FileNotFoundError(f"{source}: {dataset} does not exist")
    n_obs = int(cfg["task"]["n_obs_steps"])
    policy = load_policy(run_dir)
    keys = list(policy.obs_keys)
    pred, label, law = [], [], []
    with h5py.File(dataset, "r") as f:
        env_name = json.loads(f["data"].attrs["env_args"]).get("env_name")
        if env_name != "BlockPush":
            raise ValueError(f"{dataset}: data attrs 'env_args': env_name is {env_name!r}, not 'BlockPush'")
        names = [n.decode() for n in f["mask/valid"][()]][:n_demos]
        version = int(f["data"].attrs.get("oracle_version", 1))
        for name in names:
            g = f["data"][name]
            oracle = BlockPushOracle(order=[parse_mode(m) for m in json.loads(g.attrs["draw"])["order"]],
                                     noise_std=0)
            obs = {k: g[f"obs/{k}"][()] for k in keys}
            steps = range(n_obs - 1, len(g["actions"]), stride)
            window = {k: torch.from_numpy(np.stack([v[t - n_obs + 1:t + 1] for t in steps])).float()
                      for k, v in obs.items()}                                  # (B, To, D)
            with torch.no_grad():
                pred.append(policy.predict_action(window)[:, 0].numpy())        # (B, 2)
            label.append(g["actions"][()][list(steps)])
            law.append(np.stack([oracle.law({k: obs[k][t] for k in keys}) for t in steps]))
    pred, label, law = (np.concatenate(a).astype(np.float64) for a in (pred, label, law))

    def corr(a, b, i):
        return float(np.corrcoef(a[:, i], b[:, i])[0, 1])
    row = {"run": "/".join(Path(run_dir).resolve().parts[-2:]), "oracle_version": version,
           "objective": cfg["objective"]["_target_"].split(".")[-1], "train_steps": int(cfg["trainer"]["max_steps"]),
           "n_obs_steps": n_obs, "samples": len(pred)}
    for i, axis in enumerate("xy"):
        row[f"label_law_{axis}"] = round(corr(label, law, i), 3)
        row[f"pred_label_{axis}"] = round(corr(pred, label, i), 3)
        row[f"pred_law_{axis}"] = round(corr(pred, law, i), 3)
    return row


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--runs", required=True, help="comma list of Block Push run directories")
    ap.add_argument("--dataset", default=None, help="demo file for every run (default: each run's task.dataset)")
    ap.add_argument("--demos", type=int, default=40, help="held-out demos (mask/valid) to read")
    ap.add_argument("--stride", type=int, default=3, help="every n-th state of each demo")
    args = parse_args(ap, argv)
    runs = args.runs.split(",")
    for run in runs:                                                 # bad input before any work
        if not (Path(run) / "config.yaml").is_file():
            raise SystemExit(f"bench.label_fit: --runs: {run} has no config.yaml")
    for path in {args.dataset} if args.dataset else set():
        if not Path(path).is_file():
            raise SystemExit(f"bench.label_fit: --dataset: {path} does not exist")
    rows = [label_fit(run, args.dataset, args.demos, args.stride) for run in runs]
    write_results("label_fit", {"demos": args.demos, "stride": args.stride, "dataset": args.dataset}, rows)
    print_table(rows)


if __name__ == "__main__":
    main()
