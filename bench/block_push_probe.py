"""Why Block Push policies fail: budget, mode commitment, or the multimodal data itself.

Three probes, each a hypothesis that a row can refute:

- ``probe RUN...``: closed-loop rollouts of each policy (p1, p2, the step at which the first
  block lands: ``mean_p1_step``) and, at every executed step,
  the distance from the policy's action to the *nearest* of the oracle's four noise-free laws
  (``BlockPushOracle.law`` under each of the four orders). A policy that picked one order and
  executes it well stays near 0; one that averages orders or acts sluggishly sits far from all
  four. ``--noise fixed`` draws the same initial noise for every chunk of an episode (a
  deterministic map from observation to chunk, so a generative policy cannot flip between
  orders from one chunk to the next by resampling); ``fresh`` (the evaluator's way) draws new
  noise per chunk. Same test seeds for every run.
- the first action at reset (every demo starts the effector at the same point, so this is where
  the data is densest): ``--samples`` chunks per test seed from one observation; the mean distance
  of their first executed action to the nearest law (``t0_dist_to_nearest_law``), the mean action
  norm against the laws' (``t0_action_norm`` / ``t0_law_norm``; the laws push at full speed, norm
  near 1), and how many samples fall nearest to each order (``t0_nearest_order_share``): a policy
  that has learnt the four-way choice puts its samples on the four laws.
- ``filter --modes b0t0 --src DEMOS --out DEMOS_1MODE``: a copy of a Block Push demo file that
  keeps only demos whose first (block, target) pair is one of ``--modes`` (its ``mask`` lists
  filtered alike): train on it to see what a policy reaches when the data is unimodal.

    python -m bench.block_push_probe filter --modes b0t0 --src data/block_push_lowdim_1000.hdf5 \\
        --out data1/block_push_lowdim_1000.hdf5
    python -m bench.block_push_probe probe runs/bp_reg runs/bp_ddpm --episodes 20 --noise fresh,fixed

``probe`` appends its rows to ``bench/results/block_push_probe.json`` (a row per run, noise
and inference setting; a re-run replaces the row) and prints the table.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.common import RESULTS, arg_parser, load_rows, parse_args, run_recipe, write_results

TEST_SEED0 = 100_000


def filter_modes(src: str | Path, out: str | Path, modes: list[str]) -> int:
    """Copy ``src`` to ``out`` (atomically: a temporary file renamed at the end) keeping the demos
    whose ``mode`` attribute is in ``modes`` and the ``mask`` entries that name them; returns the
    number kept. A demo without a ``mode`` attribute, or an unknown mode, is refused by name."""
    import h5py

    from jumpflow.envs.block_push import parse_mode
    from jumpflow.io import temp_path

    for m in modes:
        parse_mode(m)
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such demo file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            if not isinstance(f.get("data"), h5py.Group):
                raise KeyError(f"{src}: no 'data' group (not a robomimic-layout demo file)")
            keep = []
            for name in list(f["data"].keys()):
                if "mode" not in f["data"][name].attrs:
                    raise KeyError(f"{src}: data/{name} has no 'mode' attribute")
                if f["data"][name].attrs["mode"] in modes:
                    keep.append(name)
                else:
                    del f["data"][name]
            if not keep:
                raise ValueError(f"{src}: no demo has a mode in {modes}")
            for split in list(f["mask"].keys()) if "mask" in f else []:
                names = [v for v in f["mask"][split][:] if v.decode() in keep]
                del f["mask"][split]
                f["mask"].create_dataset(split, data=np.asarray(names, dtype="S"))
            f["data"].attrs["total"] = int(sum(int(f["data"][k].attrs["num_samples"]) for k in keep))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(keep)


def nearest_law_distance(action: np.ndarray, laws: np.ndarray) -> tuple[float, int]:
    """``action (A,)``, ``laws (K, A)`` -> (distance to the nearest law, its index)."""
    d = np.linalg.norm(laws - action[None], axis=1)
    k = int(np.argmin(d))
    return float(d[k]), k


def first_action_probe(policy, sim, laws, seeds, samples: int) -> dict:
    """``samples`` chunks per seed from the observation at reset (module doc)."""
    import torch

    start, t_obs = policy.n_obs_steps - 1, policy.n_obs_steps
    dist, norms, law_norms, share = [], [], [], np.zeros(len(laws))
    for seed in seeds:
        obs = sim.reset(seed)
        law_actions = np.array([law.law(obs) for law in laws])                      # (K, A)
        stacked = {k: torch.as_tensor(np.stack([obs[k]] * t_obs)[None].repeat(samples, 0), dtype=torch.float32)
                   for k in policy.obs_keys}
        first = policy.predict_chunk(stacked, generator=torch.Generator().manual_seed(seed))[:, start].numpy()
        d = np.linalg.norm(first[:, None] - law_actions[None], axis=2)             # (S, K)
        dist.append(d.min(1).mean())
        share += np.bincount(d.argmin(1), minlength=len(laws))
        norms.append(np.linalg.norm(first, axis=1).mean())
        law_norms.append(np.linalg.norm(law_actions, axis=1).mean())
    return {"t0_dist_to_nearest_law": float(np.mean(dist)), "t0_action_norm": float(np.mean(norms)),
            "t0_law_norm": float(np.mean(law_norms)),
            "t0_nearest_order_share": [round(float(v), 3) for v in share / share.sum()]}


def probe_run(run: str, episodes: int, noise: str, inference: str | None, samples: int = 200) -> dict:
    """Closed-loop rollouts of one policy on the Block Push test seeds (module doc)."""
    import torch
    import yaml

    from jumpflow.envs.block_push import BLOCK_PUSH_ORDERS, BlockPushOracle, BlockPushSim
    from jumpflow.policy import load_policy

    policy = load_policy(run)
    policy.eval()
    if inference:
        sampler, steps = inference.split(":")
        policy.set_inference({"steps": int(steps), "sampler": sampler})
    sim = BlockPushSim(policy.env_meta)
    laws = [BlockPushOracle(max_delta=sim.max_delta, order=o, noise_std=0) for o in BLOCK_PUSH_ORDERS]
    start, n_exec, t_obs = policy.n_obs_steps - 1, policy.n_action_steps, policy.n_obs_steps
    p1s, p2s, dists, switches, lengths, p1_steps = [], [], [], [], [], []
    try:
        first = first_action_probe(policy, sim, laws, range(TEST_SEED0, TEST_SEED0 + min(episodes, 10)), samples)
        for ep in range(episodes):
            seed = TEST_SEED0 + ep
            obs = sim.reset(seed)
            policy.reset()
            history, queue, nearest, p1, success = [obs] * t_obs, [], [], False, False
            for t in range(int(sim.kwargs["horizon"])):
                if not queue:
                    stacked = {k: torch.as_tensor(np.stack([h[k] for h in history[-t_obs:]])[None], dtype=torch.float32)
                               for k in policy.obs_keys}
                    g = torch.Generator().manual_seed(seed if noise == "fixed" else seed * 1000 + t)
                    queue = list(policy.predict_chunk(stacked, generator=g)[0, start:start + n_exec].numpy())
                action = np.asarray(queue.pop(0), dtype=np.float64)
                d, k = nearest_law_distance(action, np.array([law.law(obs) for law in laws]))
                dists.append(d)
                nearest.append(k)
                obs, _, success = sim.step(action)
                history.append(obs)
                if not p1 and sim.success_dict()["p1"]:
                    p1 = True
                    p1_steps.append(t + 1)
                if success:
                    break
            p1s.append(p1)
            p2s.append(bool(success))
            lengths.append(t + 1)
            switches.append(int(np.count_nonzero(np.diff(nearest))))
    finally:
        sim.close()
    cfg_path = (Path(run) if Path(run).is_dir() else Path(run).parent.parent) / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    return {"run": str(run), "recipe": run_recipe(run), "objective": type(policy.objective).__name__,
            "train_steps": cfg.get("trainer", {}).get("max_steps"), "dataset": cfg.get("task", {}).get("dataset"),
            "noise": noise, "inference": inference or "default", "episodes": episodes,
            "p2": float(np.mean(p2s)), "p1": float(np.mean(p1s)),
            "mean_dist_to_nearest_law": float(np.mean(dists)),
            "nearest_order_switches_per_episode": float(np.mean(switches)),
            "mean_length": float(np.mean(lengths)),
            # when the first block lands (episodes that land one): a policy that hesitates between
            # orders at the start lands late and may run out of the episode for the second
            "mean_p1_step": float(np.mean(p1_steps)) if p1_steps else None, **first, "seeds": f"{TEST_SEED0}..{TEST_SEED0 + episodes - 1}"}


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("command", choices=("probe", "filter"))
    ap.add_argument("runs", nargs="*", help="probe: run directories (or checkpoint files)")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--noise", default="fresh", help="probe: comma list of fresh | fixed")
    ap.add_argument("--inference", default=None, help="probe: sampler:steps (e.g. ddim:10); default: the checkpoint's")
    ap.add_argument("--samples", type=int, default=200, help="probe: chunks per seed at reset")
    ap.add_argument("--label", action="append", default=[], help="probe: RUN=TEXT, what the run is (kept in its row)")
    ap.add_argument("--modes", default="b0t0", help="filter: comma list of first (block, target) modes to keep")
    ap.add_argument("--src", help="filter: the demo file")
    ap.add_argument("--out", help="filter: the file to write")
    args = parse_args(ap, argv)
    if args.command == "filter":
        if not args.src or not args.out:
            ap.error("filter needs --src and --out")
        n = filter_modes(args.src, args.out, args.modes.split(","))
        print(f"kept {n} demos with first mode in {args.modes} -> {args.out}")
        return
    if not args.runs:
        ap.error("probe needs at least one run directory")
    for noise in args.noise.split(","):
        if noise not in ("fresh", "fixed"):
            ap.error(f"--noise: fresh or fixed, got {noise!r}")
    for r in args.runs:
        if not Path(r).exists():
            ap.error(f"{r}: no such run directory or checkpoint")
    labels = dict(s.split("=", 1) for s in args.label)
    path = RESULTS / "block_push_probe.json"
    rows = load_rows(path)
    for run in args.runs:
        for noise in args.noise.split(","):
            row = probe_run(run, args.episodes, noise, args.inference, args.samples)
            row["what"] = labels.get(run, "")
            key = (row["run"], row["noise"], row["inference"])
            rows = [r for r in rows if (r["run"], r["noise"], r["inference"]) != key] + [row]
            print({k: row[k] for k in ("run", "noise", "inference", "p1", "p2", "mean_p1_step", "mean_length",
                                       "mean_dist_to_nearest_law",
                                       "t0_dist_to_nearest_law", "t0_action_norm")}, flush=True)
    write_results("block_push_probe", {"test_seed0": TEST_SEED0}, rows, path)


if __name__ == "__main__":
    main()
