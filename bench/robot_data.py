"""Robot data pipeline timings -> bench/results/robot_data.json.

Measures, for low-dim Lift: scripted demo generation (seconds per demo), the HDF5 -> zarr replay
buffer conversion, and one epoch of ``(obs[2], action[16])`` windows through a DataLoader
(batch 256), as the training job runs them.

Usage: ``python bench/robot_data.py [--n-demos 200] [--workdir /tmp/jumpflow_bench]`` (``--debug``: 5 demos).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-demos", type=int, default=200)
    p.add_argument("--workdir", default="/tmp/jumpflow_bench")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "robot_data.json"))
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    n = 5 if args.debug else args.n_demos

    import torch

    from experts import machine_info  # bench/experts.py (this script's directory is on sys.path)
    from jumpflow.datasets.sequence import RobomimicSequenceDataset
    from jumpflow.envs.demos import generate_demos
    from jumpflow.envs.sim import LOW_DIM_KEYS

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / f"lift_{n}.hdf5"
    gen = generate_demos(path, "Lift", n_demos=n, seed=0, progress=False)
    t0 = time.perf_counter()
    ds = RobomimicSequenceDataset(path, LOW_DIM_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8,
                                  cache_dir=work / "cache")
    t_conv = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds2 = RobomimicSequenceDataset(path, LOW_DIM_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8,
                                   cache_dir=work / "cache")
    t_cached = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(ds2, batch_size=256, shuffle=True, num_workers=0)
    t0 = time.perf_counter()
    n_windows = sum(b["action"].shape[0] for b in loader)
    t_epoch = time.perf_counter() - t0
    rows = [
        {"stage": "generate_demos", "n_demos": gen["n_demos"], "n_failed": gen["n_failed"],
         "steps": gen["total_samples"], "seconds": gen["seconds"], "seconds_per_demo": gen["seconds_per_demo"]},
        {"stage": "hdf5_to_zarr", "n_demos": gen["n_demos"], "steps": ds.buffer.n_steps, "seconds": t_conv},
        {"stage": "load_cached", "n_demos": gen["n_demos"], "seconds": t_cached},
        {"stage": "epoch_of_windows", "windows": n_windows, "batch_size": 256, "seconds": t_epoch},
    ]
    result = {"bench": "robot_data", "machine": machine_info(),
              "config": {"task": "Lift", "obs": "low_dim", "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8},
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print("| stage | seconds | detail |\n|---|---|---|")
    for r in rows:
        detail = {k: v for k, v in r.items() if k not in ("stage", "seconds")}
        print(f"| {r['stage']} | {r['seconds']:.2f} | {detail} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
