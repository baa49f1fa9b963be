"""Sequence windows ``(obs[n_obs_steps], action[horizon])`` with Diffusion Policy's edge padding.

A window starts at time ``s`` of an episode of length ``L`` and covers ``s .. s + horizon - 1``;
``s`` ranges over ``-pad_before .. L - horizon + pad_after`` with ``pad_before = n_obs_steps - 1``
and ``pad_after = n_action_steps - 1`` (Diffusion Policy's ``create_indices``); steps outside the
episode repeat its first / last step. Observations are the first ``n_obs_steps`` steps of the
window, actions all ``horizon`` steps, so ``action[n_obs_steps - 1]`` is the action taken at the
last observed step: a policy executes ``action[n_obs_steps - 1 : n_obs_steps - 1 + n_action_steps]``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from jumpflow.datasets.replay_buffer import ReplayBuffer, load_replay_buffer
from jumpflow.normalizer import Normalizer


def create_indices(episode_ends: np.ndarray, horizon: int, pad_before: int = 0, pad_after: int = 0,
                   episode_mask: np.ndarray | None = None) -> np.ndarray:
    """Window table ``(W, 4)`` int64: ``buffer_start, buffer_end, sample_start, sample_end``.

    ``buffer_*`` index the flat arrays; ``sample_*`` place that slice inside the ``horizon``-long
    window (the rest is edge padding).
    """
    rows = []
    start = 0
    for i, end in enumerate(np.asarray(episode_ends, dtype=np.int64)):
        length = int(end - start)
        if episode_mask is None or episode_mask[i]:
            s = np.arange(-pad_before, length - horizon + pad_after + 1, dtype=np.int64)
            if s.size:
                b0 = np.maximum(s, 0) + start
                b1 = np.minimum(s + horizon, length) + start
                off = b0 - (s + start)
                rows.append(np.stack([b0, b1, off, off + (b1 - b0)], axis=1))
        start = int(end)
    if not rows:
        return np.zeros((0, 4), dtype=np.int64)
    return np.concatenate(rows, axis=0)


def _gather(arr, idx: np.ndarray) -> np.ndarray:
    """``arr[idx]`` for a numpy or zarr array, reading one contiguous slice."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    return np.asarray(arr[lo:hi])[idx - lo]


class SequenceSampler:
    """Windows over a :class:`ReplayBuffer`: ``sample(i) -> {"obs": {k: (n_obs_steps, ...)}, "action": (horizon, A)}``.

    Images are returned channel-first ``(n_obs_steps, C, H, W)`` uint8; low-dim float32.
    """

    def __init__(self, buffer: ReplayBuffer, horizon: int = 16, n_obs_steps: int = 2, n_action_steps: int = 8,
                 episode_mask: np.ndarray | None = None):
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"need 1 <= n_obs_steps ({n_obs_steps}) <= horizon ({horizon})")
        if n_obs_steps - 1 + n_action_steps > horizon:
            raise ValueError(f"n_obs_steps - 1 + n_action_steps = {n_obs_steps - 1 + n_action_steps} "
                             f"exceeds horizon {horizon}")
        self.buffer = buffer
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.indices = create_indices(buffer.episode_ends, horizon, pad_before=n_obs_steps - 1,
                                      pad_after=n_action_steps - 1, episode_mask=episode_mask)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def sample(self, i: int) -> dict:
        b0, b1, s0, _ = (int(v) for v in self.indices[i])
        # window position p -> buffer index clamp(b0 - s0 + p, b0, b1 - 1): edge padding
        idx = np.clip(b0 - s0 + np.arange(self.horizon), b0, b1 - 1)
        action = _gather(self.buffer.data["action"], idx)
        obs_idx = idx[: self.n_obs_steps]
        obs = {}
        for k in self.buffer.obs_keys:
            w = _gather(self.buffer.data[k], obs_idx)
            if w.dtype == np.uint8 and w.ndim == 4:
                w = np.ascontiguousarray(np.moveaxis(w, -1, 1))          # (n, C, H, W)
            obs[k] = w
        return {"obs": obs, "action": action}


class RobomimicSequenceDataset(Dataset):
    """Torch dataset of windows from a robomimic HDF5 (through the cached zarr replay buffer).

    Args:
        path: robomimic ``.hdf5``.
        obs_keys: observation keys (low-dim and/or ``*_image``); unknown keys raise, listing those
            that exist.
        horizon, n_obs_steps, n_action_steps: window sizes (Diffusion Policy: 16, 2, 8).
        filter_key: demos of ``mask/<filter_key>`` only (``None``: all demos).
        cache_dir: zarr cache directory (default ``.jumpflow_cache/`` next to the file).
        val_ratio, seed: hold out this share of episodes (random, by ``seed``); :meth:`get_validation_dataset`.
        in_memory: load the buffer into RAM.

    Items: ``{"obs": {key: (n_obs_steps, D) float32 | (n_obs_steps, C, H, W) uint8},
    "action": (horizon, action_dim) float32}``; raw values: normalize with :meth:`get_normalizer`.
    """

    def __init__(self, path: str | os.PathLike, obs_keys, horizon: int = 16, n_obs_steps: int = 2,
                 n_action_steps: int = 8, filter_key: str | None = None,
                 cache_dir: str | os.PathLike | None = None, val_ratio: float = 0.0, seed: int = 42,
                 in_memory: bool = True, _buffer: ReplayBuffer | None = None, _mask: np.ndarray | None = None):
        self.path = path
        self.obs_keys = list(obs_keys)
        self.buffer = _buffer if _buffer is not None else load_replay_buffer(
            path, self.obs_keys, filter_key=filter_key, cache_dir=cache_dir, in_memory=in_memory)
        n_ep = self.buffer.n_episodes
        if _mask is None:
            val = np.zeros(n_ep, dtype=bool)
            n_val = round(val_ratio * n_ep)
            if val_ratio > 0 and n_ep > 1:
                n_val = min(max(n_val, 1), n_ep - 1)
                val[np.random.default_rng(seed).choice(n_ep, n_val, replace=False)] = True
            self.train_mask = ~val
        else:
            self.train_mask = _mask
        self.sampler = SequenceSampler(self.buffer, horizon, n_obs_steps, n_action_steps,
                                       episode_mask=self.train_mask)
        self._cfg = {"horizon": horizon, "n_obs_steps": n_obs_steps, "n_action_steps": n_action_steps}

    def get_validation_dataset(self) -> RobomimicSequenceDataset:
        return RobomimicSequenceDataset(self.path, self.obs_keys, **self._cfg, _buffer=self.buffer,
                                        _mask=~self.train_mask)

    @property
    def env_meta(self) -> dict:
        return self.buffer.env_meta

    @property
    def action_dim(self) -> int:
        return int(self.buffer.data["action"].shape[1])

    def shape_meta(self) -> dict:
        """``{"action": (A,), "obs": {key: per-step shape}}`` (images channel-first)."""
        obs = {}
        for k in self.obs_keys:
            s = tuple(self.buffer.data[k].shape[1:])
            obs[k] = (s[-1],) + s[:-1] if len(s) == 3 and self.buffer.data[k].dtype == np.uint8 else s
        return {"action": (self.action_dim,), "obs": obs}

    def get_normalizer(self, modes: dict | None = None) -> Normalizer:
        """Fit on the training episodes: ``action`` and low-dim obs with ``"limits"`` (-> [-1, 1]),
        ``*_image`` / uint8 keys with ``"image"`` (-> [0, 1]); ``modes`` overrides per key."""
        modes = dict(modes or {})
        rows = np.concatenate([np.arange(self.buffer.episode_slice(i).start, self.buffer.episode_slice(i).stop)
                               for i in range(self.buffer.n_episodes) if self.train_mask[i]])
        data = {"action": np.asarray(self.buffer.data["action"])[rows]}
        for k in self.obs_keys:
            arr = self.buffer.data[k]
            if arr.dtype == np.uint8:
                modes.setdefault(k, "image")
                data[k] = None
            else:
                data[k] = np.asarray(arr)[rows]
        norm = Normalizer()
        for k, v in data.items():
            norm.fit_key(k, v, modes.get(k, "limits"))
        return norm

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, i: int) -> dict:
        item = self.sampler.sample(i)
        return {"obs": {k: torch.from_numpy(v) for k, v in item["obs"].items()},
                "action": torch.from_numpy(item["action"])}
