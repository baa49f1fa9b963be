"""A zarr (v3) replay buffer built once from a robomimic HDF5 and cached by content.

Layout of a cache ``<cache_dir>/<stem>-<key>.zarr``::

    attrs: format, source, source_sha, obs_keys, filter_key, demo_names, env_meta
    meta/episode_ends    (E,) int64    exclusive end index of each episode in the flat arrays
    data/action          (N, A) float32
    data/obs/<key>       (N, D) float32 (low-dim) | (N, H, W, C) uint8 (images)

``<key>`` hashes the file's bytes, the obs keys, the filter key and the format version, so a
changed file or another key set gets its own cache. Conversion writes into a temporary
directory next to the cache and renames it into place only when complete: an interrupted or
failed conversion (bad input included) leaves no cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from jumpflow.datasets.robomimic import DatasetError, RobomimicFile
from jumpflow.io import atomic_directory

FORMAT_VERSION = 1
LOWDIM_CHUNK_ROWS = 1 << 14


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(block)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cache_path_for(hdf5_path: str | os.PathLike, obs_keys, filter_key: str | None = None,
                   cache_dir: str | os.PathLike | None = None, sha: str | None = None) -> Path:
    """Where the cache for this (file content, obs keys, filter key) lives."""
    p = Path(hdf5_path)
    sha = sha or file_sha256(p)
    spec = json.dumps({"sha": sha, "obs_keys": list(obs_keys), "filter_key": filter_key,
                       "format": FORMAT_VERSION}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir) if cache_dir is not None else p.parent / ".jumpflow_cache"
    return cache_dir / f"{p.stem}-{key}.zarr"


class ReplayBuffer:
    """Flat per-key arrays plus ``episode_ends``, loaded from a zarr cache.

    Attributes:
        episode_ends: ``(E,)`` int64.
        data: ``{"action": (N, A) float32, "obs/<key>": (N, ...)}``, numpy arrays when loaded in
            memory, zarr arrays otherwise (both index like numpy).
        obs_keys, env_meta, source, path.
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = True):
        import zarr

        self.path = Path(path)
        root = zarr.open_group(str(self.path), mode="r")
        attrs = dict(root.attrs)
        if attrs.get("format") != FORMAT_VERSION:
            raise DatasetError(f"{self.path}: replay-buffer cache has format {attrs.get('format')}, "
                               f"expected {FORMAT_VERSION}; delete it to rebuild")
        self.obs_keys = list(attrs["obs_keys"])
        self.env_meta = attrs.get("env_meta") or {}
        self.source = attrs.get("source")
        self.demo_names = list(attrs.get("demo_names", []))
        self.episode_ends = np.asarray(root["meta/episode_ends"][...], dtype=np.int64)
        self.data = {}
        arrays = {"action": root["data/action"]}
        for k in self.obs_keys:
            arrays[k] = root[f"data/obs/{k}"]
        for k, arr in arrays.items():
            self.data[k] = arr[...] if in_memory else arr

    @property
    def n_episodes(self) -> int:
        return int(self.episode_ends.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.episode_ends[-1]) if self.n_episodes else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(np.concatenate([[0], self.episode_ends]))

    def episode_slice(self, i: int) -> slice:
        start = 0 if i == 0 else int(self.episode_ends[i - 1])
        return slice(start, int(self.episode_ends[i]))

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.data.items()}
        return f"ReplayBuffer({self.path.name}, episodes={self.n_episodes}, steps={self.n_steps}, {shapes})"


def convert_hdf5_to_zarr(hdf5_path: str | os.PathLike, out: str | os.PathLike, obs_keys,
                         filter_key: str | None = None, sha: str | None = None) -> Path:
    """Convert the demos of a robomimic file to a zarr replay buffer at ``out`` (atomically).

    Every demo is validated (keys, lengths, NaN) before anything is renamed into place.
    """
    import zarr

    out = Path(out)
    with atomic_directory(out) as tmp, RobomimicFile(hdf5_path) as rf:
        demos = rf.demo_names(filter_key)
        if not demos:
            raise DatasetError(f"{hdf5_path}: no demos selected (filter key {filter_key!r})")
        rf.check_keys(obs_keys, demos)
        lengths = [rf.num_samples(d) for d in demos]
        n = int(sum(lengths))
        first = rf.read_demo(demos[0], obs_keys)
        root = zarr.open_group(str(tmp), mode="w")
        act_dim = first["action"].shape[1]
        arrays = {"action": root.create_array(
            "data/action", shape=(n, act_dim), dtype="float32",
            chunks=(min(n, LOWDIM_CHUNK_ROWS), act_dim))}
        for k in obs_keys:
            v = first["obs"][k]
            if v.dtype == np.uint8:
                chunks = (min(n, 64),) + v.shape[1:]
                dtype = "uint8"
            else:
                chunks = (min(n, LOWDIM_CHUNK_ROWS),) + v.shape[1:]
                dtype = "float32"
            arrays[k] = root.create_array(f"data/obs/{k}", shape=(n,) + v.shape[1:], dtype=dtype,
                                          chunks=chunks)
        # low-dim data is small: gather in memory and write once; images stream per demo
        lowdim = {k: [] for k, a in arrays.items() if a.dtype != np.uint8}
        ends, cursor = [], 0
        for i, d in enumerate(demos):
            ep = first if i == 0 else rf.read_demo(d, obs_keys)
            t = ep["action"].shape[0]
            if t == 0:
                raise DatasetError(f"{hdf5_path}: data/{d} is empty (0 steps)")
            for k, arr in arrays.items():
                v = ep["action"] if k == "action" else ep["obs"][k]
                if tuple(v.shape[1:]) != tuple(arr.shape[1:]):
                    raise DatasetError(f"{hdf5_path}: data/{d} {k} has per-step shape {v.shape[1:]}, "
                                       f"the first demo has {arr.shape[1:]}")
                if k in lowdim:
                    lowdim[k].append(v)
                else:
                    arrays[k][cursor:cursor + t] = v
            cursor += t
            ends.append(cursor)
        if cursor != n:            # num_samples attrs disagree with the arrays
            raise DatasetError(f"{hdf5_path}: num_samples attributes sum to {n} but the demos hold "
                               f"{cursor} steps")
        for k, parts in lowdim.items():
            arrays[k][...] = np.concatenate(parts, axis=0)
        root.create_array("meta/episode_ends", data=np.asarray(ends, dtype=np.int64))
        root.attrs.update({
            "format": FORMAT_VERSION, "source": str(Path(hdf5_path).resolve()),
            "source_sha": sha or "", "obs_keys": list(obs_keys), "filter_key": filter_key,
            "demo_names": demos, "env_meta": rf.env_meta,
        })
    return out


def load_replay_buffer(hdf5_path: str | os.PathLike, obs_keys, filter_key: str | None = None,
                       cache_dir: str | os.PathLike | None = None, in_memory: bool = True) -> ReplayBuffer:
    """The replay buffer of a robomimic file, converting it on first use (cached by content).

    Args:
        hdf5_path: robomimic ``.hdf5``.
        obs_keys: observation keys to keep (order kept).
        filter_key: ``mask/<filter_key>`` demos only (``None``: all demos).
        cache_dir: where caches live (default: ``.jumpflow_cache/`` next to the file).
        in_memory: load arrays into RAM (fast random access); else read lazily from zarr.
    """
    p = Path(hdf5_path)
    # validate cheaply first so bad input is reported before hashing
    RobomimicFile(p).close()
    sha = file_sha256(p)
    out = cache_path_for(p, obs_keys, filter_key, cache_dir, sha=sha)
    if not out.exists():
        convert_hdf5_to_zarr(p, out, obs_keys, filter_key, sha=sha)
    return ReplayBuffer(out, in_memory=in_memory)
