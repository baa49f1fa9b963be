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
    for name in ("states", "actions", "rewards", "dones"):
        grp.create_dataset(name, data=episode[name])
    for part in ("obs", "next_obs"):
        sub = grp.create_group(part)
        for k, v in episode[part].items():
            if v.dtype == np.uint8 and compress_images:
                sub.create_dataset(k, data=v, chunks=(1,) + v.shape[1:], compression="lzf")
            else:
                sub.create_dataset(k, data=v)


def record_episode(sim, act, obs: dict, seed: int, max_steps: int, model_file: str,
                   after_step=None) -> dict:
    """Step ``act(obs) -> action`` (clipped to [-1, 1]) in ``sim`` from ``obs`` until the first
    success or ``max_steps``; ``after_step()`` runs after each step. Returns the robomimic demo
    record: ``states (T, S)``, ``actions (T, A)``, ``rewards (T,)``, ``dones (T,)``, ``obs`` /
    ``next_obs`` ``{key: (T, ...)}``, ``model_file``, ``seed``, ``success``."""
    states, actions, rewards, obs_list = [], [], [], [obs]
    success = False
    for _ in range(max_steps):
        states.append(sim.get_state())
        a = np.clip(act(obs), -1.0, 1.0)
        obs, r, success = sim.step(a)
        actions.append(a)
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
    }


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
