"""Shared helpers of the robot data / simulation tests (the session fixtures that generate demos
live in conftest.py, so each is generated once per test session, not once per importing module)."""

from __future__ import annotations

import json

import numpy as np

LOWDIM = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]


def write_synthetic_robomimic(path, lengths=(5, 7, 4), action_dim=7, image_size: int | None = None,
                              nan_in: str | None = None, masks: bool = True) -> None:
    """A robomimic-layout HDF5 without the simulator. ``actions[t] = 100 * demo + t`` (all dims),
    ``obs/robot0_eef_pos[t] = (demo, t, -t)``, ``obs/object (T, 10)``; images filled with ``t``."""
    import h5py

    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for i, n in enumerate(lengths):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = n
            t = np.arange(n, dtype=np.float64)
            act = np.repeat((100.0 * i + t)[:, None], action_dim, axis=1)
            if nan_in == "actions" and i == len(lengths) - 1:
                act[n // 2, 0] = np.nan
            g.create_dataset("actions", data=act)
            g.create_dataset("states", data=np.zeros((n, 4)))
            g.create_dataset("rewards", data=np.zeros(n))
            g.create_dataset("dones", data=np.eye(1, n, n - 1, dtype=np.int64)[0])
            obs = g.create_group("obs")
            obs.create_dataset("robot0_eef_pos", data=np.stack([np.full(n, i), t, -t], axis=1))
            obs.create_dataset("robot0_eef_quat", data=np.tile([0.0, 0.0, 0.0, 1.0], (n, 1)))
            obs.create_dataset("robot0_gripper_qpos", data=np.stack([t, -t], axis=1) * 0.01)
            obs.create_dataset("object", data=np.arange(n * 10, dtype=np.float64).reshape(n, 10) + i)
            if image_size:
                img = np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None],
                                      (n, image_size, image_size, 3)).copy()
                obs.create_dataset("agentview_image", data=img)
            total += n
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        if masks:
            names = [f"demo_{i}" for i in range(len(lengths))]
            f.create_dataset("mask/train", data=np.array(names[:-1], dtype="S"))
            f.create_dataset("mask/valid", data=np.array(names[-1:], dtype="S"))


class ReplayPolicy:
    """Replays stored action sequences: episode ``e`` (row ``j`` of batch ``b``: ``e = b * n_envs + j``)
    gets ``actions[e]`` chunk by chunk; zeros after the end. ``predict_action -> (B, n_action_steps, A)``."""

    def __init__(self, actions: list[np.ndarray], n_envs: int, n_action_steps: int):
        self.actions, self.n_envs, self.k = actions, n_envs, n_action_steps
        self.batch = -1
        self.cursor = None
        self.seen_shapes = []

    def reset(self):
        self.batch += 1
        self.cursor = np.zeros(self.n_envs, dtype=int)

    def predict_action(self, obs_dict):
        b = next(iter(obs_dict.values())).shape[0]
        self.seen_shapes.append({k: (tuple(v.shape), str(v.dtype)) for k, v in obs_dict.items()})
        a_dim = self.actions[0].shape[1]
        out = np.zeros((b, self.k, a_dim), dtype=np.float32)
        for j in range(b):
            e = self.batch * self.n_envs + j
            if e < len(self.actions):
                seq = self.actions[e][self.cursor[j]: self.cursor[j] + self.k]
                out[j, : len(seq)] = seq
            self.cursor[j] += self.k
        return out
