"""The robomimic demo layout, written once for every demo generator (robosuite experts in
``jumpflow.envs.demos``, planar oracles in ``jumpflow.envs.planar_demos``): recording an episode
and writing its ``data/demo_<i>`` group (``states``, ``actions``, ``rewards``, ``dones``, ``obs``,
``next_obs``, attributes ``num_samples``, ``model_file``, ``seed``, ``success`` and any others)."""

from __future__ import annotations

import numpy as np


def write_demo(grp, episode: dict, compress_images: bool) -> None:
    """One ``data/demo_<i>`` group of the robomimic layout; ``episode["attrs"]`` become its attributes."""
    grp.attrs["num_samples"] = int(episode["actions"].shape[0])
    grp.attrs["model_file"] = episode["model_file"]
    grp.attrs["seed"] = int(episode["seed"])
    grp.attrs["success"] = bool(episode["success"])
    for key, value in episode.get("attrs", {}).items():      # the mh style's draws (none for ph)
        grp.attrs[key] = value
    for name in ("states", "actions", "rewards", "dones", "executed_actions"):
        if name in episode:                                   # executed_actions: clean-label oracles only
            grp.create_dataset(name, data=episode[name])
    for part in ("obs", "next_obs"):
        sub = grp.create_group(part)
        for k, v in episode[part].items():
            if v.dtype == np.uint8 and compress_images:
                sub.create_dataset(k, data=v, chunks=(1,) + v.shape[1:], compression="lzf")
            else:
                sub.create_dataset(k, data=v)


def record_episode(sim, act, obs: dict, seed: int, max_steps: int, model_file: str,
                   after_step=None, perturb=None) -> dict:
    """Step ``act(obs) -> action`` (clipped to [-1, 1]) in ``sim`` from ``obs`` until the first
    success or ``max_steps``; ``after_step()`` runs after each step. Returns the robomimic demo
    record: ``states (T, S)``, ``actions (T, A)``, ``rewards (T,)``, ``dones (T,)``, ``obs`` /
    ``next_obs`` ``{key: (T, ...)}``, ``model_file``, ``seed``, ``success``.

    ``perturb(action) -> executed`` (DART, Laskey et al. 2017): the simulator runs
    ``clip(perturb(action))`` while ``actions`` keeps the clean ``action`` as the label of the
    visited state; the record then also holds ``executed_actions (T, A)``, what to replay."""
    states, actions, rewards, obs_list, executed = [], [], [], [obs], []
    success = False
    for _ in range(max_steps):
        states.append(sim.get_state())
        a = np.clip(act(obs), -1.0, 1.0)
        run = a if perturb is None else np.clip(perturb(a), -1.0, 1.0)
        obs, r, success = sim.step(run)
        actions.append(a)
        executed.append(run)
        rewards.append(r)
        obs_list.append(obs)
        if after_step is not None:
            after_step()
        if success:
            break
    dones = np.zeros(len(actions), dtype=np.int64)
    dones[-1] = 1
    stacked = {k: np.stack([o[k] for o in obs_list]) for k in obs_list[0]}
    return {
        "states": np.stack(states), "actions": np.stack(actions).astype(np.float64),
        "rewards": np.asarray(rewards, dtype=np.float64), "dones": dones,
        "obs": {k: v[:-1] for k, v in stacked.items()}, "next_obs": {k: v[1:] for k, v in stacked.items()},
        "model_file": model_file, "seed": int(seed), "success": bool(success),
    } | ({} if perturb is None else {"executed_actions": np.stack(executed).astype(np.float64)})


def check_existing_demos(path, task_name: str, n_demos: int, image: bool) -> None:
    """An existing demo file may be reused only when it holds ``task_name``, at least ``n_demos``
    demos and (``image``) camera observations; otherwise one line says why (it is never
    overwritten)."""
    from jumpflow.datasets.robomimic import RobomimicFile

    with RobomimicFile(path) as rf:
        if rf.env_meta.get("env_name") != task_name:
            raise ValueError(f"{path}: existing file holds task {rf.env_meta.get('env_name')!r}, asked for "
                             f"{task_name!r}; remove it or choose another path")
        if len(rf.demo_names()) < n_demos:
            raise ValueError(f"{path}: existing file holds {len(rf.demo_names())} demos, asked for {n_demos}; "
                             "remove it to regenerate")
        if image and not any(k.endswith("_image") for k in rf.obs_keys()):
            raise ValueError(f"{path}: existing file has no image observations (keys {rf.obs_keys()}); "
                             "asked for image=True")


def write_demo_file(out, label: str, n_demos: int, seed: int, max_attempts: int, run_episode, env_meta: dict,
                    reject=None, valid_fraction: float = 0.1, compress_images: bool = False, progress: bool = True,
                    data_attrs: dict | None = None) -> dict:
    """Attempt episodes ``run_episode(seed + k)`` until ``n_demos`` are kept, then write the file
    atomically (``jumpflow.io.atomic_write``: nothing half-written; a shortfall writes nothing).

    ``reject(episode) -> None | reason`` decides (default: keep successes only); the ``data``
    group gets ``total``, ``env_args`` and ``data_attrs``; ``mask/train`` and ``mask/valid`` split
    the demos (``valid_fraction``, at least one of each when there are two or more).
    Returns ``{"attempts", "rejected": {reason: n}, "total", "names"}``."""
    import json
    import sys
    from pathlib import Path

    import h5py
    from tqdm import tqdm

    from jumpflow.io import atomic_write

    reject = reject or (lambda ep: None if ep["success"] else "failed")
    stats: dict = {"attempts": 0, "rejected": {}, "total": 0, "names": []}

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            bar = tqdm(total=n_demos, desc=f"{label} demos", unit="demo", disable=not progress, file=sys.stderr)
            while len(stats["names"]) < n_demos and stats["attempts"] < max_attempts:
                ep = run_episode(seed + stats["attempts"])
                stats["attempts"] += 1
                reason = reject(ep)
                if reason is not None:
                    stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1
                    continue
                demo = f"demo_{len(stats['names'])}"
                write_demo(data.create_group(demo), ep, compress_images)
                stats["names"].append(demo)
                stats["total"] += ep["actions"].shape[0]
                bar.update(1)
                bar.set_postfix(failed=sum(stats["rejected"].values()))
            bar.close()
            names = stats["names"]
            if len(names) < n_demos:
                raise RuntimeError(f"{label}: only {len(names)} of {n_demos} demos succeeded in {stats['attempts']} "
                                   f"attempts (seeds {seed}..{seed + stats['attempts'] - 1}); nothing written to {out}")
            data.attrs["total"] = int(stats["total"])
            data.attrs["env_args"] = json.dumps(env_meta)
            for key, value in (data_attrs or {}).items():
                data.attrs[key] = value
            n_valid = round(valid_fraction * len(names))
            n_valid = min(max(n_valid, 1 if valid_fraction > 0 else 0), len(names) - 1) if len(names) > 1 else 0
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array(names[: len(names) - n_valid], dtype="S"))
            mask.create_dataset("valid", data=np.array(names[len(names) - n_valid:], dtype="S"))

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(out), write)
    return stats


def check_generation_args(n_demos: int, camera_size: int, valid_fraction: float) -> None:
    """One-line errors for a demo generator's counts, before any simulator or file exists."""
    if n_demos < 1:
        raise ValueError(f"n_demos must be >= 1, got {n_demos}")
    if camera_size < 8:
        raise ValueError(f"camera_size must be >= 8 pixels, got {camera_size}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")


def demo_summary(out, task_name: str, stats: dict, seconds: float) -> dict:
    """The common part of a demo generator's summary from :func:`write_demo_file`'s stats."""
    n, attempts = len(stats["names"]), max(stats["attempts"], 1)
    failed = stats["rejected"].get("failed", 0)
    return {"path": str(out), "task": task_name, "n_demos": n, "n_attempts": stats["attempts"], "n_failed": failed,
            "success_rate": (stats["attempts"] - failed) / attempts, "seconds": seconds,
            "seconds_per_demo": seconds / max(n, 1), "total_samples": stats["total"]}
