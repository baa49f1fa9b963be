"""Robot data pipeline timings -> bench/results/robot_data.json.

Measures, for low-dim Lift: scripted demo generation (seconds per demo), the HDF5 -> zarr replay
buffer conversion, and one epoch of ``(obs[2], action[16])`` windows through a DataLoader
(batch 256), as the training job runs them.

Usage: ``python -m bench.robot_data [--n-demos 200] [--workdir /tmp/jumpflow_bench]`` (``--debug``: 5 demos);
``--hdf5 FILE --n-demos 20``: time generation on 20 demos but conversion / epoch on an existing file.
Every stage reports wall seconds and CPU seconds of this process (the machine is shared: wall time
depends on the load, CPU time much less).
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
    p.add_argument("--hdf5", default=None, help="convert this existing file instead of the generated one")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    n = 5 if args.debug else args.n_demos

    import torch

    from bench.experts import machine_info
    from jumpflow.datasets.sequence import RobomimicSequenceDataset
    from jumpflow.envs.demos import generate_demos
    from jumpflow.envs.sim import LOW_DIM_KEYS

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    path = work / f"lift_{n}.hdf5"
    c0 = time.process_time()
    gen = generate_demos(path, "Lift", n_demos=n, seed=0, progress=False)
    gen_cpu = time.process_time() - c0
    src = Path(args.hdf5) if args.hdf5 else path

    def timed(fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return out, time.perf_counter() - w, time.process_time() - c

    make = lambda: RobomimicSequenceDataset(src, LOW_DIM_KEYS, horizon=16, n_obs_steps=2, n_action_steps=8,
                                            cache_dir=work / "cache")
    ds, t_conv, c_conv = timed(make)
    ds2, t_cached, c_cached = timed(make)
    loader = torch.utils.data.DataLoader(ds2, batch_size=256, shuffle=True, num_workers=0)
    n_windows, t_epoch, c_epoch = timed(lambda: sum(b["action"].shape[0] for b in loader))
    n_src = ds.buffer.n_episodes
    rows = [
        {"stage": "generate_demos", "n_demos": gen["n_demos"], "n_failed": gen["n_failed"],
         "steps": gen["total_samples"], "seconds": gen["seconds"], "seconds_per_demo": gen["seconds_per_demo"],
         "cpu_seconds": gen_cpu, "cpu_seconds_per_demo": gen_cpu / max(gen["n_demos"], 1),
         "note": "includes creating the env once"},
        {"stage": "hdf5_to_zarr", "n_demos": n_src, "steps": ds.buffer.n_steps, "seconds": t_conv,
         "cpu_seconds": c_conv, "note": "sha256 of the file + validation + conversion"},
        {"stage": "load_cached", "n_demos": n_src, "seconds": t_cached, "cpu_seconds": c_cached},
        {"stage": "epoch_of_windows", "windows": n_windows, "batch_size": 256, "seconds": t_epoch,
         "cpu_seconds": c_epoch},
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
        detail = {k: v for k, v in r.items() if k not in ("stage", "seconds", "note")}
        print(f"| {r['stage']} | {r['seconds']:.2f} | {detail} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
