"""Reader for robomimic-format HDF5 demonstration files (robomimic's published v1.4.1 and v1.5
datasets, and the files ``jumpflow-demos`` writes: one code path).

Layout read (see ``jumpflow.envs.demos``): ``data`` attrs ``env_args`` (JSON) and ``total``;
``data/demo_<i>/actions (T, A)``, ``obs/<key> (T, ...)``, ``states (T, S)``; optional
``mask/<filter>`` (demo names as bytes). Images are ``(T, H, W, 3)`` uint8.

Every problem with the input raises :class:`DatasetError` (a ``ValueError``) whose message
starts with the file path and says what is wrong: missing file, not HDF5, truncated / corrupt,
no ``data`` group, no demos, unknown obs key (listing the keys that exist), unknown filter key,
NaN / inf in actions or low-dim observations, mismatched lengths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file."""


def _demo_sort_key(name: str):
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


def is_image_key(key: str, arr_shape: tuple | None = None, dtype=None) -> bool:
    """``*_image`` keys, or any uint8 array of rank 4 ``(T, H, W, C)``, are image observations."""
    if key.endswith(("_image", "_rgb")):
        return True
    return arr_shape is not None and len(arr_shape) == 4 and dtype == np.uint8


class RobomimicFile:
    """Open and validate a robomimic HDF5 file.

    Args:
        path: the ``.hdf5`` file.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise DatasetError(f"{p}: dataset file does not exist")
        if p.is_dir():
            raise DatasetError(f"{p}: is a directory, expected a robomimic .hdf5 file")
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head != HDF5_SIGNATURE and not h5py.is_hdf5(str(p)):
            raise DatasetError(f"{p}: not an HDF5 file (no HDF5 signature); expected a robomimic .hdf5 dataset")
        try:
            self.f = h5py.File(p, "r")
        except OSError as e:
            raise DatasetError(f"{p}: cannot open HDF5 file, it is truncated or corrupt ({e})") from None
        try:
            if "data" not in self.f:
                raise DatasetError(f"{p}: no 'data' group (top-level groups: {sorted(self.f.keys())}); "
                                   "not a robomimic dataset")
            self.data = self.f["data"]
            self._demos = sorted((k for k in self.data if isinstance(self.data[k], h5py.Group)),
                                 key=_demo_sort_key)
        except DatasetError:
            self.f.close()
            raise
        except (OSError, RuntimeError, KeyError) as e:
            self.f.close()
            raise DatasetError(f"{p}: cannot read the 'data' group, the file is truncated or corrupt ({e})") from None
        if not self._demos:
            self.f.close()
            raise DatasetError(f"{p}: 'data' group holds no demos")

    # ---------------------------------------------------------------- context
    def close(self) -> None:
        try:
            self.f.close()
        except (OSError, RuntimeError, ValueError):     # already closed, or closing a broken file: nothing to release
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- metadata
    @property
    def env_meta(self) -> dict:
        """The ``env_args`` JSON as a dict (``{}`` if absent)."""
        raw = self.data.attrs.get("env_args")
        if raw is None:
            return {}
        if isinstance(raw, bytes):
            raw = raw.decode()
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.path}: data.attrs['env_args'] is not valid JSON ({e})") from None

    def filter_keys(self) -> list[str]:
        return sorted(self.f["mask"].keys()) if "mask" in self.f else []

    def demo_names(self, filter_key: str | None = None) -> list[str]:
        """Demo group names in index order, optionally those listed in ``mask/<filter_key>``."""
        if filter_key is None:
            return list(self._demos)
        if filter_key not in self.filter_keys():
            raise DatasetError(f"{self.path}: filter key {filter_key!r} not found; "
                               f"available masks: {self.filter_keys() or 'none'}")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in self.f["mask"][filter_key][()]]
        missing = [n for n in names if n not in self.data]
        if missing:
            raise DatasetError(f"{self.path}: mask/{filter_key} lists demos not in 'data': {missing[:5]}")
        return sorted(names, key=_demo_sort_key)

    def obs_keys(self, demo: str | None = None) -> list[str]:
        """Observation keys of a demo (the first by default)."""
        demo = demo or self._demos[0]
        g = self.data[demo]
        if "obs" not in g:
            raise DatasetError(f"{self.path}: data/{demo} has no 'obs' group")
        return sorted(g["obs"].keys())

    def shapes(self, obs_keys) -> dict:
        """``{key: (per-step shape, dtype)}`` for ``obs_keys`` and ``"action"``."""
        g = self.data[self._demos[0]]
        self.check_keys(obs_keys)
        out = {k: (tuple(g["obs"][k].shape[1:]), g["obs"][k].dtype) for k in obs_keys}
        out["action"] = (tuple(g["actions"].shape[1:]), g["actions"].dtype)
        return out

    def check_keys(self, obs_keys, demos=None) -> None:
        """Raise naming the file, demo and the existing keys if any of ``obs_keys`` is missing."""
        for demo in demos or self._demos[:1]:
            have = self.obs_keys(demo)
            missing = [k for k in obs_keys if k not in have]
            if missing:
                raise DatasetError(f"{self.path}: obs key(s) {missing} not found in data/{demo}/obs; "
                                   f"existing keys: {have}")

    def num_samples(self, demo: str) -> int:
        g = self.data[demo]
        n = g.attrs.get("num_samples")
        return int(n) if n is not None else int(g["actions"].shape[0])

    # ---------------------------------------------------------------- data
    def read_demo(self, demo: str, obs_keys, check_finite: bool = True) -> dict:
        """Read one demo.

        Returns:
            ``{"action": (T, A) float32, "obs": {key: (T, ...)}}``: low-dim obs float32, images
            uint8 ``(T, H, W, C)`` as stored.
        """
        g = self.data[demo]
        try:
            if "actions" not in g:
                raise DatasetError(f"{self.path}: data/{demo} has no 'actions' dataset (has {sorted(g.keys())})")
            action = np.asarray(g["actions"][()], dtype=np.float32)
            if "obs" not in g:
                raise DatasetError(f"{self.path}: data/{demo} has no 'obs' group")
            have = sorted(g["obs"].keys())
            missing = [k for k in obs_keys if k not in have]
            if missing:
                raise DatasetError(f"{self.path}: obs key(s) {missing} not found in data/{demo}/obs; "
                                   f"existing keys: {have}")
            obs = {}
            for k in obs_keys:
                arr = g["obs"][k][()]
                if arr.dtype != np.uint8:
                    arr = np.asarray(arr, dtype=np.float32)
                    if arr.ndim == 1:
                        arr = arr[:, None]
                obs[k] = arr
        except DatasetError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise DatasetError(f"{self.path}: cannot read data/{demo}, the file is truncated or corrupt ({e})") from None
        t = action.shape[0]
        if action.ndim != 2:
            raise DatasetError(f"{self.path}: data/{demo}/actions has shape {action.shape}, expected (T, action_dim)")
        for k, v in obs.items():
            if v.shape[0] != t:
                raise DatasetError(f"{self.path}: data/{demo}/obs/{k} has {v.shape[0]} steps but actions has {t}")
        if check_finite:
            bad = ~np.isfinite(action)
            if bad.any():
                rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
                raise DatasetError(f"{self.path}: data/{demo}/actions contains NaN or inf (rows {rows})")
            for k, v in obs.items():
                if v.dtype != np.uint8 and not np.isfinite(v).all():
                    rows = np.unique(np.nonzero(~np.isfinite(v))[0])[:5].tolist()
                    raise DatasetError(f"{self.path}: data/{demo}/obs/{k} contains NaN or inf (rows {rows})")
        return {"action": action, "obs": obs}

    def read_states(self, demo: str) -> tuple[np.ndarray, str | None]:
        """``(states (T, S) float64, model_file XML or None)`` of a demo (for replay)."""
        g = self.data[demo]
        if "states" not in g:
            raise DatasetError(f"{self.path}: data/{demo} has no 'states' dataset")
        xml = g.attrs.get("model_file")
        if isinstance(xml, bytes):
            xml = xml.decode()
        return np.asarray(g["states"][()], dtype=np.float64), xml


def get_env_meta(path: str | os.PathLike) -> dict:
    """``env_meta`` dict of a robomimic HDF5 file (its ``data.attrs["env_args"]``)."""
    with RobomimicFile(path) as rf:
        meta = rf.env_meta
    if not meta:
        raise DatasetError(f"{path}: data.attrs has no 'env_args'; cannot build the simulator")
    return meta
